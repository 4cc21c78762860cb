"""Where a write at one in flight goes: a timeline across the client and the three nodes.

Starts a local 3-node cluster (``python -m dengine serve``) whose processes load
``write_trace_probe.py`` (through a ``sitecustomize`` module in a temporary directory), puts
256-byte values at one in flight through ``dengine.Client`` for ``--seconds``, stops the nodes
gracefully so that each writes its records, and prints, for the median write, when each step
happened after the client's call: the leader's handler, its sync request and appends, each
follower's receipt, sync and answer (the first follower to receive first), the leader's answer,
and the client's. Every process reads the same monotonic clock.

The probe costs a few microseconds per step, so the total runs a little above
``bench_vs_etcd.py --workloads write-1``; use this for where the time goes, that for how much.

Run:  python benchmarks/trace_write1.py [--seconds 4]
"""

# ruff: noqa: E402 (grpc's I/O manager is chosen before anything imports grpc)
from __future__ import annotations

from dengine.grpc_tuning import tune_grpc

tune_grpc()

import argparse
import asyncio
import bisect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_embedded import write_configs
from dengine import Client, event_loop

Record = tuple[int, str, int]
SITECUSTOMIZE = """
import os
if os.environ.get("DENGINE_TRACE_DIR"):
    from dengine.grpc_tuning import tune_grpc
    tune_grpc()
    import write_trace_probe
    write_trace_probe.install(os.environ["DENGINE_TRACE_DIR"])
"""


async def drive(addresses: list[str], seconds: float) -> list[tuple[int, int]]:
    """Puts at one in flight for ``seconds``; the (start, end) monotonic ns of each call."""
    async with Client(addresses) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.put(b"warm", b"x")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for i in range(300):
            await client.put(b"k%d" % i, b"v" * 256)
        calls = []
        stop = time.monotonic() + seconds
        i = 0
        while time.monotonic() < stop:
            began = time.monotonic_ns()
            await client.put(b"k%d" % (i % 1000), b"v" * 256)
            calls.append((began, time.monotonic_ns()))
            i += 1
        return calls


def first(
    records: list[Record], times: list[int], lo: int, hi: int, tag: str, *, reaching: int = 0
) -> tuple[int, int] | None:
    """The (time, detail) of the first record tagged ``tag`` in [lo, hi] whose detail (for a
    message, the last index it carries or acknowledges) is at least ``reaching``."""
    for when, t, d in records[bisect.bisect_left(times, lo) : bisect.bisect_right(times, hi)]:
        if t == tag and d >= reaching:
            return when, d
    return None


def at(found: tuple[int, int] | None) -> int | None:
    return None if found is None else found[0]


def timeline(calls: list[tuple[int, int]], traces: dict[int, list[Record]]) -> dict[str, list[float]]:
    """For each call, the µs after its start at which each step happened."""
    leader = max(traces, key=lambda pid: sum(1 for r in traces[pid] if r[1] == "batch in"))
    followers = [pid for pid in traces if pid != leader]
    times = {pid: [r[0] for r in records] for pid, records in traces.items()}
    steps: dict[str, list[float]] = {}

    def note(name: str, when: int | None, began: int) -> None:
        if when is not None:
            steps.setdefault(name, []).append((when - began) / 1000)

    for began, ended in calls[50:]:
        lead, lt = traces[leader], times[leader]
        note("client calls", began, began)
        note("leader: batch in", at(first(lead, lt, began, ended, "batch in")), began)
        note("leader: sync asked", at(first(lead, lt, began, ended, "sync asked")), began)
        append = first(lead, lt, began, ended, "send app+")
        if append is None:
            continue
        queued, last = append
        note("leader: appends queued", queued, began)
        note("leader: first append written", at(first(lead, lt, queued, ended, "write")), began)
        note("leader: synced", at(first(lead, lt, began, ended, "synced")), began)
        received = sorted(
            (when, pid)
            for pid in followers
            if (when := at(first(traces[pid], times[pid], queued, ended, "recv app+", reaching=last)))
            is not None
        )
        for rank, (when, pid) in enumerate(received):
            who = ("first", "second")[rank] + " follower"
            fr, ft = traces[pid], times[pid]
            note(f"{who}: append in", when, began)
            note(f"{who}: sync asked", at(first(fr, ft, when, ended, "sync asked")), began)
            note(f"{who}: synced", at(first(fr, ft, when, ended, "synced")), began)
            note(
                f"{who}: answer queued", at(first(fr, ft, when, ended, "send app_resp", reaching=last)), began
            )
        note(
            "leader: first answer in",
            at(first(lead, lt, queued, ended, "recv app_resp", reaching=last)),
            began,
        )
        note("leader: answered", at(first(lead, lt, began, ended, "answered")), began)
        note("leader: batch out", at(first(lead, lt, began, ended, "batch out")), began)
        note("client has its answer", ended, began)
    return steps


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="dengine-trace-", dir=Path.cwd()) as tmp:
        root = Path(tmp)
        (root / "site").mkdir()
        (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (root / "traces").mkdir()
        paths = write_configs(root)
        here = Path(__file__).resolve().parent
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root / "site"), str(here)]),
            "DENGINE_TRACE_DIR": str(root / "traces"),
        }
        nodes = [
            subprocess.Popen(
                [sys.executable, "-m", "dengine", "serve", "--config", str(p)],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for p in paths
        ]
        addresses = [p.read_text().split('listen = "')[1].split('"')[0] for p in paths]
        try:
            calls = await drive(addresses, seconds)
        finally:
            for n in nodes:
                n.send_signal(signal.SIGTERM)
            for n in nodes:
                n.wait(30)
        traces = {
            int(f.stem.split("-")[1]): [(int(w), str(t), int(d)) for w, t, d in json.loads(f.read_text())]
            for f in (root / "traces").glob("trace-*.json")
        }
    if len(traces) != 3:
        raise SystemExit(f"expected the traces of 3 nodes, found {len(traces)}")
    steps = timeline(calls, traces)
    print(f"{len(calls)} puts at 1 in flight; medians, µs after the client's call:")
    for name, values in sorted(steps.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"  {statistics.median(values):7.0f}  {name}  (n={len(values)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds (4)")
    event_loop.run(main(parser.parse_args().seconds))
