"""What a node's own bookkeeping puts in its metrics: each proposal counted once, every way a
proposal fails counted with its reason, the commit index shown as it moves (not only when
something is applied), and no per-peer series left behind by a member that left."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dengine.errors import ApplyError, OutcomeUnknownError
from dengine.node import Node
from dengine.transport.peers import PeerTransport
from test_node_embedded import Counter, configs, leader_of, started, until
from test_state_machine_rules import Slow


def value(node: Node, name: str, **labels: str) -> float:
    """The sample ``name`` with ``labels`` in the node's metrics (0 if absent)."""
    for family in text_string_to_metric_families(node.metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def has_series(node: Node, name: str, **labels: str) -> bool:
    for family in text_string_to_metric_families(node.metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return True
    return False


def test_a_proposal_proposed_again_is_counted_once(tmp_path: Path) -> None:
    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            futures = [node.submit(b"1") for _ in range(5)]
            await asyncio.sleep(0)  # proposed, not yet applied
            node._resubmit()  # as after a leader change: every waiting payload proposed again
            await asyncio.gather(*futures)
            assert value(node, "dengine_proposals_total") == 5

    asyncio.run(main())


def test_every_way_a_proposal_fails_is_counted_with_its_reason(tmp_path: Path) -> None:
    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            with pytest.raises(ApplyError):
                await node.propose(b"boom")
            assert value(node, "dengine_proposals_failed_total", reason="apply_error") == 1
        slow_cfg = configs(tmp_path / "slow", n=1)[0]
        node = Node(slow_cfg, state_machine=Slow())
        await node.start()
        await until(lambda: leader_of([node]))
        waiting = [asyncio.ensure_future(node.propose(b"x")) for _ in range(3)]
        await asyncio.sleep(0.1)
        await node.stop(transfer_leadership=False)
        for w in waiting:
            with pytest.raises(OutcomeUnknownError):
                await w
        assert value(node, "dengine_proposals_failed_total", reason="unknown") == 3

    asyncio.run(main())


def test_the_commit_index_shows_while_entries_wait_to_be_applied(tmp_path: Path) -> None:
    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        node = Node(cfg, state_machine=Slow())
        await node.start()
        try:
            await until(lambda: leader_of([node]))
            waiting = asyncio.ensure_future(node.propose(b"x"))
            await until(lambda: value(node, "dengine_commit_index") >= 2)
            assert value(node, "dengine_applied_index") < 2
        finally:
            await node.stop(transfer_leadership=False)
        with pytest.raises(OutcomeUnknownError):
            await waiting

    asyncio.run(main())


def test_a_removed_member_leaves_no_per_peer_series(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(configs(tmp_path, 3)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")
            victim = next(n for n in nodes if n is not leader)
            peer = str(victim.id)
            await until(lambda: has_series(leader, "dengine_peer_match_index", peer=peer))
            await leader.remove_member(victim.id)
            await until(lambda: not has_series(leader, "dengine_peer_match_index", peer=peer))
            assert not has_series(leader, "dengine_peer_lag_entries", peer=peer)

    asyncio.run(main())


def test_role_snapshot_and_transport_log_lines_carry_the_node_term_and_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await node.propose(b"1")
            assert await node.snapshot() is not None

    with caplog.at_level(logging.INFO, logger="dengine"):
        asyncio.run(main())
        PeerTransport(7, "c", {}, lambda m: None)._welcome(9, "h:9")
    roles = [r for r in caplog.records if getattr(r, "event", None) == "role"]
    assert roles and all(hasattr(r, "term") and hasattr(r, "index") and hasattr(r, "node_id") for r in roles)
    snapshots = [r for r in caplog.records if getattr(r, "event", None) == "snapshot"]
    assert snapshots and all(getattr(r, "term", 0) >= 1 and getattr(r, "index", 0) >= 2 for r in snapshots)
    (welcome,) = [r for r in caplog.records if "taking messages from node 9" in r.getMessage()]
    assert getattr(welcome, "node_id", None) == 7
