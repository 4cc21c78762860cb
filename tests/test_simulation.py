"""The seeded fault-injection simulation: invariants checked continuously, client histories
checked for linearizability, liveness after healing.

CI runs a fixed range of seeds. To replay one seed bit for bit:
    DENGINE_SIM_SEED=123 python -m pytest tests/test_simulation.py -k replay
More seeds: DENGINE_SIM_SEEDS=10000 (the soak documented in benchmarks/README.md).
"""

from __future__ import annotations

import os
from typing import BinaryIO

import pytest

from dengine.raft import Role
from dengine.raft.sessions import Applied
from dengine.testing import workload
from dengine.testing.sim import SimCluster, SimulationFailure, SnapshotPolicy
from dengine.testing.workload import run_kv_simulation

CI_SEEDS = int(os.environ.get("DENGINE_SIM_SEEDS", "200"))


@pytest.mark.parametrize("block", range(10))
def test_seeded_simulation(block: int) -> None:
    """Runs seeds ``block, block + 10, ...`` below CI_SEEDS (ten blocks keep output readable)."""
    for seed in range(block, CI_SEEDS, 10):
        run_kv_simulation(seed)


@pytest.mark.skipif("DENGINE_SIM_SEED" not in os.environ, reason="set DENGINE_SIM_SEED to replay one seed")
def test_replay() -> None:
    seed = int(os.environ["DENGINE_SIM_SEED"])
    report = run_kv_simulation(seed)
    print(report)


def test_a_seed_replays_bit_for_bit() -> None:
    a, b = run_kv_simulation(4242), run_kv_simulation(4242)
    assert a == b
    assert a.operations > 0 and a.completed > 0 and a.faults


class Counter:
    """A user's own state machine, as a user would bring it to dengine.testing."""

    def __init__(self) -> None:
        self.total = 0

    def apply(self, index: int, command: bytes) -> bytes:
        self.total += int(command)
        return str(self.total).encode()

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(str(self.total).encode())

    def restore(self, source: BinaryIO) -> None:
        self.total = int(source.read())


def write(cluster: SimCluster, client: int, seq: int, command: bytes, timeout: float = 3000) -> Applied:
    done: list[Applied] = []

    def attempt() -> bool:
        leader = cluster.leader()
        if not done and leader is not None and not cluster.nodes[leader].write_waiters:
            cluster.submit_write(leader, client, seq, command, done.append)
        return bool(done)

    assert cluster.run_until_true(attempt, timeout), "write did not complete"
    return done[0]


def test_users_simulate_their_own_state_machine_under_crashes() -> None:
    cluster = SimCluster(3, seed=7, state_machine=Counter)
    for seq in range(1, 21):
        write(cluster, 1, seq, b"5")
        if seq % 7 == 0:
            leader = cluster.leader()
            assert leader is not None
            cluster.crash(leader)
            cluster.run_for(50)
            cluster.restart(leader)
    cluster.run_for(500)
    totals = {n.sm.total for n in cluster.nodes.values()}
    assert totals == {100}, "every replica applied each write exactly once"


def test_a_retried_write_applies_once_across_a_leader_change() -> None:
    cluster = SimCluster(3, seed=3, state_machine=Counter)
    first = write(cluster, 9, 1, b"10")
    leader = cluster.leader()
    assert leader is not None
    cluster.crash(leader)
    again = write(cluster, 9, 1, b"10")  # the client never saw the first answer, so it retries
    assert (first.result, again.result) == (b"10", b"10")
    assert {n.sm.total for n in cluster.nodes.values() if n.sm is not None} == {10}


def test_a_node_with_a_wiped_disk_rejoins_without_a_vote() -> None:
    cluster = SimCluster(3, seed=11, state_machine=Counter)
    write(cluster, 1, 1, b"1")
    leader = cluster.leader()
    assert leader is not None
    follower = next(i for i in cluster.nodes if i != leader)
    cluster.restart(follower, wipe=True)
    raft = cluster.nodes[follower].raft
    assert raft is not None and not raft.cfg.can_vote
    write(cluster, 1, 2, b"1")
    cluster.run_for(200)
    assert cluster.nodes[follower].sm.total == 2, "it still receives and applies the log"
    # With the leader gone, the remaining healthy voter cannot win with the amnesiac's vote.
    cluster.crash(leader)
    cluster.run_for(3000)
    assert cluster.leader() is None
    cluster.restart(leader)
    assert cluster.run_until_true(lambda: cluster.leader() is not None, 3000)


def test_a_leader_that_wakes_from_a_pause_serves_no_lease_read_from_its_old_state() -> None:
    """A leader frozen past an election timeout (its successor elected and writing meanwhile)
    finds, on waking, that the read waiting for it can no longer be served from its lease: the
    ticks it missed run before anything that waited, so it steps down (it heard from no majority
    for too long) and refuses the read."""
    cluster = SimCluster(3, seed=5, state_machine=Counter, raft_options={"lease_reads": True})
    write(cluster, 1, 1, b"1")
    old = cluster.leader()
    assert old is not None
    cluster.pause(old, 500)
    # Cut off too, so that no message from the others waits for it: the read is all it finds.
    cluster.partition({old}, set(cluster.nodes) - {old})
    assert cluster.run_until_true(lambda: cluster.leader() not in (None, old), 450), "a successor leads"
    write(cluster, 1, 2, b"1")  # through the successor: the old leader's state is now stale
    outcome: list[bool] = []
    assert cluster.submit_read(old, outcome.append, lease=True) is None  # waits for it to wake
    assert cluster.run_until_true(lambda: bool(outcome), 1000), "it woke and answered"
    assert outcome == [False], "the lease read was refused, not served from the stale state"
    raft = cluster.nodes[old].raft
    assert raft is not None and raft.role is not Role.LEADER


class BrokenSnapshots(Counter):
    def snapshot(self, sink: BinaryIO) -> None:
        raise OSError("disk full")


def test_an_error_inside_a_run_names_the_seed_and_how_to_replay_it() -> None:
    """CI runs many seeds per test: an error from a state machine, the core or a store must say
    which seed raised it, not only a safety violation."""
    cluster = SimCluster(3, seed=12, state_machine=BrokenSnapshots, snapshots=SnapshotPolicy(every=2))
    with pytest.raises(
        SimulationFailure, match=r"seed 12: OSError at .* disk full .*SimCluster\(seed=12\)"
    ) as info:
        for seq in range(1, 4):
            write(cluster, 1, seq, b"1")
    assert isinstance(info.value.__cause__, OSError)


def test_an_error_in_the_kv_workload_names_the_seed_and_the_call_that_replays_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_check(*args: object, **kwargs: object) -> None:
        raise RuntimeError("checker broke")

    monkeypatch.setattr(workload, "check", broken_check)
    with pytest.raises(SimulationFailure, match=r"seed 3: RuntimeError: checker broke") as info:
        run_kv_simulation(3, duration_ms=300)
    assert "run_kv_simulation(3, duration_ms=300)" in str(info.value)
    assert "tests/test_simulation.py" not in str(info.value), "users have no such file"


class Nondeterministic(Counter):
    """Counts its calls in a variable all replicas share (as a clock, a random number or a
    process's own state would differ): each replica computes its own answer."""

    calls = 0

    def apply(self, index: int, command: bytes) -> bytes:
        Nondeterministic.calls += 1
        self.total += int(command) * Nondeterministic.calls
        return str(self.total).encode()


def test_a_nondeterministic_state_machine_fails_the_run() -> None:
    """Replicas that apply the same entries but compute different answers have forked, though
    every log agrees: the checker compares each entry's answer across nodes."""
    cluster = SimCluster(3, seed=2, state_machine=Nondeterministic)
    with pytest.raises(SimulationFailure, match="not deterministic"):
        for seq in range(1, 4):
            write(cluster, 1, seq, b"1")
        cluster.run_for(200)


def test_a_history_too_costly_to_check_fails_as_undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check has a step budget, so a pathological history fails the run with a clear message
    instead of hanging CI; unknown is never a pass."""
    monkeypatch.setattr(workload, "CHECK_BUDGET", 1)
    with pytest.raises(SimulationFailure, match=r"undecided: .* budget of 1 steps per key \(seed 3;"):
        run_kv_simulation(3, duration_ms=300)
