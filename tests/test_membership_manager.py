"""The node's membership operations (dengine.members.MembershipManager) driven on the real protocol
core (raft_harness.Cluster) through a stand-in for the node: what the operator is told, and what
the cluster holds after it, when the leader loses its change or the operator names the wrong node.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from dengine.client import Client, Membership
from dengine.errors import DengineError, RequestFailed
from dengine.members import MembershipManager
from dengine.raft import Raft, Role
from dengine.raft.membership import ConfChangeError, ConfOp, check_replacement
from dengine.testing.simstore import SimLogStore

from raft_harness import Cluster

ADDRESSES = {i: f"127.0.0.1:{7000 + i}" for i in range(1, 10)}


class StandIn:
    """The parts of a Node that MembershipManager's operator changes use, over one harness node."""

    def __init__(self, cluster: Cluster, node_id: int) -> None:
        self.cluster, self.id = cluster, node_id
        self.config = SimpleNamespace(
            raft=SimpleNamespace(tick_ms=1, election_timeout_ms=1000),
            membership=SimpleNamespace(max_lag_entries=10, promote="manual", caught_up_for_ms=0),
            cluster=SimpleNamespace(members={i: ADDRESSES[i] for i in cluster.voters}),
        )
        self.transport = SimpleNamespace(set_peers=lambda peers: None)
        self.metrics = SimpleNamespace(membership_change=lambda kind: None)

    @property
    def raft(self) -> Raft:
        return self.cluster.nodes[self.id]

    @property
    def store(self) -> SimLogStore:
        return self.cluster.stores[self.id]

    def pump(self) -> None:
        self.cluster.settle()


def five_led_by_1() -> tuple[Cluster, MembershipManager]:
    c = Cluster(5, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.propose(1, b"first")
    c.tick_all(1)
    return c, MembershipManager(StandIn(c, 1))  # type: ignore[arg-type]


def lose_the_change_of_1(c: Cluster) -> None:
    """Node 1, cut off with its change proposed and not sent, comes back after 2..5 elected node 3,
    which wrote and committed its own entries over that index: node 1 hears of them, and of the
    commit index past its change, in one append."""
    c.isolate(1)
    c.elect(3)
    c.propose(3, b"over it")
    c.heal()
    c.tick(3, c.nodes[3].cfg.heartbeat_ticks)
    c.settle()


def test_a_change_whose_entry_another_leader_overwrote_is_reported_lost_not_committed() -> None:
    c, members = five_led_by_1()

    async def main() -> None:
        c.isolate(1)  # the change reaches nobody
        change = asyncio.create_task(members.change(ConfOp.ADD_LEARNER, 6, address=ADDRESSES[6], timeout=5))
        await asyncio.sleep(0)  # proposed; change() waits for the commit index
        assert 6 in c.nodes[1].learners, "in force on node 1, as soon as it is in its log"
        c.heal()
        lose_the_change_of_1(c)
        assert c.nodes[1].commit >= 3 and c.nodes[1].role is Role.FOLLOWER
        with pytest.raises(DengineError, match="membership change was lost"):
            await change

    asyncio.run(main())
    assert not any(6 in r.learners for r in c.nodes.values()), "no node holds the change"


def test_a_replacement_whose_addition_was_lost_removes_nobody() -> None:
    c, members = five_led_by_1()

    async def main() -> None:
        c.isolate(1)
        replace = asyncio.create_task(members.replace(5, 6, ADDRESSES[6], timeout=5))
        await asyncio.sleep(0)
        c.heal()
        lose_the_change_of_1(c)
        with pytest.raises(DengineError, match="membership change was lost"):
            await replace

    asyncio.run(main())
    assert all(r.conf.voters == {1, 2, 3, 4, 5} for r in c.nodes.values()), "a voter was removed"


@pytest.mark.parametrize(
    ("new", "why"), [(3, "cannot replace itself"), (2, "already a member, at 127.0.0.1:7002")]
)
def test_a_replacement_that_names_an_existing_member_removes_nobody(new: int, why: str) -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.propose(1, b"first")
    c.tick_all(1)
    members = MembershipManager(StandIn(c, 1))  # type: ignore[arg-type]
    with pytest.raises(ConfChangeError, match=why):
        asyncio.run(members.replace(3, new, ADDRESSES[9], timeout=5))
    assert all(r.conf.voters == {1, 2, 3} for r in c.nodes.values())


def test_a_replacement_run_again_after_it_promoted_the_new_node_finishes() -> None:
    """An interrupted replacement (the new node promoted, the old one not yet removed) run again
    with the same arguments removes the old node: the new one is a member at that address."""
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.propose(1, b"first")
    c.tick_all(1)
    members = MembershipManager(StandIn(c, 1))  # type: ignore[arg-type]

    async def main() -> None:
        c.add_node(4)
        await members.change(ConfOp.ADD_LEARNER, 4, address=ADDRESSES[4])
        c.settle()
        await members.change(ConfOp.PROMOTE, 4)
        members.sync()  # as the node does after each Ready
        await members.replace(3, 4, ADDRESSES[4], timeout=5)

    asyncio.run(main())
    assert c.nodes[1].conf.voters == {1, 2, 4}


def test_the_client_checks_a_replacement_as_the_node_does() -> None:
    check_replacement(3, 4, ADDRESSES[4], {1: ADDRESSES[1], 4: ADDRESSES[4]})  # a rerun: fine
    check_replacement(3, 4, ADDRESSES[4], {1: ADDRESSES[1]})  # a new node: fine
    with pytest.raises(ConfChangeError, match="cannot replace itself"):
        check_replacement(3, 3, ADDRESSES[3], {3: ADDRESSES[3]})
    with pytest.raises(ConfChangeError, match="already a member"):
        check_replacement(3, 1, ADDRESSES[9], {1: ADDRESSES[1]})


def test_the_client_refuses_a_replacement_that_names_an_existing_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = Client(["127.0.0.1:1"], timeout=1)
    membership = Membership((1, 2, 3), (), {i: ADDRESSES[i] for i in (1, 2, 3)})
    removed: list[int] = []

    async def members(*, timeout: float | None = None) -> Membership:
        return membership

    async def remove_member(node_id: int, *, timeout: float | None = None) -> Membership:
        removed.append(node_id)
        return membership

    monkeypatch.setattr(client, "members", members)
    monkeypatch.setattr(client, "remove_member", remove_member)
    with pytest.raises(RequestFailed, match="already a member") as refused:
        asyncio.run(client.replace_member(3, 2, ADDRESSES[9]))
    assert refused.value.code == "INVALID_ARGUMENT" and removed == []


def test_a_replacement_whose_new_node_is_promoted_meanwhile_goes_on() -> None:
    """The automatic promotion can promote the caught-up new node between the replacement's wait
    and its own promotion: that promotion is refused ("already a voter"), and the replacement
    must still remove the old node rather than fail half-way."""
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.propose(1, b"first")
    c.tick_all(1)
    members = MembershipManager(StandIn(c, 1))  # type: ignore[arg-type]
    c.add_node(4)

    async def promoted_by_the_leader_meanwhile(node_id: int, timeout: float) -> None:
        c.settle()
        await members.change(ConfOp.PROMOTE, node_id)

    members.wait_caught_up = promoted_by_the_leader_meanwhile  # type: ignore[method-assign]
    asyncio.run(members.replace(3, 4, ADDRESSES[4], timeout=5))
    assert c.nodes[1].conf.voters == {1, 2, 4}
