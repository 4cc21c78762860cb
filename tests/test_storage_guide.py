"""The custom storage engine of docs/storage-engines.md passes the same conformance suite as the
built-in engines, and a node runs on it."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dengine.storage import HardState
from dengine.testing.logstore_conformance import LogStoreConformance, OpenStore, batch

sys.path.insert(0, str(Path(__file__).parent.parent / "docs" / "examples"))
from sqlite_log_store import SQLiteLogStore


class TestSQLiteLogStore(LogStoreConformance):
    durable = True

    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        return lambda: SQLiteLogStore(tmp_path / "log")


class SlowDiskSQLiteLogStore(SQLiteLogStore):
    """The example on a disk whose commit (fsync) takes 200 ms, releasing the GIL as fsync does."""

    def _commit(self, db: sqlite3.Connection) -> None:
        time.sleep(0.2)
        super()._commit(db)


def test_the_loops_calls_never_wait_for_a_sync(tmp_path: Path) -> None:
    """The node syncs on its I/O thread while its loop appends, saves the hard state and reads:
    none of those may wait for the commit under way (that would stall the whole node)."""
    store = SlowDiskSQLiteLogStore(tmp_path / "log")
    store.append(batch(1, 11, 1))
    store.sync()
    store.append(batch(11, 21, 1))
    with ThreadPoolExecutor(1) as io:
        syncing = io.submit(store.sync)
        time.sleep(0.02)  # the sync has taken the batch and is committing
        slowest = 0.0
        index = 21
        while not syncing.done():
            began = time.perf_counter()
            store.append(batch(index, index + 1, 1))
            store.save_hard_state(HardState(term=1, vote=1, commit=index))
            assert store.entries(1, index + 1) == batch(1, index + 1, 1)
            assert (store.last_index(), store.term(index), store.hard_state().commit) == (index, 1, index)
            slowest = max(slowest, time.perf_counter() - began)
            index += 1
            time.sleep(0.005)
        assert syncing.result() == 20  # what was appended before the sync began, no more
    assert slowest < 0.1, f"a loop-side call waited {slowest * 1000:.0f} ms for the sync's commit"
    assert store.sync() == index - 1
    store.close()


def test_a_node_runs_on_the_guide_engine(tmp_path: Path) -> None:
    import asyncio  # noqa: PLC0415

    from dengine.config import Config  # noqa: PLC0415
    from dengine.node import Node  # noqa: PLC0415
    from test_node_embedded import Counter, configs, leader_of, until  # noqa: PLC0415

    (base,) = configs(tmp_path, 1)
    cfg = Config.from_dict({**base.to_dict(), "storage": {"engine": "sqlite_log_store:SQLiteLogStore"}})

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            assert isinstance(getattr(node.store, "engine", node.store), SQLiteLogStore)  # maybe guarded
            await until(lambda: leader_of([node]))
            for _ in range(5):
                await node.propose(b"2")
        async with Node(cfg, state_machine=Counter()) as again:  # everything came back from SQLite
            await until(lambda: leader_of([again]))
            assert await again.propose(b"1") == b"11"

    asyncio.run(main())


GUIDE = Path(__file__).parent.parent / "docs" / "storage-engines.md"
EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"


def test_the_guides_conformance_snippet_runs_from_an_installed_package(tmp_path: Path) -> None:
    """The guide's "Proving it" snippet, as a user would paste it: nothing from this repository's
    tests/ on the path, only the installed package (and the example engine, as MyEngine)."""
    section = GUIDE.read_text().split("## Proving it", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    test_file = tmp_path / "test_my_engine.py"
    test_file.write_text("from sqlite_log_store import SQLiteLogStore as MyEngine\n" + match.group(1))
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    pytest_args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test_file)]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
