"""The client's own cost per operation: ``dengine.Client.put`` from many coroutines against a
server that answers every batch at once, in another process, without Raft or a disk.

Under saturation the client is a link of the chain every batch goes through (the client builds
the batch, the cluster commits it, the client hands out the answers, its callers write again), so
its CPU per operation is part of the round time. This measures that link alone: the client
process's CPU seconds per operation, and the throughput a single client reaches when the server
costs (almost) nothing.

Run:  python benchmarks/bench_client_cpu.py [--seconds 5] [--inflight 256] [--prev-kv]
"""

# ruff: noqa: E402 (grpc's I/O manager is chosen before anything imports grpc)
from __future__ import annotations

from dengine.grpc_tuning import tune_grpc

tune_grpc()  # what the README recommends for a program that uses the client at high rates

import argparse
import asyncio
import json
import multiprocessing
import random
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc

from dengine._core import encode_kv_write_answers, parse_kv_session_writes
from dengine.client import Client
from dengine.devcluster import free_ports
from dengine.kv import KVStateMachine, PutCommand, decode_command, encode_put
from dengine.raft.payload import SESSION_HEADER
from dengine.v1 import kv_pb2

VALUE = b"v" * 256


def _put_results() -> tuple[bytes, bytes]:
    """What the store answers a put without and with ``prev_kv`` (of an existing key)."""
    sm = KVStateMachine()
    sm.apply(1, encode_put(b"k", VALUE))
    return sm.apply(2, encode_put(b"k", VALUE)), sm.apply(3, encode_put(b"k", VALUE, prev_kv=True))


def serve(port: int, ready: Connection) -> None:
    """An instant KV server: every batch of session puts is answered with stored put results,
    over the batch stream the client uses (and over unary ``Batch``, for a client without it)."""
    plain, with_prev = _put_results()

    async def batch(request: bytes, context: Any) -> bytes:
        writes = parse_kv_session_writes(request)
        assert writes is not None, "the client sent a batch the fast path does not take"
        ops, _, payloads = writes
        commands = [decode_command(p[SESSION_HEADER.size :]) for p in payloads]
        answers: list[bytes | str] = [
            with_prev if isinstance(c, PutCommand) and c.prev_kv else plain for c in commands
        ]
        encoded = encode_kv_write_answers(ops, answers)
        assert encoded is not None
        return encoded

    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for envelope in envelopes:
            streamed = kv_pb2.StreamedBatch.FromString(envelope)
            answer = await batch(streamed.batch, context)
            yield kv_pb2.StreamedBatchAnswer(id=streamed.id, batch=answer).SerializeToString()

    async def main() -> None:
        server = grpc.aio.server()
        handlers = {
            "Batch": grpc.unary_unary_rpc_method_handler(batch),
            "BatchStream": grpc.stream_stream_rpc_method_handler(stream),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("dengine.v1.KV", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.send("ready")
        await server.wait_for_termination()

    asyncio.run(main())


async def drive(address: str, seconds: float, inflight: int, prev_kv: bool) -> dict[str, Any]:
    rng = random.Random(1)
    done = 0
    async with Client([address]) as client:
        await client.put(b"warm", VALUE)
        stop_at = time.perf_counter() + seconds

        async def lane() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await client.put(b"key-%d" % rng.randrange(100_000), VALUE, prev_kv=prev_kv)
                done += 1

        cpu0, began = time.process_time(), time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(inflight)))
        cpu, took = time.process_time() - cpu0, time.perf_counter() - began
    return {
        "ops": done,
        "ops_per_s": done / took,
        "client_cpu_us_per_op": cpu / done * 1e6,
        "inflight": inflight,
        "prev_kv": prev_kv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=256)
    parser.add_argument("--prev-kv", action="store_true", help="ask every put for the key-value it replaced")
    args = parser.parse_args()
    port = free_ports(1)[0]
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port, child), daemon=True)
    server.start()
    try:
        parent.recv()
        result = asyncio.run(drive(f"127.0.0.1:{port}", args.seconds, args.inflight, args.prev_kv))
    finally:
        server.kill()
        server.join()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
