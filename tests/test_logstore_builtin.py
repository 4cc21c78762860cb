"""Runs the LogStore conformance suite against both built-in engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from dengine.storage import LogStore, MemoryLogStore, WalLogStore, open_log_store
from dengine.testing.logstore_conformance import LogStoreConformance, OpenStore


class TestWalLogStore(LogStoreConformance):
    durable = True

    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        # Small segments so that every test also crosses segment boundaries.
        return lambda: WalLogStore(tmp_path / "log", segment_bytes=4096)


class TestWalLogStorePreallocated(LogStoreConformance):
    durable = True

    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        return lambda: WalLogStore(tmp_path / "log", segment_bytes=4096, preallocate=True)


class TestMemoryLogStore(LogStoreConformance):
    durable = False

    @pytest.fixture
    def open_store(self) -> OpenStore:
        return MemoryLogStore


def test_open_log_store_by_engine_name(tmp_path: Path) -> None:
    # The names storage.engine accepts: "file" (the WAL) and "memory"; "wal" stays an alias.
    for name in ("file", "wal"):
        wal: LogStore = open_log_store(name, tmp_path / name)
        assert isinstance(wal, WalLogStore)
        wal.close()
    assert isinstance(open_log_store("memory"), MemoryLogStore)
    with pytest.raises(ValueError, match="needs a data directory"):
        open_log_store("file")
    with pytest.raises(ValueError, match="must be 'file' or 'memory'"):
        open_log_store("rocksdb")  # type: ignore[arg-type]
