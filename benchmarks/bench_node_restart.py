"""A node with a million entries in its log: its memory, and how long it takes to restart.

DESIGN.md's target: a node with 1,000,000 entries in its log stays under 150 MB RSS, and
restarts in under 2 s. One node (a single-member cluster, so that nothing but the log and the
state machine count), the built-in KV state machine, snapshots off so that the log keeps every
entry, fsync on. The writes put 256-byte values on 1,000 keys, so the state machine stays small
and the memory measured is the node's own: the log's index, the runtime, the session table.

Three phases, each in a fresh process so that RSS is that phase's alone:
1. fill: start the node, propose ``--entries`` puts (``--inflight`` at a time), report RSS,
   stop gracefully;
2. restart: start a process on the same data directory and time ``Node.start()`` (the log
   opened, the node serving) and the moment every entry is applied again (no snapshot: the
   state machine is rebuilt from the whole log); report RSS then, and after a second of idling;
3. the same restart after the first process was killed with SIGKILL mid-write instead of
   stopped (the log's tail recovered, not closed cleanly).

Run:  python benchmarks/bench_node_restart.py [--entries 1000000] [--out FILE]
"""

# ruff: noqa: E402 (grpc's I/O manager is chosen before anything imports grpc)
from __future__ import annotations

from dengine.grpc_tuning import tune_grpc

tune_grpc()

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dengine.config import Config
from dengine.devcluster import write_configs
from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node

VALUE = b"v" * 256


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmHWM``: its peak so far), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def write_config(root: Path) -> Path:
    (path,) = write_configs(root, 1, "bench", None)
    with path.open("a") as f:
        f.write("\n[snapshot]\nenabled = false\n")
    return path


async def fill(config: Path, entries: int, inflight: int, crash_at: int) -> dict[str, Any]:
    node = Node(Config.load(config), KVStateMachine())
    await node.start()
    while node.raft is None or node.raft.lead != node.id:
        await asyncio.sleep(0.01)
    began = time.perf_counter()
    proposed = 0

    async def worker(w: int) -> None:
        nonlocal proposed
        while proposed < entries:
            proposed += 1
            if crash_at and proposed > crash_at:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-write: the other workers' in flight
            await node.propose(encode_put(b"key-%d" % (proposed % 1000), VALUE))

    await asyncio.gather(*(worker(w) for w in range(inflight)))
    took = time.perf_counter() - began
    status = node.status()
    result = {
        "entries": status.last_index,
        "fill_s": round(took, 2),
        "rss_mib": rss_mib(),
        "peak_rss_mib": rss_mib("VmHWM"),
    }
    await node.stop()
    return result


async def restart(config: Path, launched: float) -> dict[str, Any]:
    began = time.perf_counter()
    node = Node(Config.load(config), KVStateMachine())
    await node.start()
    started = time.perf_counter()
    status = node.status()
    last = status.last_index
    while node.status().applied < last:
        await asyncio.sleep(0.005)
    applied = time.perf_counter()
    rss_applied = rss_mib()
    await asyncio.sleep(1.0)
    result = {
        "log_entries": last,
        "first_index": status.first_index,
        # From the parent's launch of this process (CLOCK_MONOTONIC: the same in both).
        "launch_to_node_start_s": round(began - launched, 3),
        "launch_to_all_applied_s": round(applied - launched, 3),
        "node_start_s": round(started - began, 3),
        "node_start_to_all_applied_s": round(applied - started, 3),
        "restart_total_s": round(applied - began, 3),
        "rss_mib_all_applied": rss_applied,
        "rss_mib_idle": rss_mib(),
        "peak_rss_mib": rss_mib("VmHWM"),
    }
    await node.stop()
    return result


def phase(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=1800, check=False
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"exit": out.returncode, "stderr": out.stderr[-2000:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--phase", choices=["fill", "restart"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--crash-at", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "fill":
        print(json.dumps(asyncio.run(fill(args.config, args.entries, args.inflight, args.crash_at))))
        return
    if args.phase == "restart":
        print(json.dumps(asyncio.run(restart(args.config, args.launched))))
        return
    result: dict[str, Any] = {}
    for fill_name, restart_name, crash in (
        ("fill", "restart_after_stop", 0),
        ("fill_killed", "restart_after_kill_9", args.entries),
    ):
        with tempfile.TemporaryDirectory(prefix="dengine-restart-", dir=Path.cwd()) as tmp:
            config = write_config(Path(tmp))
            common = ["--config", str(config), "--inflight", str(args.inflight)]
            # The killed run proposes more than it lets finish: it dies with writes in flight.
            total = args.entries + (10_000 if crash else 0)
            fill_args = ["--entries", str(total), "--crash-at", str(crash)]
            result[fill_name] = phase("--phase", "fill", *fill_args, *common)
            launched = str(time.perf_counter())
            result[restart_name] = phase("--phase", "restart", "--launched", launched, *common)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
