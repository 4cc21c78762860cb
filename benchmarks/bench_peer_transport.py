"""Peer transport: one long-lived gRPC stream versus pipelined unary calls, for AppendEntries.

The node runtime sends peer messages over a long-lived stream per peer (``Raft.Messages``); the
alternative is one unary call per message with many in flight, the reply carrying the answer.
This measures both on 127.0.0.1 between two processes with grpc.aio, the way the runtime uses it:

* ``stream``: a bidirectional stream; the receiver answers every message on the same stream
  (the runtime uses one client stream in each direction, which costs the same per message).
* ``unary``: pipelined unary calls, up to W in flight, the reply being the answer.

Messages are opaque bytes of an AppendEntries' size (``--bytes``, default 16 KiB: 64 entries of
256 bytes) and answers of an acknowledgement's (32 bytes), so protobuf costs are left out of both.
Reported for 1 and W in flight: messages per second, and round-trip p50 and p99.

Run:  python benchmarks/bench_peer_transport.py [--seconds 5] [--window 64] [--bytes 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from dengine.devcluster import free_ports

SERVICE = "bench.Peer"
ACK = b"a" * 32
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


async def _serve(port: int, ready: Any) -> None:
    async def exchange(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield ACK

    async def call(request: bytes, context: Any) -> bytes:
        return ACK

    handlers = {
        "Exchange": grpc.stream_stream_rpc_method_handler(exchange),
        "Call": grpc.unary_unary_rpc_method_handler(call),
    }
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def serve(port: int, ready: Any) -> None:
    asyncio.run(_serve(port, ready))


async def run_stream(channel: grpc.aio.Channel, payload: bytes, window: int, seconds: float) -> list[float]:
    call = channel.stream_stream(f"/{SERVICE}/Exchange")()
    sent: list[float] = []  # send times of the messages still unanswered, oldest first
    rtts: list[float] = []
    stop = time.perf_counter() + seconds
    credit = asyncio.Semaphore(window)

    async def receive() -> None:
        async for _ in call:
            rtts.append(time.perf_counter() - sent.pop(0))
            credit.release()

    receiver = asyncio.create_task(receive())
    while time.perf_counter() < stop:
        await credit.acquire()
        sent.append(time.perf_counter())
        await call.write(payload)
    await call.done_writing()
    await receiver
    return rtts


async def run_unary(channel: grpc.aio.Channel, payload: bytes, window: int, seconds: float) -> list[float]:
    method = channel.unary_unary(f"/{SERVICE}/Call")
    rtts: list[float] = []
    stop = time.perf_counter() + seconds

    async def lane() -> None:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            await method(payload)
            rtts.append(time.perf_counter() - began)

    await asyncio.gather(*(lane() for _ in range(window)))
    return rtts


def summary(rtts: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(rtts)
    return {
        "messages_per_s": len(rtts) / seconds,
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1e3,
    }


async def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    payload = b"e" * args.bytes
    results: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        await channel.channel_ready()
        for window in (1, args.window):
            for name, run in (("stream", run_stream), ("unary", run_unary)):
                await run(channel, payload, window, 0.5)  # warm up
                began = time.perf_counter()
                rtts = await run(channel, payload, window, args.seconds)
                results[f"{name} x{window}"] = summary(rtts, time.perf_counter() - began)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--window", type=int, default=64, help="messages in flight (the raft.max_inflight default)"
    )
    parser.add_argument("--bytes", type=int, default=16 << 10, help="size of one message")
    args = parser.parse_args()
    (port,) = free_ports(1)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    try:
        ready.wait(30)
        results = asyncio.run(measure(port, args))
    finally:
        server.kill()
        server.join()
    for name, r in results.items():
        rate, p50, p99 = r["messages_per_s"], r["p50_ms"], r["p99_ms"]
        print(f"{name:<12} {rate:>9,.0f} msg/s  p50 {p50:6.3f} ms  p99 {p99:6.3f} ms")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
