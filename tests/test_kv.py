"""Tests for dengine.kv: command/result/snapshot formats, KV semantics, revisions, watch, determinism."""

from __future__ import annotations

import dataclasses
import io
import logging
import random
import struct
import zlib
from pathlib import Path

import pytest

from dengine import kv
from dengine.errors import DengineError
from dengine.kv import (
    MAX_KEY_SIZE,
    MAX_VALUE_SIZE,
    SNAPSHOT_MAGIC,
    CasCommand,
    DeleteCommand,
    DeleteRangeCommand,
    KeyValue,
    KVCommandError,
    KVCompactedError,
    KVResult,
    KVResultError,
    KVSnapshotError,
    KVStateMachine,
    PutCommand,
    WatchEvent,
    decode_command,
    decode_result,
    encode_cas,
    encode_command,
    encode_delete,
    encode_delete_range,
    encode_put,
)
from dengine.state_machine import StateMachine


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


class Store:
    """A KVStateMachine plus the next log index, so tests read like a client session."""

    def __init__(self, history: int = kv.DEFAULT_HISTORY) -> None:
        self.sm = KVStateMachine(history=history)
        self.index = 0

    def raw(self, command: bytes) -> bytes:
        self.index += 1
        return self.sm.apply(self.index, command)

    def do(self, command: bytes) -> KVResult:
        return decode_result(self.raw(command))

    def put(self, key: bytes, value: bytes, *, prev_kv: bool = False) -> KVResult:
        return self.do(encode_put(key, value, prev_kv=prev_kv))

    def delete(self, key: bytes) -> KVResult:
        return self.do(encode_delete(key))

    def cas(self, key: bytes, expected: bytes | None, value: bytes) -> KVResult:
        return self.do(encode_cas(key, expected, value))

    def delete_range(self, prefix: bytes) -> KVResult:
        return self.do(encode_delete_range(prefix))


def snapshot_bytes(sm: KVStateMachine) -> bytes:
    sink = io.BytesIO()
    sm.snapshot(sink)
    return sink.getvalue()


def restored(data: bytes, history: int = kv.DEFAULT_HISTORY) -> KVStateMachine:
    sm = KVStateMachine(history=history)
    sm.restore(io.BytesIO(data))
    return sm


def with_crc(body: bytes) -> bytes:
    return body + u32(zlib.crc32(body))


def snap_entry(key: bytes, value: bytes, create: int, mod: int, version: int) -> bytes:
    return struct.pack("<QQQII", create, mod, version, len(key), len(value)) + key + value


# ---------------------------------------------------------------------------------------------
# Command format


def test_command_encodings_match_the_documented_format() -> None:
    assert encode_put(b"k", b"vv") == b"\x01\x01" + u32(1) + b"k" + u32(2) + b"vv"
    assert encode_put(b"k", b"") == b"\x01\x01" + u32(1) + b"k" + u32(0)
    assert encode_put(b"k", b"vv", prev_kv=True) == b"\x01\x05" + u32(1) + b"k" + u32(2) + b"vv"
    assert encode_delete(b"key") == b"\x01\x02" + u32(3) + b"key"
    assert encode_cas(b"k", None, b"v") == b"\x01\x03" + u32(1) + b"k" + b"\x00" + u32(1) + b"v"
    assert encode_cas(b"k", b"", b"v") == b"\x01\x03" + u32(1) + b"k" + b"\x01" + u32(0) + u32(1) + b"v"
    assert encode_cas(b"k", b"old", b"v") == (
        b"\x01\x03" + u32(1) + b"k" + b"\x01" + u32(3) + b"old" + u32(1) + b"v"
    )
    assert encode_delete_range(b"") == b"\x01\x04" + u32(0)
    assert encode_delete_range(b"p/") == b"\x01\x04" + u32(2) + b"p/"


@pytest.mark.parametrize(
    "command",
    [
        PutCommand(b"k", b"v"),
        PutCommand(b"\x00\xff", b""),
        PutCommand(b"k", b"v", prev_kv=True),
        DeleteCommand(b"k"),
        CasCommand(b"k", None, b"v"),
        CasCommand(b"k", b"", b"v"),
        CasCommand(b"k", b"x" * 300, b"y" * 70_000),
        DeleteRangeCommand(b""),
        DeleteRangeCommand(b"\xff"),
    ],
)
def test_decode_command_inverts_encode_command(command: kv.KVCommand) -> None:
    data = encode_command(command)
    assert decode_command(data) == command
    assert decode_command(bytearray(data)) == command
    assert decode_command(memoryview(data)) == command


def test_encoders_enforce_limits_and_types() -> None:
    assert decode_command(encode_put(b"k" * MAX_KEY_SIZE, b"")) == PutCommand(b"k" * MAX_KEY_SIZE, b"")
    with pytest.raises(KVCommandError, match="key is 65537 bytes, over the 65536-byte limit"):
        encode_put(b"k" * (MAX_KEY_SIZE + 1), b"v")
    with pytest.raises(KVCommandError, match="key must not be empty"):
        encode_put(b"", b"v")
    with pytest.raises(KVCommandError, match="key must not be empty"):
        encode_delete(b"")
    with pytest.raises(KVCommandError, match="key must not be empty"):
        encode_cas(b"", None, b"v")
    with pytest.raises(KVCommandError, match="prefix is 65537 bytes"):
        encode_delete_range(b"p" * (MAX_KEY_SIZE + 1))
    big = bytes(MAX_VALUE_SIZE)
    assert len(encode_put(b"k", big)) == 2 + 4 + 1 + 4 + MAX_VALUE_SIZE
    with pytest.raises(KVCommandError, match="value is 16777217 bytes, over the 16777216-byte limit"):
        encode_put(b"k", big + b"x")
    with pytest.raises(KVCommandError, match="expected value is 16777217 bytes"):
        encode_cas(b"k", big + b"x", b"v")
    with pytest.raises(TypeError, match="key must be bytes, not str"):
        encode_put("k", b"v")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="value must be bytes, not int"):
        encode_put(b"k", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_command("put")  # type: ignore[arg-type]
    assert issubclass(KVCommandError, ValueError)


_PUT = encode_put(b"key", b"value")
_MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "command truncated: 0 bytes"),
    ("version only", b"\x01", "command truncated: 1 bytes"),
    ("unknown version", b"\x02" + _PUT[1:], "unsupported command format version 2"),
    ("version zero", b"\x00" + _PUT[1:], "unsupported command format version 0"),
    ("unknown op", b"\x01\x09" + _PUT[2:], "unknown command op 9"),
    ("op zero", b"\x01\x00", "unknown command op 0"),
    ("trailing after put", _PUT + b"X", "PUT command has 1 trailing bytes"),
    ("trailing after delete", encode_delete(b"k") + b"\x00\x00", "DELETE command has 2 trailing bytes"),
    ("trailing after range", encode_delete_range(b"p") + b"!", "DELETE_RANGE command has 1 trailing"),
    ("trailing after cas", encode_cas(b"k", None, b"v") + b"?", "CAS command has 1 trailing"),
    ("empty key", b"\x01\x01" + u32(0) + u32(1) + b"v", "PUT command: key must not be empty"),
    ("empty delete key", b"\x01\x02" + u32(0), "DELETE command: key must not be empty"),
    ("oversized key", b"\x01\x01" + u32(MAX_KEY_SIZE + 1) + b"k", "key is 65537 bytes, over the"),
    ("oversized value", b"\x01\x01" + u32(1) + b"k" + u32(MAX_VALUE_SIZE + 1), "value is 16777217 bytes"),
    ("huge key length", b"\x01\x02" + u32(0xFFFFFFFF), "key is 4294967295 bytes"),
    ("cas flag missing", b"\x01\x03" + u32(1) + b"k", "has_expected flag is missing"),
    ("cas bad flag", b"\x01\x03" + u32(1) + b"k" + b"\x02" + u32(1) + b"v", "has_expected flag is 2"),
    ("cas value missing", b"\x01\x03" + u32(1) + b"k" + b"\x00", "the value length needs 4 bytes"),
    ("cas expected cut", b"\x01\x03" + u32(1) + b"k" + b"\x01" + u32(5) + b"ab", "expected value needs 5"),
    ("range cut", b"\x01\x04" + u32(3) + b"p", "the prefix needs 3 bytes, 1 remain"),
] + [(f"put cut to {n}", _PUT[:n], "truncated") for n in range(2, len(_PUT))]


@pytest.mark.parametrize(("name", "data", "message"), _MALFORMED, ids=[m[0] for m in _MALFORMED])
def test_decode_command_rejects_malformed_input(name: str, data: bytes, message: str) -> None:
    with pytest.raises(KVCommandError, match=message.replace("?", r"\?")):
        decode_command(data)


@pytest.mark.parametrize(("name", "data", "message"), _MALFORMED, ids=[m[0] for m in _MALFORMED])
def test_apply_answers_malformed_commands_with_an_error_and_changes_nothing(
    name: str, data: bytes, message: str
) -> None:
    store = Store()
    store.put(b"key", b"before")
    store.put(b"other", b"x")
    seen: list[WatchEvent] = []
    store.sm.subscribe(seen.append)
    state = store.sm.range()
    events = store.sm.events_since(0)

    result = store.do(data)

    assert not result.ok
    assert result.error is not None and message in result.error
    assert result.revision == 2
    assert result.prev is None and result.deleted == 0
    assert store.sm.revision == 2
    assert store.sm.range() == state
    assert store.sm.events_since(0) == events
    assert seen == []
    assert store.sm.last_applied == 3  # the entry counts as applied, as a no-op
    # The node keeps going normally afterwards.
    assert store.put(b"key", b"after").revision == 3


def test_apply_rejects_non_bytes_commands_as_a_caller_bug() -> None:
    sm = KVStateMachine()
    with pytest.raises(TypeError):
        sm.apply(1, "put")  # type: ignore[arg-type]
    assert sm.last_applied == 0


# ---------------------------------------------------------------------------------------------
# Result format


def test_result_encoding_matches_the_documented_format() -> None:
    store = Store()
    assert store.raw(encode_put(b"a", b"1")) == b"\x01\x01" + u64(1) + u64(0)
    with_prev = store.raw(encode_put(b"a", b"22", prev_kv=True))
    assert with_prev == b"\x01\x03" + u64(2) + u64(0) + u64(1) + u64(1) + u64(1) + u32(1) + u32(1) + b"a1"
    assert store.raw(encode_put(b"a", b"3")) == b"\x01\x01" + u64(3) + u64(0), "a plain put has no prev"
    assert store.raw(encode_delete(b"missing")) == b"\x01\x00" + u64(3) + u64(0)
    error = store.raw(b"\x01\x07")
    message = b"unknown command op 7; known ops are 1 to 5"
    assert error == b"\x01\x04" + u64(3) + u64(0) + u32(len(message)) + message


def test_decode_result_rejects_malformed_results() -> None:
    store = Store()
    store.put(b"a", b"1")
    good = [store.raw(encode_put(b"a", b"2")), store.raw(b"\x01\x07"), store.raw(encode_delete(b"zz"))]
    for data in good:
        decode_result(data)
        for cut in range(len(data)):
            with pytest.raises(KVResultError, match="truncated"):
                decode_result(data[:cut])
        with pytest.raises(KVResultError, match="1 trailing bytes"):
            decode_result(data + b"\x00")
    with pytest.raises(KVResultError, match="unsupported result format version 9"):
        decode_result(b"\x09" + good[0][1:])
    with pytest.raises(KVResultError, match="unknown flag bits 0x08"):
        decode_result(b"\x01\x08" + u64(0) + u64(0))
    with pytest.raises(KVResultError, match="not UTF-8"):
        decode_result(b"\x01\x04" + u64(0) + u64(0) + u32(1) + b"\xff")
    assert issubclass(KVResultError, ValueError)


# ---------------------------------------------------------------------------------------------
# Semantics and revisions


def test_put_get_and_revision_bookkeeping() -> None:
    store = Store()
    sm = store.sm
    assert sm.revision == 0 and len(sm) == 0 and sm.get(b"a") is None

    assert store.put(b"a", b"1") == KVResult(ok=True, revision=1, prev=None)
    assert sm.get(b"a") == KeyValue(b"a", b"1", create_revision=1, mod_revision=1, version=1)
    assert store.put(b"b", b"x") == KVResult(ok=True, revision=2)
    first = sm.get(b"a")
    assert store.put(b"a", b"2", prev_kv=True) == KVResult(ok=True, revision=3, prev=first)
    assert sm.get(b"a") == KeyValue(b"a", b"2", 1, 3, 2)
    again = KVResult(ok=True, revision=4, prev=KeyValue(b"a", b"2", 1, 3, 2))
    assert store.put(b"a", b"2", prev_kv=True) == again
    assert sm.get(b"a") == KeyValue(b"a", b"2", 1, 4, 3)  # a put with the same value still counts
    assert sm.get(b"b") == KeyValue(b"b", b"x", 2, 2, 1)
    assert sm.revision == 4 and len(sm) == 2 and b"a" in sm and b"zz" not in sm
    assert sm.last_applied == 4


def test_delete_semantics() -> None:
    store = Store()
    store.put(b"a", b"1")
    store.put(b"a", b"2")
    before = store.sm.get(b"a")
    assert store.delete(b"a") == KVResult(ok=True, revision=3, prev=before, deleted=1)
    assert store.sm.get(b"a") is None and len(store.sm) == 0
    # Deleting a missing key changes nothing, not even the revision.
    assert store.delete(b"a") == KVResult(ok=False, revision=3, prev=None, deleted=0)
    assert store.sm.revision == 3
    # Re-creating starts a new life: version 1, fresh create_revision.
    assert store.put(b"a", b"3") == KVResult(ok=True, revision=4)
    assert store.sm.get(b"a") == KeyValue(b"a", b"3", 4, 4, 1)


def test_cas_semantics() -> None:
    store = Store()
    sm = store.sm
    # expected None: only if absent.
    assert store.cas(b"k", None, b"v1") == KVResult(ok=True, revision=1, prev=None)
    assert sm.get(b"k") == KeyValue(b"k", b"v1", 1, 1, 1)
    current = sm.get(b"k")
    assert store.cas(b"k", None, b"v2") == KVResult(ok=False, revision=1, prev=current)
    # Wrong expected value: fails, reports current value and mod_revision, changes nothing.
    failed = store.cas(b"k", b"nope", b"v2")
    assert failed == KVResult(ok=False, revision=1, prev=current)
    assert failed.prev is not None and failed.prev.value == b"v1" and failed.prev.mod_revision == 1
    assert sm.revision == 1 and sm.get(b"k") == current
    # Right expected value: swaps like a put.
    assert store.cas(b"k", b"v1", b"v2") == KVResult(ok=True, revision=2, prev=current)
    assert sm.get(b"k") == KeyValue(b"k", b"v2", 1, 2, 2)
    # An expected value on a missing key fails with prev None; b"" is not "absent".
    assert store.cas(b"m", b"", b"x") == KVResult(ok=False, revision=2, prev=None)
    assert store.put(b"e", b"").ok
    assert store.cas(b"e", b"", b"full") == KVResult(ok=True, revision=4, prev=KeyValue(b"e", b"", 3, 3, 1))
    assert sm.revision == 4 and sm.get(b"m") is None


def test_delete_range_semantics() -> None:
    store = Store()
    for key in (b"a", b"a/1", b"a/2", b"b", b"a0"):
        store.put(key, b"v")
    result = store.delete_range(b"a/")
    assert result == KVResult(ok=True, revision=6, prev=None, deleted=2)
    assert [kv.key for kv in store.sm.range()] == [b"a", b"a0", b"b"]
    # Nothing matched: no revision.
    assert store.delete_range(b"zz") == KVResult(ok=True, revision=6, deleted=0)
    # The empty prefix removes everything, in one revision.
    assert store.delete_range(b"") == KVResult(ok=True, revision=7, deleted=3)
    assert len(store.sm) == 0 and store.sm.range() == []
    assert store.delete_range(b"") == KVResult(ok=True, revision=7, deleted=0)


def test_apply_index_must_increase() -> None:
    sm = KVStateMachine()
    with pytest.raises(ValueError, match="index 0 is not after last_applied 0"):
        sm.apply(0, encode_put(b"a", b"1"))
    sm.apply(1, encode_put(b"a", b"1"))
    with pytest.raises(ValueError, match="index 1 is not after last_applied 1"):
        sm.apply(1, encode_put(b"a", b"2"))
    with pytest.raises(ValueError, match="not after last_applied"):
        sm.apply(-5, encode_put(b"a", b"2"))
    # A rejected apply changed nothing.
    assert sm.get(b"a") == KeyValue(b"a", b"1", 1, 1, 1) and sm.revision == 1 and sm.last_applied == 1
    # Gaps are fine (other entry kinds occupy log indexes too).
    sm.apply(10, encode_put(b"a", b"3"))
    assert sm.last_applied == 10 and sm.revision == 2
    with pytest.raises(ValueError):
        sm.apply(9, encode_put(b"a", b"4"))
    with pytest.raises(TypeError):
        sm.apply(True, encode_put(b"a", b"4"))
    assert sm.revision == 2


def test_range_prefix_limit_and_order() -> None:
    store = Store()
    keys = [b"\xff\xff", b"a\xff", b"b", b"\xff", b"a", b"\x00", b"ab", b"\xfe\xff", b"a\x00", b"\xff\x00"]
    for key in keys:
        store.put(key, key + b"!")
    sm = store.sm

    def rng(prefix: bytes, limit: int | None = None) -> list[bytes]:
        return [kv.key for kv in sm.range(prefix, limit)]

    assert rng(b"") == sorted(keys)
    assert [kv.value for kv in sm.range()] == [k + b"!" for k in sorted(keys)]
    assert rng(b"a") == [b"a", b"a\x00", b"ab", b"a\xff"]
    assert rng(b"a\xff") == [b"a\xff"]
    assert rng(b"\xff") == [b"\xff", b"\xff\x00", b"\xff\xff"]
    assert rng(b"\xff\xff") == [b"\xff\xff"]
    assert rng(b"\xff\xff\xff") == []
    assert rng(b"\x00") == [b"\x00"]
    assert rng(b"c") == []
    assert rng(b"", 3) == sorted(keys)[:3]
    assert rng(b"a", 2) == [b"a", b"a\x00"]
    assert rng(b"a", 0) == []
    assert rng(b"a", 100) == rng(b"a")
    assert rng(bytearray(b"b")) == [b"b"]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be None or an int >= 0"):
        sm.range(b"", -1)
    assert sm.range(b"a")[0] == KeyValue(b"a", b"a!", 5, 5, 1)


def test_many_keys_keep_order_through_splits_and_merges() -> None:
    rng = random.Random(7)
    store = Store(history=0)
    present: set[bytes] = set()
    for _ in range(6000):  # well past the chunk size, so chunks split
        key = rng.randbytes(rng.randint(1, 4))
        store.put(key, b"")
        present.add(key)
    assert [kv.key for kv in store.sm.range()] == sorted(present)
    for key in rng.sample(sorted(present), len(present) * 9 // 10):  # thin chunks merge
        assert store.delete(key).ok
        present.discard(key)
    assert [kv.key for kv in store.sm.range()] == sorted(present)
    for prefix in (b"\x00", b"\x7f", b"\xff", b"\x10\x20"):
        assert [kv.key for kv in store.sm.range(prefix)] == sorted(k for k in present if k.startswith(prefix))
    assert len(store.sm) == len(present)


# ---------------------------------------------------------------------------------------------
# Random model test (no Hypothesis): the store against a plain dict


class Model:
    """The obvious implementation: a dict and a counter, scanning everything for ranges."""

    def __init__(self) -> None:
        self.data: dict[bytes, KeyValue] = {}
        self.revision = 0

    def put(self, key: bytes, value: bytes, report_prev: bool = True) -> KVResult:
        prev = self.data.get(key)
        self.revision += 1
        create = prev.create_revision if prev else self.revision
        version = prev.version + 1 if prev else 1
        self.data[key] = KeyValue(key, value, create, self.revision, version)
        return KVResult(True, self.revision, prev if report_prev else None)

    def apply(self, op: tuple[str, bytes, bytes | None, bytes]) -> KVResult:
        kind, key, expected, value = op
        if kind in ("put", "put_prev"):
            return self.put(key, value, report_prev=kind == "put_prev")
        if kind == "delete":
            if key not in self.data:
                return KVResult(False, self.revision)
            self.revision += 1
            return KVResult(True, self.revision, self.data.pop(key), deleted=1)
        if kind == "cas":
            current = self.data.get(key)
            if (current is None) if expected is None else (current is not None and current.value == expected):
                return self.put(key, value)
            return KVResult(False, self.revision, current)
        victims = [k for k in self.data if k.startswith(key)]
        if victims:
            self.revision += 1
            for k in victims:
                del self.data[k]
        return KVResult(True, self.revision, deleted=len(victims))

    def range(self, prefix: bytes, limit: int | None) -> list[KeyValue]:
        return [self.data[k] for k in sorted(self.data) if k.startswith(prefix)][:limit]


def random_op(rng: random.Random, keys: list[bytes], model: Model) -> tuple[str, bytes, bytes | None, bytes]:
    key = rng.choice(keys)
    value = rng.choice([b"", b"x", b"y", rng.randbytes(rng.randint(0, 40))])
    roll = rng.random()
    if roll < 0.45:
        return ("put" if roll < 0.3 else "put_prev", key, None, value)
    if roll < 0.65:
        return ("delete", key, None, b"")
    if roll < 0.95:
        current = model.data.get(key)
        choice = rng.random()
        if choice < 0.4 and current is not None:
            expected: bytes | None = current.value  # should succeed
        elif choice < 0.7:
            expected = None
        else:
            expected = rng.choice([b"", b"x", b"y"])
        return ("cas", key, expected, value)
    return ("delete_range", key[: rng.randint(0, len(key))], None, b"")


def encode_op(op: tuple[str, bytes, bytes | None, bytes]) -> bytes:
    kind, key, expected, value = op
    if kind in ("put", "put_prev"):
        return encode_put(key, value, prev_kv=kind == "put_prev")
    if kind == "delete":
        return encode_delete(key)
    if kind == "cas":
        return encode_cas(key, expected, value)
    return encode_delete_range(key)


@pytest.mark.parametrize("seed", [2, 512])
def test_random_operations_match_a_dict_model(seed: int) -> None:
    rng = random.Random(20240601 + seed)
    alphabet = [b"a", b"b", b"\x00", b"\xff"]
    keys = [bytes(x) for x in alphabet] + [x + y for x in alphabet for y in alphabet]
    keys += [x + y + z for x in alphabet for y in alphabet for z in alphabet]
    store = Store(history=50)
    model = Model()
    for step in range(4000):
        op = random_op(rng, keys, model)
        assert store.do(encode_op(op)) == model.apply(op), (step, op)
        assert store.sm.revision == model.revision
        if step % 25 == 0:
            prefix = rng.choice([b"", *alphabet, *keys[:20]])
            limit = rng.choice([None, 0, 1, 3, 1000])
            assert store.sm.range(prefix, limit) == model.range(prefix, limit), (step, prefix, limit)
    assert store.sm.range() == model.range(b"", None)
    assert len(store.sm) == len(model.data)
    for key in keys:
        assert store.sm.get(key) == model.data.get(key)


# ---------------------------------------------------------------------------------------------
# Watch


def test_watch_events_describe_each_change() -> None:
    store = Store()
    seen: list[WatchEvent] = []
    store.sm.subscribe(seen.append)
    store.put(b"a", b"1")
    store.put(b"a", b"2")
    store.delete(b"missing")  # no change, no event
    store.cas(b"a", b"wrong", b"3")  # failed swap, no event
    store.do(b"garbage")  # malformed, no event
    store.cas(b"a", b"2", b"3")
    store.put(b"b", b"x")
    store.delete(b"a")
    store.put(b"b2", b"y")
    store.delete_range(b"b")

    a1 = KeyValue(b"a", b"1", 1, 1, 1)
    a2 = KeyValue(b"a", b"2", 1, 2, 2)
    a3 = KeyValue(b"a", b"3", 1, 3, 3)
    b = KeyValue(b"b", b"x", 4, 4, 1)
    b2 = KeyValue(b"b2", b"y", 6, 6, 1)
    expected = [
        WatchEvent("put", a1, None, 1),
        WatchEvent("put", a2, a1, 2),
        WatchEvent("put", a3, a2, 3),
        WatchEvent("put", b, None, 4),
        WatchEvent("delete", KeyValue(b"a", b"", 0, 5, 0), a3, 5),
        WatchEvent("put", b2, None, 6),
        WatchEvent("delete", KeyValue(b"b", b"", 0, 7, 0), b, 7),
        WatchEvent("delete", KeyValue(b"b2", b"", 0, 7, 0), b2, 7),
    ]
    assert seen == expected
    assert store.sm.events_since(0) == expected
    assert store.sm.events_since(5) == expected[5:]
    assert store.sm.events_since(6) == expected[6:]
    assert store.sm.events_since(7) == []
    assert store.sm.events_since(100) == []
    with pytest.raises(ValueError, match="revision must be an int >= 0"):
        store.sm.events_since(-1)


def test_subscribe_unsubscribe_and_failing_subscribers(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    first: list[int] = []
    second: list[int] = []

    def broken(event: WatchEvent) -> None:
        raise RuntimeError("subscriber bug")

    unsubscribe_first = store.sm.subscribe(lambda e: first.append(e.revision))
    store.sm.subscribe(broken)
    store.sm.subscribe(lambda e: second.append(e.revision))
    with caplog.at_level(logging.ERROR, logger="dengine.kv"):
        assert store.put(b"a", b"1").ok
    assert "subscriber bug" in caplog.text
    assert first == [1] and second == [1]
    assert store.sm.get(b"a") is not None
    unsubscribe_first()
    unsubscribe_first()  # harmless
    store.put(b"a", b"2")
    assert first == [1] and second == [1, 2]


def test_subscriber_sees_the_state_after_the_change() -> None:
    store = Store()
    observed: list[KeyValue | None] = []
    store.sm.subscribe(lambda e: observed.append(store.sm.get(e.kv.key)))
    store.put(b"a", b"1")
    store.delete(b"a")
    assert observed == [KeyValue(b"a", b"1", 1, 1, 1), None]


def test_bounded_history_reports_compaction() -> None:
    store = Store(history=3)
    for i in range(5):
        store.put(b"k%d" % i, b"v")
    assert store.sm.compacted_revision == 2
    assert [e.revision for e in store.sm.events_since(2)] == [3, 4, 5]
    with pytest.raises(KVCompactedError, match="revision 1 is compacted"):
        store.sm.events_since(1)
    with pytest.raises(KVCompactedError):
        store.sm.events_since(0)
    assert issubclass(KVCompactedError, DengineError)


def test_history_dropping_part_of_a_revision_compacts_that_revision() -> None:
    store = Store(history=2)
    for key in (b"a", b"b", b"c"):
        store.put(key, b"v")
    store.delete_range(b"")  # revision 4 with three events; only two are kept
    assert store.sm.compacted_revision == 4
    with pytest.raises(KVCompactedError):
        store.sm.events_since(3)  # a watcher at 3 would miss part of revision 4
    assert store.sm.events_since(4) == []


def test_zero_history_keeps_nothing_but_still_notifies() -> None:
    store = Store(history=0)
    seen: list[WatchEvent] = []
    store.sm.subscribe(seen.append)
    assert store.sm.events_since(0) == []
    store.put(b"a", b"1")
    assert len(seen) == 1
    with pytest.raises(KVCompactedError):
        store.sm.events_since(0)
    assert store.sm.events_since(1) == []
    with pytest.raises(ValueError, match="history must be an int >= 0"):
        KVStateMachine(history=-1)


# ---------------------------------------------------------------------------------------------
# Snapshots


def test_snapshot_matches_the_documented_format() -> None:
    store = Store()
    store.put(b"b", b"22")
    store.put(b"a", b"1")
    store.put(b"a", b"333")
    store.do(b"bad")  # index 4: counts for last_applied
    body = (
        SNAPSHOT_MAGIC
        + u32(1)
        + u64(3)  # revision
        + u64(4)  # last_applied
        + u64(2)  # entries
        + snap_entry(b"a", b"333", 2, 3, 2)
        + snap_entry(b"b", b"22", 1, 1, 1)
    )
    assert snapshot_bytes(store.sm) == with_crc(body)
    assert snapshot_bytes(KVStateMachine()) == with_crc(SNAPSHOT_MAGIC + u32(1) + u64(0) * 3)


def random_store(seed: int, ops: int, history: int = kv.DEFAULT_HISTORY) -> Store:
    rng = random.Random(seed)
    keys = [rng.randbytes(rng.randint(1, 6)) for _ in range(200)]
    store = Store(history=history)
    model = Model()
    for _ in range(ops):
        op = random_op(rng, keys, model)
        model.apply(op)
        store.raw(encode_op(op))
    return store


def test_snapshot_restore_round_trip_is_byte_identical() -> None:
    original = random_store(seed=1, ops=1500)
    data = snapshot_bytes(original.sm)
    copy = KVStateMachine()
    copy.apply(1, encode_put(b"stale", b"gone after restore"))
    copy.restore(io.BytesIO(data))
    assert copy.range() == original.sm.range()
    assert copy.revision == original.sm.revision
    assert copy.last_applied == original.sm.last_applied
    assert len(copy) == len(original.sm)
    assert copy.get(b"stale") is None
    assert snapshot_bytes(copy) == data
    # Both keep evolving identically.
    index = original.index
    for i in range(300):
        command = encode_put(b"k%d" % (i % 37), b"%d" % i) if i % 3 else encode_delete(b"k%d" % (i % 41))
        index += 1
        assert copy.apply(index, command) == original.sm.apply(index, command)
    assert snapshot_bytes(copy) == snapshot_bytes(original.sm)


def test_snapshot_streams_in_pieces_and_survives_short_io() -> None:
    class ShortWriter(io.BytesIO):
        """Accepts at most 100 KiB per call, like a raw stream may."""

        calls = 0

        def write(self, data: object, /) -> int:
            self.calls += 1
            return super().write(bytes(data)[: 100 * 1024])  # type: ignore[call-overload]

    class Trickle(io.BytesIO):
        """Returns at most 7 bytes per read."""

        def read(self, size: int | None = -1, /) -> bytes:
            return super().read(7 if size is None or size < 0 else min(size, 7))

    store = Store()
    for i in range(40):
        store.put(b"big%02d" % i, bytes([i]) * 65536)
    sink = ShortWriter()
    store.sm.snapshot(sink)
    data = sink.getvalue()
    assert data == snapshot_bytes(store.sm)
    assert len(data) > 2 * 1024 * 1024 and sink.calls > len(data) // (100 * 1024)
    copy = KVStateMachine()
    copy.restore(Trickle(data))
    assert copy.range() == store.sm.range()


def test_restore_accepts_an_unbuffered_raw_stream(tmp_path: Path) -> None:
    store = random_store(seed=3, ops=300)
    path = tmp_path / "kv.snap"
    with path.open("wb") as sink:
        store.sm.snapshot(sink)
    copy = KVStateMachine()
    with path.open("rb", buffering=0) as source:
        copy.restore(source)
    assert snapshot_bytes(copy) == snapshot_bytes(store.sm)


@pytest.fixture
def victim() -> Store:
    """A store with state and watch history that a failed restore must leave exactly as it was."""
    store = Store(history=100)
    store.put(b"keep", b"me")
    store.put(b"keep2", b"too")
    store.delete(b"keep2")
    return store


def assert_untouched(store: Store, before: bytes) -> None:
    assert snapshot_bytes(store.sm) == before
    assert len(store.sm.events_since(0)) == 3
    assert store.sm.compacted_revision == 0
    assert store.put(b"after", b"ok").revision == 4


def small_snapshot() -> bytes:
    store = Store()
    store.put(b"alpha", b"1")
    store.put(b"beta", b"two")
    store.put(b"alpha", b"3")
    return snapshot_bytes(store.sm)


def test_restore_rejects_every_bit_flip(victim: Store) -> None:
    data = small_snapshot()
    before = snapshot_bytes(victim.sm)
    for pos in range(len(data)):
        corrupt = bytearray(data)
        corrupt[pos] ^= 1 << (pos % 8)
        with pytest.raises(KVSnapshotError):
            victim.sm.restore(io.BytesIO(bytes(corrupt)))
    assert_untouched(victim, before)


def test_restore_rejects_every_truncation(victim: Store) -> None:
    data = small_snapshot()
    before = snapshot_bytes(victim.sm)
    for cut in range(len(data)):
        with pytest.raises(KVSnapshotError, match="truncated"):
            victim.sm.restore(io.BytesIO(data[:cut]))
    assert_untouched(victim, before)


def test_restore_rejects_trailing_bytes_and_bad_checksum(victim: Store) -> None:
    data = small_snapshot()
    before = snapshot_bytes(victim.sm)
    with pytest.raises(KVSnapshotError, match="trailing bytes after its CRC"):
        victim.sm.restore(io.BytesIO(data + b"\x00"))
    value_at = data.index(b"two")
    corrupt = data[:value_at] + b"twO" + data[value_at + 3 :]
    with pytest.raises(KVSnapshotError, match="checksum mismatch"):
        victim.sm.restore(io.BytesIO(corrupt))
    assert_untouched(victim, before)


def header(revision: int = 5, count: int = 1, magic: bytes = SNAPSHOT_MAGIC, version: int = 1) -> bytes:
    return magic + u32(version) + u64(revision) + u64(9) + u64(count)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (header(magic=b"NOTASNAP"), "not a dengine KV snapshot: magic is b'NOTASNAP'"),
        (header(version=2), "unsupported KV snapshot format version 2"),
        (header(count=2) + snap_entry(b"b", b"", 1, 1, 1) + snap_entry(b"a", b"", 2, 2, 1), "increasing"),
        (header(count=2) + snap_entry(b"a", b"", 1, 1, 1) + snap_entry(b"a", b"", 2, 2, 1), "increasing"),
        (header() + snap_entry(b"", b"v", 1, 1, 1), "key length 0 out of range"),
        (header() + struct.pack("<QQQII", 1, 1, 1, MAX_KEY_SIZE + 1, 0), "key length 65537"),
        (header() + struct.pack("<QQQII", 1, 1, 1, 1, MAX_VALUE_SIZE + 1), "value length 16777217"),
        (header(revision=5) + snap_entry(b"a", b"", 1, 6, 1), "inconsistent revisions"),
        (header() + snap_entry(b"a", b"", 3, 2, 1), "inconsistent revisions"),
        (header() + snap_entry(b"a", b"", 0, 2, 1), "inconsistent revisions"),
        (header() + snap_entry(b"a", b"", 1, 2, 0), "inconsistent revisions"),
        (header() + snap_entry(b"a", b"", 2, 3, 3), "inconsistent revisions"),
        (header(count=2) + snap_entry(b"a", b"", 1, 1, 1), "truncated"),
    ],
)
def test_restore_rejects_well_checksummed_but_invalid_snapshots(
    body: bytes, message: str, victim: Store
) -> None:
    before = snapshot_bytes(victim.sm)
    with pytest.raises(KVSnapshotError, match=message):
        victim.sm.restore(io.BytesIO(with_crc(body)))
    assert_untouched(victim, before)
    assert issubclass(KVSnapshotError, DengineError)


def test_restore_accepts_a_valid_hand_built_snapshot() -> None:
    sm = restored(
        with_crc(header(count=2) + snap_entry(b"a", b"x", 2, 4, 3) + snap_entry(b"b", b"", 5, 5, 1))
    )
    assert sm.revision == 5 and sm.last_applied == 9
    assert sm.range() == [KeyValue(b"a", b"x", 2, 4, 3), KeyValue(b"b", b"", 5, 5, 1)]
    assert decode_result(sm.apply(10, encode_put(b"a", b"y", prev_kv=True))) == KVResult(
        True, 6, KeyValue(b"a", b"x", 2, 4, 3)
    )
    assert sm.get(b"a") == KeyValue(b"a", b"y", 2, 6, 4)


def test_restore_resets_watch_history() -> None:
    source = random_store(seed=5, ops=200)
    store = Store()
    for i in range(10):
        store.put(b"k", b"%d" % i)
    seen: list[WatchEvent] = []
    store.sm.subscribe(seen.append)
    store.sm.restore(io.BytesIO(snapshot_bytes(source.sm)))
    revision = store.sm.revision
    assert revision == source.sm.revision
    assert store.sm.compacted_revision == revision
    assert store.sm.events_since(revision) == []
    with pytest.raises(KVCompactedError):
        store.sm.events_since(revision - 1)
    with pytest.raises(KVCompactedError):
        store.sm.events_since(0)
    assert seen == []  # a restore is not a stream of events
    store.sm.apply(store.sm.last_applied + 1, encode_put(b"new", b"1"))
    assert [e.revision for e in store.sm.events_since(revision)] == [revision + 1]
    assert [e.revision for e in seen] == [revision + 1]


def test_restoring_an_older_snapshot_drops_newer_history() -> None:
    store = Store()
    store.put(b"a", b"1")
    older = snapshot_bytes(store.sm)
    for i in range(5):
        store.put(b"a", b"%d" % i)
    store.sm.restore(io.BytesIO(older))
    assert store.sm.revision == 1
    assert store.sm.events_since(1) == []  # the events of revisions 2..6 belonged to the old state
    assert store.sm.get(b"a") == KeyValue(b"a", b"1", 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_replicas_fed_the_same_commands_produce_identical_snapshots() -> None:
    rng = random.Random(424242)
    keys = [rng.randbytes(rng.randint(1, 5)) for _ in range(300)]
    model = Model()
    commands: list[bytes] = []
    for _ in range(5000):
        if rng.random() < 0.02:
            commands.append(rng.randbytes(rng.randint(0, 12)))  # garbage proposed by some client
            continue
        op = random_op(rng, keys, model)
        model.apply(op)
        commands.append(encode_op(op))
    # Different watch-history sizes and a subscriber must not influence the replicated state.
    replicas = [KVStateMachine(history=h) for h in (10_000, 0, 7)]
    replicas[2].subscribe(lambda e: None)
    late: KVStateMachine | None = None
    for index, command in enumerate(commands, start=1):
        results = {sm.apply(index, command) for sm in replicas}
        assert len(results) == 1, index
        if late is not None:
            assert late.apply(index, command) in results
        if index == 2500:  # a replica joining through a snapshot
            late = restored(snapshot_bytes(replicas[0]))
    assert late is not None
    snapshots = {snapshot_bytes(sm) for sm in [*replicas, late]}
    assert len(snapshots) == 1
    assert replicas[0].revision == model.revision
    assert replicas[0].range() == model.range(b"", None)


# ---------------------------------------------------------------------------------------------
# Odds and ends


def test_kv_state_machine_implements_the_protocol() -> None:
    assert isinstance(KVStateMachine(), StateMachine)


def test_fast_keyvalue_constructor_builds_ordinary_frozen_keyvalues() -> None:
    fast = kv.new_key_value(b"k", b"v", 1, 2, 3)
    assert fast == KeyValue(b"k", b"v", 1, 2, 3)
    assert hash(fast) == hash(KeyValue(b"k", b"v", 1, 2, 3))
    assert type(fast) is KeyValue
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.value = b"x"  # type: ignore[misc]
    stored = Store()
    stored.put(b"k", b"v")
    kv_ = stored.sm.get(b"k")
    assert kv_ is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        kv_.version = 9  # type: ignore[misc]


def test_largest_key_and_value_are_applied_and_snapshotted() -> None:
    store = Store()
    key = b"k" * MAX_KEY_SIZE
    value = bytes(range(256)) * (MAX_VALUE_SIZE // 256)
    assert store.put(key, value).ok
    copy = restored(snapshot_bytes(store.sm))
    got = copy.get(key)
    assert got is not None and got.value == value


def test_snapshot_writes_to_a_real_file(tmp_path: Path) -> None:
    store = random_store(seed=9, ops=500)
    path = tmp_path / "snap"
    with path.open("wb") as sink:
        store.sm.snapshot(sink)
    copy = KVStateMachine()
    with path.open("rb") as source:
        copy.restore(source)
    assert copy.range() == store.sm.range()


def test_the_fast_result_decoder_agrees_with_the_checked_one() -> None:
    """decode_result's fast path (successful writes) must give exactly what the checked decoder
    gives, for every result apply produces and for damaged copies of them."""
    rng = random.Random(5)
    sm = KVStateMachine()
    results: list[bytes] = []
    for index in range(1, 2001):
        key = b"k%d" % rng.randint(0, 30)
        roll = rng.random()
        if roll < 0.5:
            command = encode_put(key, bytes(rng.randint(0, 40)))
        elif roll < 0.7:
            command = encode_delete(key)
        elif roll < 0.9:
            command = encode_cas(key, rng.choice([None, b"", bytes(3)]), b"new")
        elif roll < 0.97:
            command = encode_delete_range(b"k1")
        else:
            command = b"\x01\x09 not a command"
        results.append(sm.apply(index, command))
    assert any(decode_result(r).prev is not None for r in results)
    for raw in results:
        expected = kv._decode_result_checked(raw)
        assert decode_result(raw) == expected
        assert decode_result(memoryview(raw)) == expected == decode_result(bytearray(raw))
        for damaged in (raw[:-1], raw + b"\x00", bytes([raw[0] + 1]) + raw[1:]):
            try:
                checked: KVResult | str = kv._decode_result_checked(damaged)
            except KVResultError as exc:
                checked = str(exc)
            try:
                fast: KVResult | str = decode_result(damaged)
            except KVResultError as exc:
                fast = str(exc)
            assert fast == checked
