"""The custom storage engine of docs/storage-engines.md passes the same conformance suite as the
built-in engines, and a node runs on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from logstore_conformance import LogStoreConformance, OpenStore

sys.path.insert(0, str(Path(__file__).parent.parent / "docs" / "examples"))
from sqlite_log_store import SQLiteLogStore


class TestSQLiteLogStore(LogStoreConformance):
    durable = True

    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        return lambda: SQLiteLogStore(tmp_path / "log")


def test_a_node_runs_on_the_guide_engine(tmp_path: Path) -> None:
    import asyncio  # noqa: PLC0415

    from dengine.config import Config  # noqa: PLC0415
    from dengine.node import Node  # noqa: PLC0415
    from test_node_embedded import Counter, configs, leader_of, until  # noqa: PLC0415

    (base,) = configs(tmp_path, 1)
    cfg = Config.from_dict({**base.to_dict(), "storage": {"engine": "sqlite_log_store:SQLiteLogStore"}})

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            assert isinstance(node.store, SQLiteLogStore)
            await until(lambda: leader_of([node]))
            for _ in range(5):
                await node.propose(b"2")
        async with Node(cfg, state_machine=Counter()) as again:  # everything came back from SQLite
            await until(lambda: leader_of([again]))
            assert await again.propose(b"1") == b"11"

    asyncio.run(main())
