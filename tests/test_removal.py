"""A node removed while it was away learns it from its peers' refusals and stops
(``dengine.removal``): the rule on its own, then on real nodes over gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dengine.config import Config
from dengine.node import Node
from dengine.removal import RemovalWatch
from test_node_embedded import Counter, configs, leader_of, run, started, until, with_section
from test_node_membership import joiner_config

TIMEOUT = 1.0  # election timeout, seconds: refusals count after 2 s, runs break after 7 s


def watch_refused(by: list[int], at: list[float]) -> RemovalWatch:
    w = RemovalWatch(3, TIMEOUT)
    for t in at:
        for member in by:
            w.refused_by(member, t)
    return w


def test_a_majority_of_the_voters_refusing_for_two_election_timeouts_means_removed() -> None:
    w = watch_refused([1, 2], at=[0.0, 1.5, 2.5])
    assert w.removed_by({1, 2, 3}, (), now=2.5) == [1, 2]


def test_one_campaign_of_refusals_is_not_enough() -> None:
    # A member that has not appended the entry adding this node yet refuses it too, for a moment.
    w = watch_refused([1, 2], at=[0.0, 1.0])
    assert w.removed_by({1, 2, 3}, (), now=1.0) is None


def test_a_minority_refusing_is_not_enough() -> None:
    w = watch_refused([1, 2], at=[0.0, 1.5, 2.5])
    assert w.removed_by({1, 2, 3, 4, 5}, (), now=2.5) is None
    w.refused_by(4, 0.0)
    w.refused_by(4, 2.5)
    assert w.removed_by({1, 2, 3, 4, 5}, (), now=2.5) == [1, 2, 4]


def test_refusals_far_apart_start_a_new_run_and_old_ones_expire() -> None:
    w = watch_refused([1, 2], at=[0.0, 10.0])
    assert w.removed_by({1, 2, 3}, (), now=10.5) is None, "10 s apart: not one run"
    w = watch_refused([1, 2], at=[0.0, 2.5])
    assert w.removed_by({1, 2, 3}, (), now=20.0) is None, "nothing refused lately"


def test_a_member_that_talks_to_the_node_stops_counting() -> None:
    w = watch_refused([1, 2], at=[0.0, 1.5, 2.5])
    w.heard_from(2)
    assert w.removed_by({1, 2, 3}, (), now=2.5) is None
    assert w.watching
    w.heard_from(1)
    assert not w.watching


def test_a_learner_refused_by_a_majority_of_the_voters_is_removed_too() -> None:
    w = watch_refused([1, 2], at=[0.0, 1.5, 2.5])
    assert w.removed_by({1, 2, 4}, {3}, now=2.5) == [1, 2]
    w = watch_refused([1], at=[0.0, 1.5, 2.5])
    assert w.removed_by({1, 2, 4}, {3}, now=2.5) is None, "one voter of three"


def test_a_node_that_knows_it_left_is_never_judged_here() -> None:
    w = watch_refused([1, 2], at=[0.0, 1.5, 2.5])
    assert w.removed_by({1, 2}, {4}, now=2.5) is None


def quick_configs(root: Path) -> list[Config]:
    """Three nodes with an election timeout of 200 ms: the departed-member grace is then 4 s."""
    return with_section(configs(root), "raft", tick_ms=10, heartbeat_ms=40, election_timeout_ms=200)


def test_a_member_removed_while_down_stops_when_it_comes_back(tmp_path: Path) -> None:
    """The usual replacement: a member is down, the others remove it. Restarted, it does not
    know; its campaigns are refused by both members (once their grace for departed members is
    over), and it stops, saying why, instead of campaigning for ever."""
    cfgs = quick_configs(tmp_path)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            victim = next(n for n in nodes if n is not leader)
            assert await leader.propose(b"1") == b"1"
            await victim.stop(transfer_leadership=False)
            await leader.remove_member(victim.id)
            await asyncio.sleep(20 * 0.2)  # the members' grace for departed members (dengine.members)
            back = Node(cfgs[victim.id - 1], state_machine=Counter())
            await back.start()
            try:
                await asyncio.wait_for(back.wait_stopped(), 15)
                assert back.failure is not None and "removal from the cluster" in back.failure, back.failure
                assert "voters" in back.failure and "no longer know it" in back.failure
            finally:
                await back.stop(transfer_leadership=False)
            assert await leader.propose(b"2") == b"3", "the cluster serves on"
            survivors = [n for n in nodes if n is not victim]
            assert all(n.failure is None for n in survivors)

    run(main)


def test_a_running_member_that_is_removed_stops_once_the_grace_is_over(tmp_path: Path) -> None:
    """The leader stops replicating to a member the moment its removal is appended, so even a
    member that is up never receives it: it hears no leader, campaigns, is refused once the
    members' grace for departed members is over, and stops."""
    cfgs = quick_configs(tmp_path)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            # The leader refuses a removal that would leave a voter it has not heard from yet:
            # a loaded machine (CI) can elect it before the third node first answers.
            await leader.propose(b"0")
            await until(lambda: all(n.raft is not None and n.raft.applied >= 2 for n in nodes))
            victim = next(n for n in nodes if n is not leader)
            await leader.remove_member(victim.id)
            await asyncio.wait_for(victim.wait_stopped(), 20 * 0.2 + 15)
            assert victim.failure is not None and "removal from the cluster" in victim.failure
            assert await leader.propose(b"1") == b"1", "the cluster serves on"

    run(main)


def test_a_learner_removed_while_it_runs_stops_too(tmp_path: Path) -> None:
    """A learner never campaigns, so nothing of it reached the voters once it was removed; it
    now probes them when it hears no leader (``Raft._probe_voters``), is refused, and stops."""
    cfgs = quick_configs(tmp_path)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            cfg4 = joiner_config(tmp_path, 4, cfgs[0], promote="manual")
            learner = Node(cfg4, state_machine=Counter(), join=leader.config.node.listen)
            await learner.start()
            nodes.append(learner)
            assert await leader.propose(b"1") == b"1"
            await until(lambda: isinstance(learner.sm, Counter) and learner.sm.n == 1)
            assert learner.raft is not None and learner.raft.learners == frozenset({4})
            await leader.remove_member(4)
            await asyncio.wait_for(learner.wait_stopped(), 20 * 0.2 + 15)
            assert learner.failure is not None and "removal from the cluster" in learner.failure
            assert await leader.propose(b"2") == b"3", "the cluster serves on"

    run(main)
