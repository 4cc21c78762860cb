"""A dengine log storage engine on SQLite (the standard library's ``sqlite3``).

The example of docs/storage-engines.md: a complete :class:`dengine.storage.LogStore` that passes
``dengine.testing.logstore_conformance``. Use it with
``storage.engine = "sqlite_log_store:SQLiteLogStore"`` (the module on ``PYTHONPATH``); the node
passes the path of its log directory.

How it keeps the node's event loop free: appends and hard-state saves only go to memory (under a
short lock); ``sync()``, on the node's I/O thread, takes what is pending and writes and commits it
without holding that lock, and reads see pending entries from memory. The loop never waits for a
commit, except in ``truncate_suffix`` and ``reset``, which must be durable when they return.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

from dengine.errors import LogClosedError, LogCompactedError, LogIndexError, StorageError
from dengine.storage import Entry, HardState

_MAX = 2**63 - 1  # SQLite integers are signed 64-bit


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
        file = os.path.join(path, "log.sqlite3")
        # Two connections: the writer is used only under _write_lock (by sync and the calls that
        # must be durable on return); the reader serves the loop's reads under _lock. In WAL mode
        # a reader never waits for a writer's commit.
        self._db: sqlite3.Connection | None = sqlite3.connect(file, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, term INTEGER, data BLOB);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
            """
        )
        self._db.commit()
        # The node treats whatever a reopened store returns as durable. A crash between writing a
        # commit and its fsync can leave it in the page cache only: a checkpoint fsyncs it.
        self._db.execute("PRAGMA wal_checkpoint(FULL)")
        self._reader: sqlite3.Connection | None = sqlite3.connect(file, check_same_thread=False)
        self._lock = threading.Lock()  # held briefly; never across a commit that sync() makes
        self._write_lock = threading.Lock()  # the writer connection, one commit at a time
        meta: dict[str, int] = dict(self._db.execute("SELECT k, v FROM meta").fetchall())
        self._first: int = meta.get("compacted", 0) + 1
        self._base_term: int = meta.get("compacted_term", 0)  # term of the entry at first - 1
        last: int | None = self._db.execute("SELECT MAX(idx) FROM entries").fetchone()[0]
        self._last: int = self._first - 1 if last is None else last
        self._durable: int = self._last
        self._hard = HardState(meta.get("term", 0), meta.get("vote"), meta.get("commit", 0))
        self._pending: list[Entry] = []  # appended, not committed yet: the last entries of the log
        self._pending_hard: HardState | None = None

    # --- helpers (callers hold _lock) ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._db is None:
            raise LogClosedError("the log store is closed")

    def _committed_last(self) -> int:
        return self._last - len(self._pending)

    def _read(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo <= index < hi``, from the database up to the pending ones, then memory."""
        assert self._reader is not None
        split = min(hi, self._committed_last() + 1)
        rows = self._reader.execute(
            "SELECT idx, term, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, split)
        ).fetchall()
        out = [Entry(idx, term, bytes(data)) for idx, term, data in rows]
        start = max(lo, split) - (self._committed_last() + 1)
        return out + self._pending[start : start + hi - max(lo, split)]

    def _term(self, index: int) -> int:
        return self._base_term if index == self._first - 1 else self._read(index, index + 1)[0].term

    def _write(self, db: sqlite3.Connection, entries: list[Entry], hard: HardState | None) -> None:
        db.executemany(
            "INSERT INTO entries (idx, term, data) VALUES (?, ?, ?)",
            [(e.index, e.term, e.data) for e in entries],
        )
        if hard is not None:
            self._set_meta(db, term=hard.term, vote=hard.vote, commit=hard.commit)

    @staticmethod
    def _set_meta(db: sqlite3.Connection, **values: int | None) -> None:
        db.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", values.items())

    def _commit(self, db: sqlite3.Connection) -> None:
        try:
            db.commit()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite commit failed: {exc}") from exc

    def _flush(self, db: sqlite3.Connection) -> None:
        """Writes everything pending (holding both locks): a durable call commits it first, so a
        crash leaves a prefix of the operations."""
        self._write(db, self._pending, self._pending_hard)
        self._pending, self._pending_hard = [], None

    # --- the LogStore protocol: called on the loop, never waiting for a commit -----------------------

    def first_index(self) -> int:
        with self._lock:
            self._check_open()
            return self._first

    def last_index(self) -> int:
        with self._lock:
            self._check_open()
            return self._last

    def term(self, index: int) -> int:
        index = _index(index)
        with self._lock:
            self._check_open()
            if index == self._first - 1:
                return self._base_term
            if index < self._first:
                raise LogCompactedError(f"log index {index} was compacted away")
            if index > self._last:
                raise LogIndexError(f"log index {index} is beyond the last index {self._last}")
            return self._term(index)

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        lo, hi = _index(lo, "lo"), _index(hi, "hi")
        if lo > hi:
            raise ValueError(f"lo {lo} > hi {hi}")
        with self._lock:
            self._check_open()
            if lo < self._first and lo < hi:
                raise LogCompactedError(f"log index {lo} was compacted away")
            if hi > self._last + 1:
                raise LogIndexError(f"log index {hi - 1} is beyond the last index {self._last}")
            entries = self._read(lo, hi)
        out: list[Entry] = []
        size = 0
        for e in entries:
            size += len(e.data)
            if out and max_bytes is not None and size > max_bytes:
                break  # always at least one entry, so one large entry never stalls
            out.append(e)
        return out

    def append(self, entries: Sequence[Entry]) -> None:
        entries = list(entries)
        for e in entries:
            if not isinstance(e, Entry):
                raise TypeError("append takes dengine Entry objects")
            _index(e.index)
            _index(e.term, "term")
        if not entries:
            return
        with self._lock:
            self._check_open()
            if entries[0].index != self._last + 1:
                raise LogIndexError(f"append must start at {self._last + 1}, not {entries[0].index}")
            previous = self._pending[-1].term if self._pending else self._term(self._last)
            for i, e in enumerate(entries):
                if e.index != entries[0].index + i:
                    raise ValueError("entries must have consecutive indexes")
                if e.term < previous:
                    raise ValueError("terms must not decrease")
                previous = e.term
            self._pending.extend(entries)
            self._last = entries[-1].index

    def save_hard_state(self, hard_state: HardState) -> None:
        with self._lock:
            self._check_open()
            self._hard = self._pending_hard = hard_state

    def hard_state(self) -> HardState:
        with self._lock:
            self._check_open()
            return self._hard

    def durable_index(self) -> int:
        with self._lock:
            return self._durable

    # --- on the I/O thread: the commit runs without _lock --------------------------------------------

    def sync(self) -> int:
        return self._commit_pending()

    def compact_prefix(self, index: int) -> None:
        index = _index(index)
        with self._lock:
            self._check_open()
            if index < self._first - 1:
                raise LogCompactedError(f"already compacted up to {self._first - 1}")
            if index > self._last:
                raise LogIndexError(f"cannot compact beyond the last index {self._last}")
            if index == self._first - 1:
                return
            term = self._term(index)

        def compact(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM entries WHERE idx <= ?", (index,))
            self._set_meta(db, compacted=index, compacted_term=term)

        self._commit_pending(compact, first=(index + 1, term))

    def _commit_pending(
        self, also: Callable[[sqlite3.Connection], None] | None = None, first: tuple[int, int] | None = None
    ) -> int:
        """Commits what is pending (entries appended and the hard state saved before this call
        began), plus ``also``'s changes; the loop appends and reads meanwhile."""
        with self._write_lock:
            with self._lock:
                self._check_open()
                db = self._db
                assert db is not None
                batch, hard, covered = list(self._pending), self._pending_hard, self._last
                self._pending_hard = None
                if first is not None:  # compacted entries are refused from now on
                    self._first, self._base_term = first
            self._write(db, batch, hard)
            if also is not None:
                also(db)
            self._commit(db)
            with self._lock:
                del self._pending[: len(batch)]
                self._durable = covered
            return covered

    # --- on the loop, durable on return: they wait for a sync under way (rare; see the guide) --------

    def truncate_suffix(self, index: int) -> None:
        index = _index(index)
        with self._write_lock, self._lock:
            self._check_open()
            if index < self._first:
                raise LogCompactedError(f"cannot truncate at {index}: compacted up to {self._first - 1}")
            if index > self._last + 1:
                raise LogIndexError(f"cannot truncate at {index}: beyond the last index {self._last}")
            assert self._db is not None
            self._flush(self._db)
            self._db.execute("DELETE FROM entries WHERE idx >= ?", (index,))
            self._commit(self._db)
            self._last = self._durable = index - 1

    def reset(self, index: int, term: int) -> None:
        index, term = _index(index), _index(term, "term")
        with self._write_lock, self._lock:
            self._check_open()
            assert self._db is not None
            self._pending = []
            self._flush(self._db)  # the hard state still pending
            self._db.execute("DELETE FROM entries")
            self._set_meta(self._db, compacted=index, compacted_term=term)
            self._commit(self._db)
            self._first, self._last, self._base_term, self._durable = index + 1, index, term, index

    def close(self) -> None:
        with self._write_lock, self._lock:
            if self._db is None or self._reader is None:
                return
            self._flush(self._db)
            self._commit(self._db)
            self._db.close()
            self._reader.close()
            self._db = self._reader = None

    def __enter__(self) -> SQLiteLogStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
