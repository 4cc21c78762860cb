"""The built-in replicated key-value state machine (``dengine serve`` and the simulator's workload).

Clients turn operations into command bytes with the ``encode_*`` functions; those bytes are what the
Raft log replicates, and :meth:`KVStateMachine.apply` executes them on every replica in log order.
Keys and values are arbitrary bytes; keys are ordered bytewise (unsigned lexicographic), so prefix
ranges come back sorted.

Revisions work like etcd's: a store-wide ``revision`` counter starts at 0 and grows by one for each
command that changes state (a put always; a delete only when the key existed; a compare-and-swap
only when it swapped; a delete-range only when it removed at least one key, and then once for all
of them). Every key carries ``create_revision``, ``mod_revision`` and ``version`` (puts since it was
created). A delete followed by a put starts the key afresh at version 1.

Limits (enforced by the encoders, the decoder and snapshot restore): a key is 1 to
:data:`MAX_KEY_SIZE` (64 KiB) bytes, a value 0 to :data:`MAX_VALUE_SIZE` (16 MiB) bytes, a
delete-range prefix 0 to :data:`MAX_KEY_SIZE` bytes.

Command format (all integers little-endian; ``field`` = u32 length followed by that many bytes)::

    u8 format version (1) | u8 op | op-specific fields, and nothing after them
    op 1 PUT           field key, field value
    op 2 DELETE        field key
    op 3 CAS           field key, u8 has_expected (0: key must be absent, 1: a field follows),
                       [field expected], field value
    op 4 DELETE_RANGE  field prefix (may be empty: every key)
    op 5 PUT_PREV      field key, field value: a put whose result carries the key-value it
                       replaced (etcd's prev_kv); a plain put's result never does

Result format (what ``apply`` returns; read it with :func:`decode_result`)::

    u8 format version (1) | u8 flags (bit 0 ok, bit 1 prev present, bit 2 error present;
    other bits zero) | u64 revision | u64 deleted | [kv prev] | [field error, UTF-8]
    kv = u64 create_revision | u64 mod_revision | u64 version | u32 key length |
         u32 value length | key | value

Snapshot format (see :meth:`KVStateMachine.snapshot`)::

    8 bytes magic b"DNGKVSN\\x00" | u32 format version (1) | u64 revision | u64 last_applied |
    u64 entry count | entry count x kv (the layout above), strictly increasing key order |
    u32 CRC-32 (zlib) of every preceding byte, magic included

Nothing here ever unpickles or evaluates input: every decoder checks each length against the
limits and the remaining bytes, and rejects unknown versions, ops, flags and trailing bytes.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final, Literal, TypeAlias

from dengine import _core
from dengine._core import KVCommandError, KVSnapshotError
from dengine.errors import DengineError

__all__ = [
    "DEFAULT_HISTORY",
    "FORMAT_VERSION",
    "MAX_BATCH_OPERATIONS",
    "MAX_KEY_SIZE",
    "MAX_VALUE_SIZE",
    "SNAPSHOT_MAGIC",
    "WATCH_PROGRESS_INTERVAL_S",
    "CasCommand",
    "DeleteCommand",
    "DeleteRangeCommand",
    "KVCommand",
    "KVCommandError",
    "KVCompactedError",
    "KVResult",
    "KVResultError",
    "KVSnapshotCancelledError",
    "KVSnapshotError",
    "KVSnapshotWriter",
    "KVStateMachine",
    "KeyValue",
    "PutCommand",
    "WatchEvent",
    "decode_command",
    "decode_result",
    "encode_cas",
    "encode_command",
    "encode_delete",
    "encode_delete_range",
    "encode_put",
    "new_key_value",
    "unpack_result",
]

_log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
"""Version byte leading every command and result; bumped only with a migration plan."""

MAX_KEY_SIZE: Final = 64 * 1024
"""Largest key (and delete-range prefix) in bytes: keys are kept in memory and sorted, so keep them small."""

MAX_VALUE_SIZE: Final = 16 * 1024 * 1024
"""Largest value in bytes: one command is one log entry, and every replica holds it in memory."""

MAX_BATCH_OPERATIONS: Final = 10_000
"""Most operations in one ``Batch`` request (or one batch on a batch stream): a node refuses a
larger one whole (RESOURCE_EXHAUSTED), so a client's ``max_batch`` may not exceed it."""

DEFAULT_HISTORY: Final = 10_000
"""Watch events kept in memory by default, so a watcher that fell briefly behind can catch up."""

WATCH_PROGRESS_INTERVAL_S: Final = 1.0
"""Seconds between the progress notices a node that knows a leader sends on each watch stream;
a client hearing nothing for several of them moves the watch to another node."""

SNAPSHOT_MAGIC: Final = b"DNGKVSN\x00"
"""First eight bytes of every KV snapshot, so a wrong file is refused before anything is parsed."""

_OP_PUT: Final = 1
_OP_DELETE: Final = 2
_OP_CAS: Final = 3
_OP_DELETE_RANGE: Final = 4
_OP_PUT_PREV: Final = 5

_FLAG_OK: Final = 0x01
_FLAG_PREV: Final = 0x02
_FLAG_ERROR: Final = 0x04
_KNOWN_FLAGS: Final = _FLAG_OK | _FLAG_PREV | _FLAG_ERROR

_U32: Final = struct.Struct("<I")
_RESULT_HEAD: Final = struct.Struct("<BBQQ")  # version, flags, revision, deleted
_KV_HEAD: Final = struct.Struct("<QQQII")  # create_revision, mod_revision, version, key len, value len
_RESULT_PREV_HEAD: Final = struct.Struct("<BBQQQQQII")  # _RESULT_HEAD then _KV_HEAD

_WRITE_BUFFER: Final = 1 << 20  # snapshot bytes gathered before each sink.write
# A background writer hands the GIL over at each piece (building one and writing it release it)
# and then waits up to a switch interval to get it back from a busy apply loop: bigger pieces,
# fewer waits.
_BACKGROUND_WRITE_BUFFER: Final = 4 << 20
_READ_PIECE: Final = 1 << 20  # snapshot bytes read and validated at a time by restore

# KVCommandError (a ValueError: always bad input, raised by the encoders and decode_command, never
# by apply, which answers malformed log entries with an error result) and KVSnapshotError (a
# DengineError: a corrupt, truncated or unknown snapshot, with the state left untouched) are
# created by the Rust extension, which raises them, and re-exported here and by dengine.errors.


class KVResultError(ValueError):
    """Bytes given to :func:`decode_result` are not a well-formed KV result."""


class KVSnapshotCancelledError(DengineError):
    """A background snapshot was abandoned (``cancel()`` or a ``restore``) before it was fully written.

    Whatever the writer already gave the sink is an incomplete snapshot: discard it.
    """


class KVCompactedError(DengineError):
    """The watch history no longer holds the events after the requested revision.

    The watcher must resynchronise: read the current state (``range``) and resume from ``revision``.
    """


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key with its value and revision metadata, as stored at some revision.

    ``create_revision`` is the revision of the put that created the key, ``mod_revision`` that of
    its latest put, and ``version`` the number of puts since creation. A delete event's ``kv`` is a
    tombstone: empty value, ``mod_revision`` = the deletion's revision and the other fields 0.
    """

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True, slots=True)
class KVResult:
    """What one applied command did; ``apply`` returns it encoded, :func:`decode_result` decodes it.

    - ``ok``: put always True; delete True if the key existed; cas True if it swapped; delete-range
      True; False for a malformed command (then ``error`` says why).
    - ``revision``: the store revision after the command (unchanged when nothing changed).
    - ``prev``: the key as it was just before the command, or None if absent. For a failed cas
      this is the current value and ``mod_revision``, so a client can retry without a read.
      Always None for delete-range and errors.
    - ``deleted``: keys removed (delete: 0 or 1; delete-range: any count).
    - ``error``: why a malformed command was refused; None otherwise.
    """

    ok: bool
    revision: int
    prev: KeyValue | None = None
    deleted: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change to one key, delivered to subscribers and kept in the watch history.

    ``kv`` is the key after the change (a tombstone for a delete, see :class:`KeyValue`), ``prev``
    the key before it (None when a put created it). All events of one command share its ``revision``.
    """

    type: Literal["put", "delete"]
    kv: KeyValue
    prev: KeyValue | None
    revision: int


@dataclass(frozen=True, slots=True)
class PutCommand:
    """Set ``key`` to ``value``, creating the key if needed; with ``prev_kv``, the result
    carries the key-value it replaced."""

    key: bytes
    value: bytes
    prev_kv: bool = False


@dataclass(frozen=True, slots=True)
class DeleteCommand:
    """Remove ``key`` if present."""

    key: bytes


@dataclass(frozen=True, slots=True)
class CasCommand:
    """Set ``key`` to ``value`` only if its current value equals ``expected`` (None: key absent)."""

    key: bytes
    expected: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class DeleteRangeCommand:
    """Remove every key starting with ``prefix`` (b"" removes every key) in one revision."""

    prefix: bytes


KVCommand: TypeAlias = PutCommand | DeleteCommand | CasCommand | DeleteRangeCommand
"""Any decoded KV command."""


# Frozen dataclasses pay for immutability with a slow __init__ (one object.__setattr__ per field).
# Reads and answers build a KeyValue per key, so they fill the slots directly: about half the
# cost, same object.
_kv_slots = KeyValue.__dict__
_set_key = _kv_slots["key"].__set__
_set_value = _kv_slots["value"].__set__
_set_create = _kv_slots["create_revision"].__set__
_set_mod = _kv_slots["mod_revision"].__set__
_set_version = _kv_slots["version"].__set__
del _kv_slots


def new_key_value(
    key: bytes, value: bytes, create_revision: int, mod_revision: int, version: int
) -> KeyValue:
    """Equivalent to ``KeyValue(...)``, faster, for hot paths (apply, the client's answers)."""
    kv: KeyValue = object.__new__(KeyValue)
    _set_key(kv, key)
    _set_value(kv, value)
    _set_create(kv, create_revision)
    _set_mod(kv, mod_revision)
    _set_version(kv, version)
    return kv


# ---------------------------------------------------------------------------------------------
# Command encoding


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what} must be bytes, not {type(data).__name__}")


def encode_put(key: bytes, value: bytes, *, prev_kv: bool = False) -> bytes:
    """Encodes "set ``key`` to ``value``" as command bytes for the Raft log. With ``prev_kv``
    the result reports the key-value the put replaced (``KVResult.prev``); without it, never:
    every replica would otherwise build and keep a copy of the old value for each write."""
    op = _OP_PUT_PREV if prev_kv else _OP_PUT
    return _core.encode_kv_command(op, _as_bytes(key, "key"), None, _as_bytes(value, "value"))


def encode_delete(key: bytes) -> bytes:
    """Encodes "remove ``key``" as command bytes for the Raft log."""
    return _core.encode_kv_command(_OP_DELETE, _as_bytes(key, "key"), None, b"")


def encode_cas(key: bytes, expected: bytes | None, value: bytes) -> bytes:
    """Encodes a compare-and-swap: set ``key`` to ``value`` if its value equals ``expected``.

    ``expected=None`` means "only if the key is absent" (create-if-missing), which differs from
    ``expected=b""`` ("only if the key exists with an empty value").
    """
    key = _as_bytes(key, "key")
    value = _as_bytes(value, "value")
    if expected is not None:
        expected = _as_bytes(expected, "expected value")
    return _core.encode_kv_command(_OP_CAS, key, expected, value)


def encode_delete_range(prefix: bytes) -> bytes:
    """Encodes "remove every key starting with ``prefix``"; ``b""`` removes every key."""
    return _core.encode_kv_command(_OP_DELETE_RANGE, _as_bytes(prefix, "prefix"), None, b"")


def encode_command(command: KVCommand) -> bytes:
    """Encodes a command object; the inverse of :func:`decode_command`."""
    if isinstance(command, PutCommand):
        return encode_put(command.key, command.value, prev_kv=command.prev_kv)
    if isinstance(command, DeleteCommand):
        return encode_delete(command.key)
    if isinstance(command, CasCommand):
        return encode_cas(command.key, command.expected, command.value)
    if isinstance(command, DeleteRangeCommand):
        return encode_delete_range(command.prefix)
    raise TypeError(f"not a KV command: {type(command).__name__}")


# ---------------------------------------------------------------------------------------------
# Command decoding


def decode_command(data: bytes | bytearray | memoryview) -> KVCommand:
    """Decodes and validates command bytes; raises :class:`KVCommandError` saying what is wrong.

    A leader can call it on client input before proposing, so bad commands never reach the log.
    It is the parser ``apply`` uses, so it accepts exactly what replicas apply.
    """
    op, key, expected, value = _core.parse_kv_command(_as_bytes(data, "command"))
    if op in (_OP_PUT, _OP_PUT_PREV):
        return PutCommand(key, value, op == _OP_PUT_PREV)
    if op == _OP_DELETE:
        return DeleteCommand(key)
    if op == _OP_CAS:
        return CasCommand(key, expected, value)
    return DeleteRangeCommand(key)


# ---------------------------------------------------------------------------------------------
# Results


_result_slots = KVResult.__dict__
_set_ok = _result_slots["ok"].__set__
_set_revision = _result_slots["revision"].__set__
_set_prev = _result_slots["prev"].__set__
_set_deleted = _result_slots["deleted"].__set__
_set_error = _result_slots["error"].__set__
del _result_slots


def _new_result(ok: bool, revision: int, prev: KeyValue | None, deleted: int) -> KVResult:
    """Equivalent to ``KVResult(ok, revision, prev, deleted)``, faster (see :func:`new_key_value`)."""
    result: KVResult = object.__new__(KVResult)
    _set_ok(result, ok)
    _set_revision(result, revision)
    _set_prev(result, prev)
    _set_deleted(result, deleted)
    _set_error(result, None)
    return result


ResultFields: TypeAlias = tuple[bool, int, int, bytes | None, bytes, int, int, int]
"""A result as one flat tuple: ok, revision, deleted, then the previous key-value's key (None
when absent), value, create_revision, mod_revision and version."""

_NO_PREV: Final = (None, b"", 0, 0, 0)


def unpack_result(data: bytes) -> ResultFields | None:
    """The fields of a well-formed result that carries no error, without building objects (the
    leader answers every write from them); None for anything else, which :func:`decode_result`
    decodes or explains."""
    size = len(data)
    if size == _RESULT_HEAD.size:
        version, flags, revision, deleted = _RESULT_HEAD.unpack(data)
        if version == FORMAT_VERSION and flags & ~_FLAG_OK == 0:
            return (flags == _FLAG_OK, revision, deleted, *_NO_PREV)
    elif size >= _RESULT_PREV_HEAD.size:
        head = _RESULT_PREV_HEAD.unpack_from(data)
        version, flags, revision, deleted, create, mod, ver, key_len, value_len = head
        if (
            version == FORMAT_VERSION
            and flags & ~_FLAG_OK == _FLAG_PREV
            and key_len <= MAX_KEY_SIZE
            and value_len <= MAX_VALUE_SIZE
            and _RESULT_PREV_HEAD.size + key_len + value_len == size
        ):
            key_end = _RESULT_PREV_HEAD.size + key_len
            key = data[_RESULT_PREV_HEAD.size : key_end]
            return (flags & _FLAG_OK == _FLAG_OK, revision, deleted, key, data[key_end:], create, mod, ver)
    return None


def decode_result(data: bytes | bytearray | memoryview) -> KVResult:
    """Decodes the bytes ``apply`` returned (e.g. after they travelled to a client)."""
    buf = _as_bytes(data, "result")
    fields = unpack_result(buf)
    if fields is None:  # an error result, or malformed bytes: the checked way says which
        return _decode_result_checked(buf)
    ok, revision, deleted, key, value, create, mod, version = fields
    prev = None if key is None else new_key_value(key, value, create, mod, version)
    return _new_result(ok, revision, prev, deleted)


def _decode_result_checked(buf: bytes) -> KVResult:
    """Every result, with a precise error for each way one can be malformed."""
    size = len(buf)
    if size < _RESULT_HEAD.size:
        raise KVResultError(f"result truncated: {size} bytes, the header needs {_RESULT_HEAD.size}")
    version, flags, revision, deleted = _RESULT_HEAD.unpack_from(buf, 0)
    if version != FORMAT_VERSION:
        raise KVResultError(f"unsupported result format version {version}; this build reads {FORMAT_VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise KVResultError(f"result has unknown flag bits {flags & ~_KNOWN_FLAGS:#04x}")
    pos = _RESULT_HEAD.size
    prev: KeyValue | None = None
    if flags & _FLAG_PREV:
        if pos + _KV_HEAD.size > size:
            raise KVResultError(f"result truncated at byte {pos}: the previous key-value header is missing")
        create, mod, ver, key_len, value_len = _KV_HEAD.unpack_from(buf, pos)
        pos += _KV_HEAD.size
        if key_len > MAX_KEY_SIZE or value_len > MAX_VALUE_SIZE:
            raise KVResultError("result: previous key or value is over the size limit")
        if pos + key_len + value_len > size:
            raise KVResultError(f"result truncated at byte {pos}: the previous key-value is cut short")
        key = buf[pos : pos + key_len]
        pos += key_len
        value = buf[pos : pos + value_len]
        pos += value_len
        prev = KeyValue(key, value, create, mod, ver)
    error: str | None = None
    if flags & _FLAG_ERROR:
        if pos + 4 > size:
            raise KVResultError(f"result truncated at byte {pos}: the error length is missing")
        (length,) = _U32.unpack_from(buf, pos)
        pos += 4
        if pos + length > size:
            raise KVResultError(f"result truncated at byte {pos}: the error message is cut short")
        try:
            error = buf[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KVResultError(f"result error message is not UTF-8: {exc}") from None
        pos += length
    if pos != size:
        raise KVResultError(f"result has {size - pos} trailing bytes after byte {pos}")
    return KVResult(bool(flags & _FLAG_OK), revision, prev, deleted, error)


# ---------------------------------------------------------------------------------------------
# The state machine


class _View:
    """The open background snapshot's shared flag (see ``KVStateMachine.begin_snapshot``)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class KVSnapshotWriter:
    """Writes the state frozen by :meth:`KVStateMachine.begin_snapshot`, on any thread, once.

    ``writer(sink)`` streams to ``sink`` exactly the bytes :meth:`KVStateMachine.snapshot` would
    have written at the freeze, while the store's own thread keeps applying. When it returns or
    raises, the view is released. ``cancel()`` abandons the view without writing. A writer
    dropped without either is released when it is garbage-collected.
    """

    def __init__(self, store: KVStateMachine, view: _View, pieces: _core.KvSnapshotPieces) -> None:
        """Internal: use :meth:`KVStateMachine.begin_snapshot`."""
        self._view = view
        self._pieces: _core.KvSnapshotPieces | None = pieces
        self._revision = pieces.revision
        self._last_applied = pieces.last_applied
        self._used = False
        # Calling a finalize runs it at most once, even from two threads at the same time.
        self._release = weakref.finalize(self, store._end_view, view)
        self._release.atexit = False

    @property
    def revision(self) -> int:
        """The store revision at the freeze, which the snapshot records."""
        return self._revision

    @property
    def last_applied(self) -> int:
        """The log index of the last command applied before the freeze, which the snapshot records."""
        return self._last_applied

    def __call__(self, sink: BinaryIO) -> None:
        """Streams the frozen state to ``sink`` (the format of :meth:`KVStateMachine.snapshot`).

        Raises :class:`KVSnapshotCancelledError` if the view was cancelled before or while
        writing (the sink then holds a partial snapshot), ``RuntimeError`` on a second call, and
        whatever ``sink.write`` raises. The view is released in every case.
        """
        if self._used:
            raise RuntimeError("this KV snapshot writer already ran; call begin_snapshot() for another")
        self._used = True
        pieces = self._pieces
        try:
            if pieces is None or self._view.cancelled:
                raise KVSnapshotCancelledError("the KV snapshot was cancelled before it was written")
            _write_pieces(sink, pieces, _BACKGROUND_WRITE_BUFFER, self._view)
        finally:
            self._release()
            if pieces is not None:
                # Here, on the writer's thread with the GIL released: the frozen map pins every
                # node copied since the freeze, and freeing them all can take tens of ms. (A
                # cancel on another thread may be letting go of it at this very moment.)
                with contextlib.suppress(RuntimeError):
                    pieces.release()
            self._pieces = None

    def cancel(self) -> None:
        """Abandons the view: a writer running now raises at its next piece (into a snapshot
        store's sink, once the whole state is written), one not yet run raises at once.

        Safe from any thread; does nothing once the writer has finished. A writer not running
        lets go of its frozen tree here, with the GIL released but on the caller's thread: for a
        large store whose tree was mostly copied on write since, tens of milliseconds.
        """
        self._view.cancelled = True
        self._release()
        pieces, self._pieces = self._pieces, None
        if pieces is not None:
            # A writer running now holds the pieces, and lets go of them when it stops.
            with contextlib.suppress(RuntimeError):
                pieces.release()


def _write_pieces(sink: BinaryIO, pieces: _core.KvSnapshotPieces, size: int, view: _View | None) -> None:
    """Writes every piece of ``pieces`` to ``sink``, checking before each write that ``view``
    (if any) was not cancelled.

    A background writer (``view`` given) whose sink is a snapshot store's writes the whole state
    from Rust at once (``write_kv_pieces``), and notices a cancellation only at the end: taking
    the GIL back for every piece made the event loop wait for this thread again and again."""
    try:
        if view is not None:
            fast = getattr(sink, "write_kv_pieces", None)
            if fast is not None and fast(pieces, size):
                _raise_if_cancelled(view)
                return
        while (piece := pieces.next_piece(size)) is not None:
            _raise_if_cancelled(view)
            _write_all(sink, piece)
    except RuntimeError:
        # "Already borrowed": a cancel on another thread holds the pieces while it frees them.
        _raise_if_cancelled(view)
        raise
    # A cancel between two pieces lets go of the view, which then gives no more pieces.
    _raise_if_cancelled(view)


def _raise_if_cancelled(view: _View | None) -> None:
    if view is not None and view.cancelled:
        raise KVSnapshotCancelledError("the KV snapshot was cancelled while it was being written")


def _write_all(sink: BinaryIO, data: bytes) -> None:
    """Writes all of ``data``, looping over short writes (unbuffered raw streams may do them)."""
    view = memoryview(data)
    while view:
        written = sink.write(view)
        if written is None or written >= len(view):  # None: a writer that reports nothing wrote it all
            return
        view = view[written:]


_Record: TypeAlias = tuple[bytes, int, int, int]  # value, create_revision, mod_revision, version
_RawEvent: TypeAlias = tuple[bytes, _Record | None, _Record | None, int]  # key, kv, prev, revision


def _watch_event(raw: _RawEvent) -> WatchEvent:
    key, kv, prev, revision = raw
    before = None if prev is None else new_key_value(key, *prev)
    if kv is not None:
        return WatchEvent("put", new_key_value(key, *kv), before, revision)
    return WatchEvent("delete", KeyValue(key, b"", 0, revision, 0), before, revision)


class KVStateMachine:
    """The replicated KV store: feed it committed commands with ``apply``; read it locally.

    Implements :class:`dengine.state_machine.StateMachine` with synchronous methods. Reads
    (``get``, ``range``, ``len``) see the state as of ``last_applied`` on this replica; whether that
    is linearizable is up to the caller (the node's read path).

    The state lives in Rust (``dengine._core.KvStore``): a persistent B-tree of the keys, so a put
    is parsed, stored and answered without building Python objects, and a snapshot view is
    frozen in O(1) and written with the GIL released. With n keys, ``get``, puts and deletes cost
    O(log n); ``range`` and delete-range O(log n + keys visited); ``snapshot`` and ``restore``
    O(n), streaming. While a background snapshot is open, the first change to each part of the
    tree it shares copies that part. ``restore`` builds the new state before dropping the old
    one, so it briefly needs both.

    ``history`` bounds the watch events kept for :meth:`events_since` (0 keeps none). Not
    thread-safe: one thread (the node's apply loop) calls everything, except that the writer
    returned by :meth:`begin_snapshot` runs on another thread while that one keeps applying.
    """

    def __init__(self, *, history: int = DEFAULT_HISTORY) -> None:
        """Creates an empty store at revision 0 with nothing applied."""
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an int >= 0, got {history!r}")
        self._store = _core.KvStore(history)
        self._subscribers: dict[int, Callable[[WatchEvent], None]] = {}
        self._next_token = 0
        self._view: _View | None = None  # the open background snapshot, if any
        # Orders begin_snapshot with a release on the writer's thread. Reentrant because a garbage
        # collection inside begin_snapshot may finalize an old writer, whose release takes it too.
        self._view_lock = threading.RLock()

    # -- properties ---------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The store revision: the number of state-changing commands applied so far."""
        return self._store.revision

    @property
    def last_applied(self) -> int:
        """The log index of the last applied command (0 if none), restored from snapshots too."""
        return self._store.last_applied

    @property
    def compacted_revision(self) -> int:
        """``events_since(r)`` works for ``r >= compacted_revision``; older revisions are gone."""
        return self._store.compacted_revision

    @property
    def restores(self) -> int:
        """How many times :meth:`restore` replaced the state. Subscribers get no events for what
        a restore changed, so a watcher that sees this number move has missed changes."""
        return self._store.restores

    def __len__(self) -> int:
        """The number of keys."""
        return len(self._store)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is present."""
        return type(key) is bytes and key in self._store

    # -- apply --------------------------------------------------------------------------------

    def apply(self, index: int, command: bytes) -> bytes:
        """Applies the committed ``command`` at log ``index``; returns the encoded :class:`KVResult`.

        ``index`` must exceed ``last_applied`` (gaps are fine: not every log entry is a KV
        command); anything else is a bug in the caller and raises ``ValueError`` without changing
        anything.

        Malformed command bytes do not raise: the failure is the same on every replica, so the
        command is answered with ``KVResult(ok=False, error=...)``, the keys, revision and watch
        history stay unchanged, and only ``last_applied`` advances (the entry was applied, as a
        no-op). Subscribers are called synchronously after the state has changed; an exception
        from one is logged and does not affect the others or the result.
        """
        if type(index) is not int or index < 1:
            self._refuse(index)
        if type(command) is not bytes:
            command = _as_bytes(command, "command")
        result = self._store.apply(index, command)
        if self._subscribers:
            self._publish()
        return result

    def native_target(self) -> _core.KvStore | None:
        """The Rust store for :func:`dengine.raft.sessions.apply_entries` to apply to directly,
        or None while someone is subscribed (events are published by :meth:`apply`)."""
        return None if self._subscribers else self._store

    def _refuse(self, index: object) -> None:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, not {type(index).__name__}")
        raise ValueError(
            f"index {index} is not after last_applied {self.last_applied}: "
            "entries must be applied once each, in increasing index order"
        )

    def _publish(self) -> None:
        """Hands the latest apply's events to the subscribers."""
        watch_events = [_watch_event(raw) for raw in self._store.latest_events()]
        for callback in tuple(self._subscribers.values()):
            for event in watch_events:
                try:
                    callback(event)
                except Exception:
                    _log.exception("KV watch subscriber %r raised; it stays subscribed", callback)

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: bytes) -> KeyValue | None:
        """The current key-value for ``key``, or None if absent."""
        found = self._store.get(key)
        return None if found is None else new_key_value(key, *found)

    def range(
        self, prefix: bytes = b"", limit: int | None = None, *, max_bytes: int | None = None
    ) -> list[KeyValue]:
        """The keys starting with ``prefix`` (b"": all keys), in byte order, at most ``limit`` of
        them. Raises ValueError, before anything is copied, when their keys and values hold more
        than ``max_bytes`` (what one answer may carry)."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        prefix = _as_bytes(prefix, "prefix")
        return [new_key_value(*row) for row in self._store.range(prefix, limit, max_bytes)]

    # -- watch --------------------------------------------------------------------------------

    def events_since(self, revision: int) -> list[WatchEvent]:
        """The retained events with a revision greater than ``revision``, oldest first.

        A watcher that has seen everything up to revision r calls ``events_since(r)``. Raises
        :class:`KVCompactedError` when events after ``revision`` have already been dropped from the
        bounded history (or predate the last restore). A ``revision`` at or beyond the current
        one gives an empty list.
        """
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ValueError(f"revision must be an int >= 0, got {revision!r}")
        compacted = self._store.compacted_revision
        if revision < compacted:
            raise KVCompactedError(
                f"revision {revision} is compacted: the watch history starts after revision "
                f"{compacted}; read the current state (revision {self.revision}) and resume from there"
            )
        return [_watch_event(raw) for raw in self._store.events_since(revision)]

    def subscribe(self, callback: Callable[[WatchEvent], None]) -> Callable[[], None]:
        """Calls ``callback(event)`` synchronously, in order, for every event of every later apply.

        Returns a function that unsubscribes (calling it again is harmless). The callback runs
        inside ``apply``, so it must be quick and must not call ``apply`` or ``restore``. A restore
        produces no events: watchers should treat it like compaction and resynchronise.
        """
        token = self._next_token
        self._next_token += 1
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    # -- snapshot / restore -------------------------------------------------------------------

    def snapshot(self, sink: BinaryIO) -> None:
        """Streams the whole state to ``sink`` in the format described in the module docstring.

        The bytes depend only on the keys, their metadata, ``revision`` and ``last_applied``, so
        replicas that applied the same commands write identical snapshots. The watch history is
        not included. Output is written in pieces of about 1 MiB, never as one large object.
        """
        _write_pieces(sink, self._store.freeze(), _WRITE_BUFFER, None)

    def begin_snapshot(self) -> KVSnapshotWriter:
        """Freezes the current state in O(1) and returns a writer for it, to run on another thread.

        The returned :class:`KVSnapshotWriter`, called with a sink on any thread, writes exactly
        what :meth:`snapshot` would write now, however much is applied meanwhile on this thread:
        it holds a copy of the key tree that shares every node with the live one, and a change
        copies the nodes it touches instead of changing shared ones.

        Only one view is open at a time, since each keeps every node it shares alive: this
        raises ``RuntimeError`` while one is (run or cancel its writer first). A :meth:`restore`
        cancels the open view. Must be called on the thread that applies.
        """
        with self._view_lock:
            if self._view is not None:
                raise RuntimeError("a KV background snapshot is already open: run or cancel its writer first")
            view = _View()
            writer = KVSnapshotWriter(self, view, self._store.freeze())
            self._view = view
        return writer

    def _end_view(self, view: _View) -> None:
        """Marks ``view`` closed, if it is still the open one; any thread."""
        with self._view_lock:
            if self._view is view:
                self._view = None

    def restore(self, source: BinaryIO) -> None:
        """Replaces the state with a snapshot read from ``source``, which must hold nothing after it.

        Everything is validated (magic, version, every length and limit, strictly increasing keys,
        consistent revisions, the CRC, no trailing bytes) while building a new state; only a
        snapshot that passes replaces the current one, so on :class:`KVSnapshotError` nothing has
        changed. A successful restore empties the watch history: ``events_since`` for a revision
        before the snapshot's raises :class:`KVCompactedError`.
        """
        reader = _core.KvSnapshotReader()
        while piece := source.read(_READ_PIECE):
            reader.feed(piece if type(piece) is bytes else bytes(piece))
        self._store.install(reader)
        view = self._view
        if view is not None:  # its state was replaced: make its writer stop
            view.cancelled = True
            self._end_view(view)
