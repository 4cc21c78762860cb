"""Membership on real nodes (embedded, real gRPC on 127.0.0.1): a node joins a running cluster as a
learner, is promoted once caught up, members are removed (the leader too) and replaced, with the
configuration surviving restarts and snapshots."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.node import Node
from dengine.raft.membership import ConfChangeError, ConfOp
from test_node_embedded import Counter, configs, leader_of, run, started, until, with_section


def joiner_config(root: Path, node_id: int, seed: Config, **membership: object) -> Config:
    d = seed.to_dict()
    (port,) = free_ports(1)
    d["node"] = {
        **d["node"],
        "id": node_id,
        "listen": f"127.0.0.1:{port}",
        "advertise": f"127.0.0.1:{port}",
        "data_dir": str(root / f"n{node_id}"),
    }
    d["cluster"] = {**d["cluster"], "initial_state": "existing"}
    d["membership"] = {**d.get("membership", {}), **membership}
    return Config.from_dict(d)


def with_membership(cfgs: list[Config], **membership: object) -> list[Config]:
    return with_section(cfgs, "membership", **membership)


def test_a_node_joins_is_promoted_automatically_and_the_leader_removes_itself(tmp_path: Path) -> None:
    cfgs = with_membership(configs(tmp_path), promote="auto", caught_up_for_ms=200, max_lag_entries=10)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await asyncio.gather(*(leader.propose(b"1") for _ in range(50)))
            cfg4 = joiner_config(
                tmp_path, 4, cfgs[0], promote="auto", caught_up_for_ms=200, max_lag_entries=10
            )
            joiner = Node(cfg4, state_machine=Counter(), join=cfgs[0].node.listen)
            await joiner.start()
            nodes.append(joiner)
            await until(lambda: 4 in leader.raft.conf.voters, timeout=20)  # type: ignore[union-attr]
            await until(lambda: isinstance(joiner.sm, Counter) and joiner.sm.n == 50)
            await until(
                lambda: joiner.raft is not None and joiner.raft.conf.voters == frozenset({1, 2, 3, 4})
            )
            await until(lambda: 'kind="promote"' in leader.metrics.render().decode())
            metrics = leader.metrics.render().decode()
            assert 'kind="add_learner"' in metrics and 'kind="promote"' in metrics
            assert "dengine_learner_lag_entries" in metrics
            # The leader removes itself: the change commits, then another voter leads.
            await leader.remove_member(leader.id)
            new = await until(lambda: leader_of([n for n in nodes if n is not leader]))
            assert leader.id not in new.raft.conf.voters  # type: ignore[union-attr]
            assert await new.propose(b"1") == b"51"
            await asyncio.sleep(1.0)  # several election timeouts: the removed node stays quiet
            assert leader.raft is not None and leader.raft.role.value == "follower"
            assert leader_of([n for n in nodes if n is not leader]) is new
            # It knows its removal committed: it stops, saying so, rather than linger as a
            # non-member whose embedded callers would wait for ever.
            await until(lambda: leader.failure is not None)
            assert "its removal from the cluster" in (leader.failure or "")
            assert "no longer holds it" in (leader.failure or "")

    run(main)


def test_manual_promotion_refuses_a_learner_far_behind(tmp_path: Path) -> None:
    cfgs = with_membership(configs(tmp_path), promote="manual", max_lag_entries=5)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await asyncio.gather(*(leader.propose(b"1") for _ in range(20)))
            # The safety checks count only voters that answered lately: wait until all have.
            await until(lambda: all(p.lag == 0 for p in leader.status().peers))
            (port,) = free_ports(1)
            await leader.add_learner(7, f"127.0.0.1:{port}")  # nobody listens there: it never catches up
            with pytest.raises(ConfChangeError, match="entries behind"):
                await leader.promote(7)
            with pytest.raises(ConfChangeError, match="already a member"):
                await leader.add_learner(7, "127.0.0.1:1")
            with pytest.raises(ConfChangeError, match="already used by node 2"):
                await leader.add_learner(8, cfgs[1].node.listen)
            # Forcing a promotion that would leave 3 of 4 voters reachable is allowed...
            await leader.promote(7, force=True)
            # ...but removing a live voter then would leave 2 of 3 reachable voters... still a
            # majority; removing a second live one would not be.
            await leader.remove_member(next(n.id for n in nodes if n is not leader))
            assert leader.raft is not None
            voters = leader.raft.conf.voters
            with pytest.raises(ConfChangeError, match="less than a majority"):
                await leader.remove_member(next(n.id for n in nodes if n is not leader and n.id in voters))
            await leader.remove_member(7)
            assert leader.raft is not None and 7 not in leader.raft.conf.voters

    run(main)


def test_a_wiped_node_is_replaced_and_the_configuration_survives_restarts(tmp_path: Path) -> None:
    cfgs = with_membership(
        [
            Config.from_dict({**c.to_dict(), "snapshot": {"entries": 30, "trailing_entries": 5}})
            for c in configs(tmp_path)
        ],
        promote="manual",
    )

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await asyncio.gather(*(leader.propose(b"1") for _ in range(100)))
            victim = next(n for n in nodes if n is not leader)
            await victim.stop(transfer_leadership=False)  # its disk is gone for good
            nodes.remove(victim)
            cfg5 = joiner_config(tmp_path, 5, cfgs[0], promote="manual")
            fresh = Node(cfg5, state_machine=Counter(), join=leader.config.node.listen)
            await fresh.start()
            nodes.append(fresh)
            await until(lambda: 5 in leader.raft.learners or 5 in leader.raft.conf.voters, timeout=20)  # type: ignore[union-attr]
            await leader.replace_member(victim.id, 5, cfg5.node.listen, timeout=30)
            assert leader.raft is not None and leader.raft.conf.voters == frozenset(
                {1, 2, 3, 5} - {victim.id}
            )
            await until(lambda: isinstance(fresh.sm, Counter) and fresh.sm.n == 100)
            assert fresh.snapshots.installed >= 1, "the new node caught up by snapshot"
            # Every member restarts and keeps the new configuration (from its log or snapshot).
            for n in list(nodes):
                await n.stop(transfer_leadership=False)
            cfg_by_id = {c.node.id: c for c in [*cfgs, cfg5]}
            nodes[:] = [Node(cfg_by_id[n.id], state_machine=Counter()) for n in nodes]
            for n in nodes:
                await n.start()
            again = await until(lambda: leader_of(nodes))
            assert again.raft is not None and again.raft.conf.voters == frozenset({1, 2, 3, 5} - {victim.id})
            assert await again.propose(b"1") == b"101"

    run(main)


def test_a_replacement_waits_for_its_new_member_to_answer_before_promoting_it(tmp_path: Path) -> None:
    """Caught up but not answering (down a moment, or slow under load), the new member would be
    refused as unreachable at its promotion: the replacement waits for it within its timeout."""
    cfgs = with_membership(configs(tmp_path), promote="manual")

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await asyncio.gather(*(leader.propose(b"1") for _ in range(20)))
            victim = next(n for n in nodes if n is not leader)
            await victim.stop(transfer_leadership=False)
            cfg5 = joiner_config(tmp_path, 5, cfgs[0], promote="manual")
            fresh = Node(cfg5, state_machine=Counter(), join=leader.config.node.listen)
            await fresh.start()
            await until(lambda: isinstance(fresh.sm, Counter) and fresh.sm.n == 20)
            await fresh.stop(transfer_leadership=False)
            # Long enough for the leader to count it as not answering.
            await asyncio.sleep(2 * cfgs[0].raft.election_timeout_ms / 1000)
            replacing = asyncio.ensure_future(
                leader.replace_member(victim.id, 5, cfg5.node.listen, timeout=20)
            )
            await asyncio.sleep(0.5)
            assert not replacing.done(), "waiting for node 5, not refused"
            nodes.append(again := Node(cfg5, state_machine=Counter()))
            await again.start()
            await replacing
            assert leader.raft is not None
            assert leader.raft.conf.voters == frozenset({1, 2, 3, 5} - {victim.id})

    run(main)


def test_join_given_to_a_member_that_holds_data_changes_nothing(tmp_path: Path) -> None:
    (cfg,) = configs(tmp_path, 1)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await node.propose(b"1")
        # Restarted with --join by mistake: it still leads its own cluster and never "joins".
        async with Node(cfg, state_machine=Counter(), join="127.0.0.1:1") as again:
            await until(lambda: leader_of([again]))
            assert await again.propose(b"1") == b"2"
        assert not (tmp_path / "n1" / "joined").exists()

    run(main)


def test_a_leader_cut_off_after_proposing_its_own_removal_learns_it_left(tmp_path: Path) -> None:
    """The leader proposes its own removal and hears nothing from then on (its inbound messages
    are lost): the others take the entry, elect a leader among themselves and commit it. The old
    leader's configuration in force no longer holds it, so it does not campaign; nobody sends it
    anything any more. It used to linger for ever as a follower without a leader; it now probes
    the remaining voters, whose refusals tell it that its removal committed, and it stops."""
    cfgs = configs(tmp_path)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")
            raft, transport = leader.raft, leader.transport
            assert raft is not None and transport is not None
            # The change's safety check counts only voters that answered lately.
            await until(lambda: all(raft.heard_from_recently(v) for v in raft.conf.voters))
            transport.on_message = lambda m: None  # from now on, nothing reaches the old leader
            index = raft.propose_conf_change(
                ConfOp.REMOVE, leader.id, addresses=dict(leader.members.addresses), nonce=1
            )
            leader.pump()
            rest = [n for n in nodes if n is not leader]
            new = await until(lambda: leader_of(rest), timeout=20)
            assert new.raft is not None
            await until(lambda: new.raft is not None and new.raft.commit >= index)
            assert leader.id not in new.raft.conf.voters
            # Departed members are still heard for 20 election timeouts (8 s here); then the
            # remaining voters refuse its probes, for two election timeouts, and it leaves.
            await until(lambda: leader.failure is not None, timeout=30)
            assert "its removal from the cluster" in (leader.failure or "")
            assert raft.own_removal_pending, "it never heard the commit: the refusals told it"

    run(main)
