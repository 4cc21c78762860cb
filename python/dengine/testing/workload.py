"""A seeded fault-injection run of the built-in KV store, checked for linearizability.

:func:`run_kv_simulation` builds a :class:`~dengine.testing.sim.SimCluster`, lets clients issue
put, get, delete and compare-and-swap against a few contended keys while the seed's fault
schedule crashes nodes, freezes them, partitions the network, moves leadership and loses,
duplicates and delays messages. Then it heals everything, demands that the cluster elect a
leader and accept a write within a bound (liveness), and checks the recorded client history with
the linearizability checker. Any broken invariant raises
:class:`~dengine.testing.invariants.SimulationFailure` naming the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dengine.kv import KVStateMachine, decode_result, encode_cas, encode_delete, encode_put
from dengine.raft.membership import ConfOp
from dengine.raft.sessions import Applied, Outcome
from dengine.testing.invariants import SimulationFailure
from dengine.testing.linearizability import HistoryRecorder, KVInput, KVModel, check
from dengine.testing.sim import NetworkConfig, SimCluster, SnapshotPolicy

__all__ = ["SimReport", "run_kv_simulation"]

ATTEMPT_TIMEOUT_MS = 300.0
OP_DEADLINE_MS = 2500.0
LIVENESS_BOUND_MS = 5000.0
# Search steps allowed per key: CI's 200 seeds need at most about 2,000, so a history that needs
# this many is pathological; it fails the run as undecided instead of stalling CI.
CHECK_BUDGET = 1_000_000


@dataclass(slots=True)
class SimReport:
    """What one seeded run did (all times virtual)."""

    seed: int
    nodes: int
    operations: int = 0
    completed: int = 0
    indeterminate: int = 0
    faults: list[str] = field(default_factory=list)
    messages: int = 0
    virtual_ms: float = 0.0
    terms: int = 0
    snapshot_every: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    membership_changes: int = 0


class _Client:
    """Issues one operation at a time, retrying on timeouts and leader changes."""

    def __init__(self, sim: _Run, client_id: int) -> None:
        self.sim = sim
        self.id = client_id
        self.seq = 0
        self.counter = 0
        self.op_id = -1
        self.input: KVInput | None = None
        self.command = b""
        self.attempt = 0
        self.deadline = 0.0
        self.target: int | None = None
        self.stopped = False

    def next_op(self) -> None:
        if self.stopped or self.sim.cluster.now >= self.sim.stop_at:
            return
        rng = self.sim.rng
        key = rng.choice(self.sim.keys)
        kind = rng.choices(["put", "get", "delete", "cas"], weights=[4, 4, 1, 3])[0]
        self.counter += 1
        value = f"c{self.id}-{self.counter}".encode()
        if kind == "put":
            self.input, self.command = KVInput("put", key, value), encode_put(key, value)
        elif kind == "delete":
            self.input, self.command = KVInput("delete", key), encode_delete(key)
        elif kind == "cas":
            expected = self.sim.last_seen.get(key)
            self.input = KVInput("cas", key, value, expected)
            self.command = encode_cas(key, expected, value)
        else:
            self.input, self.command = KVInput("get", key), b""
        if kind != "get":
            self.seq += 1
        cluster = self.sim.cluster
        self.op_id = self.sim.history.invoke(self.id, self.input)  # virtual time, numbered
        self.sim.report.operations += 1
        self.deadline = cluster.now + OP_DEADLINE_MS
        self.try_once()

    def try_once(self) -> None:
        cluster = self.sim.cluster
        if cluster.now >= self.deadline:
            # Give up: the operation stays in the history as indeterminate.
            self.attempt += 1
            self.sim.report.indeterminate += 1
            cluster.schedule(self.sim.rng.uniform(1, 20), self.next_op)
            return
        self.attempt += 1
        attempt = self.attempt
        target = self.target if self.target is not None else self.sim.rng.choice(list(cluster.nodes))
        assert self.input is not None
        if self.input.op == "get":
            lease = self.sim.lease_reads and self.sim.rng.random() < 0.5
            err = cluster.submit_read(target, lambda ok: self.read_done(attempt, target, ok), lease=lease)
        else:
            err = cluster.submit_write(
                target, self.id, self.seq, self.command, lambda a: self.write_done(attempt, a)
            )
        if err is not None:
            self.retry_elsewhere(attempt, target)
            return
        cluster.schedule(ATTEMPT_TIMEOUT_MS, lambda: self.timed_out(attempt))

    def retry_elsewhere(self, attempt: int, target: int) -> None:
        if attempt != self.attempt:
            return
        hint = self.sim.cluster.leader_hint(target)
        self.target = hint if hint is not None and hint != target else None
        self.sim.cluster.schedule(self.sim.rng.uniform(5, 40), lambda: self.retry(attempt))

    def retry(self, attempt: int) -> None:
        if attempt == self.attempt:
            self.try_once()

    def timed_out(self, attempt: int) -> None:
        if attempt == self.attempt:
            self.target = None
            self.try_once()

    def finish(self, output: object) -> None:
        self.attempt += 1  # late answers to earlier attempts are ignored
        self.sim.history.complete(self.op_id, output)
        self.sim.report.completed += 1
        self.sim.cluster.schedule(self.sim.rng.uniform(0.5, 10), self.next_op)

    def write_done(self, attempt: int, applied: Applied) -> None:
        if attempt != self.attempt:
            return
        if applied.outcome not in (Outcome.APPLIED, Outcome.DUPLICATE) or applied.result is None:
            self.retry_elsewhere(attempt, self.target or 1)
            return
        result = decode_result(applied.result)
        assert self.input is not None
        if self.input.op == "put":
            self.sim.last_seen[self.input.key] = self.input.value
            self.finish(None)
        elif self.input.op == "cas":
            if result.ok:
                self.sim.last_seen[self.input.key] = self.input.value
            else:
                self.sim.last_seen[self.input.key] = result.prev.value if result.prev else None
            self.finish(result.ok)
        else:
            self.finish(result.ok)

    def read_done(self, attempt: int, node_id: int, ok: bool) -> None:
        if attempt != self.attempt:
            return
        if not ok:
            self.retry_elsewhere(attempt, node_id)
            return
        node = self.sim.cluster.nodes[node_id]
        assert self.input is not None and node.sm is not None
        kv = node.sm.get(self.input.key)
        value = kv.value if kv is not None else None
        self.sim.last_seen[self.input.key] = value
        self.finish(value)


class _Run:
    def __init__(self, seed: int, nodes: int | None, duration_ms: float, clients: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        n = nodes or rng.choice([3, 3, 5])
        network = NetworkConfig(
            drop=rng.choice([0.0, 0.0, 0.02, 0.1]),
            duplicate=rng.choice([0.0, 0.0, 0.05]),
            max_delay=rng.choice([3.0, 3.0, 15.0, 40.0]),
            # Slow disks widen the window in which a crash loses unsynced writes.
            disk_latency=rng.choice([0.3, 2.0, 10.0]),
        )
        self.lease_reads = rng.random() < 0.5
        options: dict[str, object] = {
            "lease_reads": self.lease_reads,
            "check_quorum": True,
            "pre_vote": rng.random() < 0.8,
        }
        if rng.random() < 0.3:
            # An overloaded leader: it refuses writes while a few (or any) are not applied yet.
            options["max_unapplied_bytes"] = rng.choice([1, 1, 100])
        # Most runs snapshot often and keep little log, so that lagging and restarted nodes
        # catch up by snapshot under the same faults as everything else.
        every = rng.choice([0, 8, 25, 60])
        snapshots = SnapshotPolicy(
            every=every,
            trailing=rng.choice([0, 0, 3, 20]),
            create_ms=rng.choice([0.5, 5.0, 30.0]),
            install_ms=rng.choice([0.5, 5.0, 30.0]),
            transfer_ms=rng.choice([1.0, 10.0, 60.0]),
        )
        self.cluster = SimCluster(
            n,
            seed=seed,
            state_machine=KVStateMachine,
            network=network,
            raft_options=options,
            snapshots=snapshots,
        )
        self.report = SimReport(seed=seed, nodes=n, snapshot_every=every)
        self.history = HistoryRecorder(clock=lambda: self.cluster.now)
        self.keys = [b"k%d" % i for i in range(rng.choice([1, 3, 5]))]
        self.last_seen: dict[bytes, bytes | None] = {}
        self.stop_at = duration_ms
        self.clients = [_Client(self, i + 1) for i in range(clients)]
        # Membership churn in some runs: grow from 3 voters to 5, then shrink back to 3 (removing
        # whichever voters, the leader included), all under the same faults.
        self.churn: list[tuple[ConfOp, int]] = []
        if n == 3 and rng.random() < 0.5:
            removed = rng.sample([1, 2, 3, 4, 5], 2)
            self.churn = [
                (ConfOp.ADD_LEARNER, 4),
                (ConfOp.PROMOTE, 4),
                (ConfOp.ADD_LEARNER, 5),
                (ConfOp.PROMOTE, 5),
                *[(ConfOp.REMOVE, r) for r in removed],
            ]
        self.report.membership_changes = 0

    def drive_membership(self) -> None:
        """Takes the next churn step once the previous one is committed; retries refusals."""
        cluster = self.cluster
        if not self.churn or cluster.now >= self.stop_at:
            return
        op, target = self.churn[0]
        done = cluster.membership_change_done(op, target)
        if done:
            self.churn.pop(0)
            self.report.membership_changes += 1
            self.report.faults.append(f"{cluster.now:.0f}ms {op.name.lower()} {target} done")
        elif done is False:
            if op is ConfOp.ADD_LEARNER and target not in cluster.nodes:
                cluster.add_node(target)
            leader = cluster.leader()
            assert leader is not None
            cluster.change_membership(leader, op, target)
        cluster.schedule(self.rng.uniform(50, 300), self.drive_membership)

    def inject_faults(self, until: float) -> None:
        cluster, rng, faults = self.cluster, self.rng, self.report.faults
        while cluster.now < until:
            cluster.run_for(rng.uniform(30, 400))
            ids = list(cluster.nodes)
            r = rng.random()
            if r < 0.25:
                victim = self._victim(ids)
                cluster.crash(victim)
                faults.append(f"{cluster.now:.0f}ms crash {victim}")
            elif r < 0.45:
                for i in ids:
                    if not cluster.nodes[i].alive:
                        cluster.restart(i)
                        faults.append(f"{cluster.now:.0f}ms restart {i}")
            elif r < 0.60:
                rng.shuffle(ids)
                k = rng.randint(1, len(ids) // 2)
                cluster.partition(set(ids[:k]), set(ids[k:]))
                faults.append(f"{cluster.now:.0f}ms partition {sorted(ids[:k])}|{sorted(ids[k:])}")
            elif r < 0.70:
                self._isolate_leader(ids)
            elif r < 0.78:
                a, b = rng.sample(ids, 2)
                cluster.block(a, b)
                faults.append(f"{cluster.now:.0f}ms block {a}->{b}")
            elif r < 0.85:
                # A frozen process, often past an election timeout: lease reads and anything
                # else judged by its ticks meet it on waking.
                victim, ms = self._victim(ids), rng.uniform(20, 280)
                cluster.pause(victim, ms)
                faults.append(f"{cluster.now:.0f}ms pause {victim} for {ms:.0f}ms")
            elif r < 0.92:
                self._transfer(ids)
            else:
                cluster.heal()
                faults.append(f"{cluster.now:.0f}ms heal")

    def _victim(self, ids: list[int]) -> int:
        """The leader half of the time, else any node."""
        leader = self.cluster.leader() if self.rng.random() < 0.5 else None
        return leader or self.rng.choice(ids)

    def _isolate_leader(self, ids: list[int]) -> None:
        leader = self.cluster.leader()
        if leader is not None:
            self.cluster.partition({leader}, set(ids) - {leader})
            self.report.faults.append(f"{self.cluster.now:.0f}ms isolate leader {leader}")

    def _transfer(self, ids: list[int]) -> None:
        """A leadership transfer, to a voter or by default, under whatever faults hold."""
        leader = self.cluster.leader()
        if leader is not None:
            target = self.rng.choice([None, *ids])
            refused = self.cluster.transfer_leadership(leader, target)
            self.report.faults.append(
                f"{self.cluster.now:.0f}ms transfer {leader}->{target}: {refused or 'asked'}"
            )

    def heal_all(self) -> None:
        self.cluster.heal()
        for i, node in self.cluster.nodes.items():
            if not node.alive:
                self.cluster.restart(i)

    def check_liveness(self) -> None:
        cluster = self.cluster
        done: list[Applied] = []
        start = cluster.now
        probe = encode_put(b"liveness", b"1")
        asked: dict[int, float] = {}

        def progressed() -> bool:
            # One write, retried at whoever leads every 200 ms (its session makes it apply once).
            leader = cluster.leader()
            if not done and leader is not None and cluster.now - asked.get(leader, -1e9) >= 200:
                asked[leader] = cluster.now
                cluster.submit_write(leader, 10_000, 1, probe, done.append)
            return bool(done)

        if not cluster.run_until_true(progressed, LIVENESS_BOUND_MS, step=20):
            states = {
                i: (n.raft.role.value, n.raft.term, n.raft.commit, n.store.last_index())
                for i, n in cluster.nodes.items()
                if n.raft is not None
            }
            raise SimulationFailure(
                f"no progress within {LIVENESS_BOUND_MS:.0f} ms after healing at {start:.0f} ms "
                f"(seed {cluster.seed}; nodes (role, term, commit, last): {states}; {cluster.replay})"
            )

    def check_convergence(self) -> None:
        """Once healed, every node catches up with the leader's commit index (from the log or
        by snapshot) within a bound."""
        cluster = self.cluster

        def caught_up() -> bool:
            leader = cluster.leader()
            if leader is None:
                return False
            lead = cluster.nodes[leader].raft
            assert lead is not None
            members = lead.conf.voters | lead.learners
            return all(
                n.raft is not None and n.raft.applied >= lead.commit
                for i, n in cluster.nodes.items()
                if i in members
            )

        if not cluster.run_until_true(caught_up, LIVENESS_BOUND_MS, step=20):
            states = {
                i: (n.raft.role.value, n.raft.commit, n.raft.applied, n.store.first_index())
                for i, n in cluster.nodes.items()
                if n.raft is not None
            }
            raise SimulationFailure(
                f"nodes did not catch up within {LIVENESS_BOUND_MS:.0f} ms after healing "
                f"(seed {cluster.seed}; nodes (role, commit, applied, first index): {states}; "
                f"{cluster.replay})"
            )


def run_kv_simulation(
    seed: int, *, nodes: int | None = None, duration_ms: float = 4000.0, clients: int = 4
) -> SimReport:
    """Runs one seeded simulation; raises SimulationFailure on any safety or liveness failure,
    and on any other error of the run, naming the seed and the call that replays it."""
    args = [str(seed)]
    if nodes is not None:
        args.append(f"nodes={nodes}")
    if duration_ms != 4000.0:
        args.append(f"duration_ms={duration_ms}")
    if clients != 4:
        args.append(f"clients={clients}")
    replay = f"replay: dengine.testing.workload.run_kv_simulation({', '.join(args)})"
    try:
        return _run_kv_simulation(seed, nodes, duration_ms, clients, replay)
    except SimulationFailure:
        raise
    except Exception as exc:
        raise SimulationFailure(f"seed {seed}: {type(exc).__name__}: {exc} ({replay})") from exc


def _run_kv_simulation(
    seed: int, nodes: int | None, duration_ms: float, clients: int, replay: str
) -> SimReport:
    run = _Run(seed, nodes, duration_ms, clients)
    cluster = run.cluster
    cluster.replay = replay
    for client in run.clients:
        cluster.schedule(run.rng.uniform(0, 50), client.next_op)
    if run.churn:
        cluster.schedule(run.rng.uniform(100, 500), run.drive_membership)
    run.inject_faults(until=duration_ms)
    run.heal_all()
    run.check_liveness()
    run.check_convergence()
    # Let outstanding operations finish (or time out into indeterminate ones).
    cluster.run_for(OP_DEADLINE_MS + ATTEMPT_TIMEOUT_MS)
    assert cluster.checker is not None
    cluster.checker.check_log_matching()
    cluster.checker.check_durable_quorum()
    result = check(run.history.history(), KVModel(), budget=CHECK_BUDGET)
    if result.ok is None:
        raise SimulationFailure(
            f"linearizability undecided: the check ran out of its budget of {CHECK_BUDGET} steps per key "
            f"(seed {seed}; {replay})\n{result}"
        )
    if not result:
        raise SimulationFailure(
            f"history is not linearizable (seed {seed}; {replay})\n{result}\nfaults: {run.report.faults}"
        )
    report = run.report
    report.messages = cluster.messages_sent
    report.virtual_ms = cluster.now
    report.terms = max(n.raft.term for n in cluster.nodes.values() if n.raft is not None)
    report.snapshots_taken = cluster.snapshots_taken
    report.snapshots_installed = cluster.snapshots_installed
    return report
