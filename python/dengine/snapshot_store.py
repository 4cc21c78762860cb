"""Durable snapshot files in one directory of a node's disk.

A snapshot file holds the metadata Raft needs to resume from it (the last included log index and
term, the membership configuration, the exactly-once client session table) followed by the user
state machine's bytes, exactly as ``state_machine.snapshot(sink)`` wrote them.

File format (all integers little-endian)::

    offset 0        magic                  8 bytes  b"DNGSNAP\\x00"
    offset 8        format version         u32      1
    offset 12       meta length M          u32
    offset 16       meta                   M bytes  see below
    offset 16+M     state machine bytes    D bytes
    offset 16+M+D   data length D          u64
    offset 24+M+D   SHA-256                32 bytes of every byte before it

The data length sits in the trailer because it is unknown until the state machine has finished
writing. The sizes must add up exactly to the file size, so a truncated file or one with bytes
appended is refused before any hashing.

Meta::

    index u64 | term u64
    voter count u32   | voter id u64 ...
    learner count u32 | learner id u64 ...
    session count u32 | session ...
    address count u32 | member id u64 | address length u32 | address, UTF-8 ...

    session := client id u64 | acked below u64 | last index u64 | result count u32 | result ...
    result  := sequence u64 | flags u8 (bit 0: a result follows, bit 1: an error follows)
               [| result length u32 | result bytes] [| error length u32 | error, UTF-8]

Nothing is pickled. Every count and length read from a file is checked against the bytes that
remain before anything is allocated or looped over, and every problem raises
:class:`SnapshotError` naming the file, what is wrong and, when it applies, the byte offset.

Names in the directory::

    snap-<index, 20 digits>-<term, 20 digits>.snap               a published snapshot
    snap-<index>-<term>.<16 hex digits>.tmp                      an unfinished create()
    snap-<index>-<term>.snap.partial / .snap.progress            an unfinished transfer (Rust)

A snapshot is written to a temp file and published by rename after fsync, followed by an fsync
of the directory; a crash leaves either no new snapshot or a complete one, plus at most a temp
file that :meth:`SnapshotStore.cleanup` removes. A snapshot received from the leader is published
by the Rust ``SnapshotAssembler`` at :meth:`SnapshotStore.incoming_path`, under the same name.

Every method here does blocking file I/O (and hashing, which releases the GIL for large
buffers): call them from a worker thread, never from the event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import io
import os
import re
import secrets
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TypeAlias, cast

from dengine import _core
from dengine.errors import DengineError

__all__ = [
    "SessionRow",
    "SnapshotError",
    "SnapshotFile",
    "SnapshotMeta",
    "SnapshotStore",
    "SnapshotWriter",
    "decode_meta",
    "encode_meta",
]

MAGIC = b"DNGSNAP\x00"
FORMAT_VERSION = 1

_HEADER = struct.Struct("<8sII")  # magic, format version, meta length
_TRAILER = struct.Struct("<Q32s")  # data length, SHA-256
_DATA_LEN = struct.Struct("<Q")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SESSION = struct.Struct("<QQQI")  # client id, acked below, last index, result count
_RESULT = struct.Struct("<QB")  # sequence, flags
_HAS_RESULT = 0x01
_HAS_ERROR = 0x02

_U32_MAX = 2**32 - 1
_MAX_ADDRESS_BYTES = 1024
_U64_MAX = 2**64 - 1
_HASH_PIECE = 1 << 20  # 1 MiB: large enough that hashlib releases the GIL, small enough for memory

_FINAL_RE = re.compile(r"snap-(\d{20})-(\d{20})\.snap")
_TEMP_RE = re.compile(r"snap-\d{20}-\d{20}\.[0-9a-f]{16}\.tmp")
_TRANSFER_RE = re.compile(r"snap-\d{20}-\d{20}\.snap\.(partial|progress)")

SessionRow: TypeAlias = tuple[int, int, int, tuple[tuple[int, bytes | None, str | None], ...]]
"""``(client_id, acked_below, last_index, ((sequence, result, error), ...))``: one row of
:meth:`dengine.raft.sessions.SessionTable.items`, as tuples."""


class SnapshotError(DengineError):
    """A snapshot file or metadata buffer is corrupt, truncated, or of an unknown format.

    The message names the file (or buffer), what is wrong and where. ``path`` is the file when
    there is one, ``offset`` the byte offset of the fault when it applies.
    """

    def __init__(self, message: str, *, path: Path | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


# --- metadata ---------------------------------------------------------------------------------------


def _check_int(value: object, what: str, low: int, high: int = _U64_MAX) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer from {low} to {high}, not {value!r}")


def _check_ids(ids: tuple[int, ...], what: str) -> None:
    for node in ids:
        _check_int(node, f"{what} id", 1)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate {what} id in {ids}")


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """What Raft needs besides the state machine's bytes to resume from a snapshot.

    Construction validates everything (``ValueError`` otherwise): index and term at least 1, at
    least one voter, node ids positive and unique, no learner also a voter, client ids unique and
    positive, session sequences positive and ascending, no session recorded after ``index``.
    Lists (such as :meth:`SessionTable.items` returns) are converted to tuples.
    """

    index: int
    """Index of the last log entry the snapshot includes (>= 1)."""
    term: int
    """Term of that entry (>= 1)."""
    voters: tuple[int, ...]
    """Voting members of the configuration at ``index``."""
    learners: tuple[int, ...] = ()
    """Non-voting members of that configuration."""
    sessions: tuple[SessionRow, ...] = ()
    """The exactly-once client session table at ``index``."""
    addresses: tuple[tuple[int, str], ...] = ()
    """``(member id, address)`` of the members of that configuration, sorted by id."""

    def __post_init__(self) -> None:
        # Normalise to tuples so the value is immutable and compares equal however it was built.
        object.__setattr__(self, "voters", tuple(self.voters))
        object.__setattr__(self, "learners", tuple(self.learners))
        rows = tuple((c, a, i, tuple(tuple(r) for r in rs)) for c, a, i, rs in self.sessions)
        object.__setattr__(self, "sessions", rows)
        object.__setattr__(self, "addresses", tuple(sorted((int(i), str(a)) for i, a in self.addresses)))
        _check_int(self.index, "index", 1)
        _check_int(self.term, "term", 1)
        if not self.voters:
            raise ValueError("a snapshot's configuration needs at least one voter")
        _check_ids(self.voters, "voter")
        _check_ids(self.learners, "learner")
        if both := set(self.voters) & set(self.learners):
            raise ValueError(f"node(s) {sorted(both)} are both voter and learner")
        members = set(self.voters) | set(self.learners)
        for node, address in self.addresses:
            if node not in members:
                raise ValueError(f"an address for node {node}, which is not a member")
            if not address or len(address.encode()) > _MAX_ADDRESS_BYTES:
                raise ValueError(f"node {node}'s address must be 1 to {_MAX_ADDRESS_BYTES} bytes")
        if len({node for node, _ in self.addresses}) != len(self.addresses):
            raise ValueError("a member has two addresses")
        clients: set[int] = set()
        for client, acked_below, last_index, results in self.sessions:
            _check_session(client, acked_below, last_index, results, self.index)
            if client in clients:
                raise ValueError(f"client {client} has two sessions")
            clients.add(client)


def _check_session(
    client: int,
    acked_below: int,
    last_index: int,
    results: tuple[tuple[int, bytes | None, str | None], ...],
    index: int,
) -> None:
    _check_int(client, "client id", 1)
    _check_int(acked_below, f"client {client}'s acked_below", 0)
    # A session is recorded by applying an entry, so no later than the snapshot's last entry.
    _check_int(last_index, f"client {client}'s last_index", 1, index)
    previous = 0
    for row in results:
        if len(row) != 3:
            raise ValueError(f"client {client}: a result row is (sequence, result, error), not {row!r}")
        sequence, result, error = row
        _check_int(sequence, f"client {client}'s sequence", previous + 1)
        previous = sequence
        if result is not None and not isinstance(result, bytes):
            raise ValueError(f"client {client} sequence {sequence}: result must be bytes or None")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"client {client} sequence {sequence}: error must be str or None")


def _length_prefixed(data: bytes, what: str) -> bytes:
    if len(data) > _U32_MAX:
        raise ValueError(f"{what} of {len(data)} bytes is too large for a snapshot")
    return _U32.pack(len(data)) + data


def encode_meta(meta: SnapshotMeta) -> bytes:
    """Encodes ``meta`` in the layout described in the module docstring.

    Raises ``ValueError`` if an error string is not encodable as UTF-8 or a part is too large.
    """
    parts = [_U64.pack(meta.index), _U64.pack(meta.term)]
    for ids in (meta.voters, meta.learners):
        parts.append(_U32.pack(len(ids)))
        parts.append(struct.pack(f"<{len(ids)}Q", *ids))
    parts.append(_U32.pack(len(meta.sessions)))
    for client, acked_below, last_index, results in meta.sessions:
        parts.append(_SESSION.pack(client, acked_below, last_index, len(results)))
        for sequence, result, error in results:
            flags = (_HAS_RESULT if result is not None else 0) | (_HAS_ERROR if error is not None else 0)
            parts.append(_RESULT.pack(sequence, flags))
            if result is not None:
                parts.append(_length_prefixed(result, "a session result"))
            if error is not None:
                parts.append(_length_prefixed(error.encode("utf-8"), "a session error"))
    parts.append(_U32.pack(len(meta.addresses)))
    for node, address in meta.addresses:
        parts.append(_U64.pack(node))
        parts.append(_length_prefixed(address.encode(), "an address"))
    return b"".join(parts)


class _Reader:
    """Reads the meta layout from a buffer; every read is bounds-checked first."""

    def __init__(self, data: bytes, source: str, path: Path | None, base: int) -> None:
        self.data = data
        self.pos = 0
        self.source = source
        self.path = path
        self.base = base  # file offset of data[0], so errors name offsets in the file

    def fail(self, problem: str, pos: int | None = None) -> SnapshotError:
        offset = self.base + (self.pos if pos is None else pos)
        return SnapshotError(f"{self.source}: {problem} at byte {offset}", path=self.path, offset=offset)

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            left = len(self.data) - self.pos
            raise self.fail(f"{what} needs {n} bytes but only {left} remain")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, fmt: struct.Struct, what: str, low: int = 0) -> int:
        start = self.pos
        (value,) = fmt.unpack(self.take(fmt.size, what))
        if value < low:
            raise self.fail(f"{what} is {value}, must be at least {low}", start)
        return cast(int, value)

    def count(self, what: str, min_item_size: int) -> int:
        """A u32 count of items, refused if the remaining bytes cannot hold that many."""
        start = self.pos
        n = self.uint(_U32, f"{what} count")
        if n * min_item_size > len(self.data) - self.pos:
            raise self.fail(
                f"{what} count {n} does not fit in the {len(self.data) - self.pos} bytes left", start
            )
        return n

    def ids(self, what: str) -> tuple[int, ...]:
        return tuple(self.uint(_U64, f"{what} id", 1) for _ in range(self.count(what, _U64.size)))

    def result(self, client: int) -> tuple[int, bytes | None, str | None]:
        sequence = self.uint(_U64, f"client {client}'s sequence", 1)
        flags_at = self.pos
        flags = self.uint(_U8, "result flags")
        if flags & ~(_HAS_RESULT | _HAS_ERROR):
            raise self.fail(f"unknown result flags {flags:#04x}", flags_at)
        result = error = None
        if flags & _HAS_RESULT:
            result = self.take(self.uint(_U32, "result length"), "result")
        if flags & _HAS_ERROR:
            error_at = self.pos + _U32.size
            raw = self.take(self.uint(_U32, "error length"), "error")
            try:
                error = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail(f"error text is not UTF-8 ({exc.reason})", error_at + exc.start) from None
        return sequence, result, error

    def address(self) -> tuple[int, str]:
        node = self.uint(_U64, "member id", 1)
        at = self.pos + _U32.size
        raw = self.take(self.uint(_U32, "address length"), "address")
        try:
            return node, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"address is not UTF-8 ({exc.reason})", at + exc.start) from None

    def session(self) -> SessionRow:
        client = self.uint(_U64, "client id", 1)
        acked_below = self.uint(_U64, "acked_below")
        last_index = self.uint(_U64, "last index", 1)
        # Smallest result: sequence and flags with neither result nor error.
        n = self.count(f"client {client}'s result", _RESULT.size)
        return client, acked_below, last_index, tuple(self.result(client) for _ in range(n))


def _decode_meta(data: bytes, source: str, path: Path | None, base: int) -> SnapshotMeta:
    r = _Reader(data, source, path, base)
    index = r.uint(_U64, "index", 1)
    term = r.uint(_U64, "term", 1)
    voters = r.ids("voter")
    learners = r.ids("learner")
    sessions = tuple(r.session() for _ in range(r.count("session", _SESSION.size)))
    addresses = tuple(r.address() for _ in range(r.count("address", _U64.size + _U32.size)))
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} unexpected bytes after the metadata")
    try:
        return SnapshotMeta(index, term, voters, learners, sessions, addresses)
    except ValueError as exc:  # well-formed bytes, inconsistent content (duplicates and the like)
        raise SnapshotError(f"{source}: invalid metadata: {exc}", path=path) from None


def decode_meta(data: bytes, *, source: str = "snapshot metadata") -> SnapshotMeta:
    """Decodes what :func:`encode_meta` wrote. ``source`` names the buffer in error messages.

    Raises :class:`SnapshotError` on anything malformed: a length or count running past the
    buffer, trailing bytes, zero ids, index or term, unknown flags, invalid UTF-8, or content
    :class:`SnapshotMeta` refuses.
    """
    return _decode_meta(bytes(data), source, None, 0)


# --- files ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """A published snapshot file and where its parts lie."""

    path: Path
    meta: SnapshotMeta
    data_offset: int
    """Offset of the state machine's first byte."""
    data_len: int
    """Number of state machine bytes."""
    size: int
    """Size of the whole file."""
    file_sha256: bytes | None = field(default=None, compare=False)
    """SHA-256 of the whole file (trailer included), when known without another pass: after
    ``commit`` and after ``load(verify=True)``. The transfer layer sends it along."""


def _final_name(index: int, term: int) -> str:
    _check_int(index, "index", 1)
    _check_int(term, "term", 1)
    return f"snap-{index:020d}-{term:020d}.snap"


def fsync_directory(directory: Path) -> None:
    """Makes a rename or creation in ``directory`` durable (Windows cannot open a directory)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _on_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _HashingSink(io.BufferedIOBase):
    """The write-only stream handed to ``state_machine.snapshot``: every byte goes to the temp
    file and through the hash on its way, so commit never reads the data back, and to the disk a
    step at a time (``_core.WriteBehind``), so that commit's fsync is not one burst of the whole
    state that the log's syncs, this node's and its neighbours' on the same disk, wait behind."""

    def __init__(self, file: BinaryIO, hasher: _core.Sha256) -> None:
        super().__init__()
        self._file = file
        self._hasher = hasher
        self.count = 0
        self._behind = _core.WriteBehind(file.fileno(), file.tell())
        self._unsent = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a snapshot sink that is committed or aborted")
        with memoryview(data) as view, view.cast("B") as octets:
            self._file.write(octets)
            self._hasher.update(data if type(data) is bytes else octets.tobytes())
            self.count += len(octets)
            self._unsent += len(octets)
            if self._unsent >= _core.WriteBehind.STEP:
                self._file.flush()
                # An async state machine writes its snapshot from the event loop's thread, which
                # must not wait for the disk: there the writeback only starts.
                self._behind.wrote(self._file.tell(), wait=not _on_event_loop())
                self._unsent = 0
            return len(octets)

    def write_kv_pieces(self, pieces: _core.KvSnapshotPieces, size: int) -> bool:
        """Writes what is left of a frozen built-in store straight from Rust, with the GIL
        released for the whole write (``KvSnapshotPieces.write_to``); False, having written
        nothing, where that is not available (off POSIX)."""
        write_to = getattr(pieces, "write_to", None)
        if self.closed or write_to is None:
            return False
        self._file.flush()
        self.count += write_to(self._file.fileno(), self._hasher, size)
        self._file.seek(0, os.SEEK_END)  # the buffered file learns where the descriptor is now
        return True

    def close(self) -> None:
        # Closing the sink (a state machine may) ends writing; the file stays the writer's.
        super().close()


class SnapshotWriter:
    """A snapshot being written, returned by :meth:`SnapshotStore.create`.

    Hand :attr:`sink` to ``state_machine.snapshot``, then call :meth:`commit`. Used as a context
    manager, leaving the block without a commit (by an exception or otherwise) aborts.
    """

    def __init__(self, directory: Path, meta: SnapshotMeta) -> None:
        self.meta = meta
        self.final_path = directory / _final_name(meta.index, meta.term)
        stem = self.final_path.name.removesuffix(".snap")
        self.temp_path = directory / f"{stem}.{secrets.token_hex(8)}.tmp"
        meta_bytes = encode_meta(meta)
        if len(meta_bytes) > _U32_MAX:
            raise ValueError(f"snapshot metadata of {len(meta_bytes)} bytes is too large")
        self._data_offset = _HEADER.size + len(meta_bytes)
        self._hasher = _core.Sha256()
        self._file: BinaryIO | None = open(self.temp_path, "xb")  # noqa: SIM115 (closed by commit/abort)
        self._done = False
        self._sink = _HashingSink(self._file, self._hasher)
        self.sink: BinaryIO = cast(BinaryIO, self._sink)
        """Write-only stream for the state machine's bytes; ``write`` returns the count."""
        try:
            head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta_bytes))
            for part in (head, meta_bytes):
                self._file.write(part)
                self._hasher.update(part)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> SnapshotFile:
        """Writes the trailer, fsyncs the file, renames it to its final name and fsyncs the
        directory. On failure the temp file is removed and the error raised."""
        if self._done or self._file is None:
            raise ValueError(f"snapshot {self.final_path} was already committed or aborted")
        file = self._file
        try:
            self._sink.close()
            data_len = self._sink.count
            length = _DATA_LEN.pack(data_len)
            self._hasher.update(length)
            digest = self._hasher.digest()
            whole = self._hasher.copy()
            whole.update(digest)
            file.write(length + digest)
            file.flush()
            os.fsync(file.fileno())
            size = file.tell()
            file.close()
            os.replace(self.temp_path, self.final_path)
            self._done = True
            fsync_directory(self.final_path.parent)
        except BaseException:
            self.abort()
            raise
        self._file = None
        return SnapshotFile(self.final_path, self.meta, self._data_offset, data_len, size, whole.digest())

    def abort(self) -> None:
        """Discards the snapshot: closes and removes the temp file. Idempotent; does nothing
        after a successful commit."""
        self._sink.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._done:
            self._done = True
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class _DataWindow(io.RawIOBase):
    """A read-only, seekable view of bytes ``[start, end)`` of a file: the state machine's data,
    never the trailer after it."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        super().__init__()
        self._path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        self._start = start
        self._end = end
        self._pos = start
        self._file.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("read from a closed snapshot data stream")
        want = min(len(buffer), self._end - self._pos)
        if want <= 0:
            return 0
        with memoryview(buffer) as view, view.cast("B") as octets:
            got = self._file.readinto(octets[:want]) or 0
        if got == 0:  # the file shrank under us: never pass off a short read as the end of the data
            raise SnapshotError(
                f"snapshot file {self._path}: ends at byte {self._pos}, before the end of its data "
                f"at byte {self._end}",
                path=self._path,
                offset=self._pos,
            )
        self._pos += got
        return got

    def readall(self) -> bytes:
        # One read of the rest instead of RawIOBase's growing loop of small reads.
        out = bytearray(max(self._end - self._pos, 0))
        view = memoryview(out)
        filled = 0
        while filled < len(out):
            filled += self.readinto(view[filled:])
        return bytes(out)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: self._start, io.SEEK_CUR: self._pos, io.SEEK_END: self._end}[whence]
        target = base + offset
        if target < self._start:
            raise ValueError(f"negative seek position {target - self._start}")
        self._pos = target
        self._file.seek(target)
        return target - self._start

    def tell(self) -> int:
        return self._pos - self._start

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class SnapshotStore:
    """The snapshot files of one node, in one directory.

    All methods do blocking file I/O; call them from a worker thread. Errors reading the disk
    are raised as ``OSError``; a file that is not a valid snapshot raises :class:`SnapshotError`.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Opens (creating it if needed) the snapshot directory."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> list[Path]:
        """Removes leftovers of a crash: temp files of unfinished creates and the ``.partial`` /
        ``.progress`` files of unfinished transfers. Returns the removed paths.

        Call it at start-up, before any create or transfer of this process begins: it would
        remove their files too.
        """
        removed = []
        for path in sorted(self.directory.iterdir()):
            if _TEMP_RE.fullmatch(path.name) or _TRANSFER_RE.fullmatch(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def create(self, meta: SnapshotMeta) -> SnapshotWriter:
        """Starts writing a snapshot with ``meta``; write the state to the writer's ``sink``,
        then :meth:`SnapshotWriter.commit`. A committed snapshot replaces one with the same index
        and term."""
        return SnapshotWriter(self.directory, meta)

    def incoming_path(self, index: int, term: int) -> Path:
        """The final path for a snapshot of ``(index, term)`` received from the leader, to give
        to ``SnapshotAssembler``; the same name :meth:`create` publishes under."""
        return self.directory / _final_name(index, term)

    def load(self, path: str | os.PathLike[str], *, verify: bool = True) -> SnapshotFile:
        """Parses a snapshot file's header, metadata and trailer, and with ``verify`` also checks
        its SHA-256 (reading the whole file). Raises :class:`SnapshotError` on any fault."""
        path = Path(path)
        what = f"snapshot file {path}"
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            minimum = _HEADER.size + _TRAILER.size
            if size < minimum:
                raise SnapshotError(
                    f"{what}: truncated: {size} bytes, a snapshot has at least {minimum}",
                    path=path,
                    offset=size,
                )
            magic, version, meta_len = _HEADER.unpack(_read_exact(file, 0, _HEADER.size, path))
            if magic != MAGIC:
                raise SnapshotError(
                    f"{what}: not a dengine snapshot (bad magic {magic!r} at byte 0)", path=path
                )
            if version != FORMAT_VERSION:
                raise SnapshotError(
                    f"{what}: unknown format version {version} at byte 8 (this dengine reads "
                    f"version {FORMAT_VERSION})",
                    path=path,
                    offset=8,
                )
            data_offset = _HEADER.size + meta_len
            if data_offset + _TRAILER.size > size:
                raise SnapshotError(
                    f"{what}: metadata length {meta_len} at byte 12 runs past the end of the "
                    f"{size}-byte file (truncated?)",
                    path=path,
                    offset=12,
                )
            trailer_at = size - _TRAILER.size
            data_len, digest = _TRAILER.unpack(_read_exact(file, trailer_at, _TRAILER.size, path))
            if data_len != trailer_at - data_offset:
                raise SnapshotError(
                    f"{what}: the trailer at byte {trailer_at} records {data_len} data bytes but the "
                    f"file holds {trailer_at - data_offset}: truncated, extended or a damaged trailer",
                    path=path,
                    offset=trailer_at,
                )
            meta = _decode_meta(_read_exact(file, _HEADER.size, meta_len, path), what, path, _HEADER.size)
            whole = _verify_hash(file, trailer_at + _DATA_LEN.size, digest, path) if verify else None
        named = _FINAL_RE.fullmatch(path.name)
        if named and (int(named[1]), int(named[2])) != (meta.index, meta.term):
            raise SnapshotError(
                f"{what}: its name says index {int(named[1])} term {int(named[2])} but its metadata "
                f"says index {meta.index} term {meta.term}",
                path=path,
            )
        return SnapshotFile(path, meta, data_offset, data_len, size, whole)

    def _published(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if _FINAL_RE.fullmatch(p.name))

    def list(self) -> list[SnapshotFile]:
        """All published snapshots, oldest first by ``(index, term)``, headers checked but not
        hashes. A file with a snapshot's name that does not parse raises :class:`SnapshotError`
        rather than being skipped; files with other names are ignored."""
        # Zero-padded names sort like (index, term).
        return [self.load(path, verify=False) for path in self._published()]

    def latest(self, *, verify: bool = True) -> SnapshotFile | None:
        """The snapshot with the highest ``(index, term)``, verified by hash if ``verify``, or
        None if there is none. A corrupt newest snapshot raises rather than falling back."""
        snaps = self.list()
        if not snaps:
            return None
        return self.load(snaps[-1].path, verify=True) if verify else snaps[-1]

    # builtins.list: inside this class, plain ``list`` names the method above.
    def prune(self, keep: int, pinned: Collection[Path] = ()) -> builtins.list[Path]:
        """Deletes all but the newest ``keep`` (at least 1) snapshots, except those in
        ``pinned`` (being sent or restored); returns what it deleted. A file that is gone
        already (another prune) is not an error."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        # By name alone: reading every file's metadata (session tables included) on each prune
        # cost a few percent of a busy node's time, and an old file that no longer parsed would
        # fail every prune after it.
        doomed = [path for path in self._published()[:-keep] if path not in pinned]
        for path in doomed:
            path.unlink(missing_ok=True)
        return doomed

    def open_data(self, snap: SnapshotFile) -> BinaryIO:
        """A readable, seekable binary stream over exactly the state machine's bytes of ``snap``
        (end of file where they end, never the trailer), for ``state_machine.restore``. The caller
        closes it. Load the snapshot with ``verify=True`` first: this stream does not re-check."""
        raw = _DataWindow(snap.path, snap.data_offset, snap.data_offset + snap.data_len)
        return io.BufferedReader(raw, buffer_size=_HASH_PIECE)

    def total_bytes(self) -> int:
        """Bytes of all published snapshot files together."""
        return sum(path.stat().st_size for path in self._published())


def _read_exact(file: io.BufferedReader, offset: int, n: int, path: Path) -> bytes:
    file.seek(offset)
    data = file.read(n)
    if len(data) != n:
        raise SnapshotError(
            f"snapshot file {path}: ends at byte {offset + len(data)}, expected {n} bytes from byte {offset}",
            path=path,
            offset=offset + len(data),
        )
    return data


def _verify_hash(file: io.BufferedReader, hashed_len: int, expected: bytes, path: Path) -> bytes:
    """Checks the trailer's digest; returns the whole file's SHA-256 (digest included)."""
    hasher = hashlib.sha256()
    buffer = bytearray(_HASH_PIECE)
    view = memoryview(buffer)
    file.seek(0)
    done = 0
    while done < hashed_len:
        got = file.readinto(view[: min(_HASH_PIECE, hashed_len - done)])
        if not got:
            raise SnapshotError(
                f"snapshot file {path}: ends at byte {done} while hashing", path=path, offset=done
            )
        hasher.update(view[:got])
        done += got
    if hasher.digest() != expected:
        raise SnapshotError(
            f"snapshot file {path}: SHA-256 mismatch, the file is corrupt (the trailer at byte "
            f"{hashed_len} records {expected.hex()}, the content hashes to {hasher.hexdigest()})",
            path=path,
            offset=hashed_len,
        )
    hasher.update(expected)
    return hasher.digest()
