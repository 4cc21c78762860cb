"""Making the log durable off the event loop: one sync at a time, each reported back on the loop.

The core asks for a sync by sequence number (``Ready.sync``); the node hands the number here and
hears back ``(sequence, durable index)`` once a sync that began after the request completed.
Requests made while a sync runs are served together by the next one (group commit).

The built-in engines sync on a Rust thread that wakes the loop through a socket
(``_core.BackgroundSync``); any other engine, or a loop that cannot watch file descriptors
(Windows' proactor), syncs through the node's I/O executor instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor

from dengine import _core
from dengine.errors import DengineError
from dengine.storage import LogStore, LogStoreBase, guarded

__all__ = ["LogSyncer"]

OnSynced = Callable[[int, int], None]
OnFailed = Callable[[DengineError], None]


class LogSyncer:
    """Runs ``store.sync()`` whenever a sequence newer than the last synced one is wanted.

    ``on_synced(sequence, durable_index)`` runs on the loop after each sync; ``on_failed(error)``
    runs once if a sync fails, after which nothing more is synced (a node must fail-stop: the
    page cache may have dropped writes the store cannot redo). ``observe`` gets each sync's
    duration in seconds, for the fsync histogram.
    """

    def __init__(
        self,
        store: LogStore,
        executor: Executor,
        on_synced: OnSynced,
        on_failed: OnFailed,
        observe: Callable[[float], None],
    ) -> None:
        self._store = guarded(store)
        self._executor = executor
        self._on_synced = on_synced
        self._on_failed = on_failed
        self._observe = observe
        self._wanted = 0
        self._running_for = 0  # the sequence the sync under way covers; 0 when idle
        self._began = 0.0
        self._stopped = False
        self._background: _core.BackgroundSync | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        background = getattr(_core, "BackgroundSync", None)
        if background is not None and isinstance(store, LogStoreBase):
            syncer = background(store)
            try:
                self._loop.add_reader(syncer.fileno(), self._on_background_done)
            except NotImplementedError:
                syncer.close()
            else:
                self._background = syncer

    @property
    def background(self) -> bool:
        """Whether syncs run on the store's own thread (rather than the executor)."""
        return self._background is not None

    def want(self, sequence: int) -> None:
        """Asks for everything appended so far to become durable, as ``sequence``."""
        self._wanted = max(self._wanted, sequence)
        if not self._running_for and not self._stopped:
            self._begin()

    def _begin(self) -> None:
        self._running_for = self._wanted
        self._began = time.monotonic()
        if self._background is not None:
            self._background.request()
        else:
            self._task = self._loop.create_task(self._sync_in_executor())

    def _finished(self, durable: int) -> None:
        self._observe(time.monotonic() - self._began)
        sequence, self._running_for = self._running_for, 0
        if self._stopped:
            return
        # The next sync starts before the core hears of this one: appends made meanwhile are
        # already on their way to disk while the core sends what this sync allowed.
        if self._wanted > sequence:
            self._begin()
        self._on_synced(sequence, durable)

    def _fail(self, exc: DengineError) -> None:
        self._stopped = True
        self._running_for = 0
        if self._background is not None:
            # Nothing more will be synced; a thread that died leaves its socket readable forever.
            self._loop.remove_reader(self._background.fileno())
        self._on_failed(exc)

    def _on_background_done(self) -> None:
        assert self._background is not None
        try:
            durable = self._background.take()
        except DengineError as exc:
            self._fail(exc)
            return
        if durable is not None and self._running_for:
            self._finished(durable)

    async def _sync_in_executor(self) -> None:
        try:
            # Guarded (see __init__): whatever a custom engine's sync raises or wrongly returns
            # (an OSError from os.fsync, a coroutine from an ``async def``) is a StorageError.
            durable = await self._loop.run_in_executor(self._executor, self._store.sync)
        except DengineError as exc:  # the sync failed: fail-stop, never a task nobody awaits
            self._fail(exc)
            return
        self._finished(durable)

    async def close(self) -> None:
        """Stops syncing; a sync under way completes first (its result is not reported)."""
        self._stopped = True
        if self._background is not None:
            self._loop.remove_reader(self._background.fileno())  # harmless if _fail did already
            syncer, self._background = self._background, None
            await self._loop.run_in_executor(self._executor, syncer.close)
        if self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)
