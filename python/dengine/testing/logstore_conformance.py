"""The conformance suite every :class:`dengine.storage.LogStore` engine must pass.

To check an engine, subclass :class:`LogStoreConformance` in a ``test_*.py`` file and provide the
``open_store`` fixture: a callable that opens the engine on the same underlying storage each time
it is called (so a call after ``close()`` is a reopen). Set ``durable = False`` for engines that
keep nothing across a reopen; the reopen and crash tests are then skipped.

The crash tests (POSIX only) fork: the child opens the engine, works, and leaves by ``os._exit``
without ``close()``, the way a killed process does; the parent reopens and checks that what the
protocol promised durable came back. A process crash leaves the operating system's page cache
intact, so these tests cannot catch an engine that forgets to fsync (power loss): only review can.

This module needs pytest (``import dengine.testing`` alone does not import it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

from dengine.errors import DengineError, LogClosedError, LogCompactedError, LogIndexError
from dengine.storage import Entry, HardState, LogStore

OpenStore = Callable[[], LogStore]


def batch(lo: int, hi: int, term: int, size: int = 16) -> list[Entry]:
    """Entries ``lo <= i < hi`` whose payload encodes their index, so mix-ups are visible."""
    return [Entry(i, term, (f"{i}:".encode() * size)[:size]) for i in range(lo, hi)]


def contents(store: LogStore) -> list[tuple[int, int, bytes]]:
    first, last = store.first_index(), store.last_index()
    return [(e.index, e.term, e.data) for e in store.entries(first, last + 1)]


class LogStoreConformance:
    """Behaviour shared by every engine; see the module docstring for how to use it."""

    durable = True

    @pytest.fixture
    def store(self, open_store: OpenStore) -> LogStore:
        return open_store()

    def reopen(self, store: LogStore, open_store: OpenStore) -> LogStore:
        if not self.durable:
            pytest.skip("engine keeps nothing across a reopen")
        store.sync()
        store.close()
        return open_store()

    # --- basics --------------------------------------------------------------------------------

    def test_is_a_log_store(self, store: LogStore) -> None:
        assert isinstance(store, LogStore)

    def test_fresh_store_is_empty(self, store: LogStore) -> None:
        assert (store.first_index(), store.last_index(), store.term(0)) == (1, 0, 0)
        assert store.entries(1, 1) == []
        assert store.hard_state() == HardState()

    def test_append_and_read_back(self, store: LogStore) -> None:
        store.append(batch(1, 11, 1))
        store.append(batch(11, 21, 2))
        assert store.last_index() == 20
        assert store.entries(1, 21) == batch(1, 11, 1) + batch(11, 21, 2)
        assert store.entries(5, 8) == batch(5, 8, 1)
        assert [store.term(i) for i in (1, 10, 11, 20)] == [1, 1, 2, 2]

    def test_empty_and_large_payloads(self, store: LogStore) -> None:
        big = bytes(range(256)) * 4096
        store.append([Entry(1, 1, b""), Entry(2, 1, big), Entry(3, 1, b"\x00")])
        assert [e.data for e in store.entries(1, 4)] == [b"", big, b"\x00"]

    def test_one_call_appends_a_large_batch(self, store: LogStore) -> None:
        store.append(batch(1, 5001, 3))
        assert store.last_index() == 5000
        assert store.entries(4990, 5001) == batch(4990, 5001, 3)

    def test_max_bytes_bounds_reads_but_returns_at_least_one(self, store: LogStore) -> None:
        store.append(batch(1, 101, 1, size=100))
        assert len(store.entries(1, 101, max_bytes=0)) == 1
        assert len(store.entries(1, 101, max_bytes=99)) == 1
        assert len(store.entries(1, 101, max_bytes=200)) == 2
        assert len(store.entries(1, 101, max_bytes=250)) == 2
        assert len(store.entries(1, 101, max_bytes=10_000)) == 100
        assert len(store.entries(1, 101)) == 100

    # --- rejected calls leave the log unchanged ------------------------------------------------

    def test_append_must_continue_the_log(self, store: LogStore) -> None:
        store.append(batch(1, 6, 2))
        with pytest.raises(LogIndexError):
            store.append(batch(7, 8, 2))  # gap
        with pytest.raises(LogIndexError):
            store.append(batch(5, 7, 2))  # overlap
        with pytest.raises(ValueError):
            store.append([Entry(6, 2, b""), Entry(8, 2, b"")])  # not consecutive
        with pytest.raises(ValueError):
            store.append(batch(6, 7, 1))  # term goes backwards
        assert contents(store) == [(e.index, e.term, e.data) for e in batch(1, 6, 2)]
        store.append([])
        assert store.last_index() == 5

    def test_out_of_range_reads(self, store: LogStore) -> None:
        store.append(batch(1, 6, 1))
        with pytest.raises(LogIndexError):
            store.term(6)
        with pytest.raises(LogIndexError):
            store.entries(1, 7)
        with pytest.raises(ValueError):
            store.entries(4, 3)
        store.compact_prefix(2)
        with pytest.raises(LogCompactedError):
            store.term(1)
        with pytest.raises(LogCompactedError):
            store.entries(2, 4)

    # --- conflict repair -----------------------------------------------------------------------

    def test_truncate_suffix_then_append_a_new_term(self, store: LogStore) -> None:
        store.append(batch(1, 21, 1))
        store.truncate_suffix(15)
        assert store.last_index() == 14
        store.append(batch(15, 18, 2))
        assert store.entries(13, 18) == batch(13, 15, 1) + batch(15, 18, 2)
        store.truncate_suffix(18)  # last + 1: nothing to remove
        assert store.last_index() == 17
        with pytest.raises(LogIndexError):
            store.truncate_suffix(19)

    def test_truncate_everything(self, store: LogStore) -> None:
        store.append(batch(1, 11, 1))
        store.truncate_suffix(1)
        assert (store.first_index(), store.last_index()) == (1, 0)
        store.append(batch(1, 3, 4))
        assert store.entries(1, 3) == batch(1, 3, 4)

    def test_sync_after_truncation_reports_the_new_log(self, store: LogStore) -> None:
        store.append(batch(1, 11, 1))
        assert store.sync() == 10
        store.truncate_suffix(6)
        store.append(batch(6, 8, 2))
        assert store.sync() == 7
        assert store.durable_index() == 7

    # --- compaction ----------------------------------------------------------------------------

    def test_compact_prefix_keeps_the_boundary_term(self, store: LogStore) -> None:
        store.append(batch(1, 11, 1) + batch(11, 21, 3))
        store.compact_prefix(12)
        assert (store.first_index(), store.last_index()) == (13, 20)
        assert store.term(12) == 3
        assert store.entries(13, 21) == batch(13, 21, 3)
        store.compact_prefix(12)  # already there: no-op
        with pytest.raises(LogCompactedError):
            store.compact_prefix(5)
        with pytest.raises(LogIndexError):
            store.compact_prefix(21)
        with pytest.raises(LogCompactedError):
            store.truncate_suffix(12)

    def test_compact_everything_then_append(self, store: LogStore) -> None:
        store.append(batch(1, 11, 2))
        store.compact_prefix(10)
        assert (store.first_index(), store.last_index(), store.term(10)) == (11, 10, 2)
        assert store.entries(11, 11) == []
        store.append(batch(11, 13, 2))
        assert store.entries(11, 13) == batch(11, 13, 2)

    def test_reset_to_a_snapshot(self, store: LogStore) -> None:
        store.append(batch(1, 11, 1))
        store.reset(100, 7)
        assert (store.first_index(), store.last_index(), store.term(100)) == (101, 100, 7)
        with pytest.raises(LogCompactedError):
            store.term(50)
        store.append(batch(101, 103, 7))
        assert store.entries(101, 103) == batch(101, 103, 7)

    # --- hard state and durability -------------------------------------------------------------

    def test_hard_state_round_trip(self, store: LogStore) -> None:
        store.save_hard_state(HardState(term=4, vote=2, commit=0))
        assert store.hard_state() == HardState(term=4, vote=2, commit=0)
        store.save_hard_state(HardState(term=5, vote=None, commit=3))
        assert store.hard_state() == HardState(5, None, 3)
        assert store.hard_state().vote is None

    def test_sync_reports_the_durable_index(self, store: LogStore) -> None:
        store.append(batch(1, 8, 1))
        assert store.sync() == 7
        assert store.durable_index() == 7

    def test_closed_store_refuses_work(self, store: LogStore) -> None:
        store.close()
        with pytest.raises(LogClosedError):
            store.last_index()
        with pytest.raises(LogClosedError):
            store.append(batch(1, 2, 1))
        store.close()  # closing twice is harmless

    def test_context_manager_closes(self, open_store: OpenStore) -> None:
        with open_store() as store:
            store.append(batch(1, 2, 1))
        with pytest.raises(LogClosedError):
            store.last_index()

    # --- reopen ----------------------------------------------------------------------------------

    def test_reopen_keeps_entries_and_hard_state(self, store: LogStore, open_store: OpenStore) -> None:
        store.append(batch(1, 101, 1) + batch(101, 151, 2))
        store.save_hard_state(HardState(term=2, vote=1, commit=140))
        store = self.reopen(store, open_store)
        assert store.last_index() == 150
        assert store.entries(1, 151) == batch(1, 101, 1) + batch(101, 151, 2)
        assert store.hard_state() == HardState(2, 1, 140)
        assert store.durable_index() == 150

    def test_reopen_keeps_truncation_and_compaction(self, store: LogStore, open_store: OpenStore) -> None:
        store.append(batch(1, 301, 1))
        store.truncate_suffix(201)
        store.append(batch(201, 211, 2))
        store.compact_prefix(150)
        store = self.reopen(store, open_store)
        assert (store.first_index(), store.last_index(), store.term(150)) == (151, 210, 1)
        assert store.entries(151, 211) == batch(151, 201, 1) + batch(201, 211, 2)

    def test_reopen_after_reset(self, store: LogStore, open_store: OpenStore) -> None:
        store.append(batch(1, 50, 1))
        store.reset(1000, 9)
        store.append(batch(1001, 1004, 9))
        store = self.reopen(store, open_store)
        assert (store.first_index(), store.last_index(), store.term(1000)) == (1001, 1003, 9)
        assert store.entries(1001, 1004) == batch(1001, 1004, 9)

    def test_reopen_then_continue_appending(self, store: LogStore, open_store: OpenStore) -> None:
        store.append(batch(1, 11, 1))
        store = self.reopen(store, open_store)
        store.append(batch(11, 21, 1))
        store = self.reopen(store, open_store)
        assert store.entries(1, 21) == batch(1, 21, 1)

    def test_durable_index_counts_only_synced_entries(self, store: LogStore) -> None:
        if not self.durable:
            pytest.skip("engine keeps nothing across a reopen")
        store.append(batch(1, 8, 1))
        assert store.sync() == 7
        store.append(batch(8, 11, 1))
        assert store.durable_index() == 7  # appended since the last sync: not durable yet

    # --- crash (a process killed without close(): what sync() and the durable calls promised stays)

    def crash_after(self, open_store: OpenStore, work: Callable[[LogStore], None]) -> LogStore:
        """Runs ``work`` on the engine in a child process that then dies without ``close()``;
        returns the engine reopened in this process."""
        if not self.durable:
            pytest.skip("engine keeps nothing across a reopen")
        if not hasattr(os, "fork"):
            pytest.skip("the crash tests fork (POSIX only)")
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                work(open_store())
                code = 0
            except BaseException as exc:  # reported through the exit status
                print(f"crash test child failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's work failed (see its stderr)"
        return open_store()

    def test_crash_keeps_synced_entries_and_hard_state(self, open_store: OpenStore) -> None:
        def work(store: LogStore) -> None:
            store.append(batch(1, 11, 1) + batch(11, 21, 2))
            store.save_hard_state(HardState(term=2, vote=3, commit=0))
            assert store.sync() == 20

        store = self.crash_after(open_store, work)
        assert store.last_index() == 20, "entries sync() vouched for were lost in a crash"
        assert store.entries(1, 21) == batch(1, 11, 1) + batch(11, 21, 2)
        assert (store.hard_state().term, store.hard_state().vote) == (2, 3)
        # What a reopened store holds is treated as durable: it must be.
        assert store.durable_index() == store.last_index() == 20
        store.close()

    def test_crash_keeps_a_truncation_that_returned(self, open_store: OpenStore) -> None:
        def work(store: LogStore) -> None:
            store.append(batch(1, 11, 1))
            store.sync()
            store.truncate_suffix(6)  # durable on return: no sync() follows

        store = self.crash_after(open_store, work)
        assert (store.last_index(), contents(store)) == (
            5,
            [(e.index, e.term, e.data) for e in batch(1, 6, 1)],
        )
        store.close()

    def test_crash_keeps_a_compaction_and_a_reset_that_returned(self, open_store: OpenStore) -> None:
        def compact(store: LogStore) -> None:
            store.append(batch(1, 11, 1) + batch(11, 21, 2))
            store.sync()
            store.compact_prefix(12)

        store = self.crash_after(open_store, compact)
        assert (store.first_index(), store.last_index(), store.term(12)) == (13, 20, 2)
        assert store.entries(13, 21) == batch(13, 21, 2)
        store.close()

        store = self.crash_after(open_store, lambda store: store.reset(1000, 9))
        assert (store.first_index(), store.last_index(), store.term(1000)) == (1001, 1000, 9)
        store.close()

    def test_crash_leaves_a_prefix_of_unsynced_appends(self, open_store: OpenStore) -> None:
        def work(store: LogStore) -> None:
            store.append(batch(1, 11, 1))
            store.save_hard_state(HardState(term=1, vote=1, commit=0))
            store.sync()
            store.append(batch(11, 21, 2))
            store.append(batch(21, 31, 3))
            store.save_hard_state(HardState(term=3, vote=None, commit=10))

        store = self.crash_after(open_store, work)
        last = store.last_index()
        assert 10 <= last <= 30  # what sync() returned, and any prefix of what followed: no gaps
        assert store.entries(1, last + 1) == (batch(1, 11, 1) + batch(11, 21, 2) + batch(21, 31, 3))[:last]
        assert (store.hard_state().term, store.hard_state().vote) in {(1, 1), (3, None)}  # never a mix
        store.append(batch(last + 1, last + 3, 4))  # and the log goes on from there
        assert store.sync() == last + 2
        store.close()

    # --- hostile arguments -----------------------------------------------------------------------

    @pytest.mark.parametrize("huge", [2**63, 2**64 - 1])
    def test_huge_indexes_are_clear_errors(self, store: LogStore, huge: int) -> None:
        store.append(batch(1, 4, 1))
        calls: list[Callable[[], object]] = [
            lambda: store.term(huge),
            lambda: store.entries(1, huge),
            lambda: store.truncate_suffix(huge),
            lambda: store.compact_prefix(huge),
            lambda: store.reset(huge, 1),
            lambda: store.reset(5, huge),
            lambda: store.append([Entry(huge, 1, b"")]),
            lambda: store.append([Entry(4, huge, b"")]),
        ]
        for call in calls:
            with pytest.raises((DengineError, ValueError)):
                call()
        assert store.entries(1, 4) == batch(1, 4, 1)

    def test_negative_and_wrong_types_are_rejected(self, store: LogStore) -> None:
        with pytest.raises(OverflowError):
            store.term(-1)
        with pytest.raises(TypeError):
            store.append([(1, 1, b"x")])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            store.append([Entry(1, 1, "text")])  # type: ignore[arg-type]
        assert store.last_index() == 0
