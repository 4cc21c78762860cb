"""Membership changes in the protocol core: one server at a time, in force as soon as the entry is
in a node's log (Raft thesis §4.1), with the safety checks an operator relies on."""

from __future__ import annotations

import pytest

from dengine.raft import MsgType, Role
from dengine.raft.membership import ConfChangeError, ConfOp, check

from raft_harness import Cluster

ADDRS = {1: "h:1", 2: "h:2", 3: "h:3"}


pytestmark = pytest.mark.usefixtures("both_deliveries")


def change(c: Cluster, leader: int, op: ConfOp, node: int, address: str = "") -> int:
    raft = c.nodes[leader]
    members = raft.conf.voters | raft.learners
    addresses = {m: ADDRS.get(m, f"h:{m}") for m in members}
    index = raft.propose_conf_change(op, node, address=address or f"h:{node}", addresses=addresses)
    c.settle()
    return index


def test_a_learner_receives_the_log_but_neither_votes_nor_counts() -> None:
    c = Cluster(3)
    c.elect(1)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    assert c.nodes[4].learners == frozenset({4}) and c.nodes[4].conf.voters == frozenset({1, 2, 3})
    c.propose(1, b"a")
    assert c.stores[4].last_index() == c.stores[1].last_index(), "the learner gets the log"
    # With two voters down, the leader and the learner are not a quorum.
    c.down |= {2, 3}
    before = c.nodes[1].commit
    c.propose(1, b"b")
    assert c.nodes[1].commit == before, "a learner's acknowledgement does not count"
    c.tick(4, 100)
    c.settle()
    assert c.nodes[4].role is Role.FOLLOWER, "a learner never campaigns"


def probes_sent(c: Cluster, src: int) -> list[int]:
    """The destinations of ``src``'s probes: heartbeat answers that answer no heartbeat (a real
    one echoes the tick its heartbeat was sent at, never 0)."""
    return [m.dst for m in c.sent if m.src == src and m.type is MsgType.HEARTBEAT_RESP and m.index == 0]


def test_a_learner_that_hears_no_leader_tells_the_voters_it_is_alive() -> None:
    """How a learner removed while it was away learns of it (``dengine.removal``): nobody sends it
    anything any more, so after two election timeouts without a leader it probes every voter,
    once per election timeout; voters that no longer know it refuse the probe at the wire."""
    c = Cluster(3, election_ticks=10)
    c.elect(1)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    c.tick_all(30)
    assert probes_sent(c, 4) == [], "in touch with its leader: only real heartbeat answers"
    c.sent.clear()
    c.isolate(4)
    c.tick(4, 19)
    c.settle()
    assert probes_sent(c, 4) == [], "quiet for the first two election timeouts"
    c.tick(4, 1)
    c.settle()
    assert probes_sent(c, 4) == [1, 2, 3]
    c.tick(4, 9)
    c.settle()
    assert len(probes_sent(c, 4)) == 3, "then once per election timeout"
    c.tick(4, 1)
    c.settle()
    assert len(probes_sent(c, 4)) == 6
    assert c.nodes[4].role is Role.FOLLOWER and c.nodes[4].term == c.nodes[1].term


def test_a_learners_probe_changes_nothing_for_the_voters() -> None:
    c = Cluster(3, election_ticks=10)
    c.elect(1)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    c.propose(1, b"a")
    before = {i: (c.nodes[i].role, c.nodes[i].term, c.nodes[i].commit) for i in (1, 2, 3)}
    c.cut({4}, {1})  # it hears no leader; its probes still reach the followers
    c.tick(4, 40)
    c.settle()
    assert len(probes_sent(c, 4)) >= 6
    assert {i: (c.nodes[i].role, c.nodes[i].term, c.nodes[i].commit) for i in (1, 2, 3)} == before
    c.heal()
    c.propose(1, b"b")
    assert c.stores[4].last_index() == c.stores[1].last_index(), "the learner is served again"


def test_voters_never_probe() -> None:
    c = Cluster(3, election_ticks=10, pre_vote=True)
    c.elect(1)
    c.isolate(2)
    c.tick(2, 50)
    c.settle()
    assert probes_sent(c, 2) == []


def test_only_a_member_in_touch_with_its_leader_hears_it() -> None:
    """``hears_leader`` (a watch's progress notices go by it): a learner cut off from the leader
    remembers it, never campaigning to forget it, but does not hear it."""
    c = Cluster(3, election_ticks=10)
    c.elect(1)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    c.tick_all(1)
    assert all(c.nodes[i].hears_leader for i in (1, 2, 3, 4))
    c.isolate(4)
    c.tick(4, 10)
    assert c.nodes[4].lead == 1 and not c.nodes[4].hears_leader
    c.heal()
    c.tick_all(1)
    assert c.nodes[4].hears_leader
    # A removed node never hears of its removal (the leader stops sending to it once the entry
    # is in its own log): it campaigns at its timeout, which makes it forget the leader.
    change(c, 1, ConfOp.REMOVE, 3)
    c.tick(3, 20)
    assert c.nodes[3].lead is None and not c.nodes[3].hears_leader
    assert c.nodes[2].hears_leader and c.nodes[4].hears_leader


def test_a_promoted_learner_counts_towards_commitment() -> None:
    c = Cluster(3)
    c.elect(1)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    change(c, 1, ConfOp.PROMOTE, 4)
    assert c.nodes[1].conf.voters == frozenset({1, 2, 3, 4})
    c.down.add(2)
    before = c.nodes[1].commit
    c.propose(1, b"x")  # 1, 3, 4 are three of four voters
    assert c.nodes[1].commit > before
    c.down.add(3)
    before = c.nodes[1].commit
    c.propose(1, b"y")  # 1 and 4 are two of four: not a majority
    assert c.nodes[1].commit == before


def test_only_one_change_at_a_time() -> None:
    c = Cluster(3)
    c.elect(1)
    c.add_node(4)
    c.add_node(5)
    c.down.update({2, 3})  # nothing commits
    raft = c.nodes[1]
    raft.propose_conf_change(ConfOp.ADD_LEARNER, 4, address="h:4", addresses=dict(ADDRS))
    with pytest.raises(ConfChangeError, match="not committed yet"):
        raft.propose_conf_change(ConfOp.ADD_LEARNER, 5, address="h:5", addresses=dict(ADDRS))


def test_a_new_leader_changes_nothing_before_committing_in_its_term() -> None:
    c = Cluster(3)
    c.drop_type(MsgType.APP)  # the new leader's no-op cannot commit
    raft = c.elect(1)
    with pytest.raises(ConfChangeError, match="not committed an entry of its term"):
        raft.propose_conf_change(ConfOp.ADD_LEARNER, 4, address="h:4", addresses=dict(ADDRS))


def test_refused_changes_say_why() -> None:
    c = Cluster(3)
    c.elect(1)
    raft = c.nodes[1]
    cases = [
        (ConfOp.ADD_LEARNER, 2, "h:9", "already a member"),
        (ConfOp.ADD_LEARNER, 4, "h:2", "already used by node 2"),
        (ConfOp.ADD_LEARNER, 4, "", "needs its address"),
        (ConfOp.PROMOTE, 4, "", "not a learner"),
        (ConfOp.PROMOTE, 2, "", "already a voter"),
        (ConfOp.REMOVE, 7, "", "not a member"),
    ]
    for op, node, address, why in cases:
        with pytest.raises(ConfChangeError, match=why):
            raft.propose_conf_change(op, node, address=address, addresses=dict(ADDRS))


def test_a_removal_that_would_lose_quorum_is_refused() -> None:
    c = Cluster(3)
    c.elect(1)
    c.down.add(3)
    c.tick_all(30)  # the leader stops hearing from node 3
    with pytest.raises(ConfChangeError, match="less than a majority"):
        c.nodes[1].propose_conf_change(ConfOp.REMOVE, 2, addresses=dict(ADDRS))
    # Removing the unreachable node itself is fine: 1 and 2 are a majority of {1, 2}.
    change(c, 1, ConfOp.REMOVE, 3)
    assert c.nodes[1].conf.voters == frozenset({1, 2})


def test_the_leader_removes_itself_then_hands_over() -> None:
    c = Cluster(3)
    c.elect(1)
    change(c, 1, ConfOp.REMOVE, 1)
    assert c.nodes[1].role is Role.FOLLOWER, "stepped down once its removal committed"
    assert any(m.type is MsgType.TIMEOUT_NOW and m.src == 1 for m in c.sent), "handed over at once"
    c.settle()
    new = c.leaders()
    assert len(new) == 1 and new[0] in (2, 3)
    c.propose(new[0], b"after")
    assert c.nodes[new[0]].commit == c.stores[new[0]].last_index()
    c.tick(1, 100)
    c.settle()
    assert c.nodes[1].role is Role.FOLLOWER, "a removed node does not campaign"


def test_a_configuration_in_the_log_takes_effect_at_once_and_is_undone_by_truncation() -> None:
    c = Cluster(5, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.add_node(6)
    # The change reaches node 2 only and never commits.
    c.cut({1, 2}, {3, 4, 5})
    c.nodes[1].propose_conf_change(ConfOp.ADD_LEARNER, 6, address="h:6", addresses=dict(ADDRS))
    c.settle()
    assert c.nodes[2].learners == frozenset({6}), "in force on append, before commitment"
    # Node 3 leads a newer term (votes of 4 and 5) without that entry and overwrites it on 2.
    c.heal()
    c.isolate(1)
    c.filters.append(lambda m: None if m.type is MsgType.VOTE and m.dst == 2 else m)
    c.elect(3)
    c.filters.pop()
    c.propose(3, b"x")
    assert c.nodes[2].learners == frozenset(), "the truncated change no longer applies"


def test_a_restarted_node_uses_the_latest_configuration_in_its_log() -> None:
    c = Cluster(3)
    c.elect(1)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    change(c, 1, ConfOp.PROMOTE, 4)
    restarted = c.crash_and_restart(2)
    assert restarted.conf.voters == frozenset({1, 2, 3, 4})
    assert restarted.conf_index == c.nodes[1].conf_index


def test_a_node_outside_every_configuration_never_campaigns() -> None:
    c = Cluster(3)
    c.elect(1)
    joiner = c.add_node(4)
    c.tick(4, 100)
    assert joiner.role is Role.FOLLOWER and not any(m.src == 4 for m in c.sent)


def test_conf_at_gives_the_configuration_a_snapshot_records() -> None:
    c = Cluster(3)
    c.elect(1)
    c.add_node(4)
    first = change(c, 1, ConfOp.ADD_LEARNER, 4)
    second = change(c, 1, ConfOp.PROMOTE, 4)
    raft = c.nodes[1]
    assert raft.conf_at(first - 1) == (frozenset({1, 2, 3}), frozenset())
    assert raft.conf_at(first) == (frozenset({1, 2, 3}), frozenset({4}))
    assert raft.conf_at(second) == (frozenset({1, 2, 3, 4}), frozenset())


@pytest.mark.parametrize(
    "address", ["garbage", "0.0.0.0:7009", "[::]:7009", "::1:7009", "h:0", "h:70000", "a b:1"]
)
def test_a_member_is_added_only_at_an_address_the_others_can_dial(address: str) -> None:
    """Every member would dial a new member's address for ever: one that cannot be dialled is
    refused before anything is proposed, and so is one another member already uses (whatever
    the case of its host name)."""
    with pytest.raises(ConfChangeError, match="host"):
        check(
            frozenset({1, 2, 3}),
            frozenset(),
            ConfOp.ADD_LEARNER,
            4,
            active=frozenset({1, 2, 3}),
            address=address,
        )
    with pytest.raises(ConfChangeError, match="already used by node 2"):
        check(
            frozenset({1, 2, 3}),
            frozenset(),
            ConfOp.ADD_LEARNER,
            4,
            active=frozenset({1, 2, 3}),
            address="DB2:7001",
            addresses={2: "db2:7001"},
        )
    for fine in ("db4:7001", "10.0.0.4:7001", "[fd00::4]:7001"):
        check(
            frozenset({1, 2, 3}),
            frozenset(),
            ConfOp.ADD_LEARNER,
            4,
            active=frozenset({1, 2, 3}),
            address=fine,
        )


def test_a_node_that_missed_a_change_takes_the_member_it_added() -> None:
    """What the wire asks of the core before it takes a message from a node outside the
    receiver's configuration (``dengine.transport.codec``): the sender names the log position of
    its configuration (``conf_id``), and the receiver takes it while its own log has not passed
    that position (``takes_outsider``). Node 3 was down while node 4 was added, until it catches up."""
    c = Cluster(3)
    c.elect(1)
    assert c.nodes[1].conf_id == (0, 0)
    assert not c.nodes[2].takes_outsider(4, 0, 0), "a node outside the initial configuration"
    c.down.add(3)
    c.add_node(4)
    change(c, 1, ConfOp.ADD_LEARNER, 4)
    promoted = change(c, 1, ConfOp.PROMOTE, 4)
    conf = c.nodes[1].conf_id
    assert conf == (promoted, c.nodes[1].term) and c.nodes[4].conf_id == conf
    assert c.nodes[3].takes_outsider(4, *conf), "node 3 has not reached that configuration"
    assert not c.nodes[2].takes_outsider(9, *conf), "node 2 has: it knows node 9 is no member"
    c.down.discard(3)
    c.propose(1, b"x")
    c.settle()
    assert c.nodes[3].conf_id == conf and not c.nodes[3].takes_outsider(9, *conf)
    c.stores[3].compact_prefix(promoted)
    assert c.nodes[3].conf_id == conf, "remembered after its entry is compacted"


def test_a_removed_leader_whose_last_change_was_cut_is_refused_once_the_removal_commits() -> None:
    """Node 1 leads term 1 and appends the addition of node 5 at index 3 alone, cut off; node 2
    leads term 2, writes its own entry at index 3 and commits node 1's removal. Node 1 names a
    configuration made at (3, 1), which node 2 does not hold, but node 2 has committed index 3:
    that entry can never commit, node 1's configuration is dead, and node 1 must be refused (or
    ``dengine.removal`` would never tell it it was removed)."""
    c = Cluster(3, check_quorum=False)  # node 3 votes at once, without waiting out node 1's lease
    c.elect(1)
    c.propose(1, b"a")
    c.isolate(1)
    c.add_node(5)
    index = change(c, 1, ConfOp.ADD_LEARNER, 5)
    assert c.nodes[1].conf_id == (index, 1)
    c.elect(2)
    change(c, 2, ConfOp.REMOVE, 1)
    assert c.nodes[2].commit >= index and c.nodes[2].store.term(index) == 2
    assert not c.nodes[2].takes_outsider(1, index, 1)
    assert not c.nodes[3].takes_outsider(1, index, 1)


def test_a_member_whose_removal_a_node_holds_uncommitted_is_still_taken_by_it() -> None:
    """Five nodes; leader 1 appends the removal of node 3, which only node 2 receives. Node 2's
    configuration in force no longer has node 3, but its committed one does: if node 3 leads next,
    node 2 must take its appends, which cut the removal away."""
    c = Cluster(5)
    c.elect(1)
    c.filters.append(lambda m: None if m.src == 1 and m.dst not in (2,) and m.type is MsgType.APP else m)
    change(c, 1, ConfOp.REMOVE, 3)
    assert 3 not in c.nodes[2].conf.voters
    assert c.nodes[2].takes_outsider(3, 0, 0)


def test_a_leader_that_lost_touch_after_proposing_its_own_removal_probes_and_never_campaigns() -> None:
    """Its configuration in force no longer holds it, so it must not campaign; once the removal
    commits nobody sends it anything. It probes the remaining voters (whose refusals at the wire
    tell the node it left, ``dengine.removal``), once per election timeout."""
    c = Cluster(3, election_ticks=10)
    c.elect(1)
    c.propose(1, b"a")
    c.tick_all(2)
    c.filters.append(lambda m: None if m.dst == 1 else m)  # nothing reaches node 1 any more
    index = c.nodes[1].propose_conf_change(ConfOp.REMOVE, 1, addresses=dict(ADDRS))
    c.settle()
    for _ in range(100):
        c.tick_all(1)
        if c.leaders() and c.leaders()[0] != 1:
            break
    (new,) = c.leaders()
    c.propose(new, b"b")
    assert c.nodes[new].commit >= index
    one = c.nodes[1]
    assert one.own_removal_pending and one.role is Role.FOLLOWER
    c.sent.clear()
    c.tick_all(100)  # ten election timeouts
    from_one = [m for m in c.sent if m.src == 1]
    assert not [m for m in from_one if m.type in (MsgType.VOTE, MsgType.PRE_VOTE)], "it campaigned"
    probes = [m for m in from_one if m.type is MsgType.HEARTBEAT_RESP]
    assert {m.dst for m in probes} == {2, 3} and 8 <= len(probes) <= 20
