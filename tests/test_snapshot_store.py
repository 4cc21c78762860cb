"""Snapshot files on disk: dengine.snapshot_store.

The layout is checked against the documented format with independent struct code, every damaged
file must be refused with a SnapshotError naming the file, and a snapshot sent through the Rust
chunker/assembler must load at the receiving store.
"""

from __future__ import annotations

import array
import hashlib
import io
import random
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import pytest

from dengine.errors import DengineError
from dengine.raft.sessions import SessionTable
from dengine.snapshot import SnapshotAssembler, SnapshotChunker
from dengine.snapshot_store import (
    SessionRow,
    SnapshotError,
    SnapshotFile,
    SnapshotMeta,
    SnapshotStore,
    decode_meta,
    encode_meta,
)

META = SnapshotMeta(
    index=1234,
    term=7,
    voters=(1, 2, 3),
    learners=(9,),
    sessions=(
        (11, 2, 1200, ((2, b"ok", None), (3, None, "KeyError: 'x'"), (4, None, None), (5, b"", "ünï ✓"))),
        (12, 0, 1234, ()),
    ),
)

# A small meta whose field offsets are spelled out below, from the documented layout.
SMALL = SnapshotMeta(5, 1, (1, 2), (3,), ((4, 0, 5, ((1, None, None),)),))
SMALL_FIELDS = {
    "index": 0,
    "term": 8,
    "voter count": 16,
    "voter id": 20,
    "second voter id": 28,
    "learner count": 36,
    "learner id": 40,
    "session count": 48,
    "client id": 52,
    "acked below": 60,
    "last index": 68,
    "result count": 76,
    "sequence": 80,
    "flags": 88,
}
TRAILER = 40  # data length u64 + SHA-256


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def make(
    store: SnapshotStore, meta: SnapshotMeta = META, data: bytes = b"state", pieces: int = 1
) -> SnapshotFile:
    step = max(1, -(-len(data) // pieces))
    with store.create(meta) as writer:
        for start in range(0, len(data), step):
            assert writer.sink.write(data[start : start + step]) == len(data[start : start + step])
        return writer.commit()


def meta_at(index: int, term: int) -> SnapshotMeta:
    return SnapshotMeta(index, term, (1, 2, 3))


def patch(path: Path, offset: int, new: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(new)] = new
    path.write_bytes(bytes(raw))


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def read_in_pieces(stream: BinaryIO, n: int) -> bytes:
    out = bytearray()
    while piece := stream.read(n):
        assert len(piece) <= n
        out += piece
    return bytes(out)


# --- metadata codec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [META, SMALL, SnapshotMeta(1, 1, (1,)), SnapshotMeta(2**64 - 1, 2**64 - 1, (2**64 - 1,), (5, 6))],
    ids=["sessions", "small", "minimal", "largest"],
)
def test_meta_round_trips(meta: SnapshotMeta) -> None:
    assert decode_meta(encode_meta(meta)) == meta


def test_meta_encoding_is_the_documented_layout() -> None:
    expected = struct.pack("<QQI2QIQIQQQIQBI", 5, 1, 2, 1, 2, 1, 3, 1, 4, 0, 5, 1, 1, 0, 0)
    assert encode_meta(SMALL) == expected
    with_values = SnapshotMeta(5, 1, (1,), (), ((4, 0, 5, ((1, b"ab", "é"),)),), ((1, "h:1"),))
    tail = struct.pack("<QBI", 1, 3, 2) + b"ab" + struct.pack("<I", 2) + "é".encode()
    addresses = struct.pack("<IQI", 1, 1, 3) + b"h:1"
    assert encode_meta(with_values).endswith(tail + addresses)


def test_member_addresses_round_trip_and_must_belong_to_members() -> None:
    meta = SnapshotMeta(5, 1, (1, 2), (3,), addresses=((3, "h:3"), (1, "h:1")))
    assert meta.addresses == ((1, "h:1"), (3, "h:3")), "sorted by id"
    assert decode_meta(encode_meta(meta)) == meta
    with pytest.raises(ValueError, match="not a member"):
        SnapshotMeta(5, 1, (1,), addresses=((2, "h:2"),))
    with pytest.raises(ValueError, match="two addresses"):
        SnapshotMeta(5, 1, (1,), addresses=((1, "h:1"), (1, "h:2")))


def test_meta_from_a_session_table_round_trips() -> None:
    table = SessionTable()
    table.record(7, 1, 10, b"r1", None)
    table.record(7, 2, 11, None, "ValueError: no")
    table.record(8, 5, 12, None, None, first_outstanding=5)
    rows: tuple[SessionRow, ...] = tuple((c, a, i, tuple(rs)) for c, a, i, rs in table.items())
    meta = SnapshotMeta(12, 3, (1, 2, 3), sessions=rows)
    assert decode_meta(encode_meta(meta)).sessions == (
        (7, 0, 11, ((1, b"r1", None), (2, None, "ValueError: no"))),
        (8, 5, 12, ((5, None, None),)),
    )


def test_meta_normalises_lists_to_tuples() -> None:
    table = SessionTable()
    table.record(7, 1, 10, b"r1", None)
    meta = SnapshotMeta(10, 1, [1, 2], [3], table.items())  # type: ignore[arg-type]
    assert meta == SnapshotMeta(10, 1, (1, 2), (3,), ((7, 0, 10, ((1, b"r1", None),)),))
    assert hash(meta) == hash(decode_meta(encode_meta(meta)))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"index": 0}, "index"),
        ({"term": 0}, "term"),
        ({"voters": ()}, "at least one voter"),
        ({"voters": (1, 0)}, "voter id"),
        ({"voters": (1, 1)}, "duplicate voter"),
        ({"learners": (2,)}, "both voter and learner"),
        ({"learners": (-1,)}, "learner id"),
        ({"voters": (2**64,)}, "voter id"),
        ({"sessions": ((0, 0, 1, ()),)}, "client id"),
        ({"sessions": ((1, 0, 1, ()), (1, 0, 2, ()))}, "two sessions"),
        ({"sessions": ((1, 0, 11, ()),)}, "last_index"),
        ({"sessions": ((1, 0, 1, ((2, None, None), (2, None, None))),)}, "sequence"),
        ({"sessions": ((1, 0, 1, ((0, None, None),)),)}, "sequence"),
        ({"sessions": ((1, 0, 1, ((1, "text", None),)),)}, "result must be bytes"),
        ({"sessions": ((1, 0, 1, ((1, None, b"err"),)),)}, "error must be str"),
    ],
)
def test_meta_refuses_invalid_content(kwargs: dict[str, object], problem: str) -> None:
    fields: dict[str, object] = {"index": 10, "term": 1, "voters": (1, 2), **kwargs}
    with pytest.raises(ValueError, match=problem):
        SnapshotMeta(**fields)  # type: ignore[arg-type]


def test_decode_meta_refuses_every_truncation() -> None:
    data = encode_meta(META)
    for cut in range(len(data)):
        with pytest.raises(SnapshotError, match=r"remain|does not fit"):
            decode_meta(data[:cut])


def test_decode_meta_refuses_trailing_bytes() -> None:
    data = encode_meta(SMALL)
    with pytest.raises(SnapshotError, match=f"1 unexpected bytes after the metadata at byte {len(data)}"):
        decode_meta(data + b"\x00", source="test buffer")
    with pytest.raises(SnapshotError, match=r"^test buffer: "):
        decode_meta(data + b"\x00", source="test buffer")


@pytest.mark.parametrize(
    "field",
    ["index", "term", "voter id", "second voter id", "learner id", "client id", "last index", "sequence"],
)
def test_decode_meta_refuses_zero_ids(field: str) -> None:
    data = bytearray(encode_meta(SMALL))
    offset = SMALL_FIELDS[field]
    assert data[offset : offset + 8] != bytes(8)
    data[offset : offset + 8] = bytes(8)
    with pytest.raises(SnapshotError, match=f"is 0, must be at least 1 at byte {offset}$"):
        decode_meta(bytes(data))


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("voter count", 0xFFFFFFFF, "voter count 4294967295 does not fit"),
        ("learner count", 0xFFFFFFFF, "learner count 4294967295 does not fit"),
        ("session count", 0xFFFFFFFF, "session count 4294967295 does not fit"),
        ("result count", 0xFFFFFFFF, "result count 4294967295 does not fit"),
        ("voter count", 0, "unexpected bytes after the metadata at byte 53"),  # the rest is misread
        ("flags", 0x04, "unknown result flags 0x04 at byte 88"),
        ("flags", 0x01, "address count needs 4 bytes but only 0 remain"),
        ("second voter id", 1, "duplicate voter id"),
        ("learner id", 2, "both voter and learner"),
        ("last index", 6, "last_index"),
    ],
)
def test_decode_meta_refuses_hostile_fields(field: str, value: int, problem: str) -> None:
    data = bytearray(encode_meta(SMALL))
    offset = SMALL_FIELDS[field]
    width = 1 if field == "flags" else 4 if field.endswith("count") else 8
    data[offset : offset + width] = value.to_bytes(width, "little")
    with pytest.raises(SnapshotError, match=problem):
        decode_meta(bytes(data))


def test_decode_meta_refuses_a_huge_result_length_and_bad_utf8() -> None:
    meta = SnapshotMeta(5, 1, (1,), (), ((4, 0, 5, ((1, b"ab", "xy"),)),))
    data = bytearray(encode_meta(meta))
    error_at = len(data) - 2 - 4  # before the (empty) address list
    data[error_at] = 0xFF  # not UTF-8
    with pytest.raises(SnapshotError, match=f"error text is not UTF-8 .* at byte {error_at}"):
        decode_meta(bytes(data))
    result_len_at = error_at - 4 - 2 - 4
    data[result_len_at : result_len_at + 4] = (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(SnapshotError, match="result needs 4294967295 bytes"):
        decode_meta(bytes(data))


def test_encode_meta_refuses_unencodable_error_text() -> None:
    meta = SnapshotMeta(5, 1, (1,), (), ((4, 0, 5, ((1, None, "\ud800"),)),))
    with pytest.raises(ValueError):
        encode_meta(meta)


def test_snapshot_error_is_a_dengine_error() -> None:
    with pytest.raises(DengineError):
        decode_meta(b"")


# --- writing and reading files ---------------------------------------------------------------------


def test_round_trip_of_a_multi_megabyte_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    data = payload(5 * 1024 * 1024 + 123)
    snap = make(store, META, data, pieces=7)
    assert snap.path == store.incoming_path(META.index, META.term)
    assert snap.data_len == len(data)
    assert snap.size == snap.path.stat().st_size == snap.data_offset + len(data) + TRAILER
    assert store.load(snap.path) == snap
    assert store.load(str(snap.path), verify=False) == snap
    with store.open_data(snap) as stream:
        assert stream.read() == data
        assert stream.read() == b""
    with store.open_data(snap) as stream:
        assert read_in_pieces(stream, 4093) == data
    with store.open_data(snap) as stream:
        stream.seek(len(data) - 50)
        assert read_in_pieces(stream, 1) == data[-50:]  # byte by byte up to EOF, no trailer
    with store.open_data(snap) as stream:
        assert isinstance(stream, io.BufferedIOBase)
        buf = bytearray(1000)
        assert stream.readinto(buf) == 1000
        assert bytes(buf) == data[:1000]
        assert stream.tell() == 1000


def test_file_layout_is_the_documented_format(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = make(store, SMALL, b"0123456789")
    raw = snap.path.read_bytes()
    meta = encode_meta(SMALL)
    assert raw[:16] == b"DNGSNAP\x00" + struct.pack("<II", 1, len(meta))
    assert raw[16 : 16 + len(meta)] == meta
    assert snap.data_offset == 16 + len(meta)
    assert raw[snap.data_offset : snap.data_offset + 10] == b"0123456789"
    assert raw[-40:-32] == struct.pack("<Q", 10)
    assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()
    assert len(raw) == snap.data_offset + 10 + 40


def test_empty_state_machine_data(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = make(store, SMALL, b"")
    assert store.load(snap.path).data_len == 0
    with store.open_data(snap) as stream:
        assert stream.read() == b""
        assert stream.read(10) == b""


def test_open_data_refuses_a_file_cut_short_under_it(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = make(store, SMALL, payload(10_000))
    with store.open_data(snap) as stream:
        with open(snap.path, "r+b") as file:
            file.truncate(snap.data_offset + 100)
        with pytest.raises(SnapshotError, match=f"ends at byte {snap.data_offset + 100}, before the end"):
            stream.read()


def test_sink_accepts_buffers_and_returns_the_byte_count(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    words = array.array("I", [1, 2, 3])
    with store.create(SMALL) as writer:
        assert writer.sink.write(b"ab") == 2
        assert writer.sink.write(bytearray(b"cd")) == 2
        assert writer.sink.write(memoryview(b"xxefxx")[2:4]) == 2
        assert writer.sink.write(memoryview(words)) == words.itemsize * 3
        assert writer.sink.writable() and not writer.sink.readable()
        with pytest.raises(TypeError):
            writer.sink.write("text")  # type: ignore[call-overload]
        snap = writer.commit()
    with store.open_data(snap) as stream:
        assert stream.read() == b"abcdef" + words.tobytes()
    with pytest.raises(ValueError):
        writer.sink.write(b"late")


def test_a_state_machine_may_close_the_sink(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with store.create(SMALL) as writer:
        writer.sink.write(b"abc")
        writer.sink.close()
        snap = writer.commit()
    assert store.load(snap.path).data_len == 3


def test_commit_replaces_a_snapshot_of_the_same_index_and_term(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    make(store, SMALL, b"first")
    snap = make(store, SMALL, b"second")
    assert [s.path for s in store.list()] == [snap.path]
    with store.open_data(store.load(snap.path)) as stream:
        assert stream.read() == b"second"


def test_writer_context_manager_aborts_on_exception(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(RuntimeError), store.create(SMALL) as writer:
        writer.sink.write(payload(100_000))
        assert writer.temp_path.exists()
        raise RuntimeError("state machine failed")
    assert list(tmp_path.iterdir()) == []
    with store.create(SMALL) as writer:  # left without commit: nothing is published either
        writer.sink.write(b"abc")
    assert list(tmp_path.iterdir()) == []


def test_abort_is_idempotent_and_ends_the_writer(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    writer = store.create(SMALL)
    writer.sink.write(b"abc")
    writer.abort()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        writer.commit()
    with pytest.raises(ValueError):
        writer.sink.write(b"more")


def test_commit_twice_is_refused_and_abort_after_commit_keeps_the_file(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    writer = store.create(SMALL)
    snap = writer.commit()
    with pytest.raises(ValueError, match="already committed"):
        writer.commit()
    writer.abort()
    assert store.load(snap.path) == snap


# --- refusing damaged files ---------------------------------------------------------------------------


@pytest.fixture
def snap(tmp_path: Path) -> SnapshotFile:
    return make(SnapshotStore(tmp_path), META, payload(300_000), pieces=3)


def load(path: Path, *, verify: bool = True) -> SnapshotFile:
    return SnapshotStore(path.parent).load(path, verify=verify)


def refused(path: Path, pattern: str, *, verify: bool = True) -> SnapshotError:
    with pytest.raises(SnapshotError, match=pattern) as info:
        load(path, verify=verify)
    assert str(path) in str(info.value)
    assert info.value.path == path
    return info.value


def test_load_refuses_wrong_magic(snap: SnapshotFile) -> None:
    patch(snap.path, 0, b"GIF89a")
    refused(snap.path, "not a dengine snapshot .*at byte 0", verify=False)


def test_load_refuses_an_unknown_version(snap: SnapshotFile) -> None:
    patch(snap.path, 8, struct.pack("<I", 2))
    assert refused(snap.path, "unknown format version 2 at byte 8", verify=False).offset == 8


def test_load_refuses_a_meta_length_beyond_the_file(snap: SnapshotFile) -> None:
    patch(snap.path, 12, struct.pack("<I", snap.size))
    refused(snap.path, "metadata length .* at byte 12 runs past the end", verify=False)


@pytest.mark.parametrize("keep", [0, 10, 16, 100, "data", "data+1", "trailer", "last"])
def test_load_refuses_a_truncated_file(snap: SnapshotFile, keep: int | str) -> None:
    cut = {
        "data": snap.data_offset,
        "data+1": snap.data_offset + 1,
        "trailer": snap.size - TRAILER,
        "last": snap.size - 1,
    }.get(str(keep), keep)
    assert isinstance(cut, int)
    with open(snap.path, "r+b") as file:
        file.truncate(cut)
    refused(snap.path, "truncated", verify=False)


@pytest.mark.parametrize("extra", [b"\x00", bytes(TRAILER), b"garbage" * 1000])
def test_load_refuses_bytes_appended(snap: SnapshotFile, extra: bytes) -> None:
    with open(snap.path, "ab") as file:
        file.write(extra)
    refused(snap.path, "the trailer at byte .* records", verify=False)


def test_load_verify_catches_one_flipped_data_byte(snap: SnapshotFile) -> None:
    flip(snap.path, snap.data_offset + snap.data_len // 2)
    assert load(snap.path, verify=False).data_len == snap.data_len  # the structure is intact
    refused(snap.path, "SHA-256 mismatch")


@pytest.mark.parametrize(("from_end", "pattern"), [(TRAILER, "the trailer at byte"), (1, "SHA-256 mismatch")])
def test_load_refuses_a_corrupted_trailer(snap: SnapshotFile, from_end: int, pattern: str) -> None:
    flip(snap.path, snap.size - from_end)
    refused(snap.path, pattern)


def test_load_names_the_file_offset_of_bad_metadata(snap: SnapshotFile) -> None:
    patch(snap.path, 16, bytes(8))  # the index, first field of the meta
    assert refused(snap.path, "index is 0, must be at least 1 at byte 16", verify=False).offset == 16


def test_load_refuses_a_name_that_disagrees_with_the_metadata(snap: SnapshotFile, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    wrong = store.incoming_path(META.index + 1, META.term)
    shutil.copy(snap.path, wrong)
    refused(wrong, "name says index 1235 term 7 but its metadata says index 1234 term 7")
    with pytest.raises(SnapshotError, match="name says"):
        store.list()


# --- the directory ----------------------------------------------------------------------------------


def test_latest_picks_the_highest_index_then_term(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    assert store.latest() is None
    for index, term in [(30, 2), (100, 3), (7, 9), (100, 4), (99, 9)]:
        make(store, meta_at(index, term), f"{index}/{term}".encode())
    assert [(s.meta.index, s.meta.term) for s in store.list()] == [
        (7, 9),
        (30, 2),
        (99, 9),
        (100, 3),
        (100, 4),
    ]
    latest = store.latest()
    assert latest is not None and (latest.meta.index, latest.meta.term) == (100, 4)


def test_latest_refuses_a_corrupt_newest_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    make(store, meta_at(1, 1), b"old")
    newest = make(store, meta_at(2, 1), b"new")
    flip(newest.path, newest.data_offset)
    assert store.latest(verify=False) == newest
    with pytest.raises(SnapshotError, match="SHA-256 mismatch"):
        store.latest()


def test_list_raises_on_a_damaged_snapshot_and_ignores_other_names(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    good = make(store, meta_at(5, 1), b"x")
    final = store.incoming_path(9, 1)
    for name in [final.name + ".partial", final.name + ".progress", "notes.txt", "snap-1-1.snap"]:
        (tmp_path / name).write_bytes(b"not a snapshot")
    unfinished = store.create(meta_at(8, 1))
    unfinished.sink.write(b"half")
    assert store.list() == [good]
    assert store.total_bytes() == good.size
    final.write_bytes(b"not a snapshot either")
    with pytest.raises(SnapshotError, match=str(final)):
        store.list()
    unfinished.abort()


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snaps = [make(store, meta_at(index, 1)) for index in (40, 10, 50, 20, 30)]
    by_index = {s.meta.index: s.path for s in snaps}
    assert store.prune(2) == [by_index[10], by_index[20], by_index[30]]
    assert [s.meta.index for s in store.list()] == [40, 50]
    assert store.prune(2) == []
    assert store.prune(1) == [by_index[40]]
    with pytest.raises(ValueError):
        store.prune(0)
    assert [s.meta.index for s in store.list()] == [50]


def test_prune_spares_pinned_snapshots_and_never_reads_the_files(tmp_path: Path) -> None:
    """Snapshots being sent or restored are pinned; and an old file that no longer parses must
    not fail every prune after it (pruning goes by name alone)."""
    store = SnapshotStore(tmp_path)
    snaps = {index: make(store, meta_at(index, 1)).path for index in (10, 20, 30, 40)}
    snaps[10].write_bytes(b"no longer a snapshot")
    assert store.prune(1, pinned={snaps[20]}) == [snaps[10], snaps[30]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".snap") == [
        snaps[20].name,
        snaps[40].name,
    ]


def test_total_bytes_counts_published_snapshots(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    assert store.total_bytes() == 0
    a = make(store, meta_at(1, 1), payload(1000))
    b = make(store, meta_at(2, 1), payload(5000))
    assert store.total_bytes() == a.size + b.size


def test_cleanup_removes_crash_leftovers_and_keeps_snapshots(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    kept = make(store, meta_at(3, 1), b"kept")
    crashed = store.create(meta_at(4, 1))  # never committed nor aborted, as after kill -9
    crashed.sink.write(payload(10_000))
    final = store.incoming_path(6, 2)
    partial = final.with_name(final.name + ".partial")
    progress = final.with_name(final.name + ".progress")
    partial.write_bytes(b"p")
    progress.write_bytes(b"q")
    unrelated = tmp_path / "operator-notes.tmp"
    unrelated.write_bytes(b"mine")

    restarted = SnapshotStore(tmp_path)
    assert sorted(restarted.cleanup()) == sorted([crashed.temp_path, partial, progress])
    assert sorted(tmp_path.iterdir()) == sorted([kept.path, unrelated])
    assert restarted.latest() == kept
    assert restarted.cleanup() == []
    crashed.abort()  # the file is gone already: still fine


def test_store_creates_its_directory(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "a" / "b")
    assert store.directory == tmp_path / "a" / "b"
    assert store.directory.is_dir()


def test_incoming_path_is_the_create_name(tmp_path: Path) -> None:
    leader = SnapshotStore(tmp_path / "leader")
    follower = SnapshotStore(tmp_path / "follower")
    snap = make(leader, META, b"abc")
    incoming = follower.incoming_path(META.index, META.term)
    assert incoming.parent == follower.directory
    assert incoming.name == snap.path.name == f"snap-{META.index:020d}-{META.term:020d}.snap"
    shutil.copy(snap.path, incoming)
    latest = follower.latest()
    assert latest is not None and latest.path == incoming and latest.meta == META
    with pytest.raises(ValueError):
        follower.incoming_path(0, 1)


def test_a_snapshot_sent_through_the_rust_transfer_loads_at_the_receiver(tmp_path: Path) -> None:
    leader = SnapshotStore(tmp_path / "leader")
    follower = SnapshotStore(tmp_path / "follower")
    data = payload(1_500_000, seed=3)
    sent = make(leader, META, data, pieces=4)

    chunker = SnapshotChunker(sent.path, chunk_size=64 * 1024)
    assert chunker.sha256 == hashlib.sha256(sent.path.read_bytes()).digest()
    assembler = SnapshotAssembler(follower.incoming_path(META.index, META.term), chunker.size, chunker.sha256)
    chunks = chunker.chunks()
    for _ in range(5):
        assembler.accept(next(chunks))
    assert follower.list() == []  # the transfer's .partial/.progress files are not snapshots
    for chunk in chunks:
        assembler.accept(chunk)
    published = Path(assembler.finish())

    received = follower.load(published, verify=True)
    assert received.meta == META and received.data_len == len(data)
    assert follower.latest() == received
    with follower.open_data(received) as stream:
        assert stream.read() == data


def test_the_whole_file_hash_is_known_after_commit_and_verify(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = make(store, META, payload(300_000), pieces=3)
    whole = hashlib.sha256(snap.path.read_bytes()).digest()
    assert snap.file_sha256 == whole, "commit derives it from the running hash"
    assert store.load(snap.path).file_sha256 == whole, "a verifying load derives it too"
    assert store.load(snap.path, verify=False).file_sha256 is None
