"""Session writes with a client id but sequence 0 (no sequence) are refused with
INVALID_ARGUMENT, each alone: as a Put, inside a Batch (the other writes of the batch are
applied and answered), and on a BatchStream (the stream and its other batches go on)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dengine.node import Node
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from test_client_sessions import one_kv_node


@contextlib.asynccontextmanager
async def leading_kv_node(tmp_path: Path) -> AsyncIterator[Node]:
    async with one_kv_node(tmp_path) as node:
        for _ in range(500):
            raft = node.raft
            if raft is not None and raft.lead == node.id:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the node never led")
        yield node


async def still_serving(channel: grpc.aio.Channel) -> None:
    """The node behind ``channel`` (a leader) still writes, reads and answers Status."""
    kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
    put = await kv.Put(kv_pb2.PutRequest(key=b"after", value=b"bad input"), timeout=10)
    got = await kv.Get(kv_pb2.GetRequest(key=b"after"), timeout=10)
    assert got.found and got.kv.value == b"bad input" and got.revision >= put.revision
    cluster = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
    status = await cluster.Status(cluster_pb2.StatusRequest(), timeout=10)
    assert status.role == "leader"


def _put(key: bytes, client_id: int, sequence: int) -> kv_pb2.Operation:
    session = kv_pb2.Session(client_id=client_id, sequence=sequence)
    return kv_pb2.Operation(put=kv_pb2.PutRequest(key=key, value=b"v", session=session))


def test_a_session_write_without_a_sequence_is_refused_alone_and_nothing_else_is(tmp_path: Path) -> None:
    """Sequence 0 is no sequence: the node would raise proposing it (UNKNOWN, a whole Batch
    failed although a write ahead of it was applied, a whole BatchStream ended)."""

    async def main() -> None:
        async with (
            leading_kv_node(tmp_path) as node,
            grpc.aio.insecure_channel(node.config.node.listen) as channel,
        ):
            kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kv.Put(_put(b"alone", 9, 0).put, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT

            batch = kv_pb2.BatchRequest(ops=[_put(b"first", 9, 1), _put(b"second", 9, 0)])
            answered = await kv.Batch(batch, timeout=10)
            first, second = answered.results
            assert first.WhichOneof("result") == "put" and first.put.revision > 0
            assert second.error.startswith("INVALID_ARGUMENT"), second
            assert (await kv.Get(kv_pb2.GetRequest(key=b"first"), timeout=10)).found
            assert not (await kv.Get(kv_pb2.GetRequest(key=b"second"), timeout=10)).found

            queue: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def envelopes() -> AsyncIterator[bytes]:
                while (item := await queue.get()) is not None:
                    yield item

            stream = channel.stream_stream(
                "/dengine.v1.KV/BatchStream", request_serializer=None, response_deserializer=None
            )(envelopes(), timeout=10)
            bad = kv_pb2.BatchRequest(ops=[_put(b"third", 9, 0)]).SerializeToString()
            good = kv_pb2.BatchRequest(ops=[_put(b"fourth", 9, 2)]).SerializeToString()
            queue.put_nowait(kv_pb2.StreamedBatch(id=1, batch=bad).SerializeToString())
            one = kv_pb2.StreamedBatchAnswer.FromString(await stream.read())
            queue.put_nowait(kv_pb2.StreamedBatch(id=2, batch=good).SerializeToString())
            two = kv_pb2.StreamedBatchAnswer.FromString(await stream.read())
            queue.put_nowait(None)
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() is grpc.StatusCode.OK
            assert (one.id, one.code) == (1, 0)
            (refused_op,) = kv_pb2.BatchResponse.FromString(one.batch).results
            assert refused_op.error.startswith("INVALID_ARGUMENT"), refused_op
            assert (two.id, two.code) == (2, 0)
            (applied,) = kv_pb2.BatchResponse.FromString(two.batch).results
            assert applied.put.revision > first.put.revision
            await still_serving(channel)

    asyncio.run(main())
