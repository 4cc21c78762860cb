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

import io
import logging
import struct
import threading
import weakref
import zlib
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from typing import BinaryIO, Final, Literal, TypeAlias

from dengine.errors import DengineError

__all__ = [
    "DEFAULT_HISTORY",
    "FORMAT_VERSION",
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
]

_log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
"""Version byte leading every command and result; bumped only with a migration plan."""

MAX_KEY_SIZE: Final = 64 * 1024
"""Largest key (and delete-range prefix) in bytes: keys are kept in memory and sorted, so keep them small."""

MAX_VALUE_SIZE: Final = 16 * 1024 * 1024
"""Largest value in bytes: one command is one log entry, and every replica holds it in memory."""

DEFAULT_HISTORY: Final = 10_000
"""Watch events kept in memory by default, so a watcher that fell briefly behind can catch up."""

WATCH_PROGRESS_INTERVAL_S: Final = 1.0
"""Seconds between the progress notices a node that knows a leader sends on each watch stream;
a client hearing nothing for several of them moves the watch to another node."""

SNAPSHOT_MAGIC: Final = b"DNGKVSN\x00"
"""First eight bytes of every KV snapshot, so a wrong file is refused before anything is parsed."""

_SNAPSHOT_VERSION: Final = 1

_OP_PUT: Final = 1
_OP_DELETE: Final = 2
_OP_CAS: Final = 3
_OP_DELETE_RANGE: Final = 4
_OP_NAMES: Final = {_OP_PUT: "PUT", _OP_DELETE: "DELETE", _OP_CAS: "CAS", _OP_DELETE_RANGE: "DELETE_RANGE"}

_FLAG_OK: Final = 0x01
_FLAG_PREV: Final = 0x02
_FLAG_ERROR: Final = 0x04
_KNOWN_FLAGS: Final = _FLAG_OK | _FLAG_PREV | _FLAG_ERROR

_U32: Final = struct.Struct("<I")
_CMD_HEAD: Final = struct.Struct("<BBI")  # version, op, length of the first field
_RESULT_HEAD: Final = struct.Struct("<BBQQ")  # version, flags, revision, deleted
_KV_HEAD: Final = struct.Struct("<QQQII")  # create_revision, mod_revision, version, key len, value len
_RESULT_PREV_HEAD: Final = struct.Struct("<BBQQQQQII")  # _RESULT_HEAD then _KV_HEAD, packed in one call
_SNAP_HEAD: Final = struct.Struct("<8sIQQQ")  # magic, version, revision, last_applied, count

_WRITE_BUFFER: Final = 1 << 20  # snapshot bytes gathered before each sink.write
# A background writer hands the GIL over at each piece (crc32 and write release it) and then waits
# up to a switch interval to get it back from a busy apply loop: bigger pieces, fewer waits.
_BACKGROUND_WRITE_BUFFER: Final = 4 << 20
# A background snapshot's overlay is split by key hash so that no single dict grows big: growing
# (or freeing) a dict of a million entries holds the GIL for some 30 ms, a stall of every apply.
_OVERLAY_SHARDS: Final = 256
_OVERLAY_MASK: Final = _OVERLAY_SHARDS - 1


class KVCommandError(ValueError):
    """A KV command is malformed or breaks a limit. Raised by the encoders and :func:`decode_command`.

    It is a ``ValueError`` because it is always bad input. ``apply`` never raises it for bytes from the
    log: it returns an error :class:`KVResult` instead (see :meth:`KVStateMachine.apply`).
    """


class KVResultError(ValueError):
    """Bytes given to :func:`decode_result` are not a well-formed KV result."""


class KVSnapshotError(DengineError):
    """A KV snapshot is corrupt, truncated or of an unknown format; the state was left untouched."""


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
    """Set ``key`` to ``value``, creating the key if needed."""

    key: bytes
    value: bytes


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
# apply builds a KeyValue per put, so it fills the slots directly: about half the cost, same object.
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


def _check_key(key: object, what: str = "key", *, allow_empty: bool = False) -> bytes:
    data = _as_bytes(key, what)
    if not data and not allow_empty:
        raise KVCommandError(f"{what} must not be empty")
    if len(data) > MAX_KEY_SIZE:
        raise KVCommandError(f"{what} is {len(data)} bytes, over the {MAX_KEY_SIZE}-byte limit")
    return data


def _check_value(value: object, what: str = "value") -> bytes:
    data = _as_bytes(value, what)
    if len(data) > MAX_VALUE_SIZE:
        raise KVCommandError(f"{what} is {len(data)} bytes, over the {MAX_VALUE_SIZE}-byte limit")
    return data


def encode_put(key: bytes, value: bytes) -> bytes:
    """Encodes "set ``key`` to ``value``" as command bytes for the Raft log."""
    k = _check_key(key)
    v = _check_value(value)
    return b"".join((_CMD_HEAD.pack(FORMAT_VERSION, _OP_PUT, len(k)), k, _U32.pack(len(v)), v))


def encode_delete(key: bytes) -> bytes:
    """Encodes "remove ``key``" as command bytes for the Raft log."""
    k = _check_key(key)
    return _CMD_HEAD.pack(FORMAT_VERSION, _OP_DELETE, len(k)) + k


def encode_cas(key: bytes, expected: bytes | None, value: bytes) -> bytes:
    """Encodes a compare-and-swap: set ``key`` to ``value`` if its value equals ``expected``.

    ``expected=None`` means "only if the key is absent" (create-if-missing), which differs from
    ``expected=b""`` ("only if the key exists with an empty value").
    """
    k = _check_key(key)
    v = _check_value(value)
    parts = [_CMD_HEAD.pack(FORMAT_VERSION, _OP_CAS, len(k)), k]
    if expected is None:
        parts.append(b"\x00")
    else:
        e = _check_value(expected, "expected value")
        parts += (b"\x01", _U32.pack(len(e)), e)
    parts += (_U32.pack(len(v)), v)
    return b"".join(parts)


def encode_delete_range(prefix: bytes) -> bytes:
    """Encodes "remove every key starting with ``prefix``"; ``b""`` removes every key."""
    p = _check_key(prefix, "prefix", allow_empty=True)
    return _CMD_HEAD.pack(FORMAT_VERSION, _OP_DELETE_RANGE, len(p)) + p


def encode_command(command: KVCommand) -> bytes:
    """Encodes a command object; the inverse of :func:`decode_command`."""
    if isinstance(command, PutCommand):
        return encode_put(command.key, command.value)
    if isinstance(command, DeleteCommand):
        return encode_delete(command.key)
    if isinstance(command, CasCommand):
        return encode_cas(command.key, command.expected, command.value)
    if isinstance(command, DeleteRangeCommand):
        return encode_delete_range(command.prefix)
    raise TypeError(f"not a KV command: {type(command).__name__}")


# ---------------------------------------------------------------------------------------------
# Command decoding


def _read_field(data: bytes, pos: int, what: str, limit: int, op: str) -> tuple[bytes, int]:
    """Reads one u32-length-prefixed field at ``pos``; returns it and the position after it."""
    end = len(data)
    if pos + 4 > end:
        raise KVCommandError(
            f"{op} command truncated at byte {pos}: the {what} length needs 4 bytes, {end - pos} remain"
        )
    (length,) = _U32.unpack_from(data, pos)
    if length > limit:
        raise KVCommandError(f"{op} command: {what} is {length} bytes, over the {limit}-byte limit")
    pos += 4
    if pos + length > end:
        raise KVCommandError(
            f"{op} command truncated at byte {pos}: the {what} needs {length} bytes, {end - pos} remain"
        )
    return data[pos : pos + length], pos + length


def _parse(data: bytes | bytearray | memoryview) -> tuple[int, bytes, bytes | None, bytes]:
    """Validates command bytes into ``(op, key or prefix, expected, value)``; the fast path of apply."""
    buf = data if type(data) is bytes else _as_bytes(data, "command")
    size = len(buf)
    if size >= 10 and buf[0] == FORMAT_VERSION and buf[1] == _OP_PUT:
        # Fast path for the most common command; anything unusual goes to _parse_general,
        # which produce the precise error message.
        (key_len,) = _U32.unpack_from(buf, 2)
        key_end = 6 + key_len
        if 0 < key_len <= MAX_KEY_SIZE and key_end + 4 <= size:
            (value_len,) = _U32.unpack_from(buf, key_end)
            if value_len <= MAX_VALUE_SIZE and key_end + 4 + value_len == size:
                return _OP_PUT, buf[6:key_end], None, buf[key_end + 4 :]
    return _parse_general(buf)


def _parse_general(buf: bytes) -> tuple[int, bytes, bytes | None, bytes]:
    """Every command, with a precise error for each way one can be malformed."""
    size = len(buf)
    if size < 2:
        raise KVCommandError(f"command truncated: {size} bytes, a command starts with 2 (version, op)")
    version = buf[0]
    op = buf[1]
    if version != FORMAT_VERSION:
        raise KVCommandError(
            f"unsupported command format version {version}; this build reads version {FORMAT_VERSION}"
        )
    name = _OP_NAMES.get(op)
    if name is None:
        raise KVCommandError(f"unknown command op {op}; known ops are 1 to {len(_OP_NAMES)}")
    expected: bytes | None = None
    value = b""
    if op == _OP_DELETE_RANGE:
        key, pos = _read_field(buf, 2, "prefix", MAX_KEY_SIZE, name)
    else:
        key, pos = _read_field(buf, 2, "key", MAX_KEY_SIZE, name)
        if not key:
            raise KVCommandError(f"{name} command: key must not be empty")
        if op == _OP_CAS:
            if pos >= size:
                raise KVCommandError(
                    f"{name} command truncated at byte {pos}: the has_expected flag is missing"
                )
            flag = buf[pos]
            pos += 1
            if flag == 1:
                expected, pos = _read_field(buf, pos, "expected value", MAX_VALUE_SIZE, name)
            elif flag != 0:
                raise KVCommandError(f"{name} command: has_expected flag is {flag}, must be 0 or 1")
        if op != _OP_DELETE:
            value, pos = _read_field(buf, pos, "value", MAX_VALUE_SIZE, name)
    if pos != size:
        raise KVCommandError(f"{name} command has {size - pos} trailing bytes after byte {pos}")
    return op, key, expected, value


def decode_command(data: bytes | bytearray | memoryview) -> KVCommand:
    """Decodes and validates command bytes; raises :class:`KVCommandError` saying what is wrong.

    A leader can call it on client input before proposing, so bad commands never reach the log.
    """
    op, key, expected, value = _parse(data)
    if op == _OP_PUT:
        return PutCommand(key, value)
    if op == _OP_DELETE:
        return DeleteCommand(key)
    if op == _OP_CAS:
        return CasCommand(key, expected, value)
    return DeleteRangeCommand(key)


# ---------------------------------------------------------------------------------------------
# Results


def _encode_result(
    ok: bool, revision: int, prev: KeyValue | None = None, deleted: int = 0, error: str | None = None
) -> bytes:
    flags = _FLAG_OK if ok else 0
    if error is None:
        if prev is None:
            return _RESULT_HEAD.pack(FORMAT_VERSION, flags, revision, deleted)
        key = prev.key
        value = prev.value
        head = _RESULT_PREV_HEAD.pack(
            FORMAT_VERSION,
            flags | _FLAG_PREV,
            revision,
            deleted,
            prev.create_revision,
            prev.mod_revision,
            prev.version,
            len(key),
            len(value),
        )
        return b"".join((head, key, value))
    # Error results carry no previous key-value (nothing was looked up).
    message = error.encode("utf-8")
    head = _RESULT_HEAD.pack(FORMAT_VERSION, flags | _FLAG_ERROR, revision, deleted)
    return b"".join((head, _U32.pack(len(message)), message))


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


def decode_result(data: bytes | bytearray | memoryview) -> KVResult:
    """Decodes the bytes ``apply`` returned (e.g. after they travelled to a client)."""
    buf = data if type(data) is bytes else _as_bytes(data, "result")
    size = len(buf)
    head = _RESULT_HEAD.size
    if size >= head:
        # Fast path for the answers of successful writes, which the leader decodes for every one;
        # anything else (and anything malformed) goes the checked way below.
        version, flags, revision, deleted = _RESULT_HEAD.unpack_from(buf, 0)
        if version == FORMAT_VERSION and flags & ~(_FLAG_OK | _FLAG_PREV) == 0:
            if size == head and not flags & _FLAG_PREV:
                return _new_result(bool(flags), revision, None, deleted)
            if flags & _FLAG_PREV and size >= head + _KV_HEAD.size:
                create, mod, ver, key_len, value_len = _KV_HEAD.unpack_from(buf, head)
                pos = head + _KV_HEAD.size
                if (
                    key_len <= MAX_KEY_SIZE
                    and value_len <= MAX_VALUE_SIZE
                    and pos + key_len + value_len == size
                ):
                    key_end = pos + key_len
                    prev = new_key_value(buf[pos:key_end], buf[key_end:], create, mod, ver)
                    return _new_result(bool(flags & _FLAG_OK), revision, prev, deleted)
    return _decode_result_checked(buf)


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
# Ordered key index


class _SortedKeys:
    """The set of keys in byte order, as a list of sorted chunks (a small B+-tree of height 2).

    A plain sorted list costs O(n) per insert (the memmove); chunks of at most ``2 * _LOAD`` keys
    keep an insert or removal at O(log n + _LOAD) plus O(n / _LOAD) for the rare split or merge,
    and ``iter_from`` at O(log n) to the first key. ``_maxes[i]`` is the largest key of chunk ``i``.

    :meth:`freeze` hands out the current chunks for another thread to read while this one keeps
    mutating: until :meth:`thaw`, a chunk the frozen list shares is copied before its first change
    (per-chunk copy-on-write), so the frozen chunks never change.
    """

    _LOAD: Final = 512

    def __init__(self, sorted_keys: Iterable[bytes] = ()) -> None:
        """Builds the index from keys already strictly increasing (as restore reads them)."""
        keys = list(sorted_keys)
        self._chunks: list[list[bytes]] = [keys[i : i + self._LOAD] for i in range(0, len(keys), self._LOAD)]
        self._maxes: list[bytes] = [chunk[-1] for chunk in self._chunks]
        # ids of the chunks a frozen list may still share, or None when nothing is frozen. A chunk
        # the frozen list still holds is alive, so no other chunk can have its id; the id of one
        # it dropped may be reused by a new chunk, which then costs a needless copy, no more.
        self._shared: set[int] | None = None

    def freeze(self) -> list[list[bytes]]:
        """The chunks as of now, in order; they stay unchanged until :meth:`thaw`. O(n / _LOAD)."""
        chunks = self._chunks.copy()
        self._shared = {id(chunk) for chunk in chunks}
        return chunks

    def thaw(self) -> None:
        """Ends copy-on-write: the frozen list is no longer read. Safe from any thread."""
        self._shared = None

    def _own(self, i: int) -> list[bytes]:
        """Chunk ``i``, first replaced by a private copy if a frozen list shares it."""
        chunk = self._chunks[i]
        shared = self._shared
        if shared is not None and id(chunk) in shared:
            shared.discard(id(chunk))
            chunk = chunk.copy()
            self._chunks[i] = chunk
        return chunk

    def add(self, key: bytes) -> None:
        """Inserts ``key``, which must not be present."""
        maxes = self._maxes
        if not maxes:
            self._chunks.append([key])
            maxes.append(key)
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            chunk = self._chunks[i] if self._shared is None else self._own(i)
            chunk.append(key)
            maxes[i] = key
        else:
            chunk = self._chunks[i] if self._shared is None else self._own(i)
            insort(chunk, key)
        if len(chunk) > 2 * self._LOAD:
            tail = chunk[self._LOAD :]
            del chunk[self._LOAD :]
            self._chunks.insert(i + 1, tail)
            maxes.insert(i, chunk[-1])

    def remove(self, key: bytes) -> None:
        """Removes ``key``, which must be present."""
        maxes = self._maxes
        i = bisect_left(maxes, key)
        chunk = self._chunks[i] if self._shared is None else self._own(i)
        j = bisect_left(chunk, key)
        del chunk[j]
        if not chunk:
            del self._chunks[i]
            del maxes[i]
            return
        if j == len(chunk):
            maxes[i] = chunk[-1]
        # Merge a thin chunk into its right neighbour so mass deletions do not leave many tiny chunks.
        # Only ``chunk`` (already private) changes; the neighbour is read, then dropped from the list.
        if len(chunk) < self._LOAD // 4 and i + 1 < len(self._chunks):
            chunk.extend(self._chunks[i + 1])
            del self._chunks[i + 1]
            del maxes[i]
            if len(chunk) > 2 * self._LOAD:
                tail = chunk[self._LOAD :]
                del chunk[self._LOAD :]
                self._chunks.insert(i + 1, tail)
                maxes.insert(i, chunk[-1])

    def __iter__(self) -> Iterator[bytes]:
        """Yields every key in order. The index must not change during the iteration."""
        return chain.from_iterable(self._chunks)

    def iter_from(self, start: bytes) -> Iterator[bytes]:
        """Yields the keys >= ``start`` in order. The index must not change during the iteration."""
        i = bisect_left(self._maxes, start)
        if i == len(self._maxes):
            return
        chunk = self._chunks[i]
        yield from islice(chunk, bisect_left(chunk, start), None)
        for chunk in islice(self._chunks, i + 1, None):
            yield from chunk


# ---------------------------------------------------------------------------------------------
# The state machine

# An event as kept in the history: (kv after a put, or None for a delete; prev; revision). The
# public WatchEvent (with its delete tombstone) is built only when someone asks, keeping apply cheap.
_RawEvent: TypeAlias = tuple[KeyValue | None, KeyValue | None, int]


class _View:
    """What an open background snapshot shares with the store (see ``KVStateMachine.begin_snapshot``)."""

    __slots__ = ("cancelled", "keys", "overlay")

    def __init__(self, keys: _SortedKeys) -> None:
        self.keys = keys
        # Every key changed or deleted since the freeze, with its snapshot entry as of the freeze,
        # in shard hash(key) & _OVERLAY_MASK. The apply thread writes an entry before the key's
        # first change; the writer thread only reads. Encoded bytes rather than the old KeyValue:
        # bytes are not tracked by the garbage collector, so keeping a million of them does not
        # bring on a full collection (seconds, with millions of keys).
        self.overlay: list[dict[bytes, bytes]] = [{} for _ in range(_OVERLAY_SHARDS)]
        self.cancelled = False

    def record(self, kv: KeyValue) -> None:
        """Keeps ``kv``'s entry, unless its key changed before: the first change holds the frozen one."""
        shard = self.overlay[hash(kv.key) & _OVERLAY_MASK]
        if kv.key not in shard:
            shard[kv.key] = _encode_entry(kv)


class KVSnapshotWriter:
    """Writes the state frozen by :meth:`KVStateMachine.begin_snapshot`, on any thread, once.

    ``writer(sink)`` streams to ``sink`` exactly the bytes :meth:`KVStateMachine.snapshot` would
    have written at the freeze, while the store's own thread keeps applying. When it returns or
    raises, the view is released and the store stops recording pre-freeze values. ``cancel()``
    abandons the view without writing. A writer dropped without either is released when it is
    garbage-collected, so a forgotten view cannot make the overlay grow forever.
    """

    def __init__(
        self,
        store: KVStateMachine,
        view: _View,
        *,
        chunks: list[list[bytes]],
        data: dict[bytes, KeyValue],
        revision: int,
        last_applied: int,
    ) -> None:
        """Internal: use :meth:`KVStateMachine.begin_snapshot`."""
        self._view = view
        self._chunks = chunks
        self._data = data
        self._count = len(data)
        self._revision = revision
        self._last_applied = last_applied
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
        view = self._view
        try:
            if view.cancelled:
                raise KVSnapshotCancelledError("the KV snapshot was cancelled before it was written")
            _write_snapshot(
                sink,
                revision=self._revision,
                last_applied=self._last_applied,
                count=self._count,
                keys=_drain(self._chunks),
                data=self._data,
                view=view,
                piece=_BACKGROUND_WRITE_BUFFER,
            )
        finally:
            self._release()
            self._forget()

    def _forget(self) -> None:
        """Drops the frozen state, so a writer kept after its use holds no old chunks or old dict."""
        self._chunks = []
        self._data = {}

    def cancel(self) -> None:
        """Abandons the view: a writer running now raises soon, one not yet run raises at once.

        Safe from any thread; does nothing once the writer has finished.
        """
        # The flag goes up before the view is released, so a writer that still sees it down has
        # built its pending bytes while every change was being recorded (see _write_snapshot).
        self._view.cancelled = True
        self._release()
        self._forget()


def _watch_event(raw: _RawEvent) -> WatchEvent:
    kv, prev, revision = raw
    if kv is not None:
        return WatchEvent("put", kv, prev, revision)
    assert prev is not None  # a delete always records the key it removed
    return WatchEvent("delete", KeyValue(prev.key, b"", 0, revision, 0), prev, revision)


class KVStateMachine:
    """The replicated KV store: feed it committed commands with ``apply``; read it locally.

    Implements :class:`dengine.state_machine.StateMachine` with synchronous methods. Reads
    (``get``, ``range``, ``len``) see the state as of ``last_applied`` on this replica; whether that
    is linearizable is up to the caller (the node's read path).

    Complexity with n keys: ``get`` O(1); a put of an existing key O(1); a put of a new key or a
    delete O(log n + 512) for the ordered key index (a sorted list of sorted chunks, stdlib only);
    ``range`` and delete-range O(log n + keys visited); ``snapshot`` and ``restore`` O(n), streaming;
    ``begin_snapshot`` O(n / 512), after which the first change of each frozen key or index chunk
    costs one overlay entry or one chunk copy until the view is released.
    ``restore`` builds the new state before dropping the old one, so it briefly needs both.

    ``history`` bounds the watch events kept for :meth:`events_since` (0 keeps none). Not
    thread-safe: one thread (the node's apply loop) calls everything, except that the writer
    returned by :meth:`begin_snapshot` runs on another thread while that one keeps applying.
    """

    def __init__(self, *, history: int = DEFAULT_HISTORY) -> None:
        """Creates an empty store at revision 0 with nothing applied."""
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an int >= 0, got {history!r}")
        self._history_limit = history
        self._data: dict[bytes, KeyValue] = {}
        self._keys = _SortedKeys()
        self._revision = 0
        self._last_applied = 0
        self._history: deque[_RawEvent] = deque()
        self._compacted = 0
        self._restores = 0
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
        return self._revision

    @property
    def last_applied(self) -> int:
        """The log index of the last applied command (0 if none), restored from snapshots too."""
        return self._last_applied

    @property
    def compacted_revision(self) -> int:
        """``events_since(r)`` works for ``r >= compacted_revision``; older revisions are gone."""
        return self._compacted

    @property
    def restores(self) -> int:
        """How many times :meth:`restore` replaced the state. Subscribers get no events for what
        a restore changed, so a watcher that sees this number move has missed changes."""
        return self._restores

    def __len__(self) -> int:
        """The number of keys."""
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is present."""
        return key in self._data

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
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, not {type(index).__name__}")
        if index <= self._last_applied:
            raise ValueError(
                f"index {index} is not after last_applied {self._last_applied}: "
                "entries must be applied once each, in increasing index order"
            )
        try:
            op, key, expected, value = _parse(command)
        except KVCommandError as exc:
            self._last_applied = index
            return _encode_result(False, self._revision, error=str(exc))
        self._last_applied = index
        events: list[_RawEvent] = []
        if op == _OP_PUT:
            result = _encode_result(True, self._revision + 1, self._put(key, value, events))
        elif op == _OP_DELETE:
            prev = self._data.get(key)
            if prev is None:
                return _encode_result(False, self._revision)
            self._revision += 1
            self._delete(prev, events)
            result = _encode_result(True, self._revision, prev, deleted=1)
        elif op == _OP_CAS:
            current = self._data.get(key)
            matches = (
                current is None if expected is None else current is not None and current.value == expected
            )
            if not matches:  # a failed swap reports the current key so the client can retry without a read
                return _encode_result(False, self._revision, current)
            result = _encode_result(True, self._revision + 1, self._put(key, value, events))
        else:
            victims = [self._data[k] for k in self._prefix_keys(key)]
            if not victims:
                return _encode_result(True, self._revision)
            self._revision += 1
            for kv in victims:
                self._delete(kv, events)
            result = _encode_result(True, self._revision, deleted=len(victims))
        self._publish(events)
        return result

    def _put(self, key: bytes, value: bytes, events: list[_RawEvent]) -> KeyValue | None:
        """Stores ``key`` at the next revision; returns the previous key-value."""
        self._revision = revision = self._revision + 1
        prev = self._data.get(key)
        if prev is None:
            kv = new_key_value(key, value, revision, revision, 1)
            self._keys.add(key)
        else:
            view = self._view
            if view is not None:  # a background snapshot needs the entry as of its freeze
                view.record(prev)
            kv = new_key_value(key, value, prev.create_revision, revision, prev.version + 1)
        self._data[key] = kv
        events.append((kv, prev, revision))
        return prev

    def _delete(self, prev: KeyValue, events: list[_RawEvent]) -> None:
        """Removes ``prev.key`` at the current revision (already incremented by the caller)."""
        view = self._view
        if view is not None:  # a background snapshot needs the entry as of its freeze
            view.record(prev)
        del self._data[prev.key]
        self._keys.remove(prev.key)
        events.append((None, prev, self._revision))

    def _publish(self, events: list[_RawEvent]) -> None:
        """Records the events of one command in the bounded history and hands them to subscribers."""
        history = self._history
        history.extend(events)
        while len(history) > self._history_limit:
            self._compacted = history.popleft()[2]
        if not self._subscribers:
            return
        watch_events = [_watch_event(raw) for raw in events]
        for callback in tuple(self._subscribers.values()):
            for event in watch_events:
                try:
                    callback(event)
                except Exception:
                    _log.exception("KV watch subscriber %r raised; it stays subscribed", callback)

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: bytes) -> KeyValue | None:
        """The current key-value for ``key``, or None if absent."""
        return self._data.get(key)

    def _prefix_keys(self, prefix: bytes) -> Iterator[bytes]:
        for key in self._keys.iter_from(prefix):
            if not key.startswith(prefix):
                return
            yield key

    def range(self, prefix: bytes = b"", limit: int | None = None) -> list[KeyValue]:
        """The keys starting with ``prefix`` (b"": all keys), in byte order, at most ``limit`` of them."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        prefix = _as_bytes(prefix, "prefix")
        data = self._data
        return [data[key] for key in islice(self._prefix_keys(prefix), limit)]

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
        if revision < self._compacted:
            raise KVCompactedError(
                f"revision {revision} is compacted: the watch history starts after revision "
                f"{self._compacted}; read the current state (revision {self._revision}) and resume from there"
            )
        newer: list[WatchEvent] = []
        for raw in reversed(self._history):
            if raw[2] <= revision:
                break
            newer.append(_watch_event(raw))
        newer.reverse()
        return newer

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
        not included. Output is written in pieces of about 1 MiB, never as one large object. Nothing
        may be applied meanwhile (use :meth:`begin_snapshot` for that); an open background snapshot
        does not matter here.
        """
        _write_snapshot(
            sink,
            revision=self._revision,
            last_applied=self._last_applied,
            count=len(self._data),
            keys=self._keys,
            data=self._data,
            view=None,
            piece=_WRITE_BUFFER,
        )

    def begin_snapshot(self) -> KVSnapshotWriter:
        """Freezes the current state cheaply and returns a writer for it, to run on another thread.

        The freeze costs O(n / 512) (the key index's chunk list is copied, not the keys). The
        returned :class:`KVSnapshotWriter`, called with a sink on any thread, writes exactly what
        :meth:`snapshot` would write now, however much is applied meanwhile on this thread.

        How concurrent applies stay invisible to it: until the view is released, a put or delete
        of a key that existed at the freeze first records the key's snapshot entry as of the
        freeze in an overlay, and the key index copies any chunk the frozen chunk list shares before
        changing it. For each frozen key the writer reads the live dict and then the overlay, and
        the overlay wins: a change that came before the dict read was recorded before it
        happened, so the overlay read sees it; one that came after left the dict read correct.

        Only one view is open at a time: this raises ``RuntimeError`` while one is (run or cancel
        its writer first). A :meth:`restore` cancels the open view. Must be called on the thread
        that applies.
        """
        with self._view_lock:
            if self._view is not None:
                raise RuntimeError("a KV background snapshot is already open: run or cancel its writer first")
            view = _View(self._keys)
            writer = KVSnapshotWriter(
                self,
                view,
                chunks=self._keys.freeze(),
                data=self._data,
                revision=self._revision,
                last_applied=self._last_applied,
            )
            self._view = view
        return writer

    def _end_view(self, view: _View) -> None:
        """Stops recording for ``view`` and frees its overlay, if it is still the open one; any thread."""
        with self._view_lock:
            if self._view is view:
                self._view = None
                view.keys.thaw()
        for shard in view.overlay:
            shard.clear()

    def restore(self, source: BinaryIO) -> None:
        """Replaces the state with a snapshot read from ``source``, which must hold nothing after it.

        Everything is validated (magic, version, every length and limit, strictly increasing keys,
        consistent revisions, the CRC, no trailing bytes) while building a new state; only a
        snapshot that passes replaces the current one, so on :class:`KVSnapshotError` nothing has
        changed. A successful restore empties the watch history: ``events_since`` for a revision
        before the snapshot's raises :class:`KVCompactedError`.
        """
        if isinstance(source, io.RawIOBase):  # one small read per field: let a buffer batch the syscalls
            source = io.BufferedReader(source)
        reader = _SnapshotReader(source)
        magic, version, revision, last_applied, count = _SNAP_HEAD.unpack(
            reader.read(_SNAP_HEAD.size, "the header")
        )
        if magic != SNAPSHOT_MAGIC:
            raise KVSnapshotError(
                f"not a dengine KV snapshot: magic is {magic!r}, expected {SNAPSHOT_MAGIC!r}"
            )
        if version != _SNAPSHOT_VERSION:
            raise KVSnapshotError(
                f"unsupported KV snapshot format version {version}; "
                f"this build reads version {_SNAPSHOT_VERSION}"
            )
        data: dict[bytes, KeyValue] = {}
        keys: list[bytes] = []
        previous: bytes | None = None
        for n in range(count):
            at = reader.offset
            create, mod, ver, key_len, value_len = _KV_HEAD.unpack(
                reader.read(_KV_HEAD.size, "an entry header")
            )
            if not 0 < key_len <= MAX_KEY_SIZE:
                raise KVSnapshotError(f"snapshot entry {n} at byte {at}: key length {key_len} out of range")
            if value_len > MAX_VALUE_SIZE:
                raise KVSnapshotError(
                    f"snapshot entry {n} at byte {at}: value length {value_len} over the limit"
                )
            if not (0 < create <= mod <= revision and 0 < ver <= mod - create + 1):
                raise KVSnapshotError(
                    f"snapshot entry {n} at byte {at}: inconsistent revisions (create {create}, mod {mod}, "
                    f"version {ver}, store revision {revision})"
                )
            body = reader.read(key_len + value_len, "an entry's key and value")
            key = body[:key_len]
            if previous is not None and key <= previous:
                raise KVSnapshotError(
                    f"snapshot entry {n} at byte {at}: keys are not in strictly increasing order"
                )
            previous = key
            keys.append(key)
            data[key] = new_key_value(key, body[key_len:], create, mod, ver)
        computed = reader.crc
        (stored,) = _U32.unpack(reader.read(4, "the CRC"))
        if stored != computed:
            raise KVSnapshotError(
                f"KV snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            )
        if reader.has_more():
            raise KVSnapshotError(f"KV snapshot has trailing bytes after its CRC at byte {reader.offset}")
        view = self._view
        if view is not None:  # its state is about to vanish: make its writer stop
            view.cancelled = True
            self._end_view(view)
        self._data = data
        self._keys = _SortedKeys(keys)
        self._revision = revision
        self._last_applied = last_applied
        self._history.clear()
        self._compacted = revision
        self._restores += 1


def _write_snapshot(
    sink: BinaryIO,
    *,
    revision: int,
    last_applied: int,
    count: int,
    keys: Iterable[bytes],
    data: Mapping[bytes, KeyValue],
    view: _View | None,
    piece: int,
) -> None:
    """Writes a snapshot of ``count`` ``keys`` in writes of about ``piece`` bytes.

    Each key's entry is the one the ``view`` recorded, if any, else the one built from ``data``.
    With a ``view``, every write first checks that it was not cancelled: bytes built before a
    check that passes were read while every change was still being recorded, so they are right.
    """
    shards = view.overlay if view is not None else None
    crc = 0
    buf = bytearray(_SNAP_HEAD.pack(SNAPSHOT_MAGIC, _SNAPSHOT_VERSION, revision, last_applied, count))
    for key in keys:
        # This order is what makes a concurrent change safe: the live dict first, then the
        # overlay, which holds the entry as of the freeze if the key changed meanwhile.
        kv = data.get(key)
        frozen = None if shards is None else shards[hash(key) & _OVERLAY_MASK].get(key)
        if frozen is not None:
            buf += frozen
        else:
            assert kv is not None  # a frozen key is in the dict, or was recorded before it left
            buf += _KV_HEAD.pack(kv.create_revision, kv.mod_revision, kv.version, len(key), len(kv.value))
            buf += key
            buf += kv.value
        if len(buf) >= piece:
            chunk = bytes(buf)
            buf.clear()
            crc = zlib.crc32(chunk, crc)
            _check_open(view)
            _write_all(sink, chunk)
    buf += _U32.pack(zlib.crc32(buf, crc))
    _check_open(view)
    _write_all(sink, bytes(buf))


def _drain(chunks: list[list[bytes]]) -> Iterator[bytes]:
    """Yields the keys of ``chunks`` in order, dropping each chunk from the list once walked.

    The chunks the apply thread replaced meanwhile (often all of them) are then freed one at a
    time; freed together at the end they would hold the GIL for tens of milliseconds.
    """
    chunks.reverse()
    while chunks:
        yield from chunks.pop()


def _encode_entry(kv: KeyValue) -> bytes:
    """One snapshot entry (the ``kv`` layout of the module docstring)."""
    head = _KV_HEAD.pack(kv.create_revision, kv.mod_revision, kv.version, len(kv.key), len(kv.value))
    return b"".join((head, kv.key, kv.value))


def _check_open(view: _View | None) -> None:
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


class _SnapshotReader:
    """Reads exact byte counts from a snapshot stream, tracking the offset and the running CRC."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.offset = 0
        self.crc = 0

    def read(self, size: int, what: str) -> bytes:
        """Reads exactly ``size`` bytes of ``what`` (named in the error if the stream ends early)."""
        parts: list[bytes] = []
        remaining = size
        while remaining:
            piece = self._source.read(remaining)
            if not piece:
                raise KVSnapshotError(
                    f"KV snapshot truncated at byte {self.offset + size - remaining}: "
                    f"{what} needs {size} bytes, only {size - remaining} remain"
                )
            parts.append(piece)
            remaining -= len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)  # size is never 0 here
        self.crc = zlib.crc32(data, self.crc)
        self.offset += size
        return data

    def has_more(self) -> bool:
        return bool(self._source.read(1))
