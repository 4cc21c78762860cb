"""A deterministic simulated Raft cluster on virtual time.

Every node runs the real protocol core (:class:`dengine.raft.Raft`) and applies entries to a real
state machine; only the world around it is simulated: a network with per-link delay, loss,
duplication, reordering and partitions; disks whose unsynced writes vanish on a crash; clocks;
processes that freeze for a while (a SIGSTOP, a stalled VM, a long garbage collection).
Everything random comes from one seed, so a run replays bit for bit.

While it runs, :class:`~dengine.testing.invariants.InvariantChecker` watches every node and raises
:class:`SimulationFailure` the moment a Raft safety property breaks.
"""

from __future__ import annotations

import heapq
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dengine._core import Entry
from dengine.errors import DengineError, NotLeaderError, ProposalDroppedError
from dengine.raft import Message, MsgType, Raft, RaftConfig, Role, SnapshotInfo, payload
from dengine.raft.membership import ConfChangeError, ConfOp
from dengine.raft.sessions import Applied, Outcome, SessionItems, SessionTable, apply_entry
from dengine.state_machine import StateMachine
from dengine.testing.invariants import InvariantChecker, SimulationFailure
from dengine.testing.simstore import SimLogStore

__all__ = ["NetworkConfig", "SimCluster", "SimNode", "SimSnapshot", "SimulationFailure", "SnapshotPolicy"]


@dataclass(slots=True)
class NetworkConfig:
    """Link behaviour. Delays are in virtual milliseconds."""

    min_delay: float = 0.5
    max_delay: float = 3.0
    drop: float = 0.0
    duplicate: float = 0.0
    disk_latency: float = 0.3  # typical sync time; each sync takes 0.1 to 3 times this
    tick_ms: float = 10.0
    announce_delay: float = 2.0  # how long a leader lets a new commit index wait for an append


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    """When simulated nodes snapshot and how much log they keep (``every = 0``: never on their
    own; :meth:`SimCluster.take_snapshot` still works). Times are virtual milliseconds."""

    every: int = 0
    trailing: int = 0
    keep: int = 2
    create_ms: float = 2.0
    install_ms: float = 2.0
    transfer_ms: float = 5.0


@dataclass(frozen=True, slots=True)
class SimSnapshot:
    """A snapshot on a simulated disk: the state machine's bytes and the session table."""

    info: SnapshotInfo
    state: bytes
    sessions: SessionItems


@dataclass(slots=True)
class _Waiter:
    on_done: Callable[[Applied], None]


@dataclass(slots=True)
class SimNode:
    """One simulated machine: its disk survives crashes, everything else does not."""

    id: int
    store: SimLogStore
    make_state_machine: Callable[[], StateMachine]
    config: RaftConfig
    raft: Raft | None = None
    sm: Any = None
    sessions: SessionTable = field(default_factory=SessionTable)
    incarnation: int = 0
    write_waiters: dict[tuple[int, int], list[_Waiter]] = field(default_factory=dict)
    read_waiters: dict[int, Callable[[bool], None]] = field(default_factory=dict)
    next_read_ctx: int = 0
    snapshots: list[SimSnapshot] = field(default_factory=list)  # on disk: survives crashes
    snapshotting: bool = False
    sending_snapshot: set[int] = field(default_factory=set)
    announcing: bool = False  # an announce_commit() is scheduled
    paused: bool = False  # frozen: runs no tick and handles nothing until it wakes
    missed_ticks: int = 0
    held: list[Callable[[], None]] = field(default_factory=list)  # what waits for it to wake
    disk_idle_at: float = 0.0  # when its disk finishes the syncs queued so far

    def latest_snapshot(self) -> SimSnapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    @property
    def alive(self) -> bool:
        return self.raft is not None


class SimCluster:
    """A cluster of ``n`` voters driven on virtual time by one seeded event queue."""

    def __init__(
        self,
        n: int = 3,
        *,
        seed: int = 0,
        state_machine: Callable[[], StateMachine],
        network: NetworkConfig | None = None,
        raft_options: dict[str, Any] | None = None,
        check_invariants: bool = True,
        snapshots: SnapshotPolicy | None = None,
    ) -> None:
        self.seed = seed
        self.replay = f"the same calls on SimCluster(seed={seed}) replay this run bit for bit"
        """How to replay this run, named in every failure (a harness built on the cluster says
        which of its own calls does)."""
        self.rng = random.Random(seed)
        # Sync times have a stream of their own: other draws stay as they were.
        self.disk_rng = random.Random(seed * 2 + 1)
        self.net = network or NetworkConfig()
        self.snapshot_policy = snapshots or SnapshotPolicy()
        self.snapshots_taken = 0
        self.snapshots_installed = 0
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._blocked: set[tuple[int, int]] = set()
        ids = list(range(1, n + 1))
        voters = frozenset(ids)
        opts = dict(raft_options or {})
        self.nodes: dict[int, SimNode] = {
            i: SimNode(i, SimLogStore(), state_machine, RaftConfig(id=i, voters=voters, **opts)) for i in ids
        }
        self.checker = InvariantChecker(self) if check_invariants else None
        self.messages_sent = 0
        self._raft_options = opts
        self._make_state_machine = state_machine
        for node in self.nodes.values():
            self._start(node)

    def add_node(self, node_id: int) -> SimNode:
        """Starts a new, empty machine that belongs to no configuration yet: it waits for the
        leader to add it (see :meth:`change_membership`) and learns everything from the log or a
        snapshot."""
        if node_id in self.nodes:
            raise ValueError(f"node {node_id} exists")
        config = RaftConfig(id=node_id, voters=frozenset(), **self._raft_options)
        node = self.nodes[node_id] = SimNode(node_id, SimLogStore(), self._make_state_machine, config)
        self._start(node)
        return node

    def membership_change_done(self, op: ConfOp, target: int) -> bool | None:
        """Whether the current leader's configuration shows ``op`` of ``target`` committed:
        True, False (not in its configuration yet), or None (no leader, or not committed)."""
        leader = self.leader()
        raft = self.nodes[leader].raft if leader is not None else None
        if raft is None:
            return None
        members = raft.conf.voters | raft.learners
        done = (
            (op is ConfOp.ADD_LEARNER and target in members)
            or (op is ConfOp.PROMOTE and target in raft.conf.voters)
            or (op is ConfOp.REMOVE and target not in members)
        )
        if done and raft.conf_index > raft.commit:
            return None
        return done

    def change_membership(self, node_id: int, op: ConfOp, target: int) -> str | None:
        """Proposes a membership change at ``node_id`` (which must lead); returns the refusal,
        if any. Addresses are simulated as ``sim:<id>``."""
        raft = self.nodes[node_id].raft
        if raft is None:
            return "node is down"
        if self.nodes[node_id].paused:
            return "node is paused"  # an operator's request to a frozen node times out
        members = raft.conf.voters | raft.learners
        try:
            raft.propose_conf_change(
                op, target, address=f"sim:{target}", addresses={m: f"sim:{m}" for m in members}
            )
        except (NotLeaderError, ProposalDroppedError, ConfChangeError) as exc:
            return str(exc)
        self._drive(self.nodes[node_id])
        return None

    def transfer_leadership(self, node_id: int, target: int | None = None) -> str | None:
        """Asks ``node_id`` (which must lead) to hand leadership to ``target`` (default: the most
        up-to-date voter); returns the refusal, if any. Whether the transfer completes is up to
        the network, as with a real cluster."""
        raft = self.nodes[node_id].raft
        if raft is None:
            return "node is down"
        if self.nodes[node_id].paused:
            return "node is paused"
        try:
            raft.transfer_leadership(target)
        except (NotLeaderError, ValueError) as exc:
            return str(exc)
        self._drive(self.nodes[node_id])
        return None

    # --- event queue ----------------------------------------------------------------------------

    def schedule(self, delay: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, action))

    def run_until(self, t: float) -> None:
        """Runs every event up to virtual time ``t``. An error raised by anything the run calls
        (the protocol core, a store, a state machine, a callback) comes out as a
        :class:`SimulationFailure` that names the seed, the virtual time and how to replay."""
        try:
            while self._events and self._events[0][0] <= t:
                when, _, action = heapq.heappop(self._events)
                self.now = when
                action()
        except SimulationFailure:
            raise
        except Exception as exc:
            raise SimulationFailure(
                f"seed {self.seed}: {type(exc).__name__} at {self.now:.1f} ms virtual time: {exc} "
                f"({self.replay})"
            ) from exc
        self.now = max(self.now, t)

    def run_for(self, ms: float) -> None:
        self.run_until(self.now + ms)

    def run_until_true(self, cond: Callable[[], bool], timeout: float, step: float = 5.0) -> bool:
        deadline = self.now + timeout
        while self.now < deadline:
            if cond():
                return True
            self.run_for(step)
        return cond()

    # --- nodes ----------------------------------------------------------------------------------

    def _start(self, node: SimNode) -> None:
        node.incarnation += 1
        node.sm = node.make_state_machine()
        node.sessions = SessionTable()
        node.write_waiters = {}
        node.read_waiters = {}
        node.snapshotting = False
        node.announcing = False
        node.sending_snapshot = set()
        snap = node.latest_snapshot()
        if snap is not None:
            # Restart from the latest snapshot plus the log tail; a log that does not continue
            # it (the crash came between installing a received snapshot and resetting the log)
            # is reset to it, exactly as the install would have done.
            self._restore_state(node, snap)
            s = snap.info
            store = node.store
            if not (
                store.first_index() - 1 <= s.index <= store.last_index() and store.term(s.index) == s.term
            ):
                store.reset(s.index, s.term)
        config = node.config
        if node.store.wiped:
            # An empty disk in a cluster that exists: this node may have voted in terms it no
            # longer remembers, so it must not vote again until an operator re-adds it.
            config = RaftConfig(**{**_config_fields(config), "can_vote": False})
        node.raft = Raft(
            config,
            node.store,
            seed=self.seed * 1_000_003 + node.incarnation,
            snapshot=snap.info if snap is not None else None,
        )
        incarnation = node.incarnation
        phase = self.rng.uniform(0, self.net.tick_ms)
        self.schedule(phase, lambda: self._tick(node, incarnation))

    def _tick(self, node: SimNode, incarnation: int) -> None:
        if node.raft is None or node.incarnation != incarnation:
            return
        if node.paused:
            node.missed_ticks += 1
        else:
            node.raft.tick()
            self._drive(node)
        self.schedule(self.net.tick_ms, lambda: self._tick(node, incarnation))

    def pause(self, node_id: int, ms: float) -> None:
        """Freezes a live node for ``ms`` virtual milliseconds, as a SIGSTOP, a stalled VM or a
        long garbage collection would: it runs no tick and handles nothing, while messages, its
        disk's completions and client requests for it wait. On waking it first runs every tick
        it missed, as dengine's node does, then handles what waited, in order."""
        node = self.nodes[node_id]
        if node.raft is None or node.paused:
            return
        node.paused = True
        incarnation = node.incarnation
        self.schedule(ms, lambda: self._wake(node, incarnation))

    def _wake(self, node: SimNode, incarnation: int) -> None:
        if node.raft is None or node.incarnation != incarnation:
            return
        node.paused = False
        missed, node.missed_ticks = node.missed_ticks, 0
        for _ in range(missed):
            node.raft.tick()
        node.raft.note_pause(missed)
        self._drive(node)
        held, node.held = node.held, []
        for action in held:
            action()

    def _held(self, node: SimNode, action: Callable[[], None]) -> bool:
        """Keeps ``action`` (something that happens to ``node``) until the node wakes, if it is
        paused; returns whether it did."""
        if node.paused:
            node.held.append(action)
        return node.paused

    def crash(self, node_id: int) -> None:
        """Kills a node: its unsynced writes are lost, its in-memory state is gone."""
        node = self.nodes[node_id]
        if node.raft is None:
            return
        node.raft = None
        node.sm = None
        node.store.crash()
        node.incarnation += 1
        node.paused, node.missed_ticks, node.held = False, 0, []
        node.disk_idle_at = self.now  # the syncs in flight are gone with it
        for waiters in node.write_waiters.values():
            for w in waiters:
                w.on_done(Applied(0, Outcome.STALE, error="node crashed"))
        for cb in node.read_waiters.values():
            cb(False)
        node.write_waiters, node.read_waiters = {}, {}
        if self.checker:
            self.checker.on_crash(node)

    def restart(self, node_id: int, *, wipe: bool = False) -> None:
        """Starts a crashed node again from its disk (or from an empty disk with ``wipe``)."""
        node = self.nodes[node_id]
        if node.raft is not None:
            self.crash(node_id)
        if wipe:
            node.store.wipe()
            node.snapshots = []
            if self.checker is not None:
                self.checker.on_wipe(node)
        self._start(node)

    def leader(self) -> int | None:
        """The live node that is leader in the highest term, if any."""
        best: tuple[int, int] | None = None
        for node in self.nodes.values():
            raft = node.raft
            if raft is not None and raft.role is Role.LEADER and (best is None or raft.term > best[0]):
                best = (raft.term, node.id)
        return best[1] if best else None

    # --- network ----------------------------------------------------------------------------------

    def partition(self, *groups: set[int]) -> None:
        """Only nodes in the same group can talk; nodes in no group are cut off from all."""
        self._blocked = {
            (a, b)
            for a in self.nodes
            for b in self.nodes
            if a != b and not any(a in g and b in g for g in groups)
        }

    def block(self, src: int, dst: int) -> None:
        """Drops messages from ``src`` to ``dst`` (a one-way partition)."""
        self._blocked.add((src, dst))

    def heal(self) -> None:
        self._blocked.clear()

    def _send(self, m: Message) -> None:
        self.messages_sent += 1
        if self.checker:
            self.checker.on_send(m)
        if (m.src, m.dst) in self._blocked or self.rng.random() < self.net.drop:
            return
        copies = 2 if self.rng.random() < self.net.duplicate else 1
        for _ in range(copies):
            delay = self.rng.uniform(self.net.min_delay, self.net.max_delay)
            self.schedule(delay, lambda: self._deliver(m))

    def _deliver(self, m: Message) -> None:
        node = self.nodes[m.dst]
        if node.raft is None or self._held(node, lambda: self._deliver(m)):
            return
        node.raft.step(m)
        self._drive(node)

    # --- the driver loop: what a runtime does with each Ready ------------------------------------

    def _drive(self, node: SimNode) -> None:
        raft = node.raft
        assert raft is not None
        while raft.has_ready():
            rd = raft.ready()
            if rd.sync is not None:
                node.store.begin_sync()
                self._schedule_sync(node, rd.sync)
            for m in rd.messages:
                self._send(m)
            if rd.restore is not None:
                self._install(node, rd.restore)
            if rd.committed:
                self._apply(node, rd.committed)
            for peer in rd.snapshot_needed:
                self._send_snapshot(node, peer)
            for ctx, ok in [(r.context, True) for r in rd.reads] + [(c, False) for c in rd.failed_reads]:
                done = node.read_waiters.pop(ctx, None)
                if done:
                    done(ok)
            if self.checker:
                self.checker.on_ready(node, rd)
        if raft.commit_unannounced and not node.announcing:
            node.announcing = True
            incarnation, up_to = node.incarnation, raft.commit
            self.schedule(self.net.announce_delay, lambda: self._announce(node, incarnation, up_to))

    def _announce(self, node: SimNode, incarnation: int, up_to: int) -> None:
        if node.incarnation != incarnation:
            return
        if self._held(node, lambda: self._announce(node, incarnation, up_to)):
            return
        node.announcing = False
        if node.raft is not None:
            node.raft.announce_commit(up_to)
            self._drive(node)

    def _apply(self, node: SimNode, entries: Sequence[Entry]) -> None:
        for entry in entries:
            applied = apply_entry(entry, node.sessions, node.sm.apply)
            if self.checker:
                self.checker.on_apply(node, entry, applied)
            if applied.client_id:
                for w in node.write_waiters.pop((applied.client_id, applied.sequence), []):
                    w.on_done(applied)
        assert node.raft is not None
        node.raft.applied_to(entries[-1].index)
        policy = self.snapshot_policy
        last = node.latest_snapshot()
        if policy.every and node.raft.applied - (last.info.index if last else 0) >= policy.every:
            self.take_snapshot(node.id)

    # --- snapshots ----------------------------------------------------------------------------------

    def take_snapshot(self, node_id: int) -> bool:
        """Starts a snapshot of ``node_id``'s applied state. It reaches the disk (and the log is
        compacted behind it) a little later; a crash before then loses it. False if the node is
        down or paused, already snapshotting, or has nothing new."""
        node = self.nodes[node_id]
        raft = node.raft
        last = node.latest_snapshot()
        if (
            raft is None
            or node.paused
            or node.snapshotting
            or raft.applied <= (last.info.index if last else 0)
        ):
            return False
        voters, learners = raft.conf_at(raft.applied)
        if not voters:
            return False  # a joining node before the entry that added it: no configuration known
        sink = io.BytesIO()
        node.sm.snapshot(sink)
        info = SnapshotInfo(raft.applied, raft.store.term(raft.applied), voters, learners)
        snap = SimSnapshot(info, sink.getvalue(), node.sessions.items())
        node.snapshotting = True
        incarnation = node.incarnation
        self.schedule(self.snapshot_policy.create_ms, lambda: self._snapshot_written(node, incarnation, snap))
        return True

    def _snapshot_written(self, node: SimNode, incarnation: int, snap: SimSnapshot) -> None:
        if node.raft is None or node.incarnation != incarnation:
            return  # crashed while writing: the snapshot never reached the disk
        if self._held(node, lambda: self._snapshot_written(node, incarnation, snap)):
            return
        node.snapshotting = False
        self._keep_snapshot(node, snap)
        self.snapshots_taken += 1
        compact_to = snap.info.index - self.snapshot_policy.trailing
        if compact_to > node.store.first_index() - 1:
            node.store.compact_prefix(compact_to)

    def _keep_snapshot(self, node: SimNode, snap: SimSnapshot) -> None:
        if self.checker:
            self.checker.on_snapshot(node, snap)
        node.snapshots.append(snap)
        node.snapshots.sort(key=lambda s: s.info.index)
        del node.snapshots[: -self.snapshot_policy.keep]

    def _send_snapshot(self, node: SimNode, peer: int) -> None:
        raft = node.raft
        snap = node.latest_snapshot()
        assert raft is not None
        if snap is None or peer in node.sending_snapshot:
            return
        node.sending_snapshot.add(peer)
        term, incarnation = raft.term, node.incarnation
        policy = self.snapshot_policy
        lost = (node.id, peer) in self._blocked or self.rng.random() < self.net.drop

        def report(ok: bool) -> None:
            if node.raft is None or node.incarnation != incarnation or self._held(node, lambda: report(ok)):
                return
            node.sending_snapshot.discard(peer)
            node.raft.report_snapshot(peer, snap.info.index, ok=ok)
            self._drive(node)

        def arrive() -> None:
            dst = self.nodes[peer]
            if dst.raft is None or (node.id, peer) in self._blocked:
                report(False)
                return
            dst_incarnation = dst.incarnation
            # Writing the received file takes a while; a crash meanwhile loses it.
            self.schedule(policy.install_ms, lambda: installed(dst, dst_incarnation))

        def installed(dst: SimNode, dst_incarnation: int) -> None:
            if dst.raft is None or dst.incarnation != dst_incarnation:
                report(False)
                return
            if self._held(dst, lambda: installed(dst, dst_incarnation)):
                return
            self._keep_snapshot(dst, snap)
            # The file is durable now; the node hands it to its core a moment later, and a crash
            # in between must leave a node that restarts correctly from it.
            self.schedule(policy.install_ms / 10, lambda: handed_over(dst, dst_incarnation))

        def handed_over(dst: SimNode, dst_incarnation: int) -> None:
            if dst.raft is None or dst.incarnation != dst_incarnation:
                report(False)
                return
            if self._held(dst, lambda: handed_over(dst, dst_incarnation)):
                return
            self._deliver(Message(MsgType.SNAPSHOT, node.id, peer, term, snapshot=snap.info))
            self.schedule(self.rng.uniform(self.net.min_delay, self.net.max_delay), lambda: report(True))

        delay = policy.transfer_ms + self.rng.uniform(self.net.min_delay, self.net.max_delay)
        if lost:
            self.schedule(delay + 50.0, lambda: report(False))
        else:
            self.schedule(delay, arrive)

    def _install(self, node: SimNode, info: SnapshotInfo) -> None:
        snap = next(s for s in node.snapshots if s.info == info)
        self._restore_state(node, snap)
        self.snapshots_installed += 1
        assert node.raft is not None
        node.raft.applied_to(info.index)
        # Writes waiting here whose entries the snapshot covers get their recorded results.
        for key in list(node.write_waiters):
            if node.sessions.lookup(*key) is Outcome.DUPLICATE:
                result, error = node.sessions.stored(*key)
                for w in node.write_waiters.pop(key):
                    w.on_done(Applied(info.index, Outcome.DUPLICATE, result, error, *key))

    def _restore_state(self, node: SimNode, snap: SimSnapshot) -> None:
        node.sm.restore(io.BytesIO(snap.state))
        node.sessions.restore(snap.sessions)
        if self.checker:
            self.checker.on_restore(node, snap)

    def _schedule_sync(self, node: SimNode, seq: int) -> None:
        # Each sync takes its own time (a leader's disk is not always the first one done, so a
        # leader that counted its own entries before they are durable would show), and one disk
        # finishes its syncs in the order they were asked for, as a write-ahead log's do.
        incarnation = node.incarnation
        latency = self.net.disk_latency * self.disk_rng.uniform(0.1, 3.0)
        node.disk_idle_at = max(node.disk_idle_at, self.now + latency)
        self.schedule(node.disk_idle_at - self.now, lambda: self._sync_done(node, incarnation, seq))

    def _sync_done(self, node: SimNode, incarnation: int, seq: int) -> None:
        if node.raft is None or node.incarnation != incarnation:
            return
        if self._held(node, lambda: self._sync_done(node, incarnation, seq)):
            return
        node.raft.synced(seq, node.store.complete_sync())
        self._drive(node)

    # --- client operations ------------------------------------------------------------------------

    def submit_write(
        self, node_id: int, client_id: int, sequence: int, command: bytes, on_done: Callable[[Applied], None]
    ) -> str | None:
        """Proposes a session command at ``node_id``; ``on_done`` runs when that node applies it.

        Returns an error string (not leader, dropped, node down) when it was refused outright.
        A paused node takes the request when it wakes; a refusal then reaches ``on_done`` as a
        failed outcome, as a client would hear it.
        """
        node = self.nodes[node_id]
        if node.raft is None:
            return "node is down"

        def later() -> None:
            refused = self.submit_write(node_id, client_id, sequence, command, on_done)
            if refused is not None:
                on_done(Applied(0, Outcome.STALE, error=refused))

        if self._held(node, later):
            return None
        try:
            # One operation in flight per client: everything before this sequence was answered.
            node.raft.propose([payload.session_command(client_id, sequence, command, sequence)])
        except (NotLeaderError, ProposalDroppedError) as exc:
            return str(exc)
        node.write_waiters.setdefault((client_id, sequence), []).append(_Waiter(on_done))
        self._drive(node)
        return None

    def submit_read(
        self, node_id: int, on_done: Callable[[bool], None], *, lease: bool = False
    ) -> str | None:
        """Starts a linearizable read at ``node_id``; ``on_done(True)`` means the node's state
        machine may now be read, ``on_done(False)`` that the read failed (a paused node takes
        the read when it wakes)."""
        node = self.nodes[node_id]
        if node.raft is None:
            return "node is down"

        def later() -> None:
            if self.submit_read(node_id, on_done, lease=lease) is not None:
                on_done(False)

        if self._held(node, later):
            return None
        node.next_read_ctx += 1
        ctx = node.next_read_ctx
        node.read_waiters[ctx] = on_done
        try:
            node.raft.read_index(ctx, lease=lease)
        except DengineError as exc:
            node.read_waiters.pop(ctx, None)
            return str(exc)
        self._drive(node)
        return None

    def leader_hint(self, node_id: int) -> int | None:
        node = self.nodes[node_id]
        return node.raft.lead if node.raft is not None else None


def _config_fields(config: RaftConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in RaftConfig.__dataclass_fields__}
