"""Snapshot transfer through the Python API: SnapshotChunker -> SnapshotAssembler.

Every test drives the real Rust code in `dengine._core`; the rules themselves are unit-tested in
`rust/core/src/snapshot/`. Here we check that each rule is visible from Python with the right
exception class and a useful message, and that paths, bytes and iterators behave like Python.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from dengine._core import (
    SnapshotAssembler,
    SnapshotChunk,
    SnapshotChunker,
    SnapshotChunkError,
    SnapshotIntegrityError,
    StorageError,
)

CHUNK = 4096


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Reference CRC-32C (Castagnoli), independent of the Rust implementation."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def make_source(tmp_path: Path, size: int, seed: int = 0) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    src = tmp_path / "source.snap"
    src.write_bytes(data)
    return src, data


def partial_of(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def progress_of(final: Path) -> Path:
    return final.with_name(final.name + ".progress")


def new_assembler(final: Path, chunker: SnapshotChunker) -> SnapshotAssembler:
    return SnapshotAssembler(final, chunker.size, chunker.sha256)


def send(chunker: SnapshotChunker, asm: SnapshotAssembler, limit: int | None = None) -> None:
    for i, chunk in enumerate(chunker.chunks(asm.next_offset)):
        if limit is not None and i >= limit:
            return
        asm.accept(chunk)


def test_reference_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * 1024 * 1024 + 5])
def test_round_trip(tmp_path: Path, size: int) -> None:
    src, data = make_source(tmp_path, size, seed=size)
    final = tmp_path / "received.snap"
    chunker = SnapshotChunker(src, chunk_size=CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm)
    assert asm.is_complete
    assert asm.next_offset == size
    published = asm.finish()
    assert published == str(final)
    assert final.read_bytes() == data
    assert not partial_of(final).exists()
    assert not progress_of(final).exists()


def test_chunker_properties(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 10 * CHUNK + 7)
    chunker = SnapshotChunker(str(src), CHUNK)
    assert chunker.path == str(src)
    assert chunker.size == len(data)
    assert chunker.chunk_size == CHUNK
    assert chunker.chunk_count == 11
    assert chunker.sha256 == hashlib.sha256(data).digest()
    assert isinstance(chunker.sha256, bytes)
    assert SnapshotChunker(src).chunk_size == 1 << 20


def test_chunker_trusts_a_known_digest(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 100)
    known = bytes(range(32))
    assert SnapshotChunker(src, 10, known).sha256 == known
    assert SnapshotChunker(src, 10, sha256=known).sha256 == known


def test_chunks_carry_offsets_crcs_and_one_last_flag(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 2 * CHUNK + 10)
    chunks = list(SnapshotChunker(src, CHUNK).chunks())
    assert [c.offset for c in chunks] == [0, CHUNK, 2 * CHUNK]
    assert [c.is_last for c in chunks] == [False, False, True]
    assert b"".join(c.data for c in chunks) == data
    for c in chunks:
        assert isinstance(c.data, bytes)
        assert c.crc32c == crc32c(c.data)


def test_empty_file_has_one_empty_last_chunk(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 0)
    chunker = SnapshotChunker(src, CHUNK)
    assert chunker.chunk_count == 1
    chunk = chunker.chunk_at(0)
    assert (chunk.offset, chunk.data, chunk.crc32c, chunk.is_last) == (0, b"", 0, True)
    assert list(chunker.chunks()) == [chunk]


def test_chunks_resume_from_any_boundary(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 5 * CHUNK)
    chunker = SnapshotChunker(src, CHUNK)
    it = chunker.chunks(3 * CHUNK)
    assert iter(it) is it
    assert [c.offset for c in it] == [3 * CHUNK, 4 * CHUNK]
    assert next(it, None) is None
    assert list(chunker.chunks(chunker.size)) == []
    assert chunker.chunk_at(2 * CHUNK) == next(iter(chunker.chunks(2 * CHUNK)))


def test_bad_offsets_and_arguments_raise_value_error(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 5 * CHUNK)
    chunker = SnapshotChunker(src, CHUNK)
    with pytest.raises(ValueError, match="offset 100"):
        chunker.chunk_at(100)
    with pytest.raises(ValueError, match="past the end"):
        chunker.chunk_at(5 * CHUNK)
    with pytest.raises(ValueError):
        chunker.chunks(7)
    with pytest.raises(ValueError, match="chunk_size"):
        SnapshotChunker(src, 0)
    with pytest.raises(ValueError, match="32 bytes"):
        SnapshotChunker(src, CHUNK, b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        SnapshotAssembler(tmp_path / "out", 10, b"\0" * 31)


def test_missing_file_raises_storage_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"no-such\.snap"):
        SnapshotChunker(tmp_path / "no-such.snap")
    with pytest.raises(StorageError, match="missing-dir"):
        SnapshotAssembler(tmp_path / "missing-dir" / "out.snap", 1, b"\0" * 32)


def test_snapshot_errors_are_storage_errors() -> None:
    assert issubclass(SnapshotChunkError, StorageError)
    assert issubclass(SnapshotIntegrityError, StorageError)


def test_chunk_value_semantics() -> None:
    a = SnapshotChunk(4096, b"x" * 5000, 123, False)
    b = SnapshotChunk(offset=4096, data=b"x" * 5000, crc32c=123, is_last=False)
    assert a == b
    assert hash(a) == hash(b)
    assert a != SnapshotChunk(4096, b"x" * 4999 + b"y", 123, False)
    assert a != SnapshotChunk(4096, b"x" * 5000, 123, True)
    assert a != "not a chunk"
    assert len({a, b}) == 1
    text = repr(a)
    assert "4096" in text and "5000" in text and "xxxx" not in text
    with pytest.raises(AttributeError):
        a.offset = 0  # type: ignore[misc]


def test_final_file_absent_until_finish(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 5 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    for chunk in chunker.chunks():
        asm.accept(chunk)
        assert not final.exists()
    asm.finish()
    assert final.read_bytes() == data


def test_flushing_from_another_thread_while_chunks_arrive(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 64 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    stop = threading.Event()

    def flush_until_stopped() -> None:
        while not stop.is_set():
            asm.flush_received()

    flusher = threading.Thread(target=flush_until_stopped)
    flusher.start()
    try:
        send(chunker, asm)
    finally:
        stop.set()
        flusher.join()
    asm.flush_received()
    asm.finish()
    assert final.read_bytes() == data
    with pytest.raises(ValueError, match="closed"):
        asm.flush_received()


def test_resume_after_dropping_the_assembler(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 10 * CHUNK + 1)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=4)
    del asm
    asm = new_assembler(final, chunker)
    assert asm.next_offset == 4 * CHUNK
    assert not asm.is_complete
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_resume_cuts_a_torn_progress_record(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 10 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=5)
    del asm
    progress = progress_of(final)
    with progress.open("r+b") as f:
        f.truncate(progress.stat().st_size - 3)
    asm = new_assembler(final, chunker)
    assert asm.next_offset == 4 * CHUNK
    assert partial_of(final).stat().st_size == 4 * CHUNK
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_resume_ignores_garbage_after_the_partial_file(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 10 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=3)
    del asm
    with partial_of(final).open("ab") as f:
        f.write(b"\xab" * 1000)
    asm = new_assembler(final, chunker)
    assert asm.next_offset == 3 * CHUNK
    assert partial_of(final).stat().st_size == 3 * CHUNK
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_leftovers_of_another_snapshot_are_discarded(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 10 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=5)
    del asm
    other = SnapshotAssembler(final, chunker.size, hashlib.sha256(b"other").digest())
    assert other.next_offset == 0
    assert partial_of(final).stat().st_size == 0


def test_out_of_order_chunk_is_refused(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 4 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    with pytest.raises(SnapshotChunkError, match=f"out of order: expected offset 0, got {CHUNK}"):
        asm.accept(chunker.chunk_at(CHUNK))
    assert asm.next_offset == 0
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_corrupt_chunk_is_refused_and_nothing_written(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 4 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    asm.accept(chunker.chunk_at(0))
    good = chunker.chunk_at(CHUNK)
    flipped = bytearray(good.data)
    flipped[100] ^= 0x01
    bad = SnapshotChunk(good.offset, bytes(flipped), good.crc32c, good.is_last)
    with pytest.raises(SnapshotChunkError, match=f"chunk at offset {CHUNK}: CRC mismatch"):
        asm.accept(bad)
    assert asm.next_offset == CHUNK
    assert partial_of(final).stat().st_size == CHUNK
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_duplicates(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 4 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=2)
    asm.accept(chunker.chunk_at(0))  # identical resend: fine, nothing changes
    assert asm.next_offset == 2 * CHUNK
    changed = b"\0" + chunker.chunk_at(0).data[1:]
    if changed == chunker.chunk_at(0).data:
        changed = b"\1" + changed[1:]
    with pytest.raises(SnapshotChunkError, match="offset 0"):
        asm.accept_raw(0, changed, crc32c(changed))
    assert asm.next_offset == 2 * CHUNK
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_accept_slice_writes_a_window_of_the_received_buffer(tmp_path: Path) -> None:
    final = tmp_path / "out.snap"
    payload = b"hello snapshot"
    asm = SnapshotAssembler(final, len(payload), hashlib.sha256(payload).digest())
    received = b"<header>" + payload + b"<trailer>"
    for start, length in ((8, len(received)), (len(received) + 1, 0), (-1, 3)):
        with pytest.raises((ValueError, OverflowError)):
            asm.accept_slice(received, start, length, 0, crc32c(payload))
    assert asm.next_offset == 0, "a refused slice changes nothing"
    with pytest.raises(SnapshotChunkError, match="CRC"):
        asm.accept_slice(received, 8, 5, 0, crc32c(payload[:4]))
    asm.accept_slice(received, 8, 5, 0, crc32c(payload[:5]))
    asm.accept_slice(received, 13, len(payload) - 5, 5, crc32c(payload[5:]))
    assert asm.finish() == str(final)
    assert final.read_bytes() == payload


def test_accept_raw_and_chunk_past_the_end(tmp_path: Path) -> None:
    final = tmp_path / "out.snap"
    payload = b"hello snapshot"
    asm = SnapshotAssembler(final, len(payload), hashlib.sha256(payload).digest())
    with pytest.raises(SnapshotChunkError, match="past the snapshot size"):
        asm.accept_raw(0, payload + b"!", crc32c(payload + b"!"))
    asm.accept_raw(0, payload[:5], crc32c(payload[:5]))
    asm.accept_raw(5, payload[5:], crc32c(payload[5:]))
    assert asm.is_complete
    assert asm.finish() == str(final)
    assert final.read_bytes() == payload


def test_wrong_sha256_fails_finish_and_removes_files(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 3 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = SnapshotAssembler(final, chunker.size, hashlib.sha256(b"something else").digest())
    send(chunker, asm)
    with pytest.raises(SnapshotIntegrityError, match="SHA-256 mismatch"):
        asm.finish()
    assert not final.exists()
    assert not partial_of(final).exists()
    assert not progress_of(final).exists()
    # Closed now, like a file: state-touching calls raise ValueError, abort() is a no-op.
    with pytest.raises(ValueError, match="closed"):
        asm.finish()
    with pytest.raises(ValueError, match="closed"):
        asm.accept(chunker.chunk_at(0))
    with pytest.raises(ValueError, match="closed"):
        _ = asm.next_offset
    asm.abort()
    assert asm.total_size == chunker.size
    assert asm.final_path == str(final)


def test_incomplete_finish_keeps_the_assembler_usable(tmp_path: Path) -> None:
    src, data = make_source(tmp_path, 3 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=1)
    with pytest.raises(SnapshotIntegrityError, match=f"incomplete: have {CHUNK} of {3 * CHUNK}"):
        asm.finish()
    assert not final.exists()
    send(chunker, asm)
    asm.finish()
    assert final.read_bytes() == data


def test_abort_removes_files_and_closes(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 3 * CHUNK)
    final = tmp_path / "out.snap"
    chunker = SnapshotChunker(src, CHUNK)
    asm = new_assembler(final, chunker)
    send(chunker, asm, limit=2)
    assert partial_of(final).exists() and progress_of(final).exists()
    asm.abort()
    assert not partial_of(final).exists()
    assert not progress_of(final).exists()
    assert not final.exists()
    with pytest.raises(ValueError, match="closed"):
        asm.accept(chunker.chunk_at(0))
    asm.abort()
    assert new_assembler(final, chunker).next_offset == 0


def test_paths_accept_pathlike_and_come_back_as_str(tmp_path: Path) -> None:
    src, _ = make_source(tmp_path, 10)
    chunker = SnapshotChunker(src)
    assert isinstance(chunker.path, str)
    assert os.path.samefile(chunker.path, src)
    asm = SnapshotAssembler(tmp_path / "out.snap", chunker.size, chunker.sha256)
    assert asm.final_path == str(tmp_path / "out.snap")
    assert asm.total_size == 10
    assert "out.snap" in repr(asm)
    assert "source.snap" in repr(chunker)
    asm.abort()
