"""Snapshot files go to the disk while they are written (``_core.WriteBehind``), not in one burst at
their final fsync, which the log's syncs would queue behind (50-60 ms latency spikes under load in
``benchmarks/bench_embedded.py`` before).

Measured with the machine's count of dirty page-cache bytes (``/proc/meminfo``): writing a
64 MiB snapshot leaves at most a few steps of it dirty, where a plain write of as much leaves all
of it, which each test checks first on the same directory (and skips where the page cache does
not show it, say on a tmpfs). The step arithmetic itself is tested in Rust
(``dengine_core::write_behind``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from dengine import _core
from dengine.kv import KVStateMachine, encode_put
from dengine.snapshot_store import SnapshotMeta, SnapshotStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")

MIB = 1 << 20
SIZE = 64 * MIB
# Two steps may be unwaited for at any moment; the rest is room for other writers on the machine.
LEFT_DIRTY_AT_MOST = 8 * MIB


def dirty_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Dirty line in /proc/meminfo")


def dirtied_by(write: Callable[[], None]) -> int:
    before = dirty_bytes()
    write()
    return dirty_bytes() - before


@pytest.fixture
def dirty_pages_show(tmp_path: Path) -> None:
    """Skips unless a plain 64 MiB write into ``tmp_path`` shows up as dirty bytes."""
    path = tmp_path / "plain"
    with open(path, "wb") as f:

        def plain() -> None:
            for _ in range(SIZE // MIB):
                f.write(b"p" * MIB)
            f.flush()

        grown = dirtied_by(plain)
        os.fsync(f.fileno())  # so that its writeback does not overlap the measurement to come
    path.unlink()
    if grown < SIZE * 3 // 4:
        pytest.skip(f"a plain write of 64 MiB left {grown} bytes dirty here: nothing to compare with")


@pytest.mark.usefixtures("dirty_pages_show")
def test_a_state_machine_snapshot_reaches_the_disk_while_it_is_written(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    out = store.create(SnapshotMeta(10, 2, (1, 2, 3)))
    chunk = bytes(range(256)) * 256  # 64 KiB writes, as a state machine might make them

    def snapshot() -> None:
        for _ in range(SIZE // len(chunk)):
            out.sink.write(chunk)

    left = dirtied_by(snapshot)
    committed = out.commit()
    assert left <= LEFT_DIRTY_AT_MOST, f"{left} bytes of the snapshot were left for its final fsync"
    latest = store.latest(verify=True)
    assert latest is not None and latest.file_sha256 == committed.file_sha256
    assert committed.data_len == SIZE


@pytest.mark.usefixtures("dirty_pages_show")
def test_the_built_in_store_snapshot_reaches_the_disk_while_it_is_written(tmp_path: Path) -> None:
    sm = KVStateMachine()
    value = b"v" * 4096
    count = SIZE // len(value)
    for i in range(count):
        sm.apply(i + 1, encode_put(b"key-%08d" % i, value))
    writer = sm.begin_snapshot()
    store = SnapshotStore(tmp_path / "snapshots")
    out = store.create(SnapshotMeta(count, 1, (1, 2, 3)))

    left = dirtied_by(lambda: writer(out.sink))
    out.commit()
    assert left <= LEFT_DIRTY_AT_MOST, f"{left} bytes of the snapshot were left for its final fsync"
    latest = store.latest(verify=True)
    assert latest is not None
    copy = KVStateMachine()
    with store.open_data(latest) as data:
        copy.restore(data)
    assert copy.get(b"key-%08d" % (count - 1)) is not None
    assert len(copy.range(b"key-")) == count


def test_write_behind_steps_are_a_megabyte() -> None:
    # The size the docs and the latency reasoning assume: two steps are a few ms of disk time.
    assert _core.WriteBehind.STEP == MIB


class RecordedWriteBehind:
    """Stands in for ``_core.WriteBehind``: records each ``wrote`` call's ``wait``."""

    STEP = MIB
    waits: ClassVar[list[bool]] = []

    def __init__(self, fd: int, offset: int) -> None:
        self.waits.clear()

    def wrote(self, end: int, *, wait: bool = True) -> None:
        self.waits.append(wait)


def test_a_snapshot_written_from_the_event_loop_never_waits_for_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async state machine's ``snapshot`` writes from the loop's thread: its writeback starts
    a step at a time, but the loop is never made to wait for the disk."""
    monkeypatch.setattr(_core, "WriteBehind", RecordedWriteBehind)
    out = SnapshotStore(tmp_path).create(SnapshotMeta(10, 2, (1, 2, 3)))

    async def snapshot_on_the_loop() -> None:
        for _ in range(3):
            out.sink.write(b"a" * MIB)

    asyncio.run(snapshot_on_the_loop())
    for _ in range(3):  # and the rest from a worker thread, as a plain state machine's snapshot
        out.sink.write(b"b" * MIB)
    out.commit()
    assert RecordedWriteBehind.waits == [False] * 3 + [True] * 3
