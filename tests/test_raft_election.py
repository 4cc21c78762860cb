"""Leader election (Raft §5.2, §5.4.1, thesis §9.6 Pre-Vote, §6.2 Check-Quorum), as scenarios."""

from __future__ import annotations

from dengine.raft import MsgType, Role
from dengine.raft.payload import NOOP_PAYLOAD

from raft_harness import Cluster, make_store


def test_5_2_a_leader_is_elected_and_appends_a_noop() -> None:
    c = Cluster(3)
    leader = c.elect(1)
    assert leader.term == 1
    assert [r.role for r in c.nodes.values()] == [Role.LEADER, Role.FOLLOWER, Role.FOLLOWER]
    # §5.4.2: a new leader commits earlier entries through an entry of its own term.
    for i in c.nodes:
        (noop,) = c.stores[i].entries(1, 2)
        assert (noop.term, noop.data) == (1, NOOP_PAYLOAD)
        assert c.nodes[i].commit == 1


def test_5_2_randomized_timeouts_are_within_one_to_two_election_timeouts() -> None:
    c = Cluster(3, election_ticks=10)
    for i in c.nodes:
        raft = c.nodes[i]
        ticks = 0
        while raft.role is Role.FOLLOWER:
            raft.tick()
            ticks += 1
        assert 10 <= ticks < 20


def test_a_sole_voter_campaigns_at_its_first_tick() -> None:
    """No other node can win or be leading: waiting out an election timeout would only delay a
    single-node cluster's start (and, after a crash, its applying what was committed)."""
    c = Cluster(1, election_ticks=10)
    c.tick_all()
    assert c.nodes[1].role is Role.LEADER
    c.crash_and_restart(1)
    c.tick_all()
    assert c.nodes[1].role is Role.LEADER and c.nodes[1].term == 2
    # With another voter, the timeout stands (the learner does not count as one).
    c = Cluster(2, learners=[2], election_ticks=10)
    c.tick_all()
    assert c.nodes[1].role is Role.LEADER
    c = Cluster(2, election_ticks=10)
    c.tick_all(9)
    assert c.nodes[1].role is Role.FOLLOWER and c.nodes[2].role is Role.FOLLOWER


def test_5_2_one_vote_per_term_and_it_survives_a_restart() -> None:
    c = Cluster(3, pre_vote=False)
    c.isolate(3)
    c.elect(1)  # node 2 voted for node 1 in term 1
    assert c.stores[2].hard_state().vote == 1
    c.crash_and_restart(2)
    assert (c.nodes[2].term, c.nodes[2].vote) == (1, 1)
    # Node 3 campaigns for term 1 as well (it never heard of node 1): node 2 must refuse.
    c.heal()
    c.isolate(1)
    assert c.nodes[3].term == 0  # it missed the whole election
    c.campaign(3)
    granted_to_3 = [
        m for m in c.sent if m.type is MsgType.VOTE_RESP and m.dst == 3 and not m.reject and m.term == 1
    ]
    assert granted_to_3 == []


def test_5_4_1_a_candidate_with_a_stale_log_cannot_win() -> None:
    stores = {1: make_store([1], term=1), 2: make_store([1, 1, 2], term=2), 3: make_store([1, 1, 2], term=2)}
    c = Cluster(3, stores=stores, pre_vote=False)
    c.campaign(1)
    assert c.nodes[1].role is not Role.LEADER
    assert c.leaders() == []
    c.elect(2)
    assert c.log_terms(1)[:3] == [1, 1, 2], "the stale node was repaired by the new leader"


def test_dueling_candidates_settle_on_one_leader() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.cut({1}, {3})
    c.campaign(1)  # node 1 wins with node 2's vote
    c.campaign(3)  # node 3 cannot reach node 1, and node 2 already voted in term 1
    assert c.nodes[1].role is Role.LEADER
    assert c.nodes[3].role is Role.CANDIDATE
    c.heal()
    for _ in range(200):
        c.tick_all()
        if len(c.leaders()) == 1 and all(r.lead == c.leaders()[0] for r in c.nodes.values()):
            break
    (leader,) = c.leaders()
    assert all(c.log_terms(i) == c.log_terms(leader) for i in c.nodes)


def test_prevote_keeps_a_rejoining_partitioned_node_from_disrupting() -> None:
    c = Cluster(3, pre_vote=True, check_quorum=True)
    c.elect(1)
    c.isolate(3)
    for _ in range(100):
        c.tick_all()  # node 3 keeps timing out, alone
    assert c.nodes[3].term == 1, "pre-vote must not move the isolated node's term"
    c.heal()
    c.tick_all(30)
    assert c.nodes[1].role is Role.LEADER and c.nodes[1].term == 1
    assert c.nodes[3].lead == 1


def test_without_prevote_a_rejoining_node_disrupts_the_leader() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.isolate(3)
    for _ in range(100):
        c.tick_all()
    assert c.nodes[3].term > 1
    c.heal()
    c.tick_all(30)
    assert c.nodes[1].term > 1, "the rejoining node's higher term deposes the leader"


def test_check_quorum_leader_steps_down_when_cut_off() -> None:
    c = Cluster(3, check_quorum=True, election_ticks=10)
    c.elect(1)
    c.isolate(1)
    c.tick_all(25)
    assert c.nodes[1].role is Role.FOLLOWER
    assert c.nodes[1].lead is None


def test_a_leader_that_steps_down_says_so_in_the_next_ready() -> None:
    # Cut off from everyone, it has nothing else to hand out: the role change alone must make a
    # Ready, or its driver would go on acting as leader until something else moved.
    c = Cluster(3, check_quorum=True, election_ticks=10)
    c.elect(1)
    c.isolate(1)
    leader = c.nodes[1]
    for _ in range(25):
        leader.tick()
        if leader.role is not Role.LEADER:
            break
        while c.process(1):
            pass
        c.queue.clear()
    assert leader.role is Role.FOLLOWER
    assert leader.has_ready()
    rd = leader.ready()
    assert rd.soft_state is not None and rd.soft_state.role is Role.FOLLOWER and rd.soft_state.leader is None
    assert not leader.has_ready(), "reported once"


def test_check_quorum_followers_ignore_votes_while_they_hear_a_leader() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=True)
    c.elect(1)
    c.tick_all(2)
    # Node 3 campaigns (say, its timer fired spuriously): nodes 1 and 2 heard the leader recently.
    c.campaign(3)
    assert c.nodes[1].role is Role.LEADER
    assert c.nodes[2].term == 1


def test_learners_never_campaign_and_never_count() -> None:
    c = Cluster(3, learners=[3])
    learner = c.nodes[3]
    for _ in range(100):
        learner.tick()
    assert learner.role is Role.FOLLOWER
    c.elect(1)
    c.isolate(2)
    c.propose(1, b"x")
    # Voters are {1, 2}: the learner's ack does not make a majority.
    assert c.nodes[1].commit == 1
    assert c.stores[3].last_index() == 2


def test_a_node_that_lost_its_disk_neither_votes_nor_campaigns() -> None:
    c = Cluster(3, pre_vote=False)
    c.elect(1)
    c.stores[3].wipe()
    amnesiac = c.crash_and_restart(3, can_vote=False)
    for _ in range(100):
        amnesiac.tick()
    assert amnesiac.role is Role.FOLLOWER and amnesiac.term <= 1
    c.isolate(1)
    c.nodes[2].term = 5
    c.campaign(2)
    refusals = [m for m in c.sent if m.type is MsgType.VOTE_RESP and m.src == 3 and m.dst == 2]
    assert refusals and all(m.reject for m in refusals)
    assert c.nodes[2].role is not Role.LEADER, "a wiped node's vote must not complete a majority"


def test_votes_from_an_earlier_term_are_not_counted() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.isolate(3)
    late, _ = c.hold_type(MsgType.VOTE_RESP)
    c.campaign(1)  # term 1: node 2's grant is held back
    assert late and not late[0].reject and late[0].term == 1
    for _ in range(40):
        c.nodes[1].tick()
        if c.nodes[1].term == 2:
            break
    c.settle()
    assert (c.nodes[1].role, c.nodes[1].term) == (Role.CANDIDATE, 2)
    c.nodes[1].step(late[0])  # the term-1 grant arrives during the term-2 campaign
    assert c.nodes[1].role is Role.CANDIDATE, "a vote for term 1 must not elect anyone in term 2"
