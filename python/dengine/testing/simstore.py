"""A log store with the durability of a real disk, for simulated crashes.

Writes land in memory at once but count as durable only when a sync that started after them
completes. :meth:`SimLogStore.crash` throws away everything that was not durable, exactly what
a power cut does to a real write-ahead log. Truncation, compaction and reset are durable on
return, as in :class:`~dengine.storage.WalLogStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from dengine._core import Entry, EntryBatch, HardState, MemoryLogStore


class SimLogStore:
    """Implements :class:`dengine.storage.LogStore`; see the module docstring."""

    def __init__(self) -> None:
        self._mem = MemoryLogStore()
        self._durable_last = 0
        self._durable_hs = HardState()
        self._truncated_floor: int | None = None
        self._sync_started: tuple[int, HardState] | None = None
        self.wiped = False

    # --- the LogStore protocol ------------------------------------------------------------------

    def first_index(self) -> int:
        return self._mem.first_index()

    def last_index(self) -> int:
        return self._mem.last_index()

    def term(self, index: int) -> int:
        return self._mem.term(index)

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        return self._mem.entries(lo, hi, max_bytes)

    def entry_batch(self, lo: int, hi: int, max_bytes: int | None = None) -> EntryBatch:
        """:meth:`entries` framed, as the built-in engines give them: the simulated core then
        moves entries the way a real node's does."""
        return self._mem.entry_batch(lo, hi, max_bytes)

    def append(self, entries: Sequence[Entry]) -> None:
        self._mem.append(entries)

    def truncate_suffix(self, index: int) -> None:
        self._mem.truncate_suffix(index)
        self._durable_last = min(self._durable_last, index - 1)
        if self._truncated_floor is None or index - 1 < self._truncated_floor:
            self._truncated_floor = index - 1

    def compact_prefix(self, index: int) -> None:
        self._mem.compact_prefix(index)

    def reset(self, index: int, term: int) -> None:
        self._mem.reset(index, term)
        self._durable_last = index
        self._truncated_floor = index

    def save_hard_state(self, hard_state: HardState) -> None:
        self._mem.save_hard_state(hard_state)

    def hard_state(self) -> HardState:
        return self._mem.hard_state()

    def sync(self) -> int:
        self.begin_sync()
        return self.complete_sync()

    def durable_index(self) -> int:
        return self._durable_last

    def close(self) -> None:
        pass

    def __enter__(self) -> SimLogStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- simulated disk -------------------------------------------------------------------------

    def begin_sync(self) -> None:
        """A sync starts: it covers what was written up to now."""
        self._truncated_floor = None
        self._sync_started = (self._mem.last_index(), self._mem.hard_state())

    def complete_sync(self) -> int:
        """The sync started by :meth:`begin_sync` finished; returns the durable last index."""
        if self._sync_started is None:
            return self._durable_last
        last, hs = self._sync_started
        self._sync_started = None
        if self._truncated_floor is not None:
            last = min(last, self._truncated_floor)
        self._durable_last = min(max(self._durable_last, last), self._mem.last_index())
        self._durable_hs = hs
        return self._durable_last

    def crash(self) -> None:
        """Loses every write that was not durable."""
        self._sync_started = None
        self._truncated_floor = None
        if self._mem.last_index() > self._durable_last:
            self._mem.truncate_suffix(max(self._durable_last + 1, self._mem.first_index()))
        self._mem.save_hard_state(self._durable_hs)

    def wipe(self) -> None:
        """The disk is lost entirely (replaced by an empty one)."""
        self._mem = MemoryLogStore()
        self._durable_last = 0
        self._durable_hs = HardState()
        self._sync_started = None
        self._truncated_floor = None
        self.wiped = True

    def durable_hard_state(self) -> HardState:
        """The term, vote and commit index that would survive a crash right now."""
        return self._durable_hs

    def durable_entries(self) -> list[Entry]:
        """What would survive a crash right now."""
        first = self._mem.first_index()
        return self._mem.entries(first, self._durable_last + 1) if self._durable_last >= first else []
