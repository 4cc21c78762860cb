"""Bytes that are not the method's protobuf message, sent to every KV and Cluster method of a real
node: refused with INVALID_ARGUMENT (not UNKNOWN, "Unexpected DecodeError"), and the node serves
on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dengine.cluster_service import ClusterService, add_cluster_service
from dengine.v1 import cluster_pb2, cluster_pb2_grpc
from test_kv_session_sequence import leading_kv_node, still_serving

GARBAGE = b"\xff\xff\xff\xff\x0f\x0a\x80"  # an invalid wire type, then a truncated field

# method -> how it is called
KV_METHODS = {
    "Put": "unary",
    "Get": "unary",
    "Delete": "unary",
    "CompareAndSwap": "unary",
    "Range": "unary",
    "Batch": "unary",
    "BatchStream": "bidi",
    "Watch": "ustream",
}
CLUSTER_METHODS = ["Status", "AddLearner", "Promote", "RemoveMember", "Snapshot", "TransferLeader"]


async def call_raw(channel: grpc.aio.Channel, path: str, kind: str, payload: bytes) -> grpc.StatusCode:
    """Sends ``payload`` as the request of ``path``; the status the call ended with."""
    try:
        if kind == "unary":
            await channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                payload, timeout=10
            )
        elif kind == "ustream":
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                payload, timeout=10
            )
            async for _ in call:
                break  # a watch that answers never ends by itself
        else:

            async def one() -> AsyncIterator[bytes]:
                yield payload

            call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
                one(), timeout=10
            )
            async for _ in call:
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "path, kind",
    [(f"/dengine.v1.KV/{m}", k) for m, k in KV_METHODS.items()]
    + [(f"/dengine.v1.Cluster/{m}", "unary") for m in CLUSTER_METHODS],
)
def test_bytes_that_are_not_the_message_are_refused_and_the_node_serves_on(
    tmp_path: Path, path: str, kind: str
) -> None:
    async def main() -> None:
        async with (
            leading_kv_node(tmp_path) as node,
            grpc.aio.insecure_channel(node.config.node.listen) as channel,
        ):
            assert await call_raw(channel, path, kind, GARBAGE) is grpc.StatusCode.INVALID_ARGUMENT
            await still_serving(channel)

    asyncio.run(main())


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_the_cluster_service_refuses_bytes_that_are_not_the_message(tmp_path: Path, method: str) -> None:
    """The Cluster service as :func:`add_cluster_service` serves it, around a real node."""

    async def main() -> None:
        async with leading_kv_node(tmp_path) as node:
            server = grpc.aio.server()
            add_cluster_service(server, ClusterService(node))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    path = f"/dengine.v1.Cluster/{method}"
                    assert await call_raw(channel, path, "unary", GARBAGE) is grpc.StatusCode.INVALID_ARGUMENT
                    cluster = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
                    status = await cluster.Status(cluster_pb2.StatusRequest(), timeout=10)
                    assert status.role == "leader" and status.id == node.id
            finally:
                await server.stop(None)

    asyncio.run(main())
