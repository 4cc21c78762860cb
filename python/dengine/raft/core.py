"""The Raft protocol as a pure state machine: no I/O of its own, no clock, no threads.

Inputs: :meth:`Raft.tick`, :meth:`Raft.step` (a peer message), :meth:`Raft.propose`,
:meth:`Raft.read_index`, :meth:`Raft.synced` (the log store is durable up to here) and
:meth:`Raft.applied_to`. Output: :meth:`Raft.ready`, in the spirit of etcd-raft's Ready.

The only side effects are writes to the :class:`~dengine.storage.LogStore` it was given (append,
truncate, hard state), none of which is durable until the driver syncs the store when a Ready asks
for it. Every message whose safety depends on such a write (a vote, an ack of entries, anything
sent in a term not yet durable) is held back until the driver reports that sync done.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass

from dengine._core import (
    Entry,
    EntryBatch,
    HardState,
    JointConfig,
    LogStoreBase,
    VoteResult,
    entries_from_payloads,
)
from dengine.errors import (
    LeaderOverloadedError,
    LogCompactedError,
    LogIndexError,
    NotLeaderError,
    ProposalDroppedError,
)
from dengine.raft import membership
from dengine.raft.config import RaftConfig
from dengine.raft.membership import ConfChange, ConfChangePendingError, ConfOp
from dengine.raft.messages import (
    LEADER_TYPES,
    VOTE_TYPES,
    Message,
    MsgType,
    ReadState,
    Ready,
    Role,
    SnapshotInfo,
    SoftState,
)
from dengine.raft.payload import CONF_CHANGE_KIND, NOOP_PAYLOAD, conf_change, is_conf_change, payload_is_valid
from dengine.raft.progress import Progress, ProgressState
from dengine.storage import LogStore

TRANSFER_CONTEXT = 1
"""``context`` of a VOTE sent by a campaign that leader transfer started."""

LOG_LOST_CONTEXT = 2
"""``context`` of an APP_RESP rejection from a node that lost its disk (see RaftConfig.can_vote)."""

_MAX_APPLY_BYTES = 8 << 20
# Committed chunks handed out and not yet reported applied: past this many, or this many bytes,
# the next waits (the entries stay in the log), so a state machine slower than the log cannot
# fill memory with them. With a backlog (a restart replaying its log, a follower catching up),
# each chunk gathers everything committed up to _MAX_APPLY_BYTES, and two or three of them keep
# the state machine busy: eight (64 MiB) took a node replaying a million entries from 57 to
# 152 MB of RSS, against about 110 MB with the byte bound, and replayed no faster.
_MAX_APPLYING_CHUNKS = 8
_MAX_APPLYING_BYTES = 16 << 20
# Batches a node appended and keeps to hand out once committed (see Raft._appended): a few
# suffice in the steady state; a node whose commit lags behind more reads back from its log.
_MAX_KEPT_APPENDS = 16


@dataclass(slots=True)
class _ReadRound:
    """A heartbeat round confirming leadership for every read queued before it started."""

    index: int
    requests: list[tuple[int, int]]  # (requesting node, its read context)
    acks: set[int]


def _check_log_continues(store: LogStore, snapshot: SnapshotInfo) -> None:
    if store.first_index() - 1 > snapshot.index or store.last_index() < snapshot.index:
        raise ValueError(
            f"the log ({store.first_index()}..{store.last_index()}) does not continue the "
            f"snapshot at index {snapshot.index}"
        )


def _start_term(store: LogStore, term: int, vote: int | None) -> tuple[int, int | None]:
    last_term = store.term(store.last_index())
    if last_term > term:
        # A log newer than the saved term: a node restored from a backup snapshot into an empty
        # data directory. Terms never go back, so start from the log's (with no vote in it).
        return last_term, None
    return term, vote


class Raft:
    """One Raft node's protocol state. See the module docstring for how a driver runs it."""

    # The batch this leader appended last, framed: sent as it is to followers that need
    # exactly it (the steady state) rather than read back from the log once per follower.
    # Every role change (_reset) forgets it.
    _fresh: EntryBatch | None
    # The framed batches this node appended, oldest first, kept until handed out to apply:
    # committed entries then go to the state machine as they were appended, not read back from
    # the log and checked again. Their entries are always the log's own (see _keep_appended and
    # _forget_appended_from).
    _appended: collections.deque[EntryBatch]

    def __init__(
        self,
        config: RaftConfig,
        store: LogStore,
        *,
        seed: int = 0,
        applied: int = 0,
        snapshot: SnapshotInfo | None = None,
    ) -> None:
        """``snapshot`` is the one the driver restored the state machine from (the log must
        continue it): its membership replaces the configured one, and everything it covers
        counts as applied."""
        if snapshot is not None:
            _check_log_continues(store, snapshot)
            applied = max(applied, snapshot.index)
        self.cfg = config
        self.id = config.id
        # A store that reads and appends framed batches (the built-in engines, the simulator's)
        # moves entries without a Python object per entry.
        self.store, self._framed = store, callable(getattr(store, "entry_batch", None))
        self._rng = random.Random(f"{seed}/{config.id}")
        hs = store.hard_state()
        self.term, self.vote = _start_term(store, hs.term, hs.vote)
        last = store.last_index()
        self.commit: int = max(min(hs.commit, last), applied)
        self.applied: int = applied
        self.durable: int = last
        self.lead: int | None = None
        self.role = Role.FOLLOWER
        # The configuration in force is the latest one in the log, committed or not (thesis
        # §4.1): the one at the snapshot (or the initial one), then each change entry after it.
        base = snapshot or SnapshotInfo(0, 0, config.voters, config.learners)
        self._conf_base, self._conf_base_term = (base.index, base.voters, base.learners), base.term
        self._conf_entries: list[tuple[int, int, ConfChange]] = []  # (index, term, change)
        self.conf = JointConfig(base.voters)
        self.learners = base.learners
        self.progress: dict[int, Progress] = {}
        self.lead_transferee: int | None = None
        self._forget_unapplied()

        # Ticks so far, the tick until which a TimeoutNow is taken for stale (note_pause), and
        # the term in which this node as leader sent one: no lease read for the rest of it
        # (_send_timeout_now).
        self._ticks = self._timeout_now_stale_until = self._lease_given_up_in = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_ticks
        self._votes: dict[int, bool] = {}

        self._msgs: list[Message] = []
        self._held: list[tuple[int, Message]] = []
        # The last sync handed to the driver, and the last one it reported done.
        self._sync_seq = self._synced_seq = 0
        # (last sync handed out, index kept) at each truncation or reset whose earlier syncs
        # have not all been reported: such a report may predate the cut, and say too much.
        self._cuts: list[tuple[int, int]] = []
        self._writes_pending = False  # store writes not yet covered by a handed-out sync
        self._vote_needs = 0  # sync that makes the current term and vote durable
        self._log_needs = 0  # sync that makes the last append durable
        self._saved_hs = (hs.term, hs.vote, hs.commit)
        # The last index of the committed entries handed out, and the last index and bytes of
        # each chunk not yet applied.
        self._apply_dispatched, self._applying, self._applying_bytes, self._appended = (
            applied,
            collections.deque[tuple[int, int]](),
            0,
            collections.deque(),
        )

        self._read_seq = 0
        self._read_rounds: dict[int, _ReadRound] = {}
        self._read_waiting: list[tuple[int, int]] = []
        self._read_blocked: list[tuple[int, int, bool]] = []
        self._pending_reads: list[ReadState] = []
        self._failed_reads: list[int] = []
        # Reads forwarded to the leader and not answered yet, and the tick each was last sent.
        self._forwarded_reads: dict[int, int] = {}

        self._snapshot_needed: list[int] = []
        self._restore: SnapshotInfo | None = None
        self._scan_log_for_conf_changes()
        # The soft state last reported, as a tuple: has_ready() compares it after every step,
        # and building a SoftState to compare costs 1.2 us against 0.2 us for the tuple.
        self._reported_soft: tuple[int | None, Role, int] | None = None
        self._start_as_follower(config)

    def _start_as_follower(self, config: RaftConfig) -> None:
        """Starts as a follower that knows no leader, with the first election timeout and the
        restart lease (``RaftConfig.restart_lease``, in force until tick
        ``_restart_quiet_until``; see :meth:`step`)."""
        self._become_follower(self.term, None)
        self._restart_quiet_until = config.election_ticks if config.restart_lease and self.term > 0 else 0
        if config.fast_start and config.pre_vote and self.term == 0:
            # A new cluster has no leader to wait for: its nodes campaign within their first
            # election timeout, not after it (as etcd advances its ticks). One that starts late
            # into a cluster that already elected asks for pre-votes the others refuse while they
            # hear their leader: no term moves. Without pre-vote an early campaign would raise
            # the term, so the timer then starts from zero.
            self._election_elapsed = config.election_ticks - 1

    # ------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advances logical time by one tick."""
        self._ticks += 1
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            # A sole voter has no one to wait for: no other node can win, or be leading.
            if self._promotable() and (
                self._election_elapsed >= self._randomized_timeout or self.conf.voters == {self.id}
            ):
                self._election_elapsed = 0
                self._campaign(pre=self.cfg.pre_vote)
            elif self._learner_probe_due():
                self._probe_voters()
            if self._forwarded_reads:
                self._forward_unanswered_reads_again()

    def _forward_unanswered_reads_again(self) -> None:
        """Sends again a forwarded read the leader has not answered within an election timeout.
        Peer messages can be lost (a stream that breaks drops what it still queues) while the
        leader stays: with no term change to fail it, the read would wait for ever. A copy that
        arrives late is harmless: the leader answers each with a read index no older than the
        read, and the first answer settles it."""
        if self.lead is None:
            return  # a new leader fails them (_reset); until then, nobody to ask
        due = self._ticks - self.cfg.election_ticks
        for context, sent in list(self._forwarded_reads.items()):
            if sent <= due:
                self._forward_read(context, self.lead)

    def _forward_read(self, context: int, lead: int) -> None:
        self._forwarded_reads[context] = self._ticks
        self._send(Message(MsgType.READ_INDEX, self.id, lead, self.term, context=context))

    def _learner_probe_due(self) -> bool:
        """A learner that has heard from no leader for two election timeouts, once per election
        timeout from then on; so does a node whose own removal is in its log and not known to
        be committed. A voter campaigns instead; a node that knows it left says nothing."""
        timeout = self.cfg.election_ticks
        elapsed = self._election_elapsed
        probing = self.id in self.learners or self.own_removal_pending
        return probing and elapsed >= 2 * timeout and elapsed % timeout == 0

    @property
    def own_removal_pending(self) -> bool:
        """Whether the configuration in force is this node's removal, appended but not known to
        be committed. Such a node must not campaign (it is no voter of that configuration), and
        nobody sends it anything any more once the removal commits (a leader that removed itself
        and lost touch before it heard the commit, or restarted): it probes the remaining voters,
        whose refusals tell it that it left (``dengine.removal``)."""
        cc = self.conf_change
        return (
            cc is not None
            and cc.op is ConfOp.REMOVE
            and cc.node_id == self.id
            and self.conf_index > self.commit
        )

    def _probe_voters(self) -> None:
        """Tells every voter that this learner is alive, as a heartbeat answer that answers no
        heartbeat (index 0: it extends no lease, confirms no read). A leader that still has the
        learner replicates to it again; followers ignore it. A voter that no longer knows the
        learner refuses it at the wire, and a majority of voters doing so is how a learner removed
        while it was away, to which nobody sends anything any more, learns of it (``dengine.removal``)."""
        for voter in sorted(self.conf.voters):
            self._send(Message(MsgType.HEARTBEAT_RESP, self.id, voter, self.term))

    def note_pause(self, ticks: int) -> None:
        """Tells the core that its driver just ran ``ticks`` ticks at once: the process was paused
        (SIGSTOP, a frozen VM, a long garbage collection) and the messages that reach it now
        waited through the pause. After a pause of an election timeout or more, a TimeoutNow
        among them is one its leader gave up on (a leader abandons a transfer after an election
        timeout and goes on leading): acting on it would depose a leader that was told the
        transfer failed. So for the next election timeout this node takes no TimeoutNow. One
        sent afresh in that window only fails its transfer, which the leader reports."""
        if ticks >= self.cfg.election_ticks:
            self._timeout_now_stale_until = self._ticks + self.cfg.election_ticks

    def propose(self, payloads: Sequence[bytes]) -> tuple[int, int] | None:
        """Appends a batch of entry payloads (see :mod:`dengine.raft.payload`) on the leader.

        Returns the ``(first, last)`` indexes given to them, or ``None`` when they were forwarded
        to the leader. Raises :class:`NotLeaderError` (with the leader hint) when this node cannot
        take them, :class:`ProposalDroppedError` during a leadership transfer, and its subclass
        :class:`LeaderOverloadedError` past ``max_unapplied_bytes``.
        """
        if not payloads:
            raise ValueError("propose needs at least one payload")
        if self.role is not Role.LEADER:
            if self.cfg.forward_proposals and self.lead is not None:
                self._send(Message(MsgType.PROP, self.id, self.lead, self.term, payloads=list(payloads)))
                return None
            raise NotLeaderError(self.lead)
        if self.lead_transferee is not None:
            raise ProposalDroppedError(f"leadership is being transferred to node {self.lead_transferee}")
        if CONF_CHANGE_KIND in {p[0] for p in payloads if p}:  # is_conf_change, without a call each
            raise ValueError("membership changes go through propose_conf_change")
        self._admit(payloads)
        return self._append_as_leader(payloads)

    def _forget_unapplied(self) -> None:
        # As leader: (last index, payload bytes) of each batch appended in this term and not yet
        # applied here, and their total, for ``max_unapplied_bytes``.
        self._unapplied: collections.deque[tuple[int, int]] = collections.deque()
        self.unapplied_bytes = 0

    def _admit(self, payloads: Sequence[bytes]) -> None:
        """Counts ``payloads`` as accepted and not yet applied, or raises
        :class:`LeaderOverloadedError` when they would take this leader past
        ``max_unapplied_bytes``. Followers that cannot keep up (or cannot be reached), or a state
        machine slower than the writes, make the leader refuse writes quickly, rather than hold
        more and more of them with callers waiting ever longer (etcd-raft bounds the uncommitted
        part alone, with MaxUncommittedEntriesSize)."""
        size = sum(map(len, payloads))
        limit = self.cfg.max_unapplied_bytes
        held = self.unapplied_bytes
        if limit and held and held + size > limit:
            raise LeaderOverloadedError(held, size, limit)
        self.unapplied_bytes = held + size
        self._unapplied.append((self.store.last_index() + len(payloads), size))

    def propose_conf_change(
        self,
        op: ConfOp,
        node_id: int,
        *,
        address: str = "",
        addresses: dict[int, str] | None = None,
        nonce: int = 0,
    ) -> int:
        """Appends a membership change on the leader and returns its log index. Every node uses
        the new configuration as soon as the entry is in its log (thesis §4.1).

        ``addresses`` is every member's address (the driver's business; the entry carries it to
        every node). Raises :class:`NotLeaderError` off the leader, and
        :class:`~dengine.raft.membership.ConfChangeError` for a change that is refused: another
        one is not committed yet, this leader has not committed an entry of its own term yet, or
        :func:`~dengine.raft.membership.check` finds it unsafe.
        """
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.lead)
        if self.lead_transferee is not None:
            raise ProposalDroppedError(f"leadership is being transferred to node {self.lead_transferee}")
        pending = self.conf_index
        if pending > self.commit:
            raise ConfChangePendingError(
                f"another membership change (log index {pending}) is not committed yet"
            )
        if not self._committed_in_term():
            raise ConfChangePendingError(
                "the new leader has not committed an entry of its term yet; retry shortly"
            )
        voters, learners = self.conf.voters, self.learners
        active = frozenset(p for p in self.progress if self.heard_from_recently(p))
        membership.check(voters, learners, op, node_id, active=active, address=address, addresses=addresses)
        cc = membership.propose(op, node_id, voters, learners, addresses or {}, address=address, nonce=nonce)
        _, index = self._append_as_leader([conf_change(cc)], conf=True)
        return index

    @property
    def hears_leader(self) -> bool:
        """Whether this node is a member that leads, or has heard its leader within an election
        timeout. A voter cut off from its leader forgets it when it campaigns; a learner never
        campaigns and would remember it for ever. (A removed node does not learn of its removal:
        it campaigns, and forgets.)"""
        if self.lead is None or (self.id not in self.conf.voters and self.id not in self.learners):
            return False
        return self.role is Role.LEADER or self._election_elapsed < self.cfg.election_ticks

    @property
    def conf_index(self) -> int:
        """Log index of the configuration in force (0: the initial one)."""
        return self._conf_entries[-1][0] if self._conf_entries else self._conf_base[0]

    @property
    def conf_id(self) -> tuple[int, int]:
        """``(index, term)`` of the log position that made the configuration in force: its change
        entry, or the snapshot it came with, or ``(0, 0)`` for the initial one. Sent with every
        message, so that a node that does not know this one can tell whether it simply has not
        appended the change that added it yet (:meth:`takes_outsider`)."""
        if self._conf_entries:
            index, term, _ = self._conf_entries[-1]
            return index, term
        return self._conf_base[0], self._conf_base_term

    def has_passed(self, index: int, term: int) -> bool:
        """Whether this node's log is past log position ``index`` of ``term``: it holds that entry,
        or it has committed ``index`` (compacted or not), so that any other entry there can never
        commit. A configuration made at a position this node has passed is not newer than its own."""
        if index <= self.commit or index < self.store.first_index():
            return True
        if index > self.store.last_index():
            return False
        return self._match_term(index, term)

    def takes_outsider(self, src: int, conf_index: int, conf_term: int) -> bool:
        """Whether to take a message from ``src``, a node outside the configuration in force here,
        which acts under the configuration made at ``(conf_index, conf_term)``. Raft servers take
        messages from servers outside their configuration (thesis §4.1); the wire refuses the
        ones that cannot be of use, so that a removed member learns it was removed:

        - ``src`` is still a member of this node's committed configuration: its removal is only
          in this node's log and may yet be cut (a leader it refused could never cut it);
        - or ``src``'s configuration is one this node has not reached: the change that added
          ``src`` is not in its log yet (it was down), and refusing ``src`` would keep it so.

        Anyone else is refused: a removed member (this node passed the configuration it names),
        a node of the initial configuration that is not in it.
        """
        voters, learners = self.conf_at(self.commit)
        if src in voters or src in learners:
            return True
        return conf_index > 0 and not self.has_passed(conf_index, conf_term)

    @property
    def conf_change(self) -> ConfChange | None:
        """The change entry whose configuration is in force, if it is still in the log."""
        return self._conf_entries[-1][2] if self._conf_entries else None

    def conf_entry_at(self, index: int) -> ConfChange | None:
        """The change entry in force at log index ``index`` (None: the base configuration, that
        of the snapshot or the initial one)."""
        for at, _, cc in reversed(self._conf_entries):
            if at <= index:
                return cc
        return None

    def conf_at(self, index: int) -> tuple[frozenset[int], frozenset[int]]:
        """``(voters, learners)`` as of log index ``index`` (for a snapshot taken there)."""
        cc = self.conf_entry_at(index)
        return (cc.voters, cc.learners) if cc is not None else (self._conf_base[1], self._conf_base[2])

    def _scan_log_for_conf_changes(self) -> None:
        lo = max(self._conf_base[0], self.store.first_index() - 1) + 1
        last = self.store.last_index()
        if isinstance(self.store, LogStoreBase):
            # The built-in engines find the few change entries in Rust, without reading every
            # entry into Python: a restart with a million entries stays fast.
            for index in self.store.indexes_with_first_byte(lo, last + 1, CONF_CHANGE_KIND):
                self._note_conf_changes(self.store.entries(index, index + 1))
            return
        while lo <= last:
            batch = self.store.entries(lo, last + 1, _MAX_APPLY_BYTES)
            self._note_conf_changes(batch)
            lo = batch[-1].index + 1

    def _note_conf_changes(self, entries: Sequence[Entry]) -> None:
        changed = False
        if isinstance(entries, EntryBatch):
            # Framed entries (a follower's append): only the few membership changes become
            # objects, not the whole batch.
            first = entries.first_index
            entries = [entries[i - first] for i in entries.indexes_with_first_byte(CONF_CHANGE_KIND)]
        for e in entries:
            data = e.data
            if is_conf_change(data):
                self._conf_entries.append((e.index, e.term, membership.decode(data)))
                changed = True
        if changed:
            self._adopt_conf()

    def _forget_conf_changes_from(self, index: int) -> None:
        if self._conf_entries and self._conf_entries[-1][0] >= index:
            self._conf_entries = [c for c in self._conf_entries if c[0] < index]
            self._adopt_conf()

    def _adopt_conf(self) -> None:
        voters, learners = self.conf_at(self.store.last_index())
        self.conf = JointConfig(voters)
        self.learners = learners
        if self.role is not Role.LEADER:
            return
        members = voters | learners | {self.id}
        last = self.store.last_index()
        for p in members - set(self.progress):
            pr = self.progress[p] = Progress(next=last + 1)
            pr.recent_active = True
            pr.last_heard_tick = self._ticks
        for p in set(self.progress) - members:
            del self.progress[p]
        if self.lead_transferee is not None and self.lead_transferee not in voters:
            self.lead_transferee = None

    def _send_timeout_now(self, to: int) -> None:
        """Tells ``to`` to campaign at once. Its voters grant that vote inside this leader's
        lease (a transfer must not wait one out), so from here on this leader's lease proves
        nothing: no lease read for the rest of the term, even if the transfer is given up, since
        a copy of this message still in flight can elect ``to`` later. Reads fall back to
        ReadIndex, which a deposed leader cannot complete."""
        self._lease_given_up_in = self.term
        self._send(Message(MsgType.TIMEOUT_NOW, self.id, to, self.term))

    def _step_down_if_removed(self) -> None:
        """A leader outside the configuration hands over once that configuration commits."""
        if self.id in self.conf.voters or self.commit < self.conf_index:
            return
        last = self.store.last_index()
        caught_up = [v for v in self.conf.voters if v in self.progress and self.progress[v].match == last]
        if caught_up:
            self._send_timeout_now(min(caught_up))
        self._become_follower(self.term, None)

    def read_index(self, context: int, *, lease: bool = False) -> None:
        """Asks for a linearizable read identified by ``context`` (unique per node).

        The read comes back in :attr:`Ready.reads` once this node has applied the read index, or
        in :attr:`Ready.failed_reads` if leadership changed first. With ``lease`` (which requires
        ``lease_reads``), a leader inside its lease answers without a heartbeat round.
        """
        if lease and not self.cfg.lease_reads:
            raise ValueError("lease reads are disabled (RaftConfig.lease_reads)")
        if self.role is Role.LEADER:
            self._handle_read_request(self.id, context, lease)
        elif self.lead is not None:
            self._forward_read(context, self.lead)
        else:
            self._failed_reads.append(context)

    def transfer_leadership(self, target: int | None = None) -> int:
        """Hands leadership to ``target`` (default: the most up-to-date other voter) with
        TimeoutNow. Proposals are refused until it completes or times out. Returns the target."""
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.lead)
        others = [v for v in sorted(self.conf.voters) if v != self.id]
        if target is None:
            if not others:
                raise ValueError("no other voter to transfer leadership to")
            target = max(others, key=lambda v: (self.progress[v].match, -v))
        if target not in others:
            raise ValueError(f"node {target} is not another voter of this cluster")
        self.lead_transferee = target
        self._election_elapsed = 0  # the transfer is abandoned after one election timeout
        if self.progress[target].match == self.store.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target)
        return target

    def report_snapshot(self, to: int, index: int, *, ok: bool) -> None:
        """The driver finished sending the snapshot at ``index`` to ``to`` (``ok``) or gave up.

        Either way the follower is probed again, but not before its next heartbeat answer: after
        a success its APP_RESP moves it on, after a failure that pause spaces out the retries.
        """
        pr = self.progress.get(to) if self.role is Role.LEADER else None
        if pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        pr.pending_snapshot = max(pr.pending_snapshot, index) if ok else 0
        pr.become_probe()
        pr.probe_sent = True

    def synced(self, seq: int, durable_index: int) -> None:
        """The driver made the store durable for sync ``seq``; the log is durable to here."""
        self._synced_seq = max(self._synced_seq, seq)
        if self._cuts:
            for cut_seq, kept in self._cuts:
                if seq <= cut_seq:
                    durable_index = min(durable_index, kept)
            self._cuts = [c for c in self._cuts if c[0] > self._synced_seq]
        self.durable = durable_index
        if self._held:
            still: list[tuple[int, Message]] = []
            for need, m in self._held:
                if need <= self._synced_seq:
                    self._msgs.append(m)
                else:
                    still.append((need, m))
            self._held = still
        if self.role is Role.LEADER:
            self.progress[self.id].match = durable_index
            if self._maybe_commit():
                self._after_commit()

    def _after_commit(self) -> None:
        # New entries go out now and carry the new commit index; a message only to announce it
        # waits for announce_commit(), so that under load the next append carries it instead
        # (halving the messages per write), and the leader answers its own callers first.
        self._broadcast_new_entries()
        if self.id not in self.conf.voters:
            self.announce_commit()  # the followers must learn it before this leader leaves
        self._step_down_if_removed()

    def applied_to(self, index: int) -> None:
        """The state machine has applied every entry up to ``index``."""
        self.applied = max(self.applied, index)
        applying = self._applying
        while applying and applying[0][0] <= index:
            self._applying_bytes -= applying.popleft()[1]
        unapplied = self._unapplied
        while unapplied and unapplied[0][0] <= index:
            self.unapplied_bytes -= unapplied.popleft()[1]

    def step(self, m: Message) -> None:
        """Processes one message from a peer."""
        if m.term > self.term:
            if m.type in VOTE_TYPES:
                forced = m.context == TRANSFER_CONTEXT
                in_lease = self.cfg.check_quorum and (
                    (self.lead is not None and self._election_elapsed < self.cfg.election_ticks)
                    or self._ticks < self._restart_quiet_until
                )
                if in_lease and not forced:
                    # A leader was heard recently: a disruptive (partitioned, rejoining) node
                    # must not depose it. Not even the term moves.
                    return
            if m.type is MsgType.PRE_VOTE or (m.type is MsgType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes are asked and granted for a future term, without moving to it
            else:
                self._become_follower(m.term, m.src if m.type in LEADER_TYPES else None)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (
                MsgType.APP,
                MsgType.HEARTBEAT,
                MsgType.SNAPSHOT,
            ):
                # Tell a stale leader about the newer term so that it steps down.
                self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term))
            elif m.type is MsgType.PRE_VOTE:
                self._send(Message(MsgType.PRE_VOTE_RESP, self.id, m.src, self.term, reject=True))
            return

        if m.type in VOTE_TYPES:
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    # ------------------------------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------------------------------

    def ready(self) -> Ready:
        """Collects what the driver must do now (see :class:`Ready` for the order)."""
        rd = Ready()
        hs = (self.term, self.vote, self.commit)
        if hs != self._saved_hs:
            # A commit-only change rides along with the next sync: losing it is harmless.
            self.store.save_hard_state(HardState(*hs))
            self._saved_hs = hs
        if self._writes_pending:
            self._writes_pending = False
            self._sync_seq += 1
            rd.sync = self._sync_seq
        rd.messages, self._msgs = self._msgs, []
        if self._committed_to_hand_out():
            hi = min(self.commit, self.durable)
            lo = self._apply_dispatched + 1
            if self._framed:
                # As the log holds them: applied without an object per entry.
                batch = self._appended_from(lo, hi)
                if batch is None:
                    batch = self.store.entry_batch(lo, hi + 1, _MAX_APPLY_BYTES)  # type: ignore[attr-defined]
                rd.committed, self._apply_dispatched = batch, batch.last_index
                size = batch.framed_bytes
            else:
                rd.committed = self.store.entries(lo, hi + 1, _MAX_APPLY_BYTES)
                self._apply_dispatched = rd.committed[-1].index
                size = sum(len(e.data) for e in rd.committed)
            self._applying.append((self._apply_dispatched, size))
            self._applying_bytes += size
        if self._pending_reads:
            rd.reads = [r for r in self._pending_reads if r.index <= self.applied]
            if rd.reads:
                self._pending_reads = [r for r in self._pending_reads if r.index > self.applied]
        rd.failed_reads, self._failed_reads = self._failed_reads, []
        rd.snapshot_needed, self._snapshot_needed = self._snapshot_needed, []
        rd.restore, self._restore = self._restore, None
        soft = (self.lead, self.role, self.term)
        if soft != self._reported_soft:
            self._reported_soft = soft
            rd.soft_state = SoftState(*soft)
        return rd

    def _appended_from(self, lo: int, hi: int) -> EntryBatch | None:
        """Entries ``lo`` to ``hi`` from one batch this node appended, if one still kept holds
        them all: the batch itself when they are exactly it (the steady state: what was
        appended last is committed). A backlog spanning several batches is read from the log
        instead, as one chunk."""
        kept = self._appended
        while kept and kept[0].last_index < lo:
            kept.popleft()
        if not kept or not kept[0].first_index <= lo <= hi <= kept[0].last_index:
            return None
        if kept[0].framed_bytes > _MAX_APPLY_BYTES:
            return None  # read from the log, which bounds a chunk's bytes
        batch = kept[0]
        if batch.first_index == lo and batch.last_index == hi:
            return batch
        return batch[lo - batch.first_index : hi - batch.first_index + 1]

    def _keep_appended(self, batch: Sequence[Entry]) -> None:
        """Keeps ``batch``, just appended to the log, to hand out when committed."""
        if isinstance(batch, EntryBatch) and len(batch):
            kept = self._appended
            kept.append(batch)
            if len(kept) > _MAX_KEPT_APPENDS:
                kept.popleft()

    def _forget_appended_from(self, index: int) -> None:
        """The log lost its entries from ``index`` on: so do the kept batches (a batch that
        straddles ``index`` goes whole; its earlier entries are read back from the log)."""
        kept = self._appended
        while kept and kept[-1].last_index >= index:
            kept.pop()

    def _committed_to_hand_out(self) -> bool:
        # Durable committed entries not handed out yet, and room for another chunk of them.
        return (
            min(self.commit, self.durable) > self._apply_dispatched
            and len(self._applying) < _MAX_APPLYING_CHUNKS
            and self._applying_bytes < _MAX_APPLYING_BYTES
        )

    def has_ready(self) -> bool:
        """Whether :meth:`ready` would return anything."""
        return bool(
            self._msgs
            or self._writes_pending
            or self._committed_to_hand_out()
            or any(r.index <= self.applied for r in self._pending_reads)
            or self._failed_reads
            or self._snapshot_needed
            or self._restore is not None
            or (self.lead, self.role, self.term) != self._reported_soft
            or (self.term, self.vote, self.commit) != self._saved_hs
        )

    @property
    def ticks_since_start(self) -> int:
        return self._ticks

    # ------------------------------------------------------------------------------------------
    # Roles
    # ------------------------------------------------------------------------------------------

    def _promotable(self) -> bool:
        return self.cfg.can_vote and self.id in self.conf.voters

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
            self._vote_needs = self._sync_seq + 1
            self._writes_pending = True
        self.lead = None
        self._fresh = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self.cfg.election_ticks + self._rng.randrange(self.cfg.election_ticks)
        self._votes = {}
        self.lead_transferee = None
        self._fail_leader_reads()

    def _become_follower(self, term: int, lead: int | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead
        self.progress = {}

    def _become_pre_candidate(self) -> None:
        # No term change and no vote: a pre-campaign that fails leaves no trace.
        self._votes = {}
        self.role = Role.PRE_CANDIDATE
        self.lead = None
        self.progress = {}

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self.progress = {}

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        last = self.store.last_index()
        self.progress = {p: Progress(next=last + 1) for p in self._peers_and_self()}
        me = self.progress[self.id]
        me.match = self.durable
        me.become_replicate()
        # Entries of earlier terms are not counted: their sizes are not known here, and they
        # commit with this term's first entry.
        self._forget_unapplied()
        for p in self.progress.values():
            p.recent_active = True
            p.last_heard_tick = self._ticks
        # Entries of earlier terms commit only through an entry of this term (§5.4.2).
        self._append_as_leader([NOOP_PAYLOAD])

    def _peers_and_self(self) -> list[int]:
        return sorted(self.conf.voters | self.learners | {self.id})

    def _campaign(self, *, pre: bool, transfer: bool = False) -> None:
        if not self._promotable():
            return
        if pre:
            self._become_pre_candidate()
            term, kind = self.term + 1, MsgType.PRE_VOTE
        else:
            self._become_candidate()
            term, kind = self.term, MsgType.VOTE
        self._votes = {self.id: True}
        if self._tally() is VoteResult.WON:
            self._won_election(pre)
            return
        last = self.store.last_index()
        last_term = self.store.term(last)
        for v in sorted(self.conf.voters):
            if v != self.id:
                context = TRANSFER_CONTEXT if transfer else 0
                self._send(Message(kind, self.id, v, term, index=last, log_term=last_term, context=context))

    def _won_election(self, pre: bool) -> None:
        if pre:
            self._campaign(pre=False)
        else:
            self._become_leader()

    def _tally(self) -> VoteResult:
        return self.conf.vote_result(self._votes)

    # ------------------------------------------------------------------------------------------
    # Messages by role
    # ------------------------------------------------------------------------------------------

    def _handle_vote_request(self, m: Message) -> None:
        resp = MsgType.VOTE_RESP if m.type is MsgType.VOTE else MsgType.PRE_VOTE_RESP
        can_vote = (
            self.vote == m.src
            or (self.vote is None and self.lead is None)
            or (m.type is MsgType.PRE_VOTE and m.term > self.term)
        )
        last = self.store.last_index()
        last_term = self.store.term(last)
        up_to_date = m.log_term > last_term or (m.log_term == last_term and m.index >= last)
        if self.cfg.can_vote and can_vote and up_to_date:
            if m.type is MsgType.VOTE:
                self._election_elapsed = 0
                self.vote = m.src
                self._vote_needs = self._sync_seq + 1
                self._writes_pending = True
            self._send(Message(resp, self.id, m.src, m.term))
        else:
            self._send(Message(resp, self.id, m.src, self.term, reject=True))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
            self._become_follower(m.term, m.src)
            self._step_follower(m)
        elif t is MsgType.PROP or t is MsgType.READ_INDEX:
            self._reject_unserved(m)
        elif (t is MsgType.VOTE_RESP and self.role is Role.CANDIDATE) or (
            t is MsgType.PRE_VOTE_RESP and self.role is Role.PRE_CANDIDATE
        ):
            self._votes.setdefault(m.src, not m.reject)
            result = self._tally()
            if result is VoteResult.WON:
                self._won_election(self.role is Role.PRE_CANDIDATE)
            elif result is VoteResult.LOST:
                self._become_follower(self.term, None)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is MsgType.APP:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_append(m)
        elif t is MsgType.HEARTBEAT:
            self._election_elapsed = 0
            self.lead = m.src
            self.commit = max(self.commit, min(m.commit, self.store.last_index()))
            self._send(
                Message(MsgType.HEARTBEAT_RESP, self.id, m.src, self.term, index=m.index, context=m.context)
            )
        elif t is MsgType.SNAPSHOT:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_snapshot(m)
        elif t is MsgType.TIMEOUT_NOW:
            if self._ticks >= self._timeout_now_stale_until:
                self._campaign(pre=False, transfer=True)
        elif t is MsgType.READ_INDEX_RESP:
            if self._forwarded_reads.pop(m.context, None) is not None:
                if m.reject:
                    self._failed_reads.append(m.context)
                else:
                    self._pending_reads.append(ReadState(m.context, m.index))
        elif t is MsgType.PROP:
            if self.lead is not None and self.cfg.forward_proposals:
                self._send(Message(MsgType.PROP, self.id, self.lead, self.term, payloads=m.payloads))
        elif t is MsgType.READ_INDEX:
            self._reject_unserved(m)

    def _reject_unserved(self, m: Message) -> None:
        if m.type is MsgType.READ_INDEX:
            self._send(
                Message(MsgType.READ_INDEX_RESP, self.id, m.src, self.term, context=m.context, reject=True)
            )
        # Forwarded proposals that reach a non-leader are dropped; the proposer's deadline and
        # retry (with its session sequence) take care of them.

    def _step_leader(self, m: Message) -> None:
        t = m.type
        pr = self.progress.get(m.src)
        if t is MsgType.PROP:
            # Forwarded payloads come from the network: only well-formed envelopes enter the log,
            # or one bad peer could make every replica trip over the same entry.
            # Membership changes are proposed on the leader only, where they are checked.
            valid = [p for p in m.payloads if payload_is_valid(p) and not is_conf_change(p)]
            if valid and self.lead_transferee is None:
                try:
                    self._admit(valid)
                except LeaderOverloadedError:
                    return  # as during a transfer: the forwarding node proposes them again later
                self._append_as_leader(valid)
            return
        if pr is None:
            return  # not (or no longer) a member
        if t in (MsgType.APP_RESP, MsgType.HEARTBEAT_RESP, MsgType.READ_INDEX):
            pr.recent_active = True
            pr.responded_tick = self._ticks
        if t is MsgType.APP_RESP:
            self._handle_append_response(m, pr)
        elif t is MsgType.HEARTBEAT_RESP:
            # The lease counts from when the answered heartbeat was *sent*: the follower reset
            # its election timer no earlier than that.
            pr.last_heard_tick = max(pr.last_heard_tick, m.index)
            if pr.match < self.store.last_index():
                pr.probe_sent = False
                if pr.state is ProgressState.REPLICATE and len(pr.inflight) >= self.cfg.max_inflight:
                    # The follower is alive but may have lost every append in flight (it
                    # restarted, or a link dropped them): a full window would wait forever, so
                    # each heartbeat lets one more append out, and its answer repairs the rest.
                    pr.inflight.popleft()
                self._send_append(m.src)
            elif m.src == self.lead_transferee:
                # The target is caught up and still a follower: its TimeoutNow may have been lost
                # (a peer stream that breaks drops what it carried), so each of its heartbeat
                # answers brings another. A copy that arrives after the target campaigned is from
                # an older term by then, and ignored.
                self._send_timeout_now(m.src)
            if m.context:
                self._ack_read_rounds(m.src, m.context)
        elif t is MsgType.READ_INDEX:
            self._handle_read_request(m.src, m.context, False)

    # ------------------------------------------------------------------------------------------
    # Replication
    # ------------------------------------------------------------------------------------------

    def _append_as_leader(self, payloads: Sequence[bytes], *, conf: bool = False) -> tuple[int, int]:
        first = self.store.last_index() + 1
        term = self.term
        entries: Sequence[Entry]
        if self._framed:
            entries = self._fresh = EntryBatch.from_payloads(first, term, payloads)
        else:
            entries = entries_from_payloads(first, term, payloads)
        self.store.append(entries)
        self._keep_appended(entries)
        if conf:
            self._note_conf_changes(entries)
        self._log_needs = self._sync_seq + 1
        self._writes_pending = True
        last = first + len(payloads) - 1
        self._broadcast_append()
        return first, last

    def _handle_append(self, m: Message) -> None:
        if m.index < self.commit:
            # Everything up to our commit index is known to match the leader.
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.commit))
            return
        if self._match_term(m.index, m.log_term):
            last_new = m.index + len(m.entries)
            if m.entries:
                self._append_from_leader(m)
            self.commit = max(self.commit, min(m.commit, last_new))
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=last_new))
            return
        hint = min(m.index, self.store.last_index())
        hint, hint_term = self._find_conflict_by_term(hint, m.log_term)
        self._send(
            Message(
                MsgType.APP_RESP,
                self.id,
                m.src,
                self.term,
                index=m.index,
                reject=True,
                reject_hint=hint,
                log_term=hint_term,
                # A node that lost its disk says so: the leader must not take this rejection
                # for a stale one just because it once saw this node hold more.
                context=LOG_LOST_CONTEXT if not self.cfg.can_vote else 0,
            )
        )

    def _append_from_leader(self, m: Message) -> None:
        entries = m.entries
        last = self.store.last_index()
        start = 0
        if entries[0].index <= last:
            # Skip what we already hold; truncate at the first entry that conflicts (Figure 7).
            while start < len(entries) and entries[start].index <= last:
                e = entries[start]
                if self.store.term(e.index) != e.term:
                    if e.index <= self.commit:
                        raise AssertionError(
                            f"node {self.id}: leader {m.src} conflicts with committed entry {e.index}"
                        )
                    self.store.truncate_suffix(e.index)
                    self._forget_appended_from(e.index)
                    self._forget_conf_changes_from(e.index)
                    self._cut_at(e.index - 1)
                    self._apply_dispatched = min(self._apply_dispatched, e.index - 1)
                    break
                start += 1
        if start < len(entries):
            appended = entries[start:] if start else entries
            self.store.append(appended)
            self._keep_appended(appended)
            self._note_conf_changes(appended)
            self._log_needs = self._sync_seq + 1
            self._writes_pending = True

    def _cut_at(self, kept: int) -> None:
        """The log now ends at ``kept`` (a truncation, or a reset to a snapshot): a sync already
        handed out may still report an older, longer log durable, and an acknowledgement not
        sent yet may vouch for entries past ``kept``, which the log no longer holds (the entries
        appended there next are another leader's): it is dropped, not released by a later sync
        as if they were on disk. The leader it was for learns where this log stands from the
        next answer."""
        self.durable = min(self.durable, kept)
        if self._sync_seq > self._synced_seq:
            self._cuts.append((self._sync_seq, kept))

        def vouches_past_the_cut(m: Message) -> bool:
            return m.type is MsgType.APP_RESP and not m.reject and m.index > kept

        if self._held:
            self._held = [(need, m) for need, m in self._held if not vouches_past_the_cut(m)]
        if self._msgs:
            self._msgs = [m for m in self._msgs if not vouches_past_the_cut(m)]

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is None:
            return
        if snap.index <= self.commit:
            ack = self.commit  # nothing new in it: everything it covers is committed here already
        elif self._match_term(snap.index, snap.term):
            # Our log already holds what the snapshot covers: apply those entries as usual.
            self.commit = ack = snap.index
        else:
            # The log does not reach the snapshot or has diverged before its end: everything
            # in it is either covered by the snapshot or uncommitted, so it goes (§7).
            self.store.reset(snap.index, snap.term)
            self._appended.clear()
            # The reset made the log durable to the snapshot's index, and nothing past it.
            self.commit = self.durable = self._apply_dispatched = ack = snap.index
            self._cut_at(snap.index)
            self._conf_base = (snap.index, snap.voters, snap.learners)
            self._conf_base_term = snap.term
            self._conf_entries = []
            self._adopt_conf()
            self._restore = snap
        self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=ack))

    def _match_term(self, index: int, term: int) -> bool:
        try:
            return self.store.term(index) == term
        except (LogIndexError, LogCompactedError):
            return False

    def _find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, and that term: where the
        two logs may agree, so the leader can skip a whole term per round trip."""
        try:
            first = self.store.first_index()
            while index >= first:
                t = self.store.term(index)
                if t <= term:
                    return index, t
                index -= 1
            return index, self.store.term(index) if index == first - 1 else 0
        except LogCompactedError:
            return index, 0  # compacted by the driver meanwhile: a coarser hint, still correct

    def _handle_append_rejection(self, m: Message, pr: Progress) -> None:
        if m.context == LOG_LOST_CONTEXT and m.reject_hint < pr.match:
            pr.match = m.reject_hint
            pr.become_probe()
        elif pr.state is ProgressState.REPLICATE and m.index <= pr.match:
            return  # stale rejection of something already acked
        if pr.state is ProgressState.PROBE and m.index != pr.next - 1:
            return  # answer to an older probe
        probe = m.reject_hint
        if m.log_term > 0:
            probe, _ = self._find_conflict_by_term(m.reject_hint, m.log_term)
        pr.become_probe()
        pr.next = max(min(m.index, probe + 1), pr.match + 1)
        self._send_append(m.src)

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.index > self.store.last_index():
            # No follower can hold what this leader never appended: a forged or corrupt answer.
            # Taken, it would count towards a commit of entries that do not exist.
            return
        if m.reject:
            self._handle_append_rejection(m, pr)
            return
        was_paused = pr.is_paused(self.cfg.max_inflight)
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        if self._maybe_commit():
            self._after_commit()
            if self.role is not Role.LEADER:
                return
        elif was_paused:
            self._send_append(m.src)
        while self._send_append(m.src, allow_empty=False):
            pass
        if m.src == self.lead_transferee and pr.match == self.store.last_index():
            self._send_timeout_now(m.src)

    def _send_append(self, to: int, *, allow_empty: bool = True) -> bool:
        pr = self.progress[to]
        if pr.is_paused(self.cfg.max_inflight):
            return False
        last = self.store.last_index()
        prev = pr.next - 1
        try:
            prev_term = self.store.term(prev)
            entries: Sequence[Entry] = ()
            if pr.next <= last:
                hi = min(last + 1, pr.next + self.cfg.max_batch_entries)
                fresh = self._fresh
                if (
                    fresh is not None
                    and fresh.first_index == pr.next
                    and fresh.last_index == hi - 1
                    and fresh.framed_bytes <= self.cfg.max_batch_bytes
                ):
                    # What this leader appended last: nothing can have replaced it in the log
                    # since (a leader only appends, and every role change forgets it).
                    entries = fresh
                elif self._framed:
                    # Read already framed, the way they travel: no object per entry.
                    entries = self.store.entry_batch(pr.next, hi, self.cfg.max_batch_bytes)  # type: ignore[attr-defined]
                else:
                    entries = self.store.entries(pr.next, hi, self.cfg.max_batch_bytes)
        except LogCompactedError:
            pr.become_snapshot(self.store.first_index() - 1)
            self._snapshot_needed.append(to)
            return False
        if not entries and not allow_empty:
            return False
        self._send(
            Message(
                MsgType.APP,
                self.id,
                to,
                self.term,
                index=prev,
                log_term=prev_term,
                entries=entries,
                commit=self.commit,
            )
        )
        pr.commit_sent = max(pr.commit_sent, self.commit)
        if pr.state is ProgressState.REPLICATE:
            if entries:
                pr.next = entries[-1].index + 1
                pr.inflight.append(entries[-1].index)
        else:
            pr.probe_sent = True
        return True

    @property
    def commit_unannounced(self) -> bool:
        """Whether a follower that could take a message has not been sent the commit index yet:
        the driver then calls :meth:`announce_commit` soon (a few milliseconds later)."""
        if self.role is not Role.LEADER:
            return False
        return any(
            pr.commit_sent < self.commit and not pr.is_paused(self.cfg.max_inflight)
            for p, pr in self.progress.items()
            if p != self.id
        )

    def announce_commit(self, up_to: int | None = None) -> None:
        """Sends the commit index to every follower that has not been sent ``up_to`` yet (default:
        the current commit index), as an empty append or the next entries if any are waiting.

        A driver passes the commit index it saw when it armed its announce timer: an index that
        an append carried meanwhile needs no message of its own, and a newer one gets its own
        delay. Announcing the newest index instead would send an extra round of messages per
        write whenever writes come a little slower than the delay."""
        if self.role is not Role.LEADER:
            return
        wanted = self.commit if up_to is None else min(up_to, self.commit)
        for p, pr in self.progress.items():
            if p != self.id and pr.commit_sent < wanted:
                self._send_append(p)

    def _broadcast_new_entries(self) -> None:
        for p in self.progress:
            if p != self.id:
                while self._send_append(p, allow_empty=False):
                    pass

    def _broadcast_append(self) -> None:
        for p in self.progress:
            if p != self.id and self._send_append(p):
                # A follower in REPLICATE takes a pipeline of batches, up to the in-flight window.
                while self._send_append(p, allow_empty=False):
                    pass

    def _broadcast_heartbeat(self, context: int) -> None:
        for p, pr in self.progress.items():
            if p != self.id:
                commit = min(pr.match, self.commit)
                pr.commit_sent = max(pr.commit_sent, commit)
                self._send(
                    Message(
                        MsgType.HEARTBEAT,
                        self.id,
                        p,
                        self.term,
                        index=self._ticks,
                        commit=commit,
                        context=context,
                    )
                )

    def _maybe_commit(self) -> bool:
        acked = {v: self.progress[v].match for v in self.conf.voters if v in self.progress}
        index = self.conf.committed_index(acked)
        # Only an entry of the current term commits by counting replicas (§5.4.2, Figure 8);
        # earlier entries commit with it.
        if index > self.commit and self.store.term(index) == self.term:
            self.commit = index
            self._on_commit_in_term()
            return True
        return False

    def heard_from_recently(self, peer: int) -> bool:
        """Whether ``peer`` answered this leader within the last election timeout (this node
        itself always counts): a membership change counts only such voters as reachable."""
        if peer == self.id:
            return True
        pr = self.progress.get(peer)
        return pr is not None and self._ticks - pr.responded_tick < self.cfg.election_ticks

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.cfg.election_ticks:
            self._election_elapsed = 0
            if self.cfg.check_quorum:
                active = {v: self.progress[v].recent_active or v == self.id for v in self.conf.voters}
                for p in self.progress.values():
                    p.recent_active = False
                if self.conf.vote_result(active) is not VoteResult.WON:
                    self._become_follower(self.term, None)
                    return
            self.lead_transferee = None  # a transfer that took a whole election timeout failed
        if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat(self._read_seq if self._read_rounds else 0)

    # ------------------------------------------------------------------------------------------
    # Reads
    # ------------------------------------------------------------------------------------------

    def _committed_in_term(self) -> bool:
        return self.store.term(self.commit) == self.term

    def _lease_valid(self) -> bool:
        if self._lease_given_up_in == self.term:
            return False
        heard = {
            v: v == self.id or self._ticks - self.progress[v].last_heard_tick < self.cfg.lease_ticks
            for v in self.conf.voters
        }
        return self.conf.vote_result(heard) is VoteResult.WON

    def _handle_read_request(self, src: int, context: int, lease: bool) -> None:
        if not self._committed_in_term():
            # Our commit index may lag the previous leader's until our no-op commits.
            self._read_blocked.append((src, context, lease))
            return
        if (lease and self._lease_valid()) or self.conf.voters == frozenset({self.id}):
            self._release_read(src, context, self.commit)
            return
        self._read_waiting.append((src, context))
        if not self._read_rounds:
            self._start_read_round()

    def _start_read_round(self) -> None:
        self._read_seq += 1
        self._read_rounds[self._read_seq] = _ReadRound(self.commit, self._read_waiting, {self.id})
        self._read_waiting = []
        self._broadcast_heartbeat(self._read_seq)

    def _ack_read_rounds(self, src: int, context: int) -> None:
        done = 0
        for seq, rnd in self._read_rounds.items():
            if seq > context:
                break
            rnd.acks.add(src)
            if self.conf.vote_result(dict.fromkeys(rnd.acks, True)) is VoteResult.WON:
                done = seq
        if not done:
            return
        # A confirmed round confirms every earlier one too.
        for seq in [s for s in self._read_rounds if s <= done]:
            rnd = self._read_rounds.pop(seq)
            for req_src, req_ctx in rnd.requests:
                self._release_read(req_src, req_ctx, rnd.index)
        if self._read_waiting and not self._read_rounds:
            self._start_read_round()

    def _release_read(self, src: int, context: int, index: int) -> None:
        if src == self.id:
            self._pending_reads.append(ReadState(context, index))
        else:
            self._send(
                Message(MsgType.READ_INDEX_RESP, self.id, src, self.term, index=index, context=context)
            )

    def _on_commit_in_term(self) -> None:
        if self._read_blocked and self._committed_in_term():
            blocked, self._read_blocked = self._read_blocked, []
            for src, ctx, lease in blocked:
                self._handle_read_request(src, ctx, lease)

    def _fail_leader_reads(self) -> None:
        requests = [(s, c) for s, c, _ in self._read_blocked] + self._read_waiting
        for rnd in self._read_rounds.values():
            requests.extend(rnd.requests)
        self._read_blocked, self._read_waiting, self._read_rounds = [], [], {}
        for src, ctx in requests:
            if src == self.id:
                self._failed_reads.append(ctx)
            else:
                self._send(
                    Message(MsgType.READ_INDEX_RESP, self.id, src, self.term, context=ctx, reject=True)
                )
        # Reads forwarded to a leader we no longer follow will never be answered.
        self._failed_reads.extend(sorted(self._forwarded_reads))
        self._forwarded_reads.clear()

    # ------------------------------------------------------------------------------------------
    # Sending
    # ------------------------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        # A message may leave only once what it vouches for is durable: everything sent in a
        # term (or after a vote) not yet on disk, and any ack of entries not yet on disk.
        need = self._vote_needs
        if m.type is MsgType.APP_RESP and not m.reject and self._log_needs > need:
            need = self._log_needs
        if need > self._synced_seq:
            self._held.append((need, m))
        else:
            self._msgs.append(m)
