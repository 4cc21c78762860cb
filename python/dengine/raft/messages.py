"""Messages exchanged between Raft peers, and what the core hands its driver.

One flat message type (as etcd-raft does) keeps the transport simple: every field has one
meaning per message type, documented on :class:`Message`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from dengine._core import Entry


class MsgType(enum.IntEnum):
    """Kinds of peer messages. Values are stable: they appear on the wire."""

    APP = 1  # leader -> follower: entries after (index, log_term), leader commit
    APP_RESP = 2  # follower -> leader: ack of `index`, or reject with a hint
    VOTE = 3  # candidate -> voter: last log (index, log_term)
    VOTE_RESP = 4
    PRE_VOTE = 5  # would-be candidate -> voter, for term + 1, changes no state
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # leader -> follower: commit, read round in `context`
    HEARTBEAT_RESP = 8  # echoes `context`
    PROP = 9  # follower -> leader: forwarded proposals in `payloads`
    READ_INDEX = 10  # follower -> leader: please confirm a read, `context` identifies it
    READ_INDEX_RESP = 11  # leader -> follower: read `context` may be served at `index` (reject: no leader)
    TIMEOUT_NOW = 12  # leader -> transfer target: campaign now
    SNAPSHOT = 13  # leader -> follower: install the snapshot in `snapshot` (never on the message stream)


VOTE_TYPES = (MsgType.VOTE, MsgType.PRE_VOTE)
LEADER_TYPES = (MsgType.APP, MsgType.HEARTBEAT, MsgType.TIMEOUT_NOW, MsgType.SNAPSHOT)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What the core needs to know of a snapshot: the last log entry it covers and the
    membership configuration as of that entry. The state itself stays with the driver."""

    index: int
    term: int
    voters: frozenset[int]
    learners: frozenset[int] = frozenset()


@dataclass(slots=True)
class Message:
    """A peer message.

    Field meanings by type:
      * APP: ``index``/``log_term`` = the entry preceding ``entries``; ``commit`` = leader commit.
      * APP_RESP: accepted -> ``index`` = last index now matching the leader; rejected ->
        ``index`` = the rejected ``index`` of the APP, ``reject_hint``/``log_term`` = where the
        follower's log may match (fast backtracking); ``context`` = 2 when the follower lost
        its disk, so the leader forgets what it knew of that follower's log.
      * VOTE / PRE_VOTE: ``index``/``log_term`` = the candidate's last entry; ``context`` = 1 for
        a campaign started by leader transfer (voters then ignore their leader lease).
      * HEARTBEAT: ``commit``; ``context`` = read round; ``index`` = the leader's tick when sent.
        HEARTBEAT_RESP echoes ``context`` and ``index`` (the leader's lease counts from it).
      * READ_INDEX / READ_INDEX_RESP: ``context`` = the requester's read id, ``index`` = read index.
      * SNAPSHOT: ``snapshot`` describes a snapshot the driver has already received in full and
        made durable; the follower answers with an APP_RESP.
    """

    type: MsgType
    src: int
    dst: int
    term: int
    index: int = 0
    log_term: int = 0
    entries: Sequence[Entry] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    context: int = 0
    payloads: Sequence[bytes] = ()
    snapshot: SnapshotInfo | None = None


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state a driver reports to users: who leads and what this node is."""

    leader: int | None
    role: Role
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read that may now be served: the state machine has applied ``index``."""

    context: int
    index: int


@dataclass(slots=True)
class Ready:
    """What the driver must do next, in this order:

    1. if ``sync`` is set, make the log store durable (``store.sync()``) and then call
       ``raft.synced(sync)``; messages that depended on it come in a later Ready;
    2. send ``messages`` (already safe to send);
    3. apply ``committed`` entries in order, then call ``raft.applied_to(last index)``: a core
       hands out a few chunks ahead of it, no more, and a leader counts its own writes against
       ``max_unapplied_bytes`` until then;
    4. serve ``reads``; fail ``failed_reads`` (leadership was lost before they were confirmed).

    ``restore`` (a follower accepted a snapshot; its log now starts after it) comes before
    ``committed``: replace the state machine with that snapshot, in apply order, then call
    ``raft.applied_to(restore.index)``. ``snapshot_needed`` lists followers that need the latest
    snapshot, because the entries they lack are compacted: send it, then call
    ``raft.report_snapshot``.
    """

    messages: list[Message] = field(default_factory=list)
    sync: int | None = None
    committed: Sequence[Entry] = field(default_factory=list)
    reads: list[ReadState] = field(default_factory=list)
    failed_reads: list[int] = field(default_factory=list)
    soft_state: SoftState | None = None
    snapshot_needed: list[int] = field(default_factory=list)
    restore: SnapshotInfo | None = None

    def __bool__(self) -> bool:
        return bool(
            self.messages
            or self.sync is not None
            or self.committed
            or self.reads
            or self.failed_reads
            or self.soft_state
            or self.snapshot_needed
            or self.restore is not None
        )
