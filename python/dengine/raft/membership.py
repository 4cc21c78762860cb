"""Membership changes: one server at a time (Raft thesis §4.1), as log entries.

Why single-server changes rather than joint consensus: every operation an operator needs (add a
learner, promote it, remove a member; replacing a node is add + promote + remove) changes one
server, and the majorities of two configurations that differ by one voter always overlap, so no
intermediate joint configuration is needed. The price is that only one change may be in flight:
the leader refuses a new one until the previous one is applied, and until an entry of its own
term has committed (which closes the known hole in single-server changes across leader changes).

Each change entry carries the whole configuration it produces (voters, learners and every
member's address), computed by the leader from the configuration in force. A node adopts it as
soon as the entry is in its log, committed or not, and drops it again if the entry is truncated
(thesis §4.1). A node that joins with an empty log learns the whole cluster from the entry that
added it, and snapshots carry the configuration across log compaction and restarts. (Before that
entry, a joining node knows no configuration: it takes no snapshot there.) Learners
receive the log but neither vote nor count towards commitment.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "ConfChange",
    "ConfChangeError",
    "ConfChangePendingError",
    "ConfOp",
    "check",
    "check_address",
    "check_replacement",
    "decode",
    "encode",
    "propose",
]

_HEAD = struct.Struct("<BBQQHHH")  # kind byte, op, node id, nonce, voters, learners, addresses
_ID = struct.Struct("<Q")
_ADDR = struct.Struct("<QH")
MAX_ADDRESS_BYTES = 1024
MAX_MEMBERS = 1024


class ConfOp(enum.IntEnum):
    """What a membership change does. Values are stable: they are written in the log."""

    ADD_LEARNER = 1
    PROMOTE = 2
    REMOVE = 3
    RECOVER = 4
    """Written by ``dengine recover`` into a stopped survivor's log, never proposed: the cluster
    lost a majority of its voters for good, and this node is now its only voter
    (:mod:`dengine.recovery`)."""


class ConfChangeError(ValueError):
    """A membership change was refused; the message says why."""


class ConfChangePendingError(ConfChangeError):
    """Refused for now: an earlier change or the new leader's first entry is not committed yet.
    Retrying shortly succeeds."""


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change and the configuration it produces.

    ``nonce`` tells two otherwise equal requests apart, so the node that proposed one knows
    when *its* entry was applied.
    """

    op: ConfOp
    node_id: int
    voters: frozenset[int]
    learners: frozenset[int] = frozenset()
    addresses: Mapping[int, str] = field(default_factory=dict)
    nonce: int = 0


def propose(
    op: ConfOp,
    node_id: int,
    voters: frozenset[int],
    learners: frozenset[int],
    addresses: Mapping[int, str],
    *,
    address: str = "",
    nonce: int = 0,
) -> ConfChange:
    """The change ``op`` of ``node_id`` made to the configuration ``(voters, learners)``."""
    members = dict(addresses)
    if op is ConfOp.ADD_LEARNER:
        learners = learners | {node_id}
        members[node_id] = address
    elif op is ConfOp.PROMOTE:
        voters, learners = voters | {node_id}, learners - {node_id}
    elif op is ConfOp.REMOVE:
        voters, learners = voters - {node_id}, learners - {node_id}
        members.pop(node_id, None)
    members = {i: a for i, a in members.items() if i in voters or i in learners}
    return ConfChange(op, node_id, voters, learners, members, nonce)


def check(
    voters: frozenset[int],
    learners: frozenset[int],
    op: ConfOp,
    node_id: int,
    *,
    active: frozenset[int],
    address: str = "",
    addresses: Mapping[int, str] | None = None,
) -> None:
    """Refuses, with a clear reason, a change that is meaningless or unsafe now.

    ``active`` holds the members the leader heard from recently. A change is refused when the
    active voters of the new configuration would not form a majority of it: the cluster would
    stop making progress the moment the change applied.
    """
    if node_id <= 0:
        raise ConfChangeError(f"node ids are positive integers, got {node_id}")
    if op is ConfOp.ADD_LEARNER:
        _check_new_member(voters | learners, node_id, address, addresses or {})
    elif op is ConfOp.PROMOTE:
        if node_id in voters:
            raise ConfChangeError(f"node {node_id} is already a voter")
        if node_id not in learners:
            raise ConfChangeError(f"node {node_id} is not a learner of this cluster")
    elif op is ConfOp.REMOVE:
        if node_id not in voters and node_id not in learners:
            raise ConfChangeError(f"node {node_id} is not a member")
        if voters == {node_id}:
            raise ConfChangeError(f"node {node_id} is the last voter")
    new_voters = propose(op, node_id, voters, learners, {}).voters
    live = len(new_voters & active)
    if live < len(new_voters) // 2 + 1:
        raise ConfChangeError(
            f"after this change only {live} of its {len(new_voters)} voters would be reachable "
            f"({sorted(new_voters & active)}), less than a majority: the cluster could not make progress"
        )


def _check_new_member(
    members: frozenset[int], node_id: int, address: str, addresses: Mapping[int, str]
) -> None:
    if node_id in members:
        raise ConfChangeError(f"node {node_id} is already a member")
    if not address:
        raise ConfChangeError(f"adding node {node_id} needs its address")
    check_address(address)
    for other, used in addresses.items():
        if used.lower() == address.lower() and other != node_id:
            raise ConfChangeError(f"address {address} is already used by node {other}")


def check_address(address: str) -> None:
    """Refuses an address the members could never dial: every member would try it for ever."""
    host, sep, port = address.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    bracketed = host.startswith("[")
    if not sep or not bare or not port.isdigit() or not 1 <= int(port) <= 65535 or (":" in bare) != bracketed:
        raise ConfChangeError(
            f"address {address!r} is not host:port (a host name, an IPv4 address or a bracketed IPv6 "
            "one, and a port of 1-65535)"
        )
    try:
        unspecified = ipaddress.ip_address(bare).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified or any(c.isspace() for c in bare):
        raise ConfChangeError(f"address {address!r} names no host the members could dial")


def encode(cc: ConfChange, kind_byte: int) -> bytes:
    """The entry payload of ``cc``, after the envelope's ``kind_byte``."""
    if len(cc.voters) + len(cc.learners) > MAX_MEMBERS:
        raise ConfChangeError(f"a cluster has at most {MAX_MEMBERS} members")
    parts = [
        _HEAD.pack(
            kind_byte, cc.op, cc.node_id, cc.nonce, len(cc.voters), len(cc.learners), len(cc.addresses)
        )
    ]
    parts += [_ID.pack(v) for v in sorted(cc.voters)]
    parts += [_ID.pack(v) for v in sorted(cc.learners)]
    for node, address in sorted(cc.addresses.items()):
        raw = address.encode()
        if len(raw) > MAX_ADDRESS_BYTES:
            raise ConfChangeError(f"address of node {node} is longer than {MAX_ADDRESS_BYTES} bytes")
        parts += [_ADDR.pack(node, len(raw)), raw]
    return b"".join(parts)


def decode(payload: bytes) -> ConfChange:
    """Reads a change written by :func:`encode`; ValueError on anything else."""
    if len(payload) < _HEAD.size:
        raise ValueError("truncated membership change")
    _, op, node_id, nonce, n_voters, n_learners, n_addresses = _HEAD.unpack_from(payload)
    try:
        kind = ConfOp(op)
    except ValueError:
        raise ValueError(f"unknown membership change {op}") from None
    at = _HEAD.size
    ids: list[int] = []
    for _ in range(n_voters + n_learners):
        if at + _ID.size > len(payload):
            raise ValueError("truncated membership change")
        ids.append(_ID.unpack_from(payload, at)[0])
        at += _ID.size
    addresses: dict[int, str] = {}
    for _ in range(n_addresses):
        if at + _ADDR.size > len(payload):
            raise ValueError("truncated membership change")
        node, n = _ADDR.unpack_from(payload, at)
        at += _ADDR.size
        if at + n > len(payload):
            raise ValueError("truncated membership change")
        try:
            addresses[node] = payload[at : at + n].decode()
        except UnicodeDecodeError:
            raise ValueError("membership change address is not UTF-8") from None
        at += n
    if at != len(payload):
        raise ValueError("trailing bytes after a membership change")
    voters, learners = frozenset(ids[:n_voters]), frozenset(ids[n_voters:])
    if node_id <= 0 or 0 in voters or 0 in learners or not voters or voters & learners:
        raise ValueError("membership change with an impossible configuration")
    return ConfChange(kind, node_id, voters, learners, addresses, nonce)


def check_replacement(old: int, new: int, address: str, addresses: Mapping[int, str]) -> None:
    """Refuses a replacement of ``old`` by ``new`` at ``address`` that would only remove ``old``:
    ``new`` must be another node, and if it is a member already (an earlier, interrupted
    replacement added it) it must be the one at ``address``; a member elsewhere is another node,
    named by mistake, and the replacement would leave one voter fewer."""
    if new == old:
        raise ConfChangeError(f"node {old} cannot replace itself: name the new node")
    known = addresses.get(new)
    if known is not None and known != address:
        raise ConfChangeError(
            f"node {new} is already a member, at {known}, not at {address}: a replacement adds a "
            "new node (to remove a member only, remove it)"
        )
