"""Configuration of the pure Raft core (timing in ticks; the driver decides how long a tick is)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_UNAPPLIED_BYTES = 64 << 20
"""How many payload bytes a leader holds accepted but not yet applied before it refuses
proposals: enough for any healthy pipeline (64 in-flight appends of 1 MiB each to a follower),
small enough that an overloaded leader's memory and its callers' wait stay bounded."""


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """How one Raft node behaves.

    ``voters`` and ``learners`` are the configuration a new cluster starts with. A node that is
    in neither (one joining a running cluster) starts with no configuration and never campaigns;
    it learns the cluster's configuration from the leader's log or snapshot.

    ``election_ticks`` is the minimum election timeout; each node draws its timeout uniformly
    from ``[election_ticks, 2 * election_ticks)`` after every reset, so that split votes resolve.
    Lease reads are only allowed with ``check_quorum``, and the lease lasts
    ``election_ticks - clock_drift_ticks`` ticks after a quorum last answered: shorter than the
    time any other node needs to become leader.
    """

    id: int
    voters: frozenset[int]
    learners: frozenset[int] = field(default_factory=frozenset)
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    lease_reads: bool = False
    clock_drift_ticks: int = 2
    max_inflight: int = 64
    max_batch_entries: int = 4096
    max_batch_bytes: int = 1 << 20
    forward_proposals: bool = True
    max_unapplied_bytes: int = DEFAULT_MAX_UNAPPLIED_BYTES
    """The leader refuses new proposals (``LeaderOverloadedError``, retryable) while the payloads
    it accepted in its term and has not applied yet would pass this many bytes: uncommitted ones
    (followers slow or unreachable) and committed ones its state machine has not caught up with.
    0 turns the limit off. A batch is admitted whole when nothing is pending, however large."""
    restart_lease: bool = True
    """A node that starts with a term above zero (it was in a cluster before) grants no vote for
    an election timeout after it starts, as if it had just heard from a leader: it may have
    answered the heartbeat that keeps a leader's lease valid just before it went down, and
    however long it was down, a vote it gave sooner could elect a new leader inside that lease.
    Only with ``check_quorum`` (leases exist only then). The protocol tests' harness turns it
    off to elect at once in clusters it builds from stored logs."""
    fast_start: bool = False
    """A node of a new cluster (term 0) campaigns within its first election timeout rather than
    after it, so that a cluster elects about one timeout after it starts. On in ``dengine.Node``
    (``Config.raft_config``); the protocol tests count ticks without it."""
    can_vote: bool = True
    """False for a node that lost its disk: it may have voted in terms it no longer remembers,
    so it must neither vote nor campaign until an operator re-adds it."""

    def __post_init__(self) -> None:
        if self.id <= 0:
            raise ValueError(f"id must be a positive integer, got {self.id}")
        if self.voters & self.learners:
            raise ValueError(f"nodes {sorted(self.voters & self.learners)} are both voters and learners")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        if self.lease_reads and not self.check_quorum:
            raise ValueError("lease_reads requires check_quorum")
        if not 0 <= self.clock_drift_ticks < self.election_ticks:
            raise ValueError("clock_drift_ticks must be in [0, election_ticks)")
        if self.max_inflight < 1 or self.max_batch_entries < 1 or self.max_batch_bytes < 1:
            raise ValueError("max_inflight, max_batch_entries and max_batch_bytes must be positive")
        if self.max_unapplied_bytes < 0:
            raise ValueError("max_unapplied_bytes must be at least 0 (0: no limit)")

    @property
    def lease_ticks(self) -> int:
        """Ticks a leader's lease lasts after the heartbeat round it counts from was sent. One
        tick less than the election timeout minus the drift bound: a follower that got the
        heartbeat just before its own tick counts its first tick of silence almost at once, and
        may vote a little more than ``election_ticks - 1`` ticks after the leader sent it."""
        return max(0, self.election_ticks - self.clock_drift_ticks - 1)
