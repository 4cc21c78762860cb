"""Embedded throughput: ``node.propose`` from the leader's process with many proposals in flight,
3 nodes in 3 processes on 127.0.0.1, real WAL with fsync, the built-in KV state machine, 256-byte
values. Reports ops/s, latency percentiles, and the CPU each write cost (``cpu_us_per_op``: the
leader's event-loop thread, its whole process, both followers together), which moves less than
ops/s on a shared host and so compares two versions of the code better.

The leader's process and the followers' run on the event loop ``--event-loop`` names
(``dengine.event_loop``: uvloop where installed by default).

Keys: by default worker ``w`` writes ``key-<w>-<i mod 1000>``, so the store grows by one key
per write to as many as a million (every put inserts); ``--keys N`` writes random keys among
``key-000000`` .. ``key-<N-1>`` instead, the key space of ``bench_vs_etcd.py`` (100,000 there),
where most puts replace a value.

Run:  python benchmarks/bench_embedded.py [--seconds 10] [--inflight 2000] [--keys N]
          [--event-loop auto|uvloop|asyncio]
"""

# ruff: noqa: E402 (grpc's I/O manager is chosen before anything imports grpc)
from __future__ import annotations

from dengine.grpc_tuning import tune_grpc

tune_grpc()  # what the README recommends for a program that runs a node

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from dengine import event_loop
from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.event_loop import EVENT_LOOPS
from dengine.gc_tuning import tune_gc
from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node
from dengine.v1 import cluster_pb2, cluster_pb2_grpc
from proc_cpu import cpu_seconds

VALUE = b"v" * 256


def write_configs(root: Path) -> list[Path]:
    ports = free_ports(3)
    members = ", ".join(f'{i} = "127.0.0.1:{p}"' for i, p in enumerate(ports, start=1))
    paths = []
    for i in range(1, 4):
        path = root / f"node{i}.toml"
        path.write_text(
            f'[node]\nid = {i}\nlisten = "127.0.0.1:{ports[i - 1]}"\ndata_dir = "{root / f"d{i}"}"\n'
            f'metrics_listen = ""\n[cluster]\nid = "bench"\nmembers = {{ {members} }}\n'
            "[raft]\ntick_ms = 20\nheartbeat_ms = 100\nelection_timeout_ms = 1000\n"
        )
        paths.append(path)
    return paths


async def run(seconds: float, inflight: int, loop: str, keys: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dengine-bench-", dir=Path.cwd()) as tmp:
        paths = write_configs(Path(tmp))
        followers = [
            subprocess.Popen(
                [sys.executable, "-m", "dengine", "serve", "--config", str(p)],
                env={**os.environ, "DENGINE_NODE_EVENT_LOOP": loop},
            )
            for p in paths[1:]
        ]
        node = Node(Config.load(paths[0]), KVStateMachine())
        await node.start()
        tune_gc()  # what the embedding guide recommends for a process that runs a busy node
        try:
            while node.raft is None or node.raft.lead is None:
                await asyncio.sleep(0.05)
            while node.raft.lead != node.id:
                # Ask whoever leads to hand over: the benchmark proposes from the leader's process.
                lead = node.raft.lead
                if lead is not None:
                    address = node.config.cluster.members[lead]
                    async with grpc.aio.insecure_channel(address) as channel:
                        stub = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
                        with contextlib.suppress(grpc.RpcError):
                            await stub.TransferLeader(
                                cluster_pb2.TransferLeaderRequest(id=node.id), timeout=2
                            )
                await asyncio.sleep(0.3)
            latencies: list[float] = []
            finished_at: list[float] = []
            done = 0
            stop_at = time.perf_counter() + seconds

            async def worker(w: int) -> None:
                nonlocal done
                i = 0
                pick = random.Random(w).randrange
                while time.perf_counter() < stop_at:
                    key = b"key-%d-%d" % (w, i % 1000) if keys is None else b"key-%06d" % pick(keys)
                    t = time.perf_counter()
                    await node.propose(encode_put(key, VALUE))
                    end = time.perf_counter()
                    latencies.append(end - t)
                    finished_at.append(end)
                    done += 1
                    i += 1

            began = time.perf_counter()
            cpu_before = (time.thread_time(), time.process_time(), cpu_seconds(f.pid for f in followers))
            await asyncio.gather(*(worker(w) for w in range(inflight)))
            took = time.perf_counter() - began
            cpu_after = (time.thread_time(), time.process_time(), cpu_seconds(f.pid for f in followers))
        finally:
            await node.stop(transfer_leadership=False)
            for f in followers:
                f.kill()
                f.wait()
    windows = window_p99s(began, finished_at, latencies)
    latencies.sort()
    return {
        "ops": done,
        "seconds": took,
        "ops_per_s": done / took,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        # Where the p99 comes from: the worst 100 ms of the run, and how many such windows had
        # a p99 above 20 ms (snapshots' flushes made a few such spikes before write-behind).
        "p99_worst_window_ms": max(windows, default=0.0),
        "windows_p99_over_20ms": sum(w > 20 for w in windows),
        "inflight": inflight,
        "keys": keys,
        "event_loop": event_loop.running_loop_name(),
        # CPU per write: the leader's event-loop thread, its whole process (gRPC's and the log's
        # threads too), and both followers together. Steadier than ops/s on a shared host.
        "cpu_us_per_op": {
            name: round((after - before) / max(done, 1) * 1e6, 2)
            for name, before, after in zip(
                ("leader_loop", "leader_process", "followers"), cpu_before, cpu_after, strict=True
            )
        },
    }


def window_p99s(began: float, finished_at: list[float], latencies: list[float]) -> list[float]:
    """The p99 latency (ms) of the writes that finished in each 100 ms of the run."""
    windows: dict[int, list[float]] = {}
    for end, latency in zip(finished_at, latencies, strict=True):
        windows.setdefault(int((end - began) * 10), []).append(latency)
    p99s = []
    for window in windows.values():
        window.sort()
        p99s.append(round(window[int(len(window) * 0.99)] * 1e3, 1))
    return p99s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--inflight", type=int, default=2000)
    parser.add_argument(
        "--keys", type=int, default=None, help="random keys among N (default: a growing store)"
    )
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto")
    args = parser.parse_args()
    if args.keys is not None and args.keys < 1:
        parser.error("--keys must be >= 1")
    result = event_loop.run(
        run(args.seconds, args.inflight, args.event_loop, args.keys), loop=args.event_loop
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
