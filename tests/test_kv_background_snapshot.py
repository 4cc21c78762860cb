"""Tests for KVStateMachine.begin_snapshot: a frozen view written while applies go on.

The tests compare the writer's bytes with a plain ``snapshot()`` of the state at the freeze, and
the live state afterwards with a reference store that applied the same commands without any view
open, so a broken copy-on-write (a frozen node changed in place, or a live change lost) fails them.
"""

from __future__ import annotations

import contextlib
import gc
import io
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pytest

from dengine import kv
from dengine.kv import (
    KVSnapshotCancelledError,
    KVSnapshotError,
    KVSnapshotWriter,
    KVStateMachine,
    encode_cas,
    encode_delete,
    encode_delete_range,
    encode_put,
)
from dengine.snapshot_store import SnapshotMeta, SnapshotStore

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


def key(i: int) -> bytes:
    return b"k%06d" % i


def snap(sm: KVStateMachine) -> bytes:
    sink = io.BytesIO()
    sm.snapshot(sink)
    return sink.getvalue()


def write(writer: KVSnapshotWriter) -> bytes:
    sink = io.BytesIO()
    writer(sink)
    return sink.getvalue()


def restored(data: bytes) -> KVStateMachine:
    sm = KVStateMachine()
    sm.restore(io.BytesIO(data))
    return sm


class Session:
    """A store fed commands at increasing log indexes; ``log`` keeps them for a replay."""

    def __init__(self, sm: KVStateMachine | None = None) -> None:
        self.sm = sm if sm is not None else KVStateMachine(history=100)
        self.index = self.sm.last_applied
        self.log: list[tuple[int, bytes]] = []

    def do(self, command: bytes) -> None:
        self.index += 1
        self.sm.apply(self.index, command)
        self.log.append((self.index, command))


def replay(frozen: bytes, log: list[tuple[int, bytes]]) -> KVStateMachine:
    """A reference store: the frozen state, then the logged commands, with no view ever open."""
    sm = restored(frozen)
    for index, command in log:
        sm.apply(index, command)
    return sm


def random_command(rng: random.Random, sm: KVStateMachine, universe: int) -> bytes:
    """A put, delete, CAS (matching or not), delete-range or put at either end of the key space."""
    k = key(rng.randrange(universe))
    value = rng.randbytes(rng.randrange(40))
    choice = rng.random()
    if choice < 0.45:
        return encode_put(k, value)
    if choice < 0.7:
        return encode_delete(k)
    if choice < 0.85:
        current = sm.get(k)
        expected = current.value if current is not None and rng.random() < 0.7 else None
        return encode_cas(k, expected, value)
    if choice < 0.95:
        return encode_delete_range(k[: rng.randint(5, 7)])  # up to 100 neighbouring keys
    edge = b"\x00" if rng.random() < 0.5 else b"\xff"
    return encode_put(edge + rng.randbytes(rng.randint(0, 3)), value)


class HookSink(io.BytesIO):
    """A sink that calls ``hook`` before storing each write, i.e. between two pieces of the walk."""

    def __init__(self, hook: Callable[[], None]) -> None:
        super().__init__()
        self.hook = hook

    def write(self, data: ReadableBuffer, /) -> int:
        self.hook()
        return super().write(data)


# ---------------------------------------------------------------------------------------------
# Deterministic interleavings


def test_writer_ignores_every_kind_of_change_made_after_the_freeze() -> None:
    session = Session()
    reference = Session(KVStateMachine(history=100))  # applies the same commands, never frozen

    def both(command: bytes) -> None:
        session.do(command)
        reference.do(command)

    for i in range(0, 6000, 2):  # even numbers only: room to insert in the middle
        both(encode_put(key(i), b"v%d" % i))
    frozen = snap(reference.sm)
    writer = session.sm.begin_snapshot()
    assert (writer.revision, writer.last_applied) == (3000, 3000)

    for i in range(0, 600, 2):
        both(encode_put(key(i), b"overwritten"))
    for i in range(600, 1200, 4):
        both(encode_delete(key(i)))
    for i in range(1201, 4201, 2):  # 1500 new keys in one region: many splits
        both(encode_put(key(i), b"new"))
    both(encode_put(b"\x00first", b"before every key"))
    both(encode_put(b"\xfflast", b"after every key"))
    both(encode_cas(key(2000), b"v2000", b"swapped"))
    both(encode_cas(key(2002), b"wrong", b"not swapped"))
    both(encode_delete_range(key(4500)[:4]))  # k004...: 500 keys across chunk boundaries, merges
    both(encode_delete_range(key(5000)[:5]))  # k0050..: 100 keys
    both(encode_put(key(4500), b"back"))  # deleted then put again: version 1
    both(encode_delete(key(0)))  # the very first frozen key
    both(encode_delete(key(5998)))  # the very last frozen key
    assert session.sm._view is not None

    assert write(writer) == frozen
    assert snap(session.sm) == snap(reference.sm)  # the live state did not suffer either
    assert session.sm.range() == reference.sm.range()


def test_everything_deleted_and_rebuilt_after_the_freeze() -> None:
    session = Session()
    for i in range(3000):
        session.do(encode_put(key(i), b"%d" % i))
    frozen = snap(session.sm)
    writer = session.sm.begin_snapshot()
    session.log.clear()
    session.do(encode_delete_range(b""))
    for i in reversed(range(0, 3000, 3)):
        session.do(encode_put(key(i), b"again"))
    assert write(writer) == frozen
    assert snap(session.sm) == snap(replay(frozen, session.log))


@pytest.mark.parametrize("piece", [32, 64])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_changes_between_every_piece_of_the_walk(
    seed: int, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny write buffer makes the writer call the sink after every entry or two; the sink
    # applies commands there, so changes land just behind, at and ahead of the walk's position.
    monkeypatch.setattr(kv, "_BACKGROUND_WRITE_BUFFER", piece)
    rng = random.Random(seed)
    universe = 3000
    session = Session()
    for _ in range(4000):
        session.do(random_command(rng, session.sm, universe))
    for _round in range(4):  # each round also checks that the previous view was released
        frozen = snap(session.sm)
        writer = session.sm.begin_snapshot()
        session.log.clear()
        burst = rng.choice([1, 3, 20])

        def mutate(burst: int = burst) -> None:
            for _ in range(rng.randint(0, burst)):
                session.do(random_command(rng, session.sm, universe))

        sink = HookSink(mutate)
        writer(sink)
        assert sink.getvalue() == frozen, (seed, piece, _round)
        assert len(session.log) > 100
        assert snap(session.sm) == snap(replay(frozen, session.log))
        assert session.sm._view is None


# ---------------------------------------------------------------------------------------------
# Truly concurrent


def snapshot_while_applying(session: Session, rng: random.Random, universe: int) -> None:
    """Runs a writer on a thread while this one applies; checks its bytes and the live state."""
    frozen = snap(session.sm)
    writer = session.sm.begin_snapshot()
    session.log.clear()
    applied_at_write: list[int] = []
    errors: list[BaseException] = []

    def slow_disk() -> None:
        applied_at_write.append(len(session.log))  # read on the writer's thread
        time.sleep(0.002)  # releases the GIL: the apply loop runs meanwhile

    sink = HookSink(slow_disk)

    def run() -> None:
        try:
            writer(sink)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() or len(session.log) < 3000:
        session.do(random_command(rng, session.sm, universe))
    thread.join()

    assert not errors
    assert len(applied_at_write) >= 3
    assert applied_at_write[-1] - applied_at_write[0] >= 100, applied_at_write  # they overlapped
    assert sink.getvalue() == frozen
    assert snap(session.sm) == snap(replay(frozen, session.log))
    assert session.sm._view is None


def test_writer_on_another_thread_while_applying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "_BACKGROUND_WRITE_BUFFER", 256 * 1024)  # some 20 pieces per snapshot
    rng = random.Random(7)
    universe = 60_000
    session = Session()
    for i in range(50_000):
        session.do(encode_put(key(rng.randrange(universe) if i % 5 == 0 else i), rng.randbytes(100)))
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # many more thread switches: finer interleavings
    try:
        for _ in range(3):
            snapshot_while_applying(session, rng, universe)
    finally:
        sys.setswitchinterval(old_interval)


# ---------------------------------------------------------------------------------------------
# The view's life cycle


def small_store(n: int = 2000) -> Session:
    session = Session()
    for i in range(n):
        session.do(encode_put(key(i), b"x" * (i % 50)))
    return session


def test_view_is_released_when_the_writer_finishes() -> None:
    session = small_store()
    writer = session.sm.begin_snapshot()
    view = session.sm._view
    assert view is not None
    session.do(encode_put(key(1), b"changed"))
    session.do(encode_delete(key(2)))
    write(writer)
    assert session.sm._view is None
    assert writer._pieces is None  # the frozen tree is let go at once, not when the writer is
    session.sm.begin_snapshot().cancel()  # a new view can begin


class FullDisk(io.BytesIO):
    def write(self, data: ReadableBuffer, /) -> int:
        raise OSError(28, "No space left on device")


def test_view_is_released_when_the_writer_raises() -> None:
    session = small_store()
    writer = session.sm.begin_snapshot()
    view = session.sm._view
    assert view is not None
    session.do(encode_put(key(1), b"changed"))
    with pytest.raises(OSError, match="No space"):
        writer(FullDisk())
    assert session.sm._view is None and writer._pieces is None
    with pytest.raises(RuntimeError, match="already ran"):
        write(writer)
    frozen = snap(session.sm)
    assert write(session.sm.begin_snapshot()) == frozen


class RecordingPieces:
    """Stands in for a writer's frozen pieces and notes the thread that lets go of them."""

    def __init__(self, pieces: object) -> None:
        self.pieces = pieces
        self.released_on: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.pieces, name)

    def release(self) -> None:
        self.released_on.append(threading.get_ident())
        self.pieces.release()  # type: ignore[attr-defined]


@pytest.mark.parametrize("ending", ["written", "failed", "cancelled"])
def test_the_frozen_tree_is_freed_by_the_thread_that_ends_the_writer(ending: str) -> None:
    # Freeing the frozen tree (every node copied on write since the freeze) took 25-45 ms with
    # the GIL held when it fell to whichever thread dropped the pieces last: the event loop's
    # thread stalled that long. The writer's own thread lets go of it, with the GIL released.
    session = small_store()
    writer = session.sm.begin_snapshot()
    for i in range(0, 2000, 7):
        session.do(encode_put(key(i), b"changed"))
    recording = RecordingPieces(writer._pieces)
    writer._pieces = recording  # type: ignore[assignment]
    ended_on: list[int] = []

    def end() -> None:
        ended_on.append(threading.get_ident())
        if ending == "cancelled":
            writer.cancel()
        else:
            with pytest.raises(OSError) if ending == "failed" else contextlib.nullcontext():
                writer(FullDisk() if ending == "failed" else io.BytesIO())

    thread = threading.Thread(target=end)
    thread.start()
    thread.join()
    assert recording.released_on == ended_on
    assert recording.pieces.next_piece(1 << 20) is None  # type: ignore[attr-defined]


def test_begin_while_a_view_is_open_raises() -> None:
    session = small_store()
    writer = session.sm.begin_snapshot()
    with pytest.raises(RuntimeError, match="already open"):
        session.sm.begin_snapshot()
    writer.cancel()
    writer.cancel()  # harmless
    frozen = snap(session.sm)
    assert write(session.sm.begin_snapshot()) == frozen


def test_cancel_before_writing() -> None:
    session = small_store()
    writer = session.sm.begin_snapshot()
    session.do(encode_put(key(1), b"changed"))
    writer.cancel()
    assert session.sm._view is None and writer._pieces is None
    with pytest.raises(KVSnapshotCancelledError):
        write(writer)


def test_cancel_while_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "_BACKGROUND_WRITE_BUFFER", 256)
    session = small_store()
    writer = session.sm.begin_snapshot()
    writes = 0

    def cancel_on_second_write() -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            writer.cancel()

    with pytest.raises(KVSnapshotCancelledError):
        writer(HookSink(cancel_on_second_write))
    assert writes == 2  # the writer stopped at the next piece
    assert session.sm._view is None


def test_dropped_writer_releases_its_view() -> None:
    session = small_store()
    writer = session.sm.begin_snapshot()
    view = session.sm._view
    assert view is not None
    del writer
    gc.collect()
    assert session.sm._view is None
    session.sm.begin_snapshot().cancel()


def test_restore_cancels_the_open_view() -> None:
    session = small_store()
    other = small_store(500)
    other.do(encode_put(b"other", b"store"))
    other_bytes = snap(other.sm)
    writer = session.sm.begin_snapshot()
    session.sm.restore(io.BytesIO(other_bytes))
    assert session.sm._view is None
    with pytest.raises(KVSnapshotCancelledError):
        write(writer)
    assert snap(session.sm) == other_bytes
    assert write(session.sm.begin_snapshot()) == other_bytes


def test_restore_while_the_writer_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "_BACKGROUND_WRITE_BUFFER", 256)
    session = small_store()
    other_bytes = snap(small_store(100).sm)
    writer = session.sm.begin_snapshot()
    sink = HookSink(lambda: session.sm.restore(io.BytesIO(other_bytes)))
    with pytest.raises(KVSnapshotCancelledError):
        writer(sink)
    assert snap(session.sm) == other_bytes
    session.do(encode_put(key(5), b"after"))
    assert session.sm.get(key(5)) is not None


def test_a_refused_restore_leaves_the_view_open() -> None:
    session = small_store()
    frozen = snap(session.sm)
    writer = session.sm.begin_snapshot()
    with pytest.raises(KVSnapshotError):
        session.sm.restore(io.BytesIO(frozen[:-1] + bytes([frozen[-1] ^ 1])))  # bad CRC
    session.do(encode_delete_range(b""))
    assert write(writer) == frozen


def test_plain_snapshot_while_a_view_is_open_shows_the_current_state() -> None:
    session = small_store()
    frozen = snap(session.sm)
    writer = session.sm.begin_snapshot()
    session.log.clear()
    session.do(encode_delete(key(7)))
    session.do(encode_put(b"late", b"key"))
    current = snap(session.sm)
    assert current != frozen
    assert current == snap(replay(frozen, session.log))
    assert write(writer) == frozen


def test_writer_output_restores_to_the_frozen_state() -> None:
    session = small_store()
    before = session.sm.range()
    writer = session.sm.begin_snapshot()
    session.do(encode_delete_range(key(1)[:4]))
    copy = restored(write(writer))
    assert copy.range() == before
    assert (copy.revision, copy.last_applied) == (writer.revision, writer.last_applied)


def test_a_release_while_beginning_does_not_deadlock() -> None:
    # A garbage collection inside begin_snapshot (which holds the view lock) may finalize an old
    # writer whose view a restore ended; that release takes the lock again on the same thread.
    session = small_store()
    old = session.sm.begin_snapshot()
    session.sm.restore(io.BytesIO(snap(small_store(10).sm)))

    def release_under_the_lock() -> None:
        with session.sm._view_lock:
            old._release()

    thread = threading.Thread(target=release_under_the_lock, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    session.sm.begin_snapshot().cancel()


@pytest.mark.skipif(sys.platform == "win32", reason="the one-call write is POSIX only")
def test_into_a_snapshot_store_the_writer_writes_the_state_from_rust_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a snapshot store's sink, the background writer hands the whole frozen state to
    Rust at once (the GIL released throughout), never a piece at a time through ``write``; the
    file holds the bytes a plain snapshot gives, and its SHA-256 trailer verifies."""
    session = Session()
    for i in range(3000):
        session.do(encode_put(key(i), b"v%d" % i * 20))
    expected = snap(session.sm)
    writer = session.sm.begin_snapshot()
    session.do(encode_put(key(1), b"after the freeze"))
    store = SnapshotStore(tmp_path)
    out = store.create(SnapshotMeta(session.index, 1, (1, 2, 3)))
    piecewise: list[int] = []
    real_write = type(out.sink).write

    def spy(self: BinaryIO, data: bytes) -> int:
        piecewise.append(len(data))
        return real_write(self, data)

    monkeypatch.setattr(type(out.sink), "write", spy)
    monkeypatch.setattr(kv, "_BACKGROUND_WRITE_BUFFER", 4096)  # many pieces, one call still
    writer(out.sink)
    committed = out.commit()
    assert piecewise == [], "the state went through the Python sink a piece at a time"
    latest = store.latest(verify=True)
    assert latest is not None and latest.file_sha256 == committed.file_sha256
    with store.open_data(latest) as data:
        assert data.read() == expected


def test_a_cancel_from_another_thread_while_rust_writes_the_state(tmp_path: Path) -> None:
    """A cancel that lands while the writer is inside its one Rust call (which holds the frozen
    pieces) cannot let go of them there: it returns quietly, the writer lets go when the call
    ends, and raises as cancelled rather than leaving a snapshot that looks whole."""
    session = Session()
    for i in range(100_000):
        session.do(encode_put(key(i), b"v" * 200))
    writer = session.sm.begin_snapshot()
    out = SnapshotStore(tmp_path).create(SnapshotMeta(session.index, 1, (1, 2, 3)))
    inside = threading.Event()
    real = type(out.sink).write_kv_pieces  # type: ignore[attr-defined]

    def write_kv_pieces(self: BinaryIO, pieces: object, size: int) -> bool:
        inside.set()
        return bool(real(self, pieces, size))

    type(out.sink).write_kv_pieces = write_kv_pieces  # type: ignore[attr-defined]
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            writer(out.sink)
            outcome.append(None)
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    try:
        thread = threading.Thread(target=run)
        thread.start()
        assert inside.wait(10)
        time.sleep(0.002)  # well inside the ~20 MB write
        writer.cancel()
        thread.join()
    finally:
        type(out.sink).write_kv_pieces = real  # type: ignore[attr-defined]
        out.abort()
    assert len(outcome) == 1 and isinstance(outcome[0], KVSnapshotCancelledError)
    assert session.sm._view is None
    session.sm.begin_snapshot().cancel()


def test_a_cancel_that_frees_the_view_while_the_writer_asks_for_a_piece() -> None:
    """``cancel`` lets go of the frozen tree with the GIL released, holding the pieces while it
    does; a writer that asks for its next piece meanwhile (a piece at a time, into a sink whose
    writes let the GIL go) must still end as cancelled, not with the binding's "already
    borrowed" error."""
    session = Session()
    for i in range(150_000):
        session.do(encode_put(key(i), b"v" * 16))
    writer = session.sm.begin_snapshot()
    for i in range(150_000):  # every frozen node copied on write: freeing the view takes a while
        session.do(encode_put(key(i), b"w" * 16))
    writing = threading.Event()

    class SlowSink(io.BytesIO):
        def write(self, data: ReadableBuffer) -> int:
            writing.set()
            time.sleep(0.002)  # a disk write: the GIL goes, the cancel gets in
            return len(memoryview(data))

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            writer(SlowSink())
            outcome.append(None)
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert writing.wait(10)
    time.sleep(0.0005)
    writer.cancel()
    thread.join()
    assert len(outcome) == 1 and isinstance(outcome[0], KVSnapshotCancelledError), outcome
