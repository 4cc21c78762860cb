"""The custom storage engine of docs/storage-engines.md passes the same conformance suite as the
built-in engines, and a node runs on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dengine.testing.logstore_conformance import LogStoreConformance, OpenStore

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
