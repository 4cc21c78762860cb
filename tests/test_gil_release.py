"""Long Rust calls release the GIL, so other Python threads (and an asyncio loop that awaits the
call through an executor) keep running while the disk flushes."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path

from dengine.storage import Entry, WalLogStore

PAYLOAD = b"x" * 4096


def fill(store: WalLogStore, megabytes: int) -> None:
    """Leaves `megabytes` of unsynced appends, so the next sync has real flushing to do."""
    start = store.last_index() + 1
    per_batch = 256
    for b in range(megabytes):
        lo = start + b * per_batch
        store.append([Entry(i, 1, PAYLOAD) for i in range(lo, lo + per_batch)])


def longest_stall_during(call: threading.Thread) -> tuple[float, float]:
    """Runs `call` and, meanwhile, ticks on this thread; returns (call seconds, longest gap)."""
    ticks: list[float] = []
    began = time.perf_counter()
    call.start()
    while call.is_alive():
        ticks.append(time.perf_counter())
    call.join()
    took = time.perf_counter() - began
    gaps = [b - a for a, b in zip([began, *ticks], [*ticks, time.perf_counter()], strict=True)]
    return took, max(gaps)


def test_another_thread_runs_while_sync_flushes(tmp_path: Path) -> None:
    with WalLogStore(tmp_path / "log") as store:
        fill(store, 128)
        took, stall = longest_stall_during(threading.Thread(target=store.sync))
        assert store.durable_index() == store.last_index()
    # With the GIL held for the whole flush, this thread would stall for all of it.
    # sys.getswitchinterval() (5 ms) bounds how long the syncing thread may keep the GIL before
    # it reaches the Rust call that releases it.
    assert stall < max(0.5 * took, 0.02), (
        f"main thread stalled {stall * 1000:.1f} ms of a {took * 1000:.1f} ms sync"
    )


def test_an_event_loop_keeps_running_while_sync_flushes(tmp_path: Path) -> None:
    async def main() -> tuple[int, float, float]:
        loop = asyncio.get_running_loop()
        with WalLogStore(tmp_path / "log") as store:
            fill(store, 128)
            began = time.perf_counter()
            beats = [began]
            sync = loop.run_in_executor(None, store.sync)
            while not sync.done():
                await asyncio.sleep(0)
                beats.append(time.perf_counter())
            took = time.perf_counter() - began
            stall = max(b - a for a, b in itertools.pairwise(beats))
            return await sync, took, stall

    durable, took, stall = asyncio.run(main())
    assert durable == 128 * 256
    assert stall < max(0.5 * took, 0.02), (
        f"the loop stalled {stall * 1000:.1f} ms of a {took * 1000:.1f} ms sync"
    )
