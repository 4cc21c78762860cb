"""The KV service's Batch fast path (Rust, ``dengine_core::kv::wire``) against the general path
(the protobuf messages and ``dengine.server``'s per-operation code): whatever the fast path takes,
it proposes the same payloads and answers the same response; whatever it cannot vouch for, it
leaves to the general path. Plus the raw Batch handler end to end on a real cluster."""

from __future__ import annotations

import asyncio
import random
import sys

import grpc
import pytest

from dengine._core import (
    decode_kv_batch_response,
    encode_kv_get_operation,
    encode_kv_write_answers,
    encode_kv_write_operation,
    join_kv_operations,
    parse_kv_session_writes,
)
from dengine.client import _answer_of
from dengine.kv import MAX_VALUE_SIZE, KVStateMachine, encode_cas, encode_delete, encode_put
from dengine.raft import payload as envelope
from dengine.server import RequestError, _answers_message, _prepare_cas
from dengine.v1 import kv_pb2

from cluster_procs import ProcCluster

OPS = {"put": 1, "delete": 2, "cas": 3}
PUT_PREV = 5  # the client's code for a put with prev_kv set


def session(rng: random.Random) -> kv_pb2.Session:
    seq = rng.choice([1, 2, 7, 1 << 40, (1 << 64) - 1])
    return kv_pb2.Session(
        client_id=rng.choice([1, 99, (1 << 62) + 5, (1 << 64) - 1]),
        sequence=seq,
        first_outstanding=rng.choice([0, 1, seq, seq + 5 if seq < (1 << 63) else seq]),
    )


def random_write(rng: random.Random) -> kv_pb2.Operation:
    key = bytes(rng.randrange(256) for _ in range(rng.choice([1, 5, 22, 23, 300])))
    value = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 256, 1000])))
    kind = rng.choice(list(OPS))
    if kind == "put":
        put = kv_pb2.PutRequest(key=key, value=value, session=session(rng), prev_kv=rng.random() < 0.3)
        return kv_pb2.Operation(put=put)
    if kind == "delete":
        return kv_pb2.Operation(delete=kv_pb2.DeleteRequest(key=key, session=session(rng)))
    has = rng.random() < 0.5
    expected = value[:3] if has and rng.random() < 0.5 else b""
    cas = kv_pb2.CompareAndSwapRequest(
        key=key, has_expected=has, expected=expected, value=value, session=session(rng)
    )
    return kv_pb2.Operation(cas=cas)


def expected_payloads(request: kv_pb2.BatchRequest) -> tuple[bytes, list[tuple[int, int]], list[bytes]]:
    """What the general path proposes for each write (``KVService._prepare`` then
    ``Node.submit_session``)."""
    ops, keys, payloads = bytearray(), [], []
    for op in request.ops:
        kind = op.WhichOneof("op")
        assert kind is not None
        r = getattr(op, kind)
        if kind == "put":
            command = encode_put(r.key, r.value, prev_kv=r.prev_kv)
        elif kind == "delete":
            command = encode_delete(r.key)
        else:
            command = encode_cas(r.key, r.expected if r.has_expected else None, r.value)
        s = r.session
        ops.append(OPS[kind])
        keys.append((s.client_id, s.sequence))
        fo = min(s.first_outstanding, s.sequence)
        payloads.append(envelope.session_command(s.client_id, s.sequence, command, fo))
    return bytes(ops), keys, payloads


def test_canonical_batches_of_session_writes_become_the_general_paths_payloads() -> None:
    rng = random.Random(7)
    for _ in range(300):
        request = kv_pb2.BatchRequest(ops=[random_write(rng) for _ in range(rng.randint(1, 20))])
        got = parse_kv_session_writes(request.SerializeToString())
        assert got is not None
        assert got == expected_payloads(request)


def _one_put(**fields: object) -> kv_pb2.BatchRequest:
    put = kv_pb2.PutRequest(key=b"k", value=b"v", session=kv_pb2.Session(client_id=1, sequence=1))
    for name, value in fields.items():
        if value is None:
            put.ClearField(name)
        else:
            setattr(put, name, value)
    return kv_pb2.BatchRequest(ops=[kv_pb2.Operation(put=put)])


def _raw(request: kv_pb2.BatchRequest) -> bytes:
    return request.SerializeToString()


VALID = _raw(_one_put())


@pytest.mark.parametrize(
    "request_bytes, why",
    [
        (b"", "an empty batch"),
        (_raw(kv_pb2.BatchRequest(ops=[kv_pb2.Operation(get=kv_pb2.GetRequest(key=b"k"))])), "a get"),
        (
            _raw(
                kv_pb2.BatchRequest(
                    ops=[_one_put().ops[0], kv_pb2.Operation(get=kv_pb2.GetRequest(key=b"k"))]
                )
            ),
            "writes mixed with a get",
        ),
        (_raw(_one_put(session=None)), "a write without a session"),
        (_raw(_one_put(key=b"")), "an empty key"),
        (_raw(_one_put(key=b"k" * (64 * 1024 + 1))), "a key over the limit"),
        (_raw(kv_pb2.BatchRequest(ops=[kv_pb2.Operation()])), "an empty operation"),
        (VALID[:-1], "a truncated request"),
        (VALID + b"\x10\x01", "an unknown top-level field"),
        (VALID + VALID[:0] + b"\x0a\x00", "an empty operation after a valid one"),
        (
            _raw(
                kv_pb2.BatchRequest(
                    ops=[
                        kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"k", session=kv_pb2.Session(client_id=1)))
                    ]
                )
            ),
            "sequence 0",
        ),
        (
            _raw(
                kv_pb2.BatchRequest(
                    ops=[
                        kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"k", session=kv_pb2.Session(sequence=1)))
                    ]
                )
            ),
            "client id 0",
        ),
    ],
)
def test_anything_else_is_left_to_the_general_path(request_bytes: bytes, why: str) -> None:
    assert parse_kv_session_writes(request_bytes) is None, why


def test_a_field_given_twice_is_left_to_the_general_path() -> None:
    # The protobuf library merges or overrides repeated fields; the fast path does not guess.
    op = _one_put().ops[0].SerializeToString()  # b"\x0a" + len + PutRequest
    put = _one_put().ops[0].put.SerializeToString()
    twice_key = b"\x0a\x01x" + put
    patched = b"\x0a" + bytes([len(twice_key)]) + twice_key
    assert kv_pb2.Operation.FromString(patched).put.key == b"k", "the library keeps the last key"
    assert parse_kv_session_writes(b"\x0a" + bytes([len(op)]) + op) is not None
    assert parse_kv_session_writes(b"\x0a" + bytes([len(patched)]) + patched) is None


def test_random_damage_never_passes_as_a_different_batch() -> None:
    """Every damaged request the fast path still takes must mean, to the protobuf library, the
    very writes the fast path read from it."""
    rng = random.Random(11)
    taken = 0
    for _ in range(3000):
        request = kv_pb2.BatchRequest(ops=[random_write(rng) for _ in range(rng.randint(1, 4))])
        data = bytearray(request.SerializeToString())
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256) if rng.random() < 0.7 else data[i] ^ (1 << rng.randrange(8))
        got = parse_kv_session_writes(bytes(data))
        if got is None:
            continue
        taken += 1
        assert got == expected_payloads(kv_pb2.BatchRequest.FromString(bytes(data)))
    assert taken > 0, "no damaged request was still canonical: the check above checked nothing"


def results_of_real_writes(rng: random.Random) -> tuple[bytes, list[bytes | str]]:
    """Write results as the built-in store returns them: puts with and without a previous value,
    deletes of present and missing keys, swaps that succeed and fail; and error answers."""
    sm = KVStateMachine()
    ops, answers = bytearray(), list[bytes | str]()
    for i in range(200):
        key = b"k%d" % rng.randrange(8)
        value = b"v" * rng.choice([0, 1, 300])
        kind = rng.choice(["put", "delete", "cas", "error"])
        if kind == "error":
            ops.append(rng.choice(list(OPS.values())))
            answers.append(
                rng.choice(["UNAVAILABLE: the node stopped", "FAILED_PRECONDITION: not leader; leader=2@h:1"])
            )
            continue
        if kind == "put":
            command = encode_put(key, value, prev_kv=rng.random() < 0.5)
        elif kind == "delete":
            command = encode_delete(key)
        else:
            command = encode_cas(key, rng.choice([None, b"", b"v", value]), value)
        ops.append(OPS[kind])
        answers.append(sm.apply(i + 1, command))
    return bytes(ops), answers


def test_answers_encode_to_the_general_paths_response() -> None:
    rng = random.Random(3)
    for _ in range(20):
        ops, answers = results_of_real_writes(rng)
        encoded = encode_kv_write_answers(ops, answers)
        assert encoded is not None
        expected = _answers_message(ops, answers)
        got = kv_pb2.BatchResponse.FromString(encoded)
        assert got == expected
        assert [r.WhichOneof("result") for r in got.results] == [
            r.WhichOneof("result") for r in expected.results
        ]


def test_a_result_that_is_not_plain_is_left_to_the_general_path() -> None:
    sm = KVStateMachine()
    error_result = sm.apply(1, b"\x01\x09")  # an unknown op: the store answers an error result
    assert encode_kv_write_answers(b"\x01", [error_result]) is None
    assert encode_kv_write_answers(b"\x02", [b"not a result"]) is None
    with pytest.raises(ValueError, match="one answer per write"):
        encode_kv_write_answers(b"\x01\x01", [error_result])


# --- the client's side ------------------------------------------------------------------------


def test_the_clients_operation_bytes_mean_what_the_protobuf_library_builds() -> None:
    rng = random.Random(5)
    for _ in range(500):
        op = random_write(rng) if rng.random() < 0.8 else None
        if op is None:
            get = kv_pb2.GetRequest(
                key=b"k%d" % rng.randrange(100),
                consistency=rng.choice([kv_pb2.LINEARIZABLE, kv_pb2.LEASE, kv_pb2.STALE]),
            )
            built = encode_kv_get_operation(get.key, get.consistency)
            assert kv_pb2.Operation.FromString(built) == kv_pb2.Operation(get=get)
            continue
        kind = op.WhichOneof("op")
        assert kind is not None
        r = getattr(op, kind)
        s = r.session
        expected = (r.expected if r.has_expected else None) if kind == "cas" else None
        value = b"" if kind == "delete" else r.value
        code = PUT_PREV if kind == "put" and r.prev_kv else OPS[kind]
        built = encode_kv_write_operation(
            code, r.key, value, expected, (s.client_id, s.sequence, s.first_outstanding)
        )
        assert kv_pb2.Operation.FromString(built) == op
    ops = [encode_kv_get_operation(b"a", 0), encode_kv_get_operation(b"b", 2)]
    assert kv_pb2.BatchRequest.FromString(join_kv_operations(ops)) == kv_pb2.BatchRequest(
        ops=[kv_pb2.Operation.FromString(o) for o in ops]
    )


def random_response(rng: random.Random) -> kv_pb2.BatchResponse:
    def kv() -> kv_pb2.KeyValue:
        return kv_pb2.KeyValue(
            key=rng.choice([b"", b"k", b"key" * 9]),
            value=rng.choice([b"", b"v" * 300]),
            create_revision=rng.choice([0, 1, 1 << 40]),
            mod_revision=rng.choice([0, 5]),
            version=rng.choice([0, 3]),
        )

    response = kv_pb2.BatchResponse()
    for _ in range(rng.randint(0, 12)):
        slot = response.results.add()
        kind = rng.choice(["put", "get", "delete", "cas", "error"])
        rev = rng.choice([0, 1, (1 << 64) - 1])
        with_kv = rng.random() < 0.5
        if kind == "error":
            slot.error = rng.choice(["", "UNAVAILABLE: x", "FAILED_PRECONDITION: not leader; leader=2@h:1 é"])
        elif kind == "put":
            slot.put.revision = rev
            if with_kv:
                slot.put.prev.CopyFrom(kv())
        elif kind == "get":
            slot.get.found = rng.random() < 0.5
            slot.get.revision = rev
            if with_kv:
                slot.get.kv.CopyFrom(kv())
        elif kind == "delete":
            slot.delete.deleted = rng.random() < 0.5
            slot.delete.revision = rev
            if with_kv:
                slot.delete.prev.CopyFrom(kv())
        else:
            slot.cas.succeeded = rng.random() < 0.5
            slot.cas.revision = rev
            if with_kv:
                slot.cas.current.CopyFrom(kv())
    return response


def test_the_client_reads_answers_as_the_protobuf_library_does() -> None:
    rng = random.Random(9)
    for _ in range(500):
        response = random_response(rng)
        got = decode_kv_batch_response(response.SerializeToString())
        assert got == [_answer_of(r) for r in response.results]


def test_a_damaged_answer_is_read_as_the_protobuf_library_reads_it_or_left_to_it() -> None:
    rng = random.Random(13)
    taken = 0
    for _ in range(3000):
        data = bytearray(random_response(rng).SerializeToString())
        if not data:
            continue
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        got = decode_kv_batch_response(bytes(data))
        if got is None:
            continue
        taken += 1
        parsed = kv_pb2.BatchResponse.FromString(bytes(data))
        assert got == [_answer_of(r) for r in parsed.results]
    assert taken > 0


# --- the raw Batch handler on a real cluster --------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")
def test_the_batch_rpc_answers_both_paths_and_refuses_malformed_bytes(cluster: ProcCluster) -> None:
    async def main() -> None:
        leader = cluster.wait_leader()
        async with grpc.aio.insecure_channel(cluster.address(leader)) as channel:
            raw = channel.unary_unary("/dengine.v1.KV/Batch")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(b"\x0a\xff\xff\xff", timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            fast = kv_pb2.BatchRequest(
                ops=[
                    kv_pb2.Operation(
                        put=kv_pb2.PutRequest(
                            key=b"a", value=b"1", session=kv_pb2.Session(client_id=5, sequence=1)
                        )
                    ),
                    kv_pb2.Operation(
                        cas=kv_pb2.CompareAndSwapRequest(
                            key=b"a",
                            has_expected=True,
                            expected=b"0",
                            value=b"2",
                            session=kv_pb2.Session(client_id=5, sequence=2),
                        )
                    ),
                ]
            ).SerializeToString()
            assert parse_kv_session_writes(fast) is not None
            first = kv_pb2.BatchResponse.FromString(await raw(fast, timeout=5))
            assert [r.WhichOneof("result") for r in first.results] == ["put", "cas"]
            assert not first.results[1].cas.succeeded and first.results[1].cas.current.value == b"1"
            again = kv_pb2.BatchResponse.FromString(await raw(fast, timeout=5))
            assert again == first, "a retried batch is answered from the session table, applied once"
            general = kv_pb2.BatchRequest(
                ops=[
                    kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"b", value=b"x")),  # no session
                    kv_pb2.Operation(get=kv_pb2.GetRequest(key=b"a")),
                    kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"", value=b"x")),
                ]
            ).SerializeToString()
            assert parse_kv_session_writes(general) is None
            mixed = kv_pb2.BatchResponse.FromString(await raw(general, timeout=5))
            assert mixed.results[0].put.revision > first.results[0].put.revision
            assert mixed.results[1].get.found and mixed.results[1].get.kv.value == b"1"
            assert mixed.results[2].error.startswith("INVALID_ARGUMENT: key must be 1 to")

    asyncio.run(main())


def test_an_oversized_expected_value_is_refused_like_an_oversized_value() -> None:
    """A compare-and-swap whose expected value passes the value limit fits in a gRPC message:
    it must be refused with the status an oversized value gets (RESOURCE_EXHAUSTED), one
    operation's error in a batch, not a ValueError that fails the call (or the batch) as
    UNKNOWN after other writes of it were proposed."""
    big = b"x" * (MAX_VALUE_SIZE + 1)
    request = kv_pb2.CompareAndSwapRequest(key=b"k", expected=big, has_expected=True, value=b"v")
    with pytest.raises(RequestError) as refused:
        _prepare_cas(request)
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
