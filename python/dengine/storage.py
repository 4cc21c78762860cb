"""Log storage: the :class:`LogStore` protocol and the two built-in engines.

The Raft layer touches storage only through :class:`LogStore`, so a custom engine (on RocksDB,
SQLite, a cloud disk...) plugs in by implementing these methods.
``dengine.testing.logstore_conformance`` is the suite any engine must pass; it runs against both
built-ins.

Conventions (those of the Raft paper): indexes start at 1; a fresh log has ``first_index() == 1``
and ``last_index() == 0``. After ``compact_prefix(i)``, ``first_index() == i + 1`` and ``term(i)``
still answers, because the leader needs the term just before the first entry it sends.

Durability: nothing is durable until a later ``sync()`` returns. ``sync`` is group commit: it
flushes every append and hard-state save made before it with as few fsyncs as possible, and the
built-in engines release the GIL while flushing, so an asyncio loop can run it in an executor
(``await loop.run_in_executor(None, store.sync)``) and keep serving. ``truncate_suffix``,
``compact_prefix`` and ``reset`` are durable when they return.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

from dengine._core import Entry, EntryBatch, HardState, LogStoreBase, MemoryLogStore, WalLogStore
from dengine.errors import ConfigError, DengineError, StorageError

# A batch a follower received stays framed (EntryBatch) on its way to append(): it reads like the
# Sequence[Entry] the protocol names, and says so to isinstance checks.
Sequence.register(EntryBatch)

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "Entry",
    "GuardedLogStore",
    "HardState",
    "LogStore",
    "LogStoreBase",
    "MemoryLogStore",
    "WalLogStore",
    "open_custom_log_store",
    "open_log_store",
]

DEFAULT_SEGMENT_BYTES = 64 << 20
"""A WAL segment stops taking appends once it reaches this size (64 MiB)."""


@runtime_checkable
class LogStore(Protocol):
    """What the Raft layer needs from a log storage engine.

    Errors must be raised as :mod:`dengine.errors` classes: ``LogCompactedError`` for an index
    below ``first_index()``, ``LogIndexError`` for one beyond ``last_index()`` or an append that
    does not continue the log, ``StorageError`` for I/O failures.
    """

    def first_index(self) -> int:
        """Index of the first stored entry (one past the compaction point)."""
        ...

    def last_index(self) -> int:
        """Index of the last entry, or ``first_index() - 1`` when the log is empty."""
        ...

    def term(self, index: int) -> int:
        """Term of entry ``index``, for ``first_index() - 1 <= index <= last_index()``."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``lo <= index < hi``, stopping once payloads exceed ``max_bytes``.

        At least one entry is returned when ``lo < hi``, so one large entry never stalls
        replication.
        """
        ...

    def append(self, entries: Sequence[Entry]) -> None:
        """Appends a batch that starts at ``last_index() + 1``, with consecutive indexes and
        terms that never decrease. Conflicts are removed with ``truncate_suffix`` first."""
        ...

    def truncate_suffix(self, index: int) -> None:
        """Removes every entry with index ``>= index``; durable on return."""
        ...

    def compact_prefix(self, index: int) -> None:
        """Discards entries ``<= index`` (a snapshot covers them); durable on return."""
        ...

    def reset(self, index: int, term: int) -> None:
        """Drops the whole log and restarts it after a snapshot at ``(index, term)``: afterwards
        ``first_index() == index + 1``, ``last_index() == index`` and ``term(index) == term``;
        durable on return."""
        ...

    def save_hard_state(self, hard_state: HardState) -> None:
        """Records term, vote and commit index. Term and vote must be durable after the next
        ``sync()``; an engine may let a change of the commit index alone wait for a later flush
        (the core clamps a restored commit index to the log, so losing it is harmless)."""
        ...

    def hard_state(self) -> HardState:
        """The last saved hard state (``HardState()`` for a fresh store)."""
        ...

    def sync(self) -> int:
        """Makes earlier appends and hard-state saves durable; returns the durable last index,
        which covers only entries appended before its flush began. Runs on the node's I/O thread:
        the loop's calls must never wait for it (docs/storage-engines.md)."""
        ...

    def durable_index(self) -> int:
        """What the last ``sync()`` returned (lowered by ``truncate_suffix``, set by ``reset``;
        ``last_index()`` after a reopen, since what a reopened store returns must be durable).
        The node does not call it; :mod:`dengine.testing`'s invariant checks do."""
        ...

    def close(self) -> None:
        """Flushes and releases resources; later calls raise ``LogClosedError``."""
        ...

    def __enter__(self) -> LogStore: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_log_store(
    engine: Literal["file", "wal", "memory"],
    path: str | os.PathLike[str] | None = None,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    preallocate: bool = False,
) -> LogStore:
    """Opens a built-in engine by its configuration name (``storage.engine``).

    ``"file"`` (the WAL; ``"wal"`` is accepted too) needs ``path``, the node's log directory;
    ``"memory"`` keeps nothing on disk. ``preallocate`` has the WAL prepare each next segment as a
    zero-filled file in the background: each fsync gets cheaper (lower median latency), but every
    segment is written twice and the tail latency suffers; see ``benchmarks/bench_logstore.py``.
    """
    if engine in ("file", "wal"):
        if path is None:
            raise ValueError(f"storage.engine = {engine!r} needs a data directory path")
        return WalLogStore(path, segment_bytes=segment_bytes, preallocate=preallocate)
    if engine == "memory":
        return MemoryLogStore()
    raise ValueError(f"storage.engine must be 'file' or 'memory', got {engine!r}")


class GuardedLogStore:
    """A custom engine as the node uses it: any exception one of its methods raises that is not a
    :class:`~dengine.errors.DengineError` (an ``OSError`` from ``os.fsync``, a ``sqlite3.Error``,
    a bug) becomes a :class:`~dengine.errors.StorageError` naming the engine and the method, the
    error the node handles by stopping (fail-stop) instead of leaving a loop callback broken.

    The built-in engines raise only dengine errors and are not wrapped (they are on the hot path).
    ``engine`` is the wrapped store; other attributes are looked up on it.
    """

    def __init__(self, engine: LogStore) -> None:
        self.engine = engine
        self._name = type(engine).__qualname__

    def _call(self, method: str, *args: object) -> Any:
        try:
            result = getattr(self.engine, method)(*args)
        except DengineError:
            raise
        except Exception as exc:
            raise StorageError(f"{self._name}.{method}() failed: {type(exc).__name__}: {exc}") from exc
        if inspect.isawaitable(result):
            # An ``async def`` method: its work never ran, and nothing the node could do with the
            # awaitable would make it durable in the order the log needs.
            if inspect.iscoroutine(result):
                result.close()
            raise StorageError(
                f"{self._name}.{method}() returned {type(result).__name__}: log store methods must be "
                "plain (synchronous) methods; the node runs the slow ones on a thread of its own"
            )
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def first_index(self) -> int:
        result: int = self._call("first_index")
        return result

    def last_index(self) -> int:
        result: int = self._call("last_index")
        return result

    def term(self, index: int) -> int:
        result: int = self._call("term", index)
        return result

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        result: list[Entry] = self._call("entries", lo, hi, max_bytes)
        return result

    def append(self, entries: Sequence[Entry]) -> None:
        self._call("append", entries)

    def truncate_suffix(self, index: int) -> None:
        self._call("truncate_suffix", index)

    def compact_prefix(self, index: int) -> None:
        self._call("compact_prefix", index)

    def reset(self, index: int, term: int) -> None:
        self._call("reset", index, term)

    def save_hard_state(self, hard_state: HardState) -> None:
        self._call("save_hard_state", hard_state)

    def hard_state(self) -> HardState:
        result: HardState = self._call("hard_state")
        return result

    def sync(self) -> int:
        result = self._call("sync")
        if not isinstance(result, int):
            raise StorageError(f"{self._name}.sync() returned {type(result).__name__}, not the durable index")
        return result

    def durable_index(self) -> int:
        result: int = self._call("durable_index")
        return result

    def close(self) -> None:
        self._call("close")

    def __enter__(self) -> GuardedLogStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def guarded(store: LogStore) -> LogStore:
    """``store`` as the node uses it: a built-in engine as it is, any other in a
    :class:`GuardedLogStore` (once)."""
    return store if isinstance(store, (LogStoreBase, GuardedLogStore)) else GuardedLogStore(store)


def open_custom_log_store(engine: str, cls: type[LogStore], path: str | os.PathLike[str]) -> LogStore:
    """Constructs the custom engine ``cls`` (named ``engine`` in ``storage.engine``) on the log
    directory ``path``, wrapped in :class:`GuardedLogStore`.

    A constructor that fails with anything but a dengine error (a ``TypeError`` because it takes
    no path, a ``PermissionError``...) is a :class:`~dengine.errors.ConfigError` for
    ``storage.engine`` that names the engine and the cause; a dengine error (say a
    ``StorageError`` for a corrupt log) is raised as it is.
    """
    try:
        store = cls(path)  # type: ignore[call-arg]
    except DengineError:
        raise
    except TypeError as exc:
        raise ConfigError(
            f"storage.engine = {engine!r}: the constructor must take the log directory path "
            f"({cls.__qualname__}(path)), and calling it failed: TypeError: {exc}",
            key="storage.engine",
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"storage.engine = {engine!r}: {cls.__qualname__}({os.fspath(path)!r}) failed: "
            f"{type(exc).__name__}: {exc}",
            key="storage.engine",
        ) from exc
    return GuardedLogStore(store)
