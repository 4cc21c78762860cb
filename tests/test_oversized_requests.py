"""Requests a node must refuse with a clear status rather than an UNKNOWN: above all those a few
bytes long that would cost it seconds of its loop or gigabytes of memory, refused before the
work (RESOURCE_EXHAUSTED or INVALID_ARGUMENT); the node serves on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dengine import server as server_module
from dengine._core import parse_kv_session_writes
from dengine.kv import KVStateMachine
from dengine.node import Node
from dengine.server import MAX_ANSWER_BYTES, MAX_BATCH, kv_services
from dengine.transport import peers
from dengine.v1 import kv_pb2, kv_pb2_grpc, raft_pb2
from test_kv_session_sequence import leading_kv_node, still_serving
from test_node_embedded import configs, until, with_section

EMPTY_ITEM = b"\x0a\x00"  # field 1 (the repeated messages or operations), an empty message
BIG = 1 << 20


def test_a_peer_batch_of_too_many_messages_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    async def main() -> None:
        async with leading_kv_node(tmp_path) as node:
            transport = node.transport
            assert transport is not None
            parsed: list[Any] = []
            parse = transport._parse

            async def recording(data: bytes, kind: Any, context: Any, method: str) -> Any:
                parsed.append(kind)
                return await parse(data, kind, context, method)

            transport._parse = recording  # type: ignore[method-assign]

            async def one() -> AsyncIterator[bytes]:
                yield EMPTY_ITEM * (peers._MAX_BATCH_MESSAGES + 1)

            async with grpc.aio.insecure_channel(node.config.node.listen) as channel:
                call = channel.stream_unary(
                    "/dengine.v1.Raft/Messages", request_serializer=None, response_deserializer=None
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(one(), timeout=10)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert parsed == [], "it was parsed first"
                await still_serving(channel)

    asyncio.run(main())


def test_a_kv_batch_of_too_many_operations_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    parse = parse_kv_session_writes

    def recording(request: bytes) -> Any:
        parsed.append(len(request))
        return parse(request)

    monkeypatch.setattr(server_module, "parse_kv_session_writes", recording)

    async def main() -> None:
        async with leading_kv_node(tmp_path) as node:  # noqa: SIM117
            async with grpc.aio.insecure_channel(node.config.node.listen) as channel:
                batch = channel.unary_unary(
                    "/dengine.v1.KV/Batch", request_serializer=None, response_deserializer=None
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await batch(EMPTY_ITEM * (MAX_BATCH + 1), timeout=10)
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert parsed == [], "it was parsed first"
                await still_serving(channel)

    asyncio.run(main())


def test_gets_and_ranges_whose_answer_would_be_too_large_are_refused_before_it_is_built(
    tmp_path: Path,
) -> None:
    """One key of a megabyte, asked for by thousands of gets a few bytes each, made the node copy
    it into every answer, and only then did gRPC refuse the answer as too large."""
    many = MAX_ANSWER_BYTES // BIG + 1

    async def main() -> None:
        async with leading_kv_node(tmp_path) as node:
            options = [("grpc.max_receive_message_length", 64 << 20)]
            async with grpc.aio.insecure_channel(node.config.node.listen, options=options) as channel:
                kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                for i in range(many):
                    await kv.Put(kv_pb2.PutRequest(key=b"big/%03d" % i, value=b"v" * BIG), timeout=10)
                get = kv_pb2.Operation(get=kv_pb2.GetRequest(key=b"big/000"))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await kv.Batch(kv_pb2.BatchRequest(ops=[get] * many), timeout=10)
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "ask for fewer keys" in (refused.value.details() or "")
                fewer = await kv.Batch(kv_pb2.BatchRequest(ops=[get] * 4), timeout=10)
                assert [len(r.get.kv.value) for r in fewer.results] == [BIG] * 4
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await kv.Range(kv_pb2.RangeRequest(prefix=b"big/"), timeout=10)
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                some = await kv.Range(kv_pb2.RangeRequest(prefix=b"big/", limit=4), timeout=10)
                assert len(some.kvs) == 4
                await still_serving(channel)

    asyncio.run(main())


def test_a_sender_header_of_thousands_of_digits_is_no_error(tmp_path: Path) -> None:
    """int() of a run of more than 4,300 digits raises: the header named no node, and the stream
    ended UNKNOWN with a traceback in the log instead of being taken like one without it."""

    async def main() -> None:
        async with leading_kv_node(tmp_path) as node:

            async def none() -> AsyncIterator[bytes]:
                return
                yield b""  # an async generator that sends nothing

            async with grpc.aio.insecure_channel(node.config.node.listen) as channel:
                call = channel.stream_unary(
                    "/dengine.v1.Raft/Messages", request_serializer=None, response_deserializer=None
                )
                answer = await call(none(), metadata=((peers.SENDER_KEY, "9" * 5000),), timeout=10)
                assert raft_pb2.StreamClosed.FromString(answer) == raft_pb2.StreamClosed()
                await still_serving(channel)

    asyncio.run(main())


def test_a_lease_read_asked_of_a_node_without_lease_reads_is_a_bad_argument(tmp_path: Path) -> None:
    """A node with check_quorum off has no lease: a read asking for one raised ValueError inside
    the service, which gRPC answered UNKNOWN."""
    (cfg,) = with_section(configs(tmp_path, 1), "raft", check_quorum=False)

    async def main() -> None:
        sm = KVStateMachine()
        async with Node(cfg, sm, extra_services=kv_services(sm)) as node:
            await until(lambda: node.raft is not None and node.raft.lead == node.id)
            async with grpc.aio.insecure_channel(node.config.node.listen) as channel:
                kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await kv.Get(kv_pb2.GetRequest(key=b"k", consistency=kv_pb2.LEASE), timeout=10)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "lease reads are off" in (refused.value.details() or "")
                got = await kv.Get(kv_pb2.GetRequest(key=b"k"), timeout=10)
                assert not got.found

    asyncio.run(main())
