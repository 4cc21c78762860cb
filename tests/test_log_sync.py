"""LogSyncer: the node's log syncs off the event loop, on the store's own thread for the built-in
engines and through the executor for any other, reported back on the loop, one at a time."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from dengine import _core
from dengine._core import Entry
from dengine.errors import DengineError, LogClosedError, OutcomeUnknownError, StorageError
from dengine.log_sync import LogSyncer
from dengine.node import Node
from dengine.storage import LogStore, WalLogStore

sys.path.insert(0, str(Path(__file__).parent.parent / "docs" / "examples"))
from sqlite_log_store import SQLiteLogStore

P = ParamSpec("P")
# The store's own sync thread exists where the loop can watch its socket (POSIX); elsewhere the
# built-in engines sync through the executor like any other.
OWN_THREAD = hasattr(_core, "BackgroundSync")


class PythonStore(SQLiteLogStore):
    """A store whose sync is Python code: the storage guide's custom engine, which can fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail: bool | Exception = False  # an exception to raise, or True for a StorageError
        self.syncs = 0

    def sync(self) -> int:
        self.syncs += 1
        if isinstance(self.fail, Exception):
            raise self.fail
        if self.fail:
            raise StorageError("disk on fire")
        return super().sync()


class Recorder:
    def __init__(self) -> None:
        self.synced: list[tuple[int, int]] = []
        self.failed: list[DengineError] = []
        self.durations: list[float] = []
        self.event = asyncio.Event()

    def on_synced(self, seq: int, durable: int) -> None:
        self.synced.append((seq, durable))
        self.event.set()

    def on_failed(self, exc: DengineError) -> None:
        self.failed.append(exc)
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), 5)
        self.event.clear()


def append(store: LogStore, n: int) -> None:
    first = store.last_index() + 1
    entries: Sequence[Entry] = [Entry(i, 1, b"x" * 100) for i in range(first, first + n)]
    store.append(entries)


def on_loop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Runs an async test in a fresh event loop (pytest sees the test's own parameters)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def syncer_for(store: LogStore, io: ThreadPoolExecutor, rec: Recorder) -> LogSyncer:
    return LogSyncer(store, io, rec.on_synced, rec.on_failed, rec.durations.append)


@pytest.mark.skipif(not OWN_THREAD, reason="the store's sync thread is POSIX-only")
@on_loop
async def test_a_builtin_engine_syncs_on_its_own_thread_and_reports_on_the_loop(tmp_path: Path) -> None:
    store = WalLogStore(tmp_path / "log")
    rec = Recorder()
    with ThreadPoolExecutor(1) as io:
        syncer = syncer_for(store, io, rec)
        assert syncer.background
        append(store, 3)
        syncer.want(1)
        await rec.next()
        assert rec.synced == [(1, 3)] and store.durable_index() == 3
        assert len(rec.durations) == 1 and rec.durations[0] >= 0
        await syncer.close()
    store.close()


@pytest.mark.parametrize("engine", ["wal", "python"])
@on_loop
async def test_requests_made_during_a_sync_are_served_together_by_the_next_one(
    tmp_path: Path, engine: str
) -> None:
    store: LogStore = WalLogStore(tmp_path / "log") if engine == "wal" else PythonStore(tmp_path / "py")
    rec = Recorder()
    with ThreadPoolExecutor(1) as io:
        syncer = syncer_for(store, io, rec)
        assert syncer.background == (engine == "wal" and OWN_THREAD)
        append(store, 1)
        syncer.want(1)
        for seq in (2, 3):  # while the first sync runs: the loop has not turned since
            append(store, 2)
            syncer.want(seq)
        while len(rec.synced) < 2:
            await rec.next()
        await asyncio.sleep(0.05)
        assert rec.synced == [(1, rec.synced[0][1]), (3, 5)], "one more sync covered both requests"
        assert rec.synced[0][1] >= 1
        await syncer.close()
    store.close()


@on_loop
async def test_a_custom_engine_syncs_through_the_executor(tmp_path: Path) -> None:
    store = PythonStore(tmp_path / "py")
    rec = Recorder()
    with ThreadPoolExecutor(1, thread_name_prefix="io") as io:
        syncer = syncer_for(store, io, rec)
        assert not syncer.background
        append(store, 2)
        syncer.want(7)
        await rec.next()
        assert rec.synced == [(7, 2)] and store.syncs == 1
        await syncer.close()


@pytest.mark.parametrize("engine", ["wal", "python"])
@on_loop
async def test_a_failed_sync_is_reported_once_and_nothing_is_synced_after_it(
    tmp_path: Path, engine: str
) -> None:
    rec = Recorder()
    with ThreadPoolExecutor(1) as io:
        if engine == "wal":
            wal = WalLogStore(tmp_path / "log")
            syncer = syncer_for(wal, io, rec)
            append(wal, 1)
            wal.close()  # the next sync raises LogClosedError on the store's thread
            expected: type[DengineError] = LogClosedError
        else:
            py = PythonStore(tmp_path / "py")
            syncer = syncer_for(py, io, rec)
            append(py, 1)
            py.fail = True
            expected = StorageError
        syncer.want(1)
        await rec.next()
        assert rec.synced == [] and len(rec.failed) == 1 and isinstance(rec.failed[0], expected)
        syncer.want(2)
        await asyncio.sleep(0.1)
        assert rec.synced == [] and len(rec.failed) == 1, "a sync ran after a failed one"
        await syncer.close()


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), RuntimeError("engine bug")])
@on_loop
async def test_a_custom_sync_that_raises_any_exception_is_a_sync_failure(
    tmp_path: Path, error: Exception
) -> None:
    # A custom engine's sync() may raise what os.fsync or its library raises: the syncer must
    # fail (and the node fail-stop), not lose the exception in a task nobody awaits.
    rec = Recorder()
    with ThreadPoolExecutor(1) as io:
        py = PythonStore(tmp_path / "py")
        syncer = syncer_for(py, io, rec)
        append(py, 1)
        py.fail = error
        syncer.want(1)
        await rec.next()
        assert rec.synced == [] and len(rec.failed) == 1
        failure = rec.failed[0]
        assert isinstance(failure, StorageError) and failure.__cause__ is error
        assert "PythonStore" in str(failure) and str(error) in str(failure)
        await syncer.close()
        py.close()


@on_loop
async def test_an_async_sync_handed_over_directly_is_a_sync_failure(tmp_path: Path) -> None:
    class AsyncSync(SQLiteLogStore):
        async def sync(self) -> int:  # type: ignore[override]
            return 0

    rec = Recorder()
    with ThreadPoolExecutor(1) as io:
        store = AsyncSync(tmp_path / "py")
        syncer = syncer_for(store, io, rec)  # type: ignore[arg-type]
        syncer.want(1)
        await rec.next()
        assert rec.synced == [] and len(rec.failed) == 1
        assert isinstance(rec.failed[0], StorageError) and "returned coroutine" in str(rec.failed[0])
        await syncer.close()
        store.close()


@on_loop
async def test_a_node_whose_custom_sync_raises_os_error_fail_stops(tmp_path: Path) -> None:
    from test_node_embedded import Counter, configs, until  # noqa: PLC0415

    (cfg,) = configs(tmp_path, n=1)
    store = PythonStore(tmp_path / "custom-log")
    node = Node(cfg, state_machine=Counter(), log_store=store)
    await node.start()
    await until(lambda: node.leader_id == node.id)
    store.fail = OSError(5, "Input/output error")
    with pytest.raises(OutcomeUnknownError, match="Input/output error"):
        await asyncio.wait_for(node.propose(b"2"), 5)
    await asyncio.wait_for(node.wait_stopped(), 5)
    assert node.failure is not None and "PythonStore" in node.failure
    await asyncio.wait_for(node.stop(), 5)


@on_loop
async def test_a_node_whose_log_sync_fails_stops_and_fails_its_waiting_proposals(tmp_path: Path) -> None:
    from test_node_embedded import Counter, configs, until  # noqa: PLC0415

    (cfg,) = configs(tmp_path, n=1)
    store = PythonStore(tmp_path / "custom-log")
    node = Node(cfg, state_machine=Counter(), log_store=store)
    await node.start()
    host, port = cfg.node.listen.rsplit(":", 1)
    await until(lambda: node.leader_id == node.id)
    assert await node.propose(b"1") == b"1"
    store.fail = True
    with pytest.raises(OutcomeUnknownError, match="storage failure: disk on fire"):
        await asyncio.wait_for(node.propose(b"2"), 5)
    await asyncio.wait_for(node.wait_stopped(), 5)
    with pytest.raises(DengineError, match="storage failure: disk on fire"):
        await node.propose(b"3")  # refused, saying why
    # A fail-stopped node stops serving (peers and clients see it down and go elsewhere) and
    # releases its log, without anyone calling stop().
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))
    with pytest.raises(LogClosedError):
        store.last_index()
    await asyncio.wait_for(node.stop(), 5)  # and stop() afterwards returns at once


@pytest.mark.skipif(not OWN_THREAD, reason="the store's sync thread is POSIX-only")
def test_a_sync_thread_that_is_gone_is_reported_rather_than_polled(tmp_path: Path) -> None:
    # Once the thread has exited its socket reads as end-of-file, readable forever: the syncer
    # must hear an error (and stop watching), not an endless stream of empty wake-ups.
    store = WalLogStore(tmp_path / "log")
    thread = _core.BackgroundSync(store)
    thread.close()
    with pytest.raises(StorageError, match="sync thread stopped"):
        thread.take()
    with pytest.raises(RuntimeError, match="closed"):
        thread.request()
    store.close()


class FailingAppends(SQLiteLogStore):
    """A custom store handed to the node as an object, whose appends can fail with an OSError."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail = False

    def append(self, entries: Sequence[Entry]) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        super().append(entries)


@on_loop
async def test_a_store_object_whose_append_raises_os_error_fail_stops_its_node(tmp_path: Path) -> None:
    """A store object given as ``log_store=`` is guarded like a configured engine: before, the
    OSError escaped a loop callback, the proposal waited for ever and the node went on leading."""
    from test_node_embedded import Counter, configs, until  # noqa: PLC0415

    (cfg,) = configs(tmp_path, n=1)
    store = FailingAppends(tmp_path / "custom-log")
    node = Node(cfg, state_machine=Counter(), log_store=store)
    await node.start()
    await until(lambda: node.leader_id == node.id)
    assert await node.propose(b"1") == b"1"
    store.fail = True
    with pytest.raises(OutcomeUnknownError, match="No space left"):
        await asyncio.wait_for(node.propose(b"2"), 5)
    await asyncio.wait_for(node.wait_stopped(), 5)
    assert node.failure is not None and "FailingAppends.append()" in node.failure
    await asyncio.wait_for(node.stop(), 5)
