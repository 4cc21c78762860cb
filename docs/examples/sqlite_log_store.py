"""A dengine log storage engine on SQLite (the standard library's ``sqlite3``).

The example of docs/storage-engines.md: a complete :class:`dengine.storage.LogStore` that passes
``dengine.testing.logstore_conformance``. Use it with ``storage.engine = "sqlite_log_store:SQLiteLogStore"``
(the module on ``PYTHONPATH``); the node passes the path of its log directory.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ParamSpec, TypeVar

from dengine.errors import LogClosedError, LogCompactedError, LogIndexError, StorageError
from dengine.storage import Entry, HardState

_MAX = 2**63 - 1  # SQLite integers are signed 64-bit
P = ParamSpec("P")
T = TypeVar("T")


def _locked(method: Callable[P, T]) -> Callable[P, T]:
    """The node calls ``sync`` on its I/O thread while the event loop thread appends and reads:
    every method holds the store's lock."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper


def _index(value: int, what: str = "index") -> int:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    if value < 0:
        raise OverflowError(f"{what} must not be negative")
    if value > _MAX:
        raise ValueError(f"{what} {value} is out of range")
    return value


class SQLiteLogStore:
    """Entries, the compaction point and the hard state in one SQLite database."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        os.makedirs(path, exist_ok=True)
        self._lock = threading.RLock()
        # Autocommit off: appends and hard-state saves wait in a transaction until sync(). The
        # connection is shared between threads, serialized by the lock.
        self._db: sqlite3.Connection | None = sqlite3.connect(
            os.path.join(path, "log.sqlite3"), check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, term INTEGER, data BLOB);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
            """
        )
        self._db.commit()
        self._durable = self.last_index()

    # --- helpers ----------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LogClosedError("the log store is closed")
        return self._db

    def _meta(self, key: str, default: int = 0) -> int:
        row = self._conn().execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return default if row is None or row[0] is None else int(row[0])

    def _set_meta(self, key: str, value: int | None) -> None:
        self._conn().execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def _commit(self) -> None:
        try:
            self._conn().commit()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite commit failed: {exc}") from exc

    # --- the LogStore protocol ----------------------------------------------------------------------

    @_locked
    def first_index(self) -> int:
        return self._meta("compacted") + 1

    @_locked
    def last_index(self) -> int:
        row = self._conn().execute("SELECT MAX(idx) FROM entries").fetchone()
        return int(row[0]) if row[0] is not None else self.first_index() - 1

    @_locked
    def term(self, index: int) -> int:
        index = _index(index)
        compacted = self._meta("compacted")
        if index == compacted:
            return self._meta("compacted_term")
        if index < compacted:
            raise LogCompactedError(f"log index {index} was compacted away")
        row = self._conn().execute("SELECT term FROM entries WHERE idx = ?", (index,)).fetchone()
        if row is None:
            raise LogIndexError(f"log index {index} is beyond the last index {self.last_index()}")
        return int(row[0])

    @_locked
    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        lo, hi = _index(lo, "lo"), _index(hi, "hi")
        if lo > hi:
            raise ValueError(f"lo {lo} > hi {hi}")
        if lo < self.first_index() and lo < hi:
            raise LogCompactedError(f"log index {lo} was compacted away")
        if hi > self.last_index() + 1:
            raise LogIndexError(f"log index {hi - 1} is beyond the last index {self.last_index()}")
        out: list[Entry] = []
        size = 0
        rows = self._conn().execute(
            "SELECT idx, term, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, hi)
        )
        for idx, term, data in rows:
            size += len(data)
            if out and max_bytes is not None and size > max_bytes:
                break  # always at least one entry, so one large entry never stalls
            out.append(Entry(idx, term, bytes(data)))
        return out

    @_locked
    def append(self, entries: Sequence[Entry]) -> None:
        entries = list(entries)
        if not entries:
            return
        for e in entries:
            if not isinstance(e, Entry):
                raise TypeError("append takes dengine Entry objects")
            _index(e.index)
            _index(e.term, "term")
        last = self.last_index()
        if entries[0].index != last + 1:
            raise LogIndexError(f"append must start at {last + 1}, not {entries[0].index}")
        previous = self.term(last) if last >= self.first_index() - 1 else 0
        for i, e in enumerate(entries):
            if e.index != entries[0].index + i:
                raise ValueError("entries must have consecutive indexes")
            if e.term < previous:
                raise ValueError("terms must not decrease")
            previous = e.term
        self._conn().executemany(
            "INSERT INTO entries (idx, term, data) VALUES (?, ?, ?)",
            [(e.index, e.term, e.data) for e in entries],
        )

    @_locked
    def truncate_suffix(self, index: int) -> None:
        index = _index(index)
        if index <= self._meta("compacted"):
            raise LogCompactedError(f"cannot truncate at {index}: compacted up to {self._meta('compacted')}")
        if index > self.last_index() + 1:
            raise LogIndexError(f"cannot truncate at {index}: beyond the last index {self.last_index()}")
        self._conn().execute("DELETE FROM entries WHERE idx >= ?", (index,))
        self._commit()  # durable on return, as the protocol requires
        self._durable = min(self._durable, index - 1)

    @_locked
    def compact_prefix(self, index: int) -> None:
        index = _index(index)
        compacted = self._meta("compacted")
        if index < compacted:
            raise LogCompactedError(f"already compacted up to {compacted}")
        if index > self.last_index():
            raise LogIndexError(f"cannot compact beyond the last index {self.last_index()}")
        if index == compacted:
            return
        term = self.term(index)
        self._conn().execute("DELETE FROM entries WHERE idx <= ?", (index,))
        self._set_meta("compacted", index)
        self._set_meta("compacted_term", term)
        self._commit()

    @_locked
    def reset(self, index: int, term: int) -> None:
        index, term = _index(index), _index(term, "term")
        self._conn().execute("DELETE FROM entries")
        self._set_meta("compacted", index)
        self._set_meta("compacted_term", term)
        self._commit()
        self._durable = index

    @_locked
    def save_hard_state(self, hard_state: HardState) -> None:
        self._set_meta("term", hard_state.term)
        self._set_meta("vote", hard_state.vote)
        self._set_meta("commit", hard_state.commit)

    @_locked
    def hard_state(self) -> HardState:
        row = self._conn().execute("SELECT v FROM meta WHERE k = 'vote'").fetchone()
        vote = None if row is None or row[0] is None else int(row[0])
        return HardState(self._meta("term"), vote, self._meta("commit"))

    @_locked
    def sync(self) -> int:
        self._commit()
        self._durable = self.last_index()
        return self._durable

    @_locked
    def durable_index(self) -> int:
        return self._durable

    @_locked
    def close(self) -> None:
        if self._db is not None:
            self._db.commit()
            self._db.close()
            self._db = None

    def __enter__(self) -> SQLiteLogStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
