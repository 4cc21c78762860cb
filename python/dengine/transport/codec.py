"""Conversion between the core's :class:`~dengine.raft.Message` and the wire's RaftMessage.

Entries cross as one bytes field framed by the Rust core (CRC-checked on arrival). Everything
from the network is validated here before the protocol sees it: an unknown type, a sender that is
not a member, a message for another node or another cluster is refused with a clear reason.

A sender outside the receiver's configuration is refused unless the receiver's core takes it
(``dengine.raft.Raft.takes_outsider``: a member added while the receiver was down, which may well
lead the cluster by the time the receiver is back; a member whose removal the receiver has not
committed). Such a sender must act as a leader or a candidate would (an append, a heartbeat, a
vote request, a TimeoutNow, a snapshot), name the configuration it acts under (:class:`Sender`)
and, on the message stream, the address to answer it at.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from dengine._core import Entry, EntryBatch, SnapshotChunkError, encode_entries, split_snapshot_chunk
from dengine.raft import Message, MsgType
from dengine.raft.membership import ConfChangeError, check_address
from dengine.v1 import raft_pb2

_MAX_U63 = (1 << 63) - 1


class WireError(ValueError):
    """A peer message was refused; the text says why (it is logged and returned to the sender)."""


class UnknownSenderError(WireError):
    """A peer message from a node that is not in the receiver's configuration: a removed member,
    or one whose addition the receiver has not appended yet (see ``dengine.removal``)."""


@dataclass(frozen=True, slots=True)
class Sender:
    """What a node says of itself on every message: its configuration's log position
    (``dengine.raft.Raft.conf_id``) and the address it takes peer streams on."""

    conf_index: int = 0
    conf_term: int = 0
    address: str = ""


TakesOutsider = Callable[[int, int, int], bool]
"""``takes_outsider(src, conf_index, conf_term)``: whether the receiver takes messages from
``src``, which is not in its configuration; see ``dengine.raft.Raft.takes_outsider``."""

# What an outsider may send: what a leader or a candidate sends to a node it counts as a member.
_OUTSIDER_TYPES = frozenset(
    int(t) for t in (MsgType.APP, MsgType.HEARTBEAT, MsgType.VOTE, MsgType.PRE_VOTE, MsgType.TIMEOUT_NOW)
)


def to_wire(m: Message, cluster_id: str, sender: Sender = Sender()) -> raft_pb2.RaftMessage:
    return raft_pb2.RaftMessage(
        cluster_id=cluster_id,
        type=int(m.type),  # type: ignore[arg-type]
        to=m.dst,
        term=m.term,
        index=m.index,
        log_term=m.log_term,
        commit=m.commit,
        reject=m.reject,
        reject_hint=m.reject_hint,
        context=m.context,
        entries=encode_entries(m.entries) if m.entries else b"",
        payloads=list(m.payloads),
        conf_index=sender.conf_index,
        conf_term=sender.conf_term,
        from_address=sender.address,
        **{"from": m.src},
    )


def _check_route(
    w: raft_pb2.RaftMessage | raft_pb2.SnapshotHeader,
    cluster_id: str,
    me: int,
    members: Collection[int],
    takes_outsider: TakesOutsider | None,
) -> int:
    if w.cluster_id != cluster_id:
        raise WireError(f"message from cluster {w.cluster_id!r}, this node belongs to {cluster_id!r}")
    src: int = getattr(w, "from")
    if src not in members and not _outsider_taken(w, src, takes_outsider):
        raise UnknownSenderError(
            f"message from unknown node {src}: not a member of this node's configuration"
        )
    if w.to != me:
        raise WireError(f"message for node {w.to} reached node {me}")
    return src


def _outsider_taken(
    w: raft_pb2.RaftMessage | raft_pb2.SnapshotHeader, src: int, takes_outsider: TakesOutsider | None
) -> bool:
    if takes_outsider is None or w.conf_index > _MAX_U63 or w.conf_term > w.term:
        return False  # a configuration is made in its maker's term or before
    if isinstance(w, raft_pb2.RaftMessage) and not _answerable(w):
        return False
    return takes_outsider(src, w.conf_index, w.conf_term)


def _answerable(w: raft_pb2.RaftMessage) -> bool:
    """Whether ``w`` is what a leader or a candidate sends, with an address to answer it at."""
    return w.type in _OUTSIDER_TYPES and _dialable(w.from_address)


def _dialable(address: str) -> bool:
    if not address or len(address) > 255:
        return False
    try:
        check_address(address)
    except ConfChangeError:
        return False
    return True


def check_snapshot_header(
    h: raft_pb2.SnapshotHeader,
    *,
    cluster_id: str,
    me: int,
    members: Collection[int],
    takes_outsider: TakesOutsider | None = None,
) -> None:
    """Refuses a snapshot offer or chunk that is misrouted or makes no sense."""
    _check_route(h, cluster_id, me, members, takes_outsider)
    for name in ("term", "index", "log_term", "size"):
        if getattr(h, name) > _MAX_U63:
            raise WireError(f"{name} {getattr(h, name)} is out of range")
    if not (h.term and h.index and h.log_term and h.size):
        raise WireError("a snapshot needs a term, an index, a log term and a size")
    if len(h.sha256) != 32:
        raise WireError(f"a snapshot's sha256 must be 32 bytes, got {len(h.sha256)}")


def from_wire(
    w: raft_pb2.RaftMessage,
    *,
    cluster_id: str,
    me: int,
    members: Collection[int],
    takes_outsider: TakesOutsider | None = None,
) -> Message:
    """The core's message for ``w``; :class:`WireError` if it is refused. ``takes_outsider``
    (None: refuse every sender outside ``members``) decides on a sender outside them."""
    src = _check_route(w, cluster_id, me, members, takes_outsider)
    try:
        kind = MsgType(w.type)
    except ValueError:
        raise WireError(f"unknown message type {w.type}") from None
    if kind is MsgType.SNAPSHOT:
        raise WireError("snapshots travel through InstallSnapshot, not the message stream")
    for name in ("term", "index", "log_term", "commit", "reject_hint", "context"):
        if getattr(w, name) > _MAX_U63:
            raise WireError(f"{name} {getattr(w, name)} is out of range")
    entries: Sequence[Entry] = ()
    framed = w.entries  # read once: every read of a protobuf bytes field copies it
    if framed:
        # Kept framed: the follower appends the records as they came, without an object each.
        try:
            entries = batch = EntryBatch.from_bytes(framed)
        except ValueError as exc:
            raise WireError(f"damaged entries: {exc}") from None
        if kind is MsgType.APP and batch.first_index != w.index + 1:
            raise WireError(f"entries start at {batch.first_index}, not after index {w.index}")
    return Message(
        kind,
        src,
        me,
        w.term,
        index=w.index,
        log_term=w.log_term,
        entries=entries,
        commit=w.commit,
        reject=w.reject,
        reject_hint=w.reject_hint,
        context=w.context,
        payloads=tuple(w.payloads),
    )


@dataclass(frozen=True, slots=True)
class ReceivedChunk:
    """A snapshot chunk as it arrived. Its bytes are ``buffer[start:start + length]``: the
    serialized message itself, so that large chunks are never copied out of it on their way to
    disk (every read of a protobuf bytes field makes a copy)."""

    header: raft_pb2.SnapshotHeader
    offset: int
    crc32c: int
    buffer: bytes
    start: int
    length: int

    @classmethod
    def parse(cls, message: bytes) -> ReceivedChunk:
        """Reads a serialized ``SnapshotChunk``; a malformed one is a :class:`WireError`."""
        try:
            header, offset, crc32c, start, length = split_snapshot_chunk(message)
            return cls(raft_pb2.SnapshotHeader.FromString(header), offset, crc32c, message, start, length)
        except (SnapshotChunkError, DecodeError) as exc:
            raise WireError(f"a malformed snapshot chunk: {exc}") from None

    @classmethod
    def of(cls, chunk: raft_pb2.SnapshotChunk) -> ReceivedChunk:
        """The same, from a message already decoded."""
        data = chunk.data
        return cls(chunk.header, chunk.offset, chunk.crc32c, data, 0, len(data))
