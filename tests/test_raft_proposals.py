"""Proposals: batching on the leader, forwarding or refusal on followers, leader transfer."""

from __future__ import annotations

import pytest

from dengine.errors import NotLeaderError, ProposalDroppedError
from dengine.raft import Message, MsgType, Role
from dengine.raft.payload import command

from raft_harness import Cluster


def test_a_batch_of_proposals_gets_consecutive_indexes_and_one_append_per_follower() -> None:
    c = Cluster(3)
    c.elect(1)
    c.sent.clear()
    indexes = c.nodes[1].propose([command(b"%d" % i) for i in range(100)])
    c.settle()
    assert indexes == (2, 101)
    apps = [m for m in c.sent if m.type is MsgType.APP and m.dst == 2 and m.entries]
    assert len(apps) == 1 and len(apps[0].entries) == 100
    assert c.nodes[1].commit == 101


def test_a_follower_forwards_proposals_to_the_leader() -> None:
    c = Cluster(3, forward_proposals=True)
    c.elect(1)
    assert c.nodes[3].propose([command(b"fwd")]) is None
    c.settle()
    assert c.stores[1].last_index() == 2
    assert c.nodes[3].commit == 2


def test_a_follower_refuses_with_a_leader_hint_when_not_forwarding() -> None:
    c = Cluster(3, forward_proposals=False)
    c.elect(1)
    with pytest.raises(NotLeaderError) as info:
        c.nodes[2].propose([command(b"x")])
    assert info.value.leader == 1


def test_without_a_leader_a_proposal_is_refused() -> None:
    c = Cluster(3)
    with pytest.raises(NotLeaderError) as info:
        c.nodes[2].propose([command(b"x")])
    assert info.value.leader is None


def test_leader_transfer_with_timeout_now() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"x")
    target = c.nodes[1].transfer_leadership(3)
    c.settle()
    assert target == 3
    assert c.nodes[3].role is Role.LEADER
    assert c.nodes[1].role is Role.FOLLOWER and c.nodes[1].lead == 3
    assert [m for m in c.sent if m.type is MsgType.TIMEOUT_NOW and m.dst == 3]


def test_leader_transfer_to_the_most_up_to_date_voter_by_default() -> None:
    c = Cluster(3)
    c.elect(1)
    c.isolate(2)
    c.propose(1, b"x")
    c.heal()
    c.filters.append(lambda m: None if m.dst == 2 or m.src == 2 else m)
    assert c.nodes[1].transfer_leadership() == 3


def test_proposals_are_refused_during_a_transfer_which_times_out() -> None:
    c = Cluster(3, election_ticks=10)
    c.elect(1)
    c.isolate(3)
    c.nodes[1].transfer_leadership(3)
    with pytest.raises(ProposalDroppedError):
        c.nodes[1].propose([command(b"x")])
    c.tick_all(11)
    assert c.nodes[1].role is Role.LEADER
    assert c.nodes[1].lead_transferee is None
    assert c.nodes[1].propose([command(b"x")]) is not None


def test_transfer_catches_the_target_up_first() -> None:
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    for i in range(5):
        c.propose(1, b"%d" % i)
    c.heal()
    c.nodes[1].transfer_leadership(3)
    c.settle()
    assert c.nodes[3].role is Role.LEADER
    assert c.log_terms(3)[:6] == c.log_terms(1)[:6]


def test_malformed_forwarded_payloads_never_enter_the_log() -> None:
    c = Cluster(3)
    c.elect(1)
    last = c.stores[1].last_index()
    c.nodes[1].step(Message(MsgType.PROP, 2, 1, c.nodes[1].term, payloads=[b"", b"\x09junk", command(b"ok")]))
    c.settle()
    entries = c.stores[1].entries(last + 1, c.stores[1].last_index() + 1)
    assert [e.data for e in entries] == [command(b"ok")]
