"""Proposals: batching on the leader, forwarding or refusal on followers, leader transfer."""

from __future__ import annotations

import pytest

from dengine._core import Entry, HardState
from dengine.errors import LeaderOverloadedError, NotLeaderError, ProposalDroppedError
from dengine.raft import Message, MsgType, Role
from dengine.raft.payload import command
from dengine.testing.simstore import SimLogStore

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


def test_a_lost_timeout_now_is_sent_again_when_the_target_answers_a_heartbeat() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"x")
    lost: list[Message] = []

    def lose_the_first_timeout_now(m: Message) -> Message | None:
        if m.type is MsgType.TIMEOUT_NOW and not lost:
            lost.append(m)
            return None
        return m

    c.filters.append(lose_the_first_timeout_now)
    c.nodes[1].transfer_leadership(3)
    c.settle()

    def roles() -> tuple[Role, Role]:  # read afresh each time
        return c.nodes[1].role, c.nodes[3].role

    assert lost and roles() == (Role.LEADER, Role.FOLLOWER)
    c.tick(1)  # the next heartbeat: node 3's answer brings a TimeoutNow again
    c.settle()
    assert roles() == (Role.FOLLOWER, Role.LEADER) and c.nodes[1].lead == 3


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "slow"])
def test_a_timeout_now_that_waited_through_a_pause_is_not_acted_on(paused: bool) -> None:
    """Thesis §3.10: a leader abandons a transfer the target does not complete within an election
    timeout. A target that was frozen meanwhile (SIGSTOP, a stalled VM) wakes to the TimeoutNow
    that waited for it: taking it would depose the leader the operator was told still leads.
    After a pause of an election timeout or more it is not acted on; the late TimeoutNow of a
    target that was merely slow still is (the extra election the thesis allows)."""
    c = Cluster(3, election_ticks=10)
    c.elect(1)
    c.propose(1, b"x")
    held, holding = c.hold_type(MsgType.TIMEOUT_NOW)
    c.nodes[1].transfer_leadership(3)
    c.settle()
    c.filters.remove(holding)
    assert held
    c.tick(1, 11)  # the leader gives up on the transfer and leads on
    c.settle()
    assert c.nodes[1].role is Role.LEADER and c.nodes[1].lead_transferee is None
    term = c.nodes[1].term
    if paused:  # node 3 slept through 12 ticks; its driver runs them at once on waking
        c.tick(3, 12)
        c.nodes[3].note_pause(12)
    # The leader's heartbeats, then the TimeoutNow that waited.
    c.tick(1, 3)
    c.settle()
    assert c.nodes[3].role is Role.FOLLOWER and c.nodes[3].lead == 1
    c.queue.extend(held)
    c.settle()

    def role_and_term(i: int) -> tuple[Role, int]:  # read afresh
        return c.nodes[i].role, c.nodes[i].term

    if paused:
        assert role_and_term(1) == (Role.LEADER, term)
        assert role_and_term(3) == (Role.FOLLOWER, term)
    else:
        assert role_and_term(3) == (Role.LEADER, term + 1)


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


# --- an overloaded leader (raft.max_unapplied_bytes) --------------------------------------------


def test_the_leader_refuses_proposals_past_its_limit_until_they_are_applied() -> None:
    c = Cluster(3, max_unapplied_bytes=100)
    c.elect(1)
    leader = c.nodes[1]
    c.isolate(2)
    c.isolate(3)
    leader.propose([command(b"a" * 59)])  # 60 payload bytes, nothing else pending
    assert leader.unapplied_bytes == 60
    with pytest.raises(LeaderOverloadedError, match=r"max_unapplied_bytes"):
        leader.propose([command(b"b" * 59)])
    last = c.stores[1].last_index()
    leader.propose([command(b"c" * 39)])  # 40 more fit: exactly at the limit
    assert c.stores[1].last_index() == last + 1 and leader.unapplied_bytes == 100
    c.heal()
    c.tick_all(2)  # heartbeats bring the followers back into the pipeline
    c.settle()
    assert leader.commit == c.stores[1].last_index() and leader.unapplied_bytes == 0
    leader.propose([command(b"d" * 99)])
    assert leader.unapplied_bytes == 100


def test_a_batch_larger_than_the_limit_is_admitted_when_nothing_is_pending() -> None:
    c = Cluster(3, max_unapplied_bytes=10)
    c.elect(1)
    indexes = c.nodes[1].propose([command(b"x" * 50), command(b"y" * 50)])
    c.settle()
    assert indexes is not None and c.nodes[1].commit == indexes[1]
    assert c.nodes[1].unapplied_bytes == 0


def test_a_forwarded_proposal_past_the_limit_is_dropped_by_the_leader() -> None:
    c = Cluster(3, max_unapplied_bytes=100, forward_proposals=True)
    c.elect(1)
    c.filters.append(lambda m: None if m.type is MsgType.APP and m.dst == 2 else m)
    c.isolate(3)
    c.propose(1, b"a" * 90)
    last = c.stores[1].last_index()
    assert c.nodes[2].propose([command(b"f" * 20)]) is None  # forwarded; 91 + 21 bytes > 100
    c.settle()
    assert c.stores[1].last_index() == last  # not appended: the forwarding node proposes it again


def test_a_new_leader_counts_only_what_it_proposed_in_its_term() -> None:
    c = Cluster(3, max_unapplied_bytes=100)
    c.elect(1)
    c.isolate(2)
    c.isolate(3)
    c.nodes[1].propose([command(b"a" * 99)])
    c.heal()
    c.isolate(1)
    c.tick_all(60)  # 2 and 3 stop hearing from 1 and elect one of themselves
    new = next(c.nodes[i] for i in (2, 3) if c.nodes[i].role is Role.LEADER)
    assert new.unapplied_bytes == 0
    c.isolate(2)
    c.isolate(3)
    new.propose([command(b"b" * 99)])  # admitted whole: nothing of this term is pending
    assert new.unapplied_bytes == 100
    with pytest.raises(ProposalDroppedError):
        new.propose([command(b"c")])


def test_a_limit_of_zero_admits_everything() -> None:
    c = Cluster(3, max_unapplied_bytes=0)
    c.elect(1)
    c.isolate(2)
    c.isolate(3)
    for _ in range(100):
        c.nodes[1].propose([command(b"z" * 1000)])
    assert c.nodes[1].unapplied_bytes == 100 * 1001


def test_committed_writes_count_against_the_limit_until_the_leader_applies_them() -> None:
    c = Cluster(3, max_unapplied_bytes=100)
    leader = c.elect(1)
    c.no_apply.add(1)  # a state machine that has fallen behind
    c.propose(1, b"a" * 59)
    assert leader.commit == c.stores[1].last_index() and leader.unapplied_bytes == 60
    with pytest.raises(LeaderOverloadedError):
        leader.propose([command(b"b" * 59)])
    leader.applied_to(leader.commit)
    assert leader.unapplied_bytes == 0
    leader.propose([command(b"b" * 59)])


def test_committed_entries_wait_in_the_log_while_the_state_machine_lags() -> None:
    """At most 8 committed chunks are handed out unapplied; the rest stays in the log, and goes
    out as one chunk once the state machine catches up."""
    c = Cluster(3)
    c.elect(1)
    c.no_apply.add(2)
    for i in range(20):
        c.propose(1, b"%d" % i)
    follower = c.nodes[2]
    handed_out = c.applied[2][-1].index
    assert follower.commit == 21 and handed_out == 9  # the noop at 1, then 2..9, a chunk each
    follower.applied_to(handed_out)
    c.settle()
    assert [e.index for e in c.applied[2]] == list(range(1, 22))


class _EntryListStore(SimLogStore):
    """A store that reads entries as lists only, as a custom Python engine may."""

    entry_batch = None  # type: ignore[assignment]


@pytest.mark.parametrize("framed", [False, True], ids=["entry-lists", "entry-batches"])
def test_a_restart_replays_its_log_a_few_megabytes_at_a_time(framed: bool) -> None:
    """A node restarting with a long committed log (or a follower catching up) gets it in
    chunks of at most 8 MiB, and no new chunk while 16 MiB or more are handed out unapplied:
    replaying a million entries must not hold a large part of the log in memory at once."""
    mib = 1 << 20
    stores: dict[int, SimLogStore] = {}
    for i in (1, 2, 3):
        store = SimLogStore() if framed else _EntryListStore()
        store.append([Entry(n, 1, command(b"x" * mib)) for n in range(1, 41)])
        store.save_hard_state(HardState(1, None, 40))
        store.sync()
        stores[i] = store
    c = Cluster(3, stores=stores)
    c.no_apply.add(1)
    for _ in range(20):
        c.process(1)
    handed_out = len(c.applied[1])
    assert 0 < handed_out < 40, handed_out
    assert handed_out * mib < (16 + 8) * mib, handed_out
    c.nodes[1].applied_to(handed_out)
    for _ in range(20):
        c.process(1)
    assert len(c.applied[1]) > handed_out
