"""Snapshots in the simulator: catch-up by snapshot, leader changes mid-transfer, crashes while a
snapshot is created or installed, restarts from a snapshot plus the log tail. Invariants (every
snapshot of an index is identical on every node, and the usual Raft properties) are checked
throughout; the seeded runs in test_simulation.py mix snapshots with random faults."""

from __future__ import annotations

from dengine.testing.sim import SimCluster, SnapshotPolicy
from test_simulation import Counter, write


def converged(cluster: SimCluster) -> bool:
    leader = cluster.leader()
    if leader is None:
        return False
    commit = cluster.nodes[leader].raft.commit  # type: ignore[union-attr]
    return all(n.raft is not None and n.raft.applied >= commit for n in cluster.nodes.values())


def totals(cluster: SimCluster) -> set[int]:
    return {n.sm.total for n in cluster.nodes.values() if n.sm is not None}


def cluster_with_a_lagging_follower(policy: SnapshotPolicy, writes: int = 60) -> tuple[SimCluster, int]:
    cluster = SimCluster(3, seed=5, state_machine=Counter, snapshots=policy)
    write(cluster, 1, 1, b"1")
    leader = cluster.leader()
    assert leader is not None
    lagging = next(i for i in cluster.nodes if i != leader)
    cluster.crash(lagging)
    for seq in range(2, writes + 1):
        write(cluster, 1, seq, b"1")
    assert cluster.nodes[leader].store.first_index() > 2, "the leader compacted what the follower lacks"
    return cluster, lagging


def test_a_follower_that_missed_many_entries_catches_up_by_snapshot() -> None:
    cluster, lagging = cluster_with_a_lagging_follower(SnapshotPolicy(every=10, trailing=2))
    cluster.restart(lagging)
    assert cluster.run_until_true(lambda: converged(cluster), 3000)
    assert cluster.snapshots_installed >= 1
    assert totals(cluster) == {60}
    follower = cluster.nodes[lagging]
    assert follower.store.first_index() > 2, "its log restarted after the snapshot"
    assert follower.latest_snapshot() is not None


def test_the_leader_changes_in_the_middle_of_a_transfer() -> None:
    policy = SnapshotPolicy(every=10, trailing=0, transfer_ms=200.0)
    cluster, lagging = cluster_with_a_lagging_follower(policy)
    old_leader = cluster.leader()
    assert old_leader is not None
    cluster.restart(lagging)
    # Let the transfer start, then kill its sender before the snapshot arrives.
    assert cluster.run_until_true(lambda: bool(cluster.nodes[old_leader].sending_snapshot), 1000, step=1)
    cluster.crash(old_leader)
    cluster.run_for(1000)
    cluster.restart(old_leader)
    assert cluster.run_until_true(lambda: converged(cluster), 5000)
    assert totals(cluster) == {60}
    assert cluster.snapshots_installed >= 1
    assert all(not n.sending_snapshot for n in cluster.nodes.values()), "no transfer left dangling"


def test_a_crash_while_creating_a_snapshot_loses_only_that_snapshot() -> None:
    cluster = SimCluster(3, seed=9, state_machine=Counter, snapshots=SnapshotPolicy(create_ms=50.0))
    for seq in range(1, 21):
        write(cluster, 1, seq, b"1")
    leader = cluster.leader()
    assert leader is not None
    node = cluster.nodes[leader]
    assert cluster.take_snapshot(leader)
    cluster.run_for(10)
    cluster.crash(leader)  # before the snapshot reached the disk
    assert node.latest_snapshot() is None and node.store.first_index() == 1, "nothing compacted"
    cluster.restart(leader)
    for seq in range(21, 31):
        write(cluster, 1, seq, b"1")
    assert cluster.run_until_true(lambda: converged(cluster), 3000)
    assert totals(cluster) == {30}


def test_a_crash_while_receiving_a_snapshot_and_after_storing_it() -> None:
    policy = SnapshotPolicy(every=10, trailing=0, install_ms=100.0)
    cluster, lagging = cluster_with_a_lagging_follower(policy)
    node = cluster.nodes[lagging]
    cluster.restart(lagging)
    # Crash it while the received file is being written: nothing of it survives.
    assert cluster.run_until_true(lambda: converged(cluster) or _receiving(cluster), 2000, step=1)
    cluster.crash(lagging)
    assert node.latest_snapshot() is None
    cluster.restart(lagging)
    # Now crash it after the file is durable but before its core installed it: the restart
    # must start from that snapshot and reset the log that does not continue it.
    assert cluster.run_until_true(lambda: node.latest_snapshot() is not None, 2000, step=0.5)
    assert node.store.first_index() == 1, "the log was not reset yet"
    cluster.crash(lagging)
    cluster.restart(lagging)
    assert node.raft is not None and node.raft.applied == node.latest_snapshot().info.index  # type: ignore[union-attr]
    assert cluster.run_until_true(lambda: converged(cluster), 3000)
    assert totals(cluster) == {60}


def _receiving(cluster: SimCluster) -> bool:
    return any(n.sending_snapshot for n in cluster.nodes.values())


def test_a_node_restarts_from_its_snapshot_and_the_log_tail() -> None:
    cluster = SimCluster(3, seed=13, state_machine=Counter, snapshots=SnapshotPolicy(every=10, trailing=3))
    for seq in range(1, 26):
        write(cluster, 1, seq, b"2")
    cluster.run_for(100)
    node = cluster.nodes[1]
    snap = node.latest_snapshot()
    assert snap is not None and node.store.first_index() == snap.info.index - 3 + 1
    cluster.crash(1)
    cluster.restart(1)
    assert node.sm.total >= snap.info.index and node.raft is not None
    assert cluster.run_until_true(lambda: converged(cluster), 3000)
    assert totals(cluster) == {50}


def test_logs_stay_bounded_over_a_long_run() -> None:
    cluster = SimCluster(3, seed=17, state_machine=Counter, snapshots=SnapshotPolicy(every=20, trailing=5))
    for seq in range(1, 301):
        write(cluster, 1, seq, b"1")
    cluster.run_for(100)
    for n in cluster.nodes.values():
        assert n.store.last_index() - n.store.first_index() + 1 <= 20 + 5 + 10
        assert len(n.snapshots) <= 2
