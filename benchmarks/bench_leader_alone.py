"""The leader's own cost per write, without peers: ``node.propose`` with many proposals in flight
on a cluster of one voter, the built-in KV state machine and 256-byte values, in one process.

What the embedded benchmark's leader does for each write except replicating it: proposing,
appending, applying (on the apply thread), answering, and the benchmark's own worker loop. With
no peers, no fsync (``--engine memory``, the default) and no other process competing for the
cores, it moves far less from run to run than ``bench_embedded.py`` does, so it suits comparing
two versions of the code on the leader's path. Reports writes per second and the event loop's
CPU per write (``loop_us_per_op``).

Run:  python benchmarks/bench_leader_alone.py [--writes 300000] [--inflight 1000]
          [--engine memory|file] [--event-loop auto|uvloop|asyncio]
"""

# ruff: noqa: E402 (grpc's I/O manager is chosen before anything imports grpc)
from __future__ import annotations

from dengine.grpc_tuning import tune_grpc

tune_grpc()

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from dengine import event_loop
from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.event_loop import EVENT_LOOPS
from dengine.gc_tuning import tune_gc
from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node

VALUE = b"v" * 256


async def run(writes: int, inflight: int, engine: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dengine-bench-", dir=Path.cwd()) as tmp:
        port = free_ports(1)[0]
        address = f"127.0.0.1:{port}"
        config = Config.from_dict(
            {
                "node": {"id": 1, "listen": address, "data_dir": str(Path(tmp) / "d"), "metrics_listen": ""},
                "cluster": {"id": "bench", "members": {"1": address}},
                "raft": {"tick_ms": 20, "heartbeat_ms": 100, "election_timeout_ms": 1000},
                "storage": {"engine": engine},
                "snapshot": {"enabled": False},
            }
        )
        node = Node(config, KVStateMachine())
        await node.start()
        tune_gc()
        try:
            while node.raft is None or node.raft.lead != node.id:
                await asyncio.sleep(0.02)
            each = writes // inflight

            async def worker(w: int) -> None:
                for i in range(each):
                    await node.propose(encode_put(b"key-%d-%d" % (w, i % 1000), VALUE))

            began, cpu = time.perf_counter(), time.thread_time()
            await asyncio.gather(*(worker(w) for w in range(inflight)))
            took, cpu = time.perf_counter() - began, time.thread_time() - cpu
        finally:
            await node.stop(transfer_leadership=False)
    done = each * inflight
    return {
        "writes": done,
        "ops_per_s": done / took,
        "loop_us_per_op": round(cpu / done * 1e6, 2),
        "inflight": inflight,
        "engine": engine,
        "event_loop": event_loop.running_loop_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=300_000)
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--engine", choices=["memory", "file"], default="memory")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto")
    args = parser.parse_args()
    if args.inflight < 1 or args.writes < args.inflight:
        parser.error("need --inflight >= 1 and --writes >= --inflight")
    result = event_loop.run(run(args.writes, args.inflight, args.engine), loop=args.event_loop)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
