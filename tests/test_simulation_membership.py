"""Membership changes in the simulator, scenario by scenario (the seeded runs in test_simulation.py
also grow and shrink clusters under random faults): a partition during a change, the leader
removed in the middle of a change, the disruptive removed server (thesis §4.2.3), and a snapshot
taken during a change. Invariants are checked throughout."""

from __future__ import annotations

from dengine.raft.membership import ConfOp
from dengine.testing.sim import SimCluster, SnapshotPolicy
from test_simulation import Counter, write


def leader_of(cluster: SimCluster) -> int:
    assert cluster.run_until_true(lambda: cluster.leader() is not None, 3000)
    leader = cluster.leader()
    assert leader is not None
    return leader


def change(cluster: SimCluster, op: ConfOp, target: int, timeout: float = 3000) -> None:
    """Retries the change at whoever leads until the leader's configuration shows it committed."""

    def done() -> bool:
        state = cluster.membership_change_done(op, target)
        leader = cluster.leader()
        if state is False and leader is not None:
            cluster.change_membership(leader, op, target)
        return bool(state)

    assert cluster.run_until_true(done, timeout, step=20), f"{op.name} {target} did not complete"


def grow_to(cluster: SimCluster, *new: int) -> None:
    for n in new:
        cluster.add_node(n)
        change(cluster, ConfOp.ADD_LEARNER, n)
        change(cluster, ConfOp.PROMOTE, n)


def totals(cluster: SimCluster, members: set[int]) -> set[int]:
    return {cluster.nodes[i].sm.total for i in members}


def test_a_partition_during_a_change() -> None:
    cluster = SimCluster(3, seed=21, state_machine=Counter)
    write(cluster, 1, 1, b"1")
    leader = leader_of(cluster)
    cluster.add_node(4)
    change(cluster, ConfOp.ADD_LEARNER, 4)
    # The promotion is proposed, then the leader is cut off with the new node before it commits.
    cluster.change_membership(leader, ConfOp.PROMOTE, 4)
    cluster.partition({leader, 4}, set(cluster.nodes) - {leader, 4})
    cluster.run_for(2000)
    cluster.heal()
    for seq in range(2, 12):
        write(cluster, 1, seq, b"1")
    cluster.run_for(500)
    # Whatever the outcome of the promotion, every member agrees and nothing was lost.
    leader = leader_of(cluster)
    raft = cluster.nodes[leader].raft
    assert raft is not None
    assert totals(cluster, set(raft.conf.voters | raft.learners)) == {11}


def test_the_leader_removed_in_the_middle_of_a_change() -> None:
    cluster = SimCluster(3, seed=22, state_machine=Counter)
    write(cluster, 1, 1, b"1")
    grow_to(cluster, 4, 5)
    leader = leader_of(cluster)
    # The leader proposes its own removal and crashes before it commits.
    cluster.change_membership(leader, ConfOp.REMOVE, leader)
    cluster.run_for(1)
    cluster.crash(leader)
    for seq in range(2, 12):
        write(cluster, 1, seq, b"1")
    change(cluster, ConfOp.REMOVE, leader)  # done by whoever leads now, if it was lost
    new = leader_of(cluster)
    raft = cluster.nodes[new].raft
    assert raft is not None and leader not in raft.conf.voters and len(raft.conf.voters) == 4
    cluster.restart(leader)  # a removed node comes back
    cluster.run_for(2000)
    assert cluster.leader() == new or cluster.leader() in raft.conf.voters
    assert totals(cluster, set(raft.conf.voters)) == {11}


def test_a_removed_server_does_not_disrupt_the_cluster() -> None:
    # Thesis §4.2.3: a server removed while cut off never learns it; it times out and campaigns
    # with higher terms. Pre-vote and the leader lease keep it from deposing the leader.
    cluster = SimCluster(3, seed=23, state_machine=Counter)
    write(cluster, 1, 1, b"1")
    grow_to(cluster, 4)
    leader = leader_of(cluster)
    victim = next(i for i in (1, 2, 3) if i != leader)
    cluster.partition({victim}, set(cluster.nodes) - {victim})
    change(cluster, ConfOp.REMOVE, victim)
    term = cluster.nodes[leader].raft.term  # type: ignore[union-attr]
    cluster.heal()  # it can reach everyone again, still believing it is a voter
    for seq in range(2, 30):
        write(cluster, 1, seq, b"1")
        cluster.run_for(50)
    assert cluster.leader() == leader, "the leader was not deposed"
    assert cluster.nodes[leader].raft.term == term  # type: ignore[union-attr]


def test_a_snapshot_during_a_membership_change_carries_the_configuration() -> None:
    cluster = SimCluster(3, seed=24, state_machine=Counter, snapshots=SnapshotPolicy(every=5, trailing=0))
    for seq in range(1, 10):
        write(cluster, 1, seq, b"1")
    cluster.add_node(4)
    change(cluster, ConfOp.ADD_LEARNER, 4)
    for seq in range(10, 30):
        write(cluster, 1, seq, b"1")
    change(cluster, ConfOp.PROMOTE, 4)
    for seq in range(30, 40):
        write(cluster, 1, seq, b"1")
    cluster.run_for(500)
    node4 = cluster.nodes[4]
    assert cluster.snapshots_installed >= 1 or node4.latest_snapshot() is not None
    # Every node's newest snapshot records the configuration in force at its index; restarting
    # every node from snapshot plus log keeps the 4-voter configuration.
    for i in list(cluster.nodes):
        cluster.crash(i)
    for i in list(cluster.nodes):
        cluster.restart(i)
    leader = leader_of(cluster)
    raft = cluster.nodes[leader].raft
    assert raft is not None and raft.conf.voters == frozenset({1, 2, 3, 4})
    write(cluster, 1, 40, b"1")
    cluster.run_for(500)
    assert totals(cluster, {1, 2, 3, 4}) == {40}
