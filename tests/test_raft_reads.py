"""Linearizable reads: ReadIndex (thesis §6.4), lease reads (§6.4.1), follower reads."""

from __future__ import annotations

import pytest

from dengine.raft import Message, MsgType, Role

from raft_harness import Cluster


def test_read_index_waits_for_a_quorum_heartbeat_and_the_apply() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"x")
    c.hold_sync.add(2)
    c.hold_sync.add(3)
    c.nodes[1].read_index(7)
    c.settle()
    assert c.reads[1] == [(7, 2)], "the read index is the commit index when the read arrived"


def test_reads_share_one_heartbeat_round() -> None:
    c = Cluster(5)
    c.elect(1)
    c.sent.clear()
    c.filters.append(lambda m: None if m.type is MsgType.HEARTBEAT_RESP else m)
    for ctx in range(1, 51):
        c.nodes[1].read_index(ctx)
        c.settle()
    heartbeats = [m for m in c.sent if m.type is MsgType.HEARTBEAT]
    assert len(heartbeats) == 4, "50 reads while a round is in flight: still one round (4 heartbeats)"
    c.heal()
    c.tick_all(1)
    assert sorted(ctx for ctx, _ in c.reads[1]) == list(range(1, 51))


def test_a_read_is_released_only_after_the_read_index_is_applied() -> None:
    c = Cluster(3)
    c.elect(1)
    c.no_apply.add(1)  # the state machine falls behind the commit index
    c.propose(1, b"a")
    leader = c.nodes[1]
    assert (leader.commit, leader.applied) == (2, 1)
    leader.read_index(1)
    c.settle()
    assert c.reads[1] == [], "leadership is confirmed, but entry 2 is not applied yet"
    leader.applied_to(2)
    c.settle()
    assert c.reads[1] == [(1, 2)]


def test_a_new_leader_serves_reads_only_after_committing_in_its_term() -> None:
    c = Cluster(3, check_quorum=False)
    c.elect(1)
    c.drop_type(MsgType.APP_RESP)  # the no-op cannot commit
    c.elect(2)
    assert c.nodes[2].commit < c.stores[2].last_index()
    c.nodes[2].read_index(9)
    c.settle()
    assert c.reads[2] == []
    c.heal()
    c.tick_all(2)
    assert [ctx for ctx, _ in c.reads[2]] == [9]


def test_a_stale_isolated_leader_serves_no_linearizable_read() -> None:
    c = Cluster(3, lease_reads=True, check_quorum=True, election_ticks=10, clock_drift_ticks=2)
    c.elect(1)
    c.tick_all(2)
    c.isolate(1)
    c.nodes[1].read_index(1)
    c.tick_all(3)
    assert c.reads[1] == [], "ReadIndex needs a quorum to answer"
    # Past the lease, a lease read falls back to ReadIndex and is not served either.
    c.tick_all(9)
    c.nodes[1].read_index(2, lease=True)
    c.tick_all(1)
    assert c.reads[1] == []
    # Meanwhile the majority elects a new leader; the old one steps down and fails the reads.
    c.tick_all(30)
    assert 1 not in c.leaders() and c.leaders()
    assert sorted(c.failed_reads[1]) == [1, 2]


def test_a_lease_read_inside_the_lease_needs_no_round_trip() -> None:
    c = Cluster(3, lease_reads=True, check_quorum=True)
    c.elect(1)
    c.tick_all(1)
    c.sent.clear()
    c.nodes[1].read_index(5, lease=True)
    c.process(1)
    assert c.reads[1] == [(5, 1)]
    assert not [m for m in c.sent if m.type is MsgType.HEARTBEAT]


def test_a_follower_that_restarts_inside_a_lease_elects_no_one_before_it_ends() -> None:
    """§6.4.1 with a crash: node 2 answers leader 1's heartbeat (so 1's lease counts on it),
    restarts at once, and node 3, cut off from 1, campaigns. Had node 2 forgotten that it heard
    a leader, its vote would make 3 leader while 1 still serves lease reads: a read on 1 would
    miss what 3 commits. So a node that restarts grants no vote for an election timeout."""
    c = Cluster(
        3, lease_reads=True, check_quorum=True, election_ticks=10, clock_drift_ticks=2, restart_lease=True
    )
    c.elect(1)
    c.tick_all(1)  # a heartbeat round: 2 and 3 answered
    c.cut({1}, {3})
    c.crash_and_restart(2)
    c.campaign(3)
    assert c.nodes[3].role is not Role.LEADER, "elected inside the old leader's lease"
    c.nodes[1].read_index(7, lease=True)
    c.process(1)
    assert c.reads[1] == [(7, c.nodes[1].commit)], "the old leader's lease still holds"
    # Its time out over, the restarted node votes again: with 1 gone, 2 and 3 elect.
    c.isolate(1)
    c.tick_all(30)
    assert [i for i in c.leaders() if i != 1]


def test_a_node_of_a_new_cluster_campaigns_within_its_first_election_timeout() -> None:
    # fast_start (on in dengine.Node): nothing to wait for in a cluster that never had a leader.
    for fast, earliest, latest in ((True, 1, 10), (False, 10, 19)):
        c = Cluster(3, election_ticks=10, fast_start=fast)
        for i in c.nodes:
            ticks = 0
            while c.nodes[i].role is Role.FOLLOWER:
                c.nodes[i].tick()
                ticks += 1
            assert earliest <= ticks <= latest, (fast, i, ticks)
    # A restarted node (a term above zero) waits its whole timeout, restart lease or not.
    c = Cluster(3, election_ticks=10, fast_start=True)
    c.elect(1)
    node = c.crash_and_restart(2)
    ticks = 0
    while node.role is Role.FOLLOWER:
        node.tick()
        ticks += 1
    assert ticks >= 10


def test_lease_reads_require_check_quorum() -> None:
    with pytest.raises(ValueError, match="check_quorum"):
        Cluster(3, lease_reads=True, check_quorum=False)
    c = Cluster(3)
    c.elect(1)
    with pytest.raises(ValueError, match="lease reads are disabled"):
        c.nodes[1].read_index(1, lease=True)


def test_followers_get_the_read_index_from_the_leader() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"x")
    c.nodes[3].read_index(4)
    c.settle()
    assert c.reads[3] == [(4, 2)]
    assert [m for m in c.sent if m.type is MsgType.READ_INDEX and m.src == 3]


def test_a_follower_read_fails_when_its_leader_goes_away() -> None:
    c = Cluster(3)
    c.elect(1)
    c.drop_type(MsgType.READ_INDEX_RESP)
    c.nodes[3].read_index(4)
    c.settle()
    c.isolate(1)
    c.tick_all(40)
    assert c.failed_reads[3] == [4]


def test_a_read_without_any_leader_fails_at_once() -> None:
    c = Cluster(3)
    c.nodes[2].read_index(1)
    c.settle()
    assert c.failed_reads[2] == [1]


@pytest.mark.parametrize("transfer", ["under way", "given up"])
def test_a_leader_that_hands_over_serves_no_lease_read_for_the_rest_of_its_term(transfer: str) -> None:
    """§3.10 with §6.4.1: the target of a leadership transfer campaigns at its leader's
    TimeoutNow, and its voters grant that vote inside the leader's lease (a transfer must not
    wait one out). So once it sent a TimeoutNow, the old leader's lease proves nothing: here it
    hears nothing more, the target wins and commits a write, and a lease read on the old
    leader would miss it. Even once the transfer is given up (an election timeout without
    news), a copy of the TimeoutNow still on its way can elect the target later."""
    c = Cluster(3, lease_reads=True, check_quorum=True, election_ticks=10, clock_drift_ticks=2)
    c.elect(1)
    c.tick_all(1)  # a heartbeat round answered: the lease holds
    c.nodes[1].read_index(1, lease=True)
    c.process(1)
    assert c.reads[1] == [(1, c.nodes[1].commit)], "inside its lease before the transfer"
    delayed: list[Message] = []
    c.nodes[1].transfer_leadership(2)
    if transfer == "given up":
        # The TimeoutNow is held up on the wire; with no answer from 2 in time the transfer
        # is given up while 3 keeps the lease fresh.
        c.filters.append(lambda m: delayed.append(m) if m.type is MsgType.TIMEOUT_NOW else m)
        c.process(1)
        c.settle()
        for _ in range(12):
            c.tick_all(1)
        assert c.nodes[1].lead_transferee is None and c.nodes[1].role is Role.LEADER
        c.filters.clear()
    # From here on node 1 hears nothing, and only its TimeoutNow gets out.
    c.filters.append(
        lambda m: None if m.dst == 1 or (m.src == 1 and m.type is not MsgType.TIMEOUT_NOW) else m
    )
    for m in delayed:
        c.deliver(m)
    c.process(1)
    c.settle()
    assert c.nodes[2].role is Role.LEADER and c.nodes[1].role is Role.LEADER
    c.propose(2, b"x")
    assert c.nodes[2].commit > c.nodes[1].commit
    c.nodes[1].read_index(2, lease=True)
    c.process(1)
    assert (2, c.nodes[1].commit) not in c.reads[1], "a lease read that misses a committed write"


def test_a_lease_ends_before_a_follower_that_heard_the_round_late_in_its_tick_may_vote() -> None:
    """§6.4.1 at tick granularity, with no drift bound: the followers get the leader's heartbeat
    just before their own tick, so they count their first tick of silence at once and may vote
    after the leader's ``election_ticks - 1``-th tick since it sent it. The lease must be over
    by then, or a lease read on the old leader misses what the new one commits."""
    c = Cluster(3, lease_reads=True, check_quorum=True, election_ticks=10, clock_drift_ticks=0)
    c.elect(1)
    c.settle()
    c.sent.clear()
    while not any(m.type is MsgType.HEARTBEAT for m in c.sent):
        c.tick(1)
        c.process(1)
    c.settle()  # the round answered: the lease counts from the tick it was sent
    c.isolate(1)
    c.tick(2, 10)  # each follower's tick comes right after the heartbeat, the leader's later
    c.tick(1, 9)
    c.campaign(3)
    assert c.nodes[3].role is Role.LEADER and c.nodes[1].role is Role.LEADER
    c.propose(3, b"x")
    c.nodes[1].read_index(9, lease=True)
    c.process(1)
    assert c.reads[1] == [], "a lease read that misses what the new leader committed"


@pytest.mark.parametrize("lost", [MsgType.READ_INDEX, MsgType.READ_INDEX_RESP])
def test_a_forwarded_read_whose_message_is_lost_is_sent_again(lost: MsgType) -> None:
    """Peer messages can be lost while the leader stays (a stream that breaks drops what it still
    queues): a forwarded read asked again after an election timeout is served, not left waiting
    for a term change that never comes."""
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"x")
    dropped: list[Message] = []

    def lose_the_first(m: Message) -> Message | None:
        if m.type is lost and not dropped:
            dropped.append(m)
            return None
        return m

    c.filters.append(lose_the_first)
    c.nodes[3].read_index(4)
    c.settle()
    assert dropped and c.reads[3] == []
    c.tick_all(c.nodes[3].cfg.election_ticks)
    c.settle()
    assert c.leaders() == [1]
    assert [ctx for ctx, _ in c.reads[3]] == [4]
    assert c.nodes[3]._forwarded_reads == {}
