"""Applying committed batches to the built-in KV store off the event loop's thread.

Applying is the largest single cost of a write on a busy node running the built-in store: each
put walks a large ordered map and misses the caches at every level, and on the event loop's
thread that work, and the caches it evicts, delay everything else the loop does. So a node's
apply loop hands each large batch to :class:`ApplyThread`, which applies it through the session
table on a Rust thread without the GIL (``_core.NativeApplier``) while the loop goes on with
proposals, replication and answers. The batch's answers come back to the loop, which settles the
waiting proposals as before; those of its leading run of plain puts are made at once, on the
loop's thread, from the store's revision alone, before the thread walks the map with them. The
writers they answer go on with their next writes while the map is updated: the cluster's writes
otherwise wait for the leader's whole apply at every round.

On Linux the thread runs five nice levels below the loop (nice 5 for a loop at 0): its work is
off the path of every write (a leader's writes are answered before it runs them, a follower
acknowledges entries before it applies them), so on a busy machine the loop and the log sync that
every write waits for take a core first.

Small batches (a write at a time) are still applied in place: the hand-off costs a thread
wake-up and a loop wake-up, tens of microseconds on the path of the write, which only a large
batch earns back (:data:`MIN_ENTRIES`). A platform without the thread (Windows), or a loop that
cannot watch file descriptors, applies every batch in place.

Python code that touches the store while a batch is under way (a read, a status call) waits for
it: from the moment a run of writes is answered until the map has them all (the store itself
makes its callers wait, ``_core.KvStore``), so whoever heard a write answered reads it; and the
thread holds the store's lock while it applies the rest of a batch, so nothing sees part of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from dengine import _core
from dengine.raft.sessions import Answer, SessionTable, apply_entry

__all__ = ["MIN_ENTRIES", "ApplyThread"]

MIN_ENTRIES = 64
"""Batches of at least this many entries go to the thread; smaller ones are applied in place."""


class ApplyThread:
    """One node's apply thread for the built-in store ``store`` and the session table
    ``sessions``; :meth:`start` makes one, or returns None where there can be none."""

    def __init__(self, applier: _core.NativeApplier, store: _core.KvStore, sessions: SessionTable) -> None:
        self._applier = applier
        self._store = store
        self._sessions = sessions
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] | None = None
        self._wanted: Collection[tuple[int, int]] = ()
        self._answered: list[Answer] = []
        self._closed = False

    @classmethod
    def start(cls, store: _core.KvStore, sessions: SessionTable) -> ApplyThread | None:
        """The apply thread for ``store`` and ``sessions``, watched by the running loop; None on
        a platform without it or a loop that cannot watch its socket."""
        native = getattr(_core, "NativeApplier", None)
        if native is None:
            return None
        applier = native(store, sessions.native_table())
        thread = cls(applier, store, sessions)
        try:
            thread._loop.add_reader(applier.fileno(), thread._on_ready)
        except NotImplementedError:
            applier.close()
            return None
        return thread

    async def apply(
        self,
        batch: _core.EntryBatch,
        wanted: Collection[tuple[int, int]],
        early: Callable[[list[Answer]], None] | None = None,
    ) -> tuple[list[Answer], int]:
        """Applies the entries of ``batch`` up to the first one the thread leaves aside (a
        membership change, a damaged envelope), which is applied here, or to the end. Returns the
        answers of the session commands in ``wanted``, as
        :func:`dengine.raft.sessions.apply_committed` does, and how many entries were applied.

        It stops there so that the caller decides again where the rest goes: a watch that
        subscribed meanwhile needs the rest applied through the state machine, which publishes
        the events the thread would give to nobody.

        ``early``, if given, gets at once the answers of the batch's leading run of writes whose
        answers need only the store's revision (the usual put), before the thread has walked the
        map with them; these are then not returned. Their callers can go on with their next
        writes while the map is updated, and any read of the store made meanwhile waits for it.
        """
        if self._closed:
            raise RuntimeError("the apply thread is closed")
        answered: list[Answer] = []
        self._done = self._loop.create_future()
        self._wanted, self._answered = wanted, answered
        self._applier.submit(batch, wanted, answered)
        if early is not None and answered:
            early(answered[:])
            answered.clear()
        try:
            at = await asyncio.shield(self._done)
        finally:
            self._done, self._wanted, self._answered = None, (), []
        if at < len(batch):
            # Nobody waits for a membership change or a damaged envelope.
            apply_entry(batch[at], self._sessions, self._store.apply)
            at += 1
        return answered, at

    def _on_ready(self) -> None:
        done = self._done
        try:
            position = self._applier.take(self._wanted, self._answered)
        except Exception as exc:
            # The thread died mid-batch (a bug), or its answers could not be handed over (no
            # memory left): the node cannot know what the batch changed, or who was answered.
            self._loop.remove_reader(self._applier.fileno())
            self._closed = True
            if done is not None and not done.done():
                done.set_exception(exc)
            return
        if position is not None and done is not None and not done.done():
            done.set_result(position)

    def close(self) -> None:
        """Stops the thread after the batch it may be applying (a millisecond or so at worst)."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._applier.fileno())
        self._applier.close()
