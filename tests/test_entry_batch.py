"""EntryBatch: entries kept framed from the leader's log to a follower's, read like a sequence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from dengine._core import Entry, EntryBatch, LogIndexError, encode_entries
from dengine.storage import LogStoreBase, MemoryLogStore, WalLogStore

ENTRIES = [Entry(5, 1, b"a"), Entry(6, 1, b""), Entry(7, 2, b"\x03conf"), Entry(8, 3, b"x" * 5000)]


def batch(entries: list[Entry] = ENTRIES) -> EntryBatch:
    return EntryBatch.from_bytes(encode_entries(entries))


def test_it_reads_like_the_list_it_was_framed_from() -> None:
    b = batch()
    assert isinstance(b, Sequence) and len(b) == 4 and bool(b)
    assert list(b) == ENTRIES and [e.index for e in b] == [5, 6, 7, 8]
    assert b[0] == ENTRIES[0] and b[-1] == ENTRIES[-1] and b[-4] == ENTRIES[0]
    assert (b.first_index, b.last_index) == (5, 8)
    for bad in (4, -5):
        with pytest.raises(IndexError):
            b[bad]
    tail = b[2:]
    assert isinstance(tail, EntryBatch) and list(tail) == ENTRIES[2:]
    assert tail.to_bytes() == encode_entries(ENTRIES[2:])
    assert list(b[1:3]) == ENTRIES[1:3] and len(b[3:1]) == 0 and not b[4:]
    with pytest.raises(ValueError, match="step 1"):
        b[::2]
    assert b.indexes_with_first_byte(3) == [7]
    assert b.to_bytes() == encode_entries(ENTRIES) and encode_entries(b) == b.to_bytes()


def test_a_leader_frames_its_payloads_once_for_the_log_and_every_follower() -> None:
    b = EntryBatch.from_payloads(5, 2, [b"a", b"", b"x" * 5000])
    assert list(b) == [Entry(5, 2, b"a"), Entry(6, 2, b""), Entry(7, 2, b"x" * 5000)]
    assert b.to_bytes() == encode_entries(list(b)) and b.framed_bytes == len(b.to_bytes())
    # The wire bytes are made once and shared: the same object for every follower's message.
    assert b.to_bytes() is b.to_bytes() and encode_entries(b) is b.to_bytes()
    assert len(EntryBatch.from_payloads(1, 1, [])) == 0
    with pytest.raises(ValueError, match="exceeds the maximum"):
        EntryBatch.from_payloads(2**63, 1, [b"past the largest log index"])


def test_damaged_bytes_are_refused() -> None:
    good = encode_entries(ENTRIES)
    for damaged in (good[:-1], good[:10], b"\x00" + good[1:]):
        with pytest.raises(ValueError):
            EntryBatch.from_bytes(damaged)
    empty = EntryBatch.from_bytes(b"")
    assert len(empty) == 0 and (empty.first_index, empty.last_index) == (0, 0)


@pytest.mark.parametrize("engine", ["wal", "memory"])
def test_a_store_appends_a_framed_batch_and_reads_one_back(tmp_path: Path, engine: str) -> None:
    def open_store() -> LogStoreBase:
        return WalLogStore(tmp_path / "log") if engine == "wal" else MemoryLogStore()

    first = [Entry(1, 1, b"one"), Entry(2, 1, b"two"), Entry(3, 1, b"three")]
    store = open_store()
    store.append(first)
    store.append(batch([Entry(4, 1, b"four"), *ENTRIES]))
    assert store.sync() == 8
    assert store.entries(1, 9) == [*first, Entry(4, 1, b"four"), *ENTRIES]
    read = store.entry_batch(2, 9)
    assert isinstance(read, EntryBatch) and list(read) == store.entries(2, 9)
    assert list(store.entry_batch(2, 9, 4)) == store.entries(2, 9, 4), "the same byte limit"
    with pytest.raises(LogIndexError, match="must start at last_index"):
        store.append(batch([Entry(10, 3, b"gap")]))
    store.close()
    if engine == "wal":
        reopened = open_store()
        assert reopened.entries(1, 9) == [*first, Entry(4, 1, b"four"), *ENTRIES]
        reopened.close()
