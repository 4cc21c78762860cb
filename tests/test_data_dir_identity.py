"""A data dir belongs to one node of one cluster, started with one set of initial voters
(``dengine.identity``): a node given another's data dir, another cluster's, or other initial
members is stopped before it can vote, and loses nothing; a data dir that holds nothing yet is
claimed anew."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.errors import ConfigError
from dengine.identity import FILE_NAME
from dengine.node import Node
from test_node_embedded import Counter, configs, leader_of, started, until, with_section


def config(root: Path, node: int = 1, *, data: str = "n1", cluster: str = "c", voters: int = 1) -> Config:
    ports = free_ports(voters)
    members = {str(i): f"127.0.0.1:{p}" for i, p in enumerate(ports, start=1)}
    if str(node) not in members:
        members[str(node)] = members.pop("1")
    return Config.from_dict(
        {
            "node": {
                "id": node,
                "listen": members[str(node)],
                "data_dir": str(root / data),
                "metrics_listen": "",
            },
            "cluster": {"id": cluster, "members": members},
            "raft": {"tick_ms": 20, "heartbeat_ms": 60, "election_timeout_ms": 400},
        }
    )


async def write_some(cfg: Config, n: int = 3) -> int:
    """Runs a one-node cluster on ``cfg`` and has it apply ``n`` increments; returns the count."""
    counter = Counter()
    async with Node(cfg, state_machine=counter) as node:
        for _ in range(n):
            await node.propose(b"1")
    return counter.n


async def start_fails(cfg: Config) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        async with Node(cfg, state_machine=Counter()):
            pass
    return caught.value


def identity_of(root: Path, data: str = "n1") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / data / FILE_NAME).read_text())
    return doc


def test_the_first_start_records_the_identity_and_later_starts_check_it(tmp_path: Path) -> None:
    assert asyncio.run(write_some(config(tmp_path))) == 3
    assert identity_of(tmp_path) == {"format": 1, "cluster": "c", "node": 1, "voters": [1]}
    assert asyncio.run(write_some(config(tmp_path))) == 6, "the same node starts again, its data kept"


def test_another_nodes_data_dir_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    asyncio.run(write_some(config(tmp_path)))
    error = asyncio.run(start_fails(config(tmp_path, node=2)))
    assert error.key == "node.id" and "belongs to node 1" in str(error) and FILE_NAME in str(error)
    assert asyncio.run(write_some(config(tmp_path))) == 6, "nothing lost, the right node starts"


def test_another_clusters_data_dir_is_refused(tmp_path: Path) -> None:
    asyncio.run(write_some(config(tmp_path)))
    error = asyncio.run(start_fails(config(tmp_path, cluster="other")))
    assert error.key == "cluster.id" and "belongs to cluster 'c'" in str(error)


def test_other_initial_members_are_refused_while_the_configuration_is_the_initial_one(tmp_path: Path) -> None:
    """``dengine cluster --data-dir ./dev --nodes 1`` after a three-node run: node 1 would take
    itself for the only voter and commit alone over a log that may miss writes its peers hold."""
    three = configs(tmp_path, 3)

    async def write_in_three() -> None:
        async with started(three) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")

    asyncio.run(write_in_three())
    assert identity_of(tmp_path, "n1")["voters"] == [1, 2, 3]
    error = asyncio.run(start_fails(config(tmp_path, cluster="embedded")))
    assert error.key == "cluster.members" and "first started with {1, 2, 3}" in str(error)
    asyncio.run(write_in_three())  # with its own members it starts, and the cluster serves


def test_a_damaged_identity_is_refused_naming_the_file(tmp_path: Path) -> None:
    asyncio.run(write_some(config(tmp_path)))
    (tmp_path / "n1" / FILE_NAME).write_text('{"format": 1, "cluster": "c", "node": "one"')
    error = asyncio.run(start_fails(config(tmp_path)))
    assert "is damaged" in str(error) and str(tmp_path / "n1" / FILE_NAME) in str(error)


def test_a_data_dir_from_before_the_identity_is_claimed_on_its_next_start(tmp_path: Path) -> None:
    asyncio.run(write_some(config(tmp_path)))
    (tmp_path / "n1" / FILE_NAME).unlink()
    assert asyncio.run(write_some(config(tmp_path))) == 6
    assert identity_of(tmp_path)["node"] == 1


def test_a_data_dir_that_holds_nothing_yet_is_claimed_anew(tmp_path: Path) -> None:
    """A node first started under a wrong id on an empty data dir that never voted nor wrote:
    nothing is at stake, so the corrected start takes the dir over."""
    asyncio.run(write_some(config(tmp_path)))
    shutil.rmtree(tmp_path / "n1" / "log")
    shutil.rmtree(tmp_path / "n1" / "snapshots", ignore_errors=True)
    assert asyncio.run(write_some(config(tmp_path, node=2), n=1)) == 1
    assert identity_of(tmp_path)["node"] == 2


def test_an_original_member_restarted_with_join_is_not_refused(tmp_path: Path) -> None:
    """``dengine serve --join`` given again to a member that holds data changes nothing (and
    sets cluster.initial_state = "existing"): its identity still matches."""
    three = configs(tmp_path, 3)

    async def main() -> None:
        async with started(three) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")
            follower = next(n for n in nodes if n is not leader)
            await follower.stop(transfer_leadership=False)
            again = Node(
                with_section([follower.config], "cluster", initial_state="existing")[0],
                Counter(),
                join=leader.config.node.listen,
            )
            nodes.append(again)
            await again.start()
            await until(lambda: again.raft is not None and again.raft.applied >= 2)

    asyncio.run(main())
