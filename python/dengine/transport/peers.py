"""The gRPC peer transport: one long-lived message stream from this node to each peer.

Raft tolerates lost, duplicated and reordered messages, so the transport keeps it simple: each
peer has a bounded queue; a background task keeps one client stream open to the peer and drains
the queue into it, reconnecting with backoff when the peer is down. When a queue is full the
oldest messages are dropped (the protocol retransmits whatever matters).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from dengine._core import EntryBatch, SnapshotChunkError, SnapshotIntegrityError, count_protobuf_field
from dengine.logs import node_logger
from dengine.raft import Message
from dengine.transport.codec import (
    ReceivedChunk,
    Sender,
    TakesOutsider,
    UnknownSenderError,
    WireError,
    check_snapshot_header,
    from_wire,
    to_wire,
)
from dengine.v1 import raft_pb2, raft_pb2_grpc

if TYPE_CHECKING:
    from dengine.snapshotting import SnapshotManager


MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
PEER_CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    # Each attempt to reach a peer makes a new channel and backs off by itself (50 ms doubling
    # to 1 s). By default grpc shares one subchannel per address among a process's channels,
    # with a reconnect backoff of its own (1 s at first), which a new channel can inherit. In CI
    # runs a node started a moment before a peer did not reach it for 0.7-1.5 s, and the peer
    # missed a new leader's messages and a TimeoutNow; this backoff is the likely cause.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
SENDER_KEY = "dengine-sender"
"""Initial metadata of a message stream: the sending node's id. The receiver only uses it to
retry at once its own stream back to that node if it was waiting out a backoff (the node is
back); every message still carries, and is checked for, its sender and cluster."""
MAX_GUESTS = 16
"""At most this many senders outside the configuration are answered at once (see ``_welcome``)."""
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
REFUSAL_KEY = "dengine-refusal"
"""Trailing metadata key naming why a peer refused a stream (its value: :data:`UNKNOWN_SENDER`)."""
UNKNOWN_SENDER = "unknown-sender"
"""The refusal of a message from a node not in the receiver's configuration."""
_QUEUE_LIMIT = 4096
_MAX_BATCH_MESSAGES = 512
_QUEUE_BYTES = 256 << 20
"""Most bytes of messages waiting for one peer; the oldest go first beyond it (Raft sends again
what counts). A follower that acknowledges no append but answers every heartbeat is sent one
more batch per heartbeat, and a count alone would let that grow to gigabytes."""
_WARN_AFTER_S = 3.0
"""A peer that cannot be reached (UNAVAILABLE: down, or a failed TLS handshake) for this long is
warned about; shorter outages (a restart) stay at DEBUG."""
_WARN_EVERY_S = 60.0
"""At most one such warning per peer this often while it keeps failing."""
_UP_FOR_S = 30.0
"""A stream that lasted this long before failing was up: its failure starts a new outage."""
_MAX_BATCH_BYTES = 16 << 20
"""Most bytes of messages riding in one write (one larger message goes alone): a follower
catching up is sent a window of full appends at once, and together they could pass the 64 MiB
message limit, which would fail the stream and lose them all, again and again."""


_Parsed = TypeVar("_Parsed", raft_pb2.RaftBatch, raft_pb2.SnapshotHeader)


class _Outbox(asyncio.Queue[raft_pb2.RaftMessage | None]):
    """A peer's queue of messages (None: the stream using it ended), with about how many bytes
    they hold: each message's size is given with it (:meth:`push`), measured before it became
    protobuf (a ``ByteSize()`` of a large append costs about 10 µs)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.bytes = 0
        self.taken_size = 0  # the size of the message taken last
        self._sizes: collections.deque[int] = collections.deque()
        self._size_of_next = 0

    def push(self, item: raft_pb2.RaftMessage, size: int) -> None:
        self._size_of_next = size
        self.put_nowait(item)

    def _put(self, item: raft_pb2.RaftMessage | None) -> None:
        size, self._size_of_next = self._size_of_next, 0
        self._sizes.append(size)
        self.bytes += size
        super()._put(item)

    def _get(self) -> raft_pb2.RaftMessage | None:
        self.taken_size = self._sizes.popleft()
        self.bytes -= self.taken_size
        return super()._get()


def _wire_size(m: Message) -> int:
    """About how many bytes ``m`` takes on the wire: its entries, and a little for the rest."""
    entries = m.entries
    if isinstance(entries, EntryBatch):
        return entries.framed_bytes + 128
    return sum(len(e.data) + 32 for e in entries) + 128


class PeerTransport(raft_pb2_grpc.RaftServicer):
    """Sends this node's messages to its peers and hands incoming ones to ``on_message``."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        peers: Mapping[int, str],
        on_message: Callable[[Message], None],
        *,
        channel_credentials: Callable[[], grpc.ChannelCredentials | None] | None = None,
    ) -> None:
        """``channel_credentials`` makes the credentials of each new channel to a peer (None:
        plaintext): asked at every connection, so that rotated certificates are used."""
        self.node_id = node_id
        self._log = node_logger("dengine.transport", node_id)  # its lines carry node_id
        self.cluster_id = cluster_id
        self.peers = dict(peers)
        self.members = frozenset(self.peers) | {node_id}
        self.on_message = on_message
        self.credentials = channel_credentials
        # Per peer, the queue the current (or next) stream to it drains; None ends a stream's
        # request iterator (see _run_peer).
        self._queues: dict[int, _Outbox] = {}
        self._peer_tasks: dict[int, asyncio.Task[None]] = {}
        # Per peer whose stream is waiting out a backoff: set when the peer opens a stream to
        # this node, to end the wait.
        self._back: dict[int, asyncio.Event] = {}
        self._started = False
        self._closing = False
        self.rejected = 0
        self.snapshots: SnapshotManager | None = None
        self.sender = Sender()
        """What this node says of itself on every message (its configuration and address)."""
        self.takes_outsider: TakesOutsider | None = None
        """Set by the node: decides on senders outside its configuration (None: refuse them)."""
        # Senders outside the configuration this node answers, and when each was last heard.
        self._guests: dict[int, float] = {}
        self.on_unknown_to: Callable[[int], None] | None = None
        """Called with a peer's id when it refuses this node's messages as coming from a node
        not in its configuration (see ``dengine.removal``)."""
        self.on_grpc_error: Callable[[str, grpc.StatusCode], None] | None = None
        """Set by the node (``NodeMetrics.grpc_error``): called with the method and the status of
        every peer call this node refuses (``Messages``, ``OfferSnapshot``, ``InstallSnapshot``)
        and of every stream to a peer that fails (``Messages/out``)."""

    def _count_error(self, method: str, code: grpc.StatusCode) -> None:
        if self.on_grpc_error is not None:
            self.on_grpc_error(method, code)

    # --- sending ------------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._start_peers()

    def _start_peers(self) -> None:
        for peer in self.peers:
            if peer != self.node_id and peer not in self._queues:
                self._queues[peer] = _Outbox()
                self._peer_tasks[peer] = asyncio.create_task(self._run_peer(peer), name=f"peer-{peer}")

    def set_peers(self, peers: Mapping[int, str]) -> None:
        """Follows a membership change: streams to new members, stops streaming to removed ones,
        and accepts messages from exactly the new set (plus this node, plus the outsiders the
        core takes, see ``dengine.transport.codec``). Outsiders this node still streams to stay
        until they are members or fall silent (:meth:`expire_guests`)."""
        for peer in [g for g in self._guests if g in peers]:
            del self._guests[peer]
        self._stream_to({**{g: self.peers[g] for g in self._guests}, **peers})
        self.members = frozenset(peers) | {self.node_id}

    def _welcome(self, peer: int, address: str) -> bool:
        """``peer``, outside this node's configuration, sent a message the core takes: answer it
        at ``address`` (the core answers on streams of its own). False when this node already
        answers as many outsiders as it ever will (the message is then refused)."""
        if peer not in self._guests and len(self._guests) >= MAX_GUESTS:
            return False
        self._guests[peer] = time.monotonic()
        if self.peers.get(peer) != address:
            self._log.warning(
                "node %d: taking messages from node %d, which is not in this node's configuration: it "
                "leads or campaigns under a configuration this node has not reached; answering it at %s",
                self.node_id,
                peer,
                address,
            )
            self._stream_to({**self.peers, peer: address})
        return True

    def expire_guests(self, silent_for_s: float) -> None:
        """Stops answering outsiders not heard from for ``silent_for_s`` seconds."""
        since = time.monotonic() - silent_for_s
        gone = {g for g, heard in self._guests.items() if heard < since}
        if gone:
            for g in gone:
                del self._guests[g]
            self._stream_to({p: a for p, a in self.peers.items() if p not in gone})

    def _stream_to(self, peers: Mapping[int, str]) -> None:
        peers = dict(peers)
        for peer in set(self._queues) - set(peers):
            self._queues.pop(peer)
            task = self._peer_tasks.pop(peer, None)
            if task is not None:
                task.cancel()
        changed = {p for p, a in peers.items() if self.peers.get(p) != a and p in self._queues}
        self.peers = peers
        for peer in changed:  # a member that moved: reconnect to its new address
            task = self._peer_tasks.pop(peer, None)
            if task is not None:
                task.cancel()
            self._queues.pop(peer, None)
        if self._started:
            self._start_peers()

    def send(self, m: Message) -> None:
        q = self._queues.get(m.dst)
        if q is None:
            return
        size = _wire_size(m)
        # Drop the oldest beyond the limits: the peer is far behind, down, or not reading.
        while q.qsize() >= _QUEUE_LIMIT or (q.qsize() and q.bytes + size > _QUEUE_BYTES):
            q.get_nowait()
        q.push(to_wire(m, self.cluster_id, self.sender), size)

    async def _outgoing(self, q: _Outbox) -> AsyncIterator[raft_pb2.RaftBatch]:
        carried: raft_pb2.RaftMessage | None = None  # taken, but left for the next batch
        while True:
            first = carried if carried is not None else await q.get()
            carried = None
            if first is None:
                return
            batch = raft_pb2.RaftBatch()
            # Each message goes in through add().CopyFrom: building the batch from a list of
            # messages (or appending one) copies a message that carries a large append far more
            # slowly, 100-250 us for 160 KB of entries against 4 us.
            add = batch.messages.add
            add().CopyFrom(first)
            size = q.taken_size
            # Whatever else queued up while the previous write was in flight rides along.
            while not q.empty() and len(batch.messages) < _MAX_BATCH_MESSAGES:
                m = q.get_nowait()
                if m is None:
                    return
                size += q.taken_size
                if size > _MAX_BATCH_BYTES:
                    carried = m
                    break
                add().CopyFrom(m)
            yield batch

    def channel(self, address: str) -> grpc.aio.Channel:
        """A new channel to ``address`` with this node's credentials and limits."""
        credentials = self.credentials() if self.credentials is not None else None
        if credentials is not None:
            return grpc.aio.secure_channel(address, credentials, options=PEER_CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)

    async def _run_peer(self, peer: int) -> None:
        q = self._queues[peer]
        backoff = _FIRST_BACKOFF_S
        sender = ((SENDER_KEY, str(self.node_id)),)
        outage = _Outage()
        while not self._closing and peer in self.peers:
            started = time.monotonic()
            try:
                async with self.channel(self.peers[peer]) as channel:
                    stub = raft_pb2_grpc.RaftStub(channel)  # type: ignore[no-untyped-call]
                    await stub.Messages(self._outgoing(q), metadata=sender)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self._count_error("Messages/out", exc.code())
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED):
                    self._report_failure(peer, exc, outage, started)
                elif exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    self._log.warning(
                        "node %d: peer %d refused our messages: %s",
                        self.node_id,
                        peer,
                        exc.details(),
                    )
                    if self.on_unknown_to is not None and _refused_as_unknown(exc):
                        self.on_unknown_to(peer)
                else:
                    self._log.debug(
                        "node %d: stream to peer %d ended: %s",
                        self.node_id,
                        peer,
                        exc.code(),
                    )
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED):
                    outage.since = None
            except Exception:
                outage.since = None
                self._count_error("Messages/out", grpc.StatusCode.UNKNOWN)
                self._log.exception("node %d: stream to peer %d failed", self.node_id, peer)
            finally:
                # grpc leaves a failed stream's request iterator waiting on its queue: sharing
                # the queue with the next stream, it would take (and lose) the next message,
                # one per failed attempt, so that a peer back after a minute's outage would miss
                # the first sixty messages sent to it, a new election's votes among them. So each
                # stream has a queue of its own, and the old one is told to stop. What it still
                # holds is stale: Raft resends what counts.
                q.put_nowait(None)
            if self._queues.get(peer) is not q:
                return  # the peer left, or moved: set_peers started another task
            q = self._queues[peer] = _Outbox()
            await self._pause(peer, backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _report_failure(self, peer: int, exc: grpc.aio.AioRpcError, outage: _Outage, started: float) -> None:
        """Logs a stream to ``peer`` that failed as unreachable (UNAVAILABLE: the peer is down, or
        the TLS handshake failed: wrong host name, unknown CA, expired certificate) or refused
        this node's certificate (PERMISSION_DENIED). A restart's short outage stays at DEBUG; a
        failure that lasts gets a WARNING, at most once per peer per :data:`_WARN_EVERY_S`."""
        now = time.monotonic()
        if outage.since is None or now - started >= _UP_FOR_S:
            outage.since = now  # a new outage (the stream before this one was up)
        lasting = now - outage.since >= _WARN_AFTER_S or exc.code() is grpc.StatusCode.PERMISSION_DENIED
        if lasting and (outage.warned is None or now - outage.warned >= _WARN_EVERY_S):
            outage.warned = now
            self._log.warning(
                "node %d: cannot stream to peer %d at %s for %.0f s: %s: %s (retrying; warned again "
                "in %.0f s if it still fails)",
                self.node_id,
                peer,
                self.peers.get(peer, "?"),
                now - outage.since,
                exc.code().name,
                exc.details(),
                _WARN_EVERY_S,
            )
        else:
            self._log.debug(
                "node %d: stream to peer %d ended: %s: %s",
                self.node_id,
                peer,
                exc.code().name,
                exc.details(),
            )

    async def _pause(self, peer: int, seconds: float) -> None:
        """Waits ``seconds`` before the next attempt to reach ``peer``, or until it opens a stream
        to this node: a node restarted after an outage of a second or more would otherwise wait
        up to the longest backoff for its peers' messages (a follower's catch-up, a vote)."""
        back = self._back[peer] = asyncio.Event()
        try:
            await asyncio.wait_for(back.wait(), seconds)
        except asyncio.TimeoutError:  # not TimeoutError: the two differ before Python 3.11
            pass
        finally:
            if self._back.get(peer) is back:
                del self._back[peer]

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._peer_tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._peer_tasks.clear()

    # --- receiving (the gRPC servicer) ----------------------------------------------------------

    async def _admit(self, context: Any, method: str) -> None:
        """Refuses the call with PERMISSION_DENIED unless its caller may speak the peer protocol.

        Under TLS with client certificates, only a node certificate may: one that allows
        ``serverAuth``, as every node's must (it serves with it, and presents it to its peers).
        A client certificate (``clientAuth`` only) is refused, whatever its names, so a
        certificate handed out for the CLI cannot forge appends or snapshots. A caller without a
        certificate gets here only without ``tls.client_auth`` (or without TLS): the service is
        then open to whoever reaches the port. Checked once per call (``Messages`` is one long
        stream), not per message.
        """
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            return
        from dengine.tls import allows_server_auth  # noqa: PLC0415 - cryptography only with TLS

        if allows_server_auth(pems[0]):
            return
        names = context.auth_context().get("x509_common_name") or [b"?"]
        why = (
            f"the certificate of {names[0].decode(errors='replace')!r} does not allow serverAuth: it "
            "is not a node certificate, and only nodes may call the Raft service"
        )
        self.rejected += 1
        self._log.warning(
            "node %d: refused a Raft %s call from %s: %s",
            self.node_id,
            method,
            context.peer(),
            why,
        )
        self._count_error(method, grpc.StatusCode.PERMISSION_DENIED)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        raise AssertionError("unreachable")

    async def _parse(self, data: bytes, kind: type[_Parsed], context: Any, method: str) -> _Parsed:
        """``data`` as a ``kind`` message; bytes that are not one get INVALID_ARGUMENT."""
        try:
            return kind.FromString(data)
        except DecodeError as exc:
            await self._refuse(context, WireError(f"not a {kind.DESCRIPTOR.name} message: {exc}"), method)

    async def _messages_bytes(
        self, request_iterator: AsyncIterator[bytes], context: Any
    ) -> raft_pb2.StreamClosed:
        """:meth:`Messages` served with raw bytes (see :func:`add_raft_service`)."""

        async def parsed() -> AsyncIterator[raft_pb2.RaftBatch]:
            async for data in request_iterator:
                # Counted before it is parsed: millions of empty messages (two bytes each) would
                # hold the loop for seconds, past an election timeout, before any check.
                count = count_protobuf_field(data, 1, _MAX_BATCH_MESSAGES)
                if count is not None and count > _MAX_BATCH_MESSAGES:
                    too_many = f"at most {_MAX_BATCH_MESSAGES} messages go in one batch"
                    await self._refuse(context, WireError(too_many), "Messages")
                yield await self._parse(data, raft_pb2.RaftBatch, context, "Messages")

        return await self.Messages(parsed(), context)

    async def Messages(
        self, request_iterator: AsyncIterator[raft_pb2.RaftBatch], context: Any
    ) -> raft_pb2.StreamClosed:
        await self._admit(context, "Messages")
        self._opened_by(context)
        async for batch in request_iterator:
            if len(batch.messages) > _MAX_BATCH_MESSAGES:
                # A node sends at most that many together; millions in one message (64 MiB of
                # small ones) would hold the loop for seconds, long enough for an election.
                await self._refuse(
                    context,
                    WireError(f"a batch of {len(batch.messages)} messages; at most {_MAX_BATCH_MESSAGES}"),
                    "Messages",
                )
            for w in batch.messages:
                try:
                    m = from_wire(
                        w,
                        cluster_id=self.cluster_id,
                        me=self.node_id,
                        members=self.members,
                        takes_outsider=self.takes_outsider,
                    )
                    if m.src not in self.members and not self._welcome(m.src, w.from_address):
                        raise UnknownSenderError(
                            f"message from unknown node {m.src}: this node already answers "
                            f"{MAX_GUESTS} nodes outside its configuration"
                        )
                except WireError as exc:
                    await self._refuse(context, exc, "Messages")
                self.on_message(m)
        return raft_pb2.StreamClosed()

    def _opened_by(self, context: Any) -> None:
        """A peer opened a message stream to this node: it is up, so a stream back to it that
        waits out a backoff tries again now."""
        for key, value in context.invocation_metadata() or ():
            if key == SENDER_KEY:
                # An id is at most 20 digits; a longer run of digits is no id (and int() of one
                # over 4,300 digits raises).
                back = self._back.get(int(value)) if value.isdigit() and len(value) <= 20 else None
                if back is not None:
                    back.set()
                return

    async def _refuse(self, context: Any, exc: WireError, method: str) -> NoReturn:
        self.rejected += 1
        code = (
            grpc.StatusCode.FAILED_PRECONDITION
            if isinstance(exc, UnknownSenderError) or "cluster" in str(exc)
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        self._log.warning(
            "node %d: refused a peer message: %s (peer %s)",
            self.node_id,
            exc,
            context.peer(),
        )
        marked = ((REFUSAL_KEY, UNKNOWN_SENDER),) if isinstance(exc, UnknownSenderError) else ()
        self._count_error(method, code)
        await context.abort(code, str(exc), trailing_metadata=marked)
        raise AssertionError("unreachable") from exc

    def _receiver(self) -> SnapshotManager:
        if self.snapshots is None:
            raise WireError("this node does not take snapshots")
        return self.snapshots

    def _check_header(self, h: raft_pb2.SnapshotHeader) -> None:
        check_snapshot_header(
            h,
            cluster_id=self.cluster_id,
            me=self.node_id,
            members=self.members,
            takes_outsider=self.takes_outsider,
        )

    async def _offer_bytes(self, request: bytes, context: Any) -> raft_pb2.SnapshotOfferResponse:
        """:meth:`OfferSnapshot` served with raw bytes (see :func:`add_raft_service`)."""
        await self._admit(context, "OfferSnapshot")
        return await self._offer(
            await self._parse(request, raft_pb2.SnapshotHeader, context, "OfferSnapshot"), context
        )

    async def OfferSnapshot(
        self, request: raft_pb2.SnapshotHeader, context: Any
    ) -> raft_pb2.SnapshotOfferResponse:
        await self._admit(context, "OfferSnapshot")
        return await self._offer(request, context)

    async def _offer(self, request: raft_pb2.SnapshotHeader, context: Any) -> raft_pb2.SnapshotOfferResponse:
        try:
            self._check_header(request)
            return await self._receiver().offer(request)
        except WireError as exc:
            await self._refuse(context, exc, "OfferSnapshot")
            raise

    async def InstallSnapshot(
        self, request_iterator: AsyncIterator[bytes], context: Any
    ) -> raft_pb2.InstallSnapshotResponse:
        """Receives a snapshot's chunks, each as the serialized message (see :func:`add_raft_service`)."""
        await self._admit(context, "InstallSnapshot")

        async def checked() -> AsyncIterator[ReceivedChunk]:
            async for message in request_iterator:
                chunk = ReceivedChunk.parse(message)
                self._check_header(chunk.header)
                yield chunk

        try:
            return await self._receiver().receive(checked())
        except WireError as exc:
            await self._refuse(context, exc, "InstallSnapshot")
            raise
        except (ValueError, SnapshotChunkError) as exc:
            self._log.warning(
                "node %d: refused a snapshot chunk: %s (peer %s)",
                self.node_id,
                exc,
                context.peer(),
            )
            self._count_error("InstallSnapshot", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        except SnapshotIntegrityError as exc:
            self._log.error(
                "node %d: a received snapshot failed verification: %s (peer %s)",
                self.node_id,
                exc,
                context.peer(),
            )
            self._count_error("InstallSnapshot", grpc.StatusCode.DATA_LOSS)
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            raise


def add_raft_service(server: grpc.aio.Server, transport: PeerTransport) -> None:
    """Serves ``transport`` as the ``dengine.v1.Raft`` service. Unlike the generated
    ``add_RaftServicer_to_server``, every method takes its messages as raw bytes and parses them
    itself: bytes that are not the message get INVALID_ARGUMENT (a deserializer's failure would
    be UNKNOWN), and a snapshot chunk's data goes from the received buffer to disk without being
    copied out of it."""
    handlers = {
        "Messages": grpc.stream_unary_rpc_method_handler(
            transport._messages_bytes,
            request_deserializer=None,
            response_serializer=raft_pb2.StreamClosed.SerializeToString,
        ),
        "OfferSnapshot": grpc.unary_unary_rpc_method_handler(
            transport._offer_bytes,
            request_deserializer=None,
            response_serializer=raft_pb2.SnapshotOfferResponse.SerializeToString,
        ),
        "InstallSnapshot": grpc.stream_unary_rpc_method_handler(
            transport.InstallSnapshot,
            request_deserializer=None,
            response_serializer=raft_pb2.InstallSnapshotResponse.SerializeToString,
        ),
    }
    service = raft_pb2.DESCRIPTOR.services_by_name["Raft"]
    # A method added to raft.proto must be served here too: fail at startup, not at the first call.
    assert set(handlers) == {m.name for m in service.methods}, "add_raft_service is behind raft.proto"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class _Outage:
    """A peer's current run of failed streams (see :meth:`PeerTransport._report_failure`)."""

    def __init__(self) -> None:
        self.since: float | None = None  # when the run began (None: the last stream did not fail so)
        self.warned: float | None = None  # when it was last warned about


def _refused_as_unknown(exc: grpc.aio.AioRpcError) -> bool:
    return any(k == REFUSAL_KEY and v == UNKNOWN_SENDER for k, v in exc.trailing_metadata() or ())
