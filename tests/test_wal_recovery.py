"""Crash recovery seen from Python: torn tails are cut and logged, corruption is refused with
the file and offset, and nothing is dropped silently."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dengine.errors import CorruptLogError, DengineError, StorageError
from dengine.storage import Entry, HardState, WalLogStore

HEADER = 28  # bytes of framing in front of every payload
SEGMENT_HEADER = 16


def write(path: Path, n: int, size: int = 32) -> None:
    with WalLogStore(path) as store:
        store.append([Entry(i, 1, bytes([i % 256]) * size) for i in range(1, n + 1)])
        store.save_hard_state(HardState(term=1, vote=1, commit=n))
        store.sync()


def only_segment(path: Path) -> Path:
    (seg,) = sorted(path.glob("*.wal"))
    return seg


def test_torn_tail_is_cut_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "log"
    write(log, 10)
    seg = only_segment(log)
    with open(seg, "r+b") as f:
        f.truncate(os.path.getsize(seg) - 5)  # a crash in the middle of the last record
    with caplog.at_level(logging.WARNING, logger="dengine.storage"), WalLogStore(log) as store:
        assert store.last_index() == 9
        assert store.torn_tail is not None
        path, offset, cut = store.torn_tail
        assert (path, offset, cut) == (seg, SEGMENT_HEADER + 9 * (HEADER + 32), HEADER + 32 - 5)
        assert store.hard_state() == HardState(1, 1, 10)
    assert any("torn tail" in r.getMessage() and str(seg) in r.getMessage() for r in caplog.records)


def test_clean_reopen_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "log", 5)
    with (
        caplog.at_level(logging.WARNING, logger="dengine.storage"),
        WalLogStore(tmp_path / "log") as store,
    ):
        assert store.torn_tail is None
    assert caplog.records == []


def test_corruption_names_file_and_offset(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(log, 10)
    seg = only_segment(log)
    data = bytearray(seg.read_bytes())
    third = SEGMENT_HEADER + 2 * (HEADER + 32)
    data[third + HEADER + 1] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as info:
        WalLogStore(log)
    assert str(seg) in str(info.value)
    assert f"offset {third}" in str(info.value)
    assert isinstance(info.value, StorageError)
    assert isinstance(info.value, DengineError)
    assert seg.read_bytes() == bytes(data), "a refused log must be left exactly as found"


def test_io_errors_name_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(StorageError, match="not-a-dir"):
        WalLogStore(blocker / "log")


def test_bad_options_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="segment_bytes"):
        WalLogStore(tmp_path / "log", segment_bytes=10)
