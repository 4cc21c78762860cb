"""Failover as a client feels it: a local 3-node cluster under steady writes has its leader killed
with SIGKILL, round after round; dengine and etcd side by side, each with its default timeouts
(a 1 s election timeout, drawn from [1, 2) s, and 100 ms heartbeats in both). With ``--stop
term`` the leader is stopped with SIGTERM instead, as in a rolling restart: both systems then hand
leadership over before they exit.

Per round:
* election: from the kill until both survivors name the same new leader (polled every 20 ms);
* write gap: the longest time around the kill in which no write was acknowledged, as the
  clients saw it (``--inflight`` writers, each putting one 256-byte value at a time);
* after the election: how much of the gap the clients added to the election (gap - election).
The killed node is started again after each round, and the next round waits for all three to
agree on a leader.

The clients: ``dengine.client.Client`` (it follows the leader and passes over a node that stopped
answering), and for etcd the thinnest one that fails over: generated stubs (as in
``bench_vs_etcd.py``) on every member, a put that failed or got no answer within
``ETCD_ATTEMPT_S`` retried at once on the next member (etcd's followers forward writes to their
leader, and hold them while they have none, so etcd's write gap depends on that timeout).

Run:  python benchmarks/bench_failover.py [--rounds 5] [--stop kill|term] [--inflight 16]
          [--no-etcd] [--out F] [--keep]
"""

# ruff: noqa: E402 (grpc's I/O manager is chosen before anything imports grpc)
from __future__ import annotations

from dengine.grpc_tuning import tune_grpc

tune_grpc()

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from bench_vs_etcd import (
    VALUE,
    Cluster,
    Servers,
    build_etcd_stubs,
    dengine_leader,
    etcd_leader,
    etcd_version,
    start_dengine,
    start_etcd,
    wait_for_leader,
)
from dengine.client import CHANNEL_OPTIONS, Client

STOP_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
POLL_S = 0.02
SETTLE_S = 2.0  # steady writing before a kill, and after the writes resume
RECOVERY_TIMEOUT_S = 30.0
ETCD_ATTEMPT_S = 0.5


class Writers:
    """``n`` coroutines putting random keys through ``put``; records when each put returned."""

    def __init__(self, put: Callable[[bytes], Any], n: int) -> None:
        self.put = put
        self.done: list[float] = []
        self.failed = 0
        self._tasks = [asyncio.ensure_future(self._run(random.Random(w))) for w in range(n)]

    async def _run(self, rng: random.Random) -> None:
        while True:
            try:
                await self.put(b"key-%06d" % rng.randrange(100_000))
            except Exception:  # the client gave up within its deadline: counted, not fatal
                self.failed += 1
                continue
            self.done.append(time.monotonic())

    def resumed_after(self, moment: float) -> bool:
        return bool(self.done) and self.done[-1] > moment

    def longest_gap(self, after: float) -> float:
        """The longest time between two acknowledgements, the later one after ``after``."""
        done = self.done
        return max((b - a for a, b in itertools.pairwise(done) if b > after), default=0.0)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class EtcdPutter:
    """Puts through etcd's KV stubs on one member; a failed attempt moves every writer to the next
    member and is retried there at once."""

    def __init__(self, endpoints: Sequence[str], stub_dir: Path) -> None:
        if str(stub_dir) not in sys.path:
            sys.path.insert(0, str(stub_dir))
        self.pb: Any = importlib.import_module("etcd_kv_pb2")
        pb_grpc: Any = importlib.import_module("etcd_kv_pb2_grpc")
        # The reconnect backoff of dengine's client too, so that both are measured without
        # gRPC's default one (which grows to two minutes).
        self.channels = [grpc.aio.insecure_channel(e, options=CHANNEL_OPTIONS) for e in endpoints]
        self.stubs = [pb_grpc.KVStub(c) for c in self.channels]
        self.target = 0

    async def put(self, key: bytes) -> None:
        while True:
            at = self.target
            try:
                await self.stubs[at].Put(self.pb.PutRequest(key=key, value=VALUE), timeout=ETCD_ATTEMPT_S)
                return
            except grpc.aio.AioRpcError:
                if self.target == at:  # the first writer to see it fail moves them all on
                    self.target = (at + 1) % len(self.stubs)
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


async def _poll(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class Scenario:
    stop: int  # the signal that stops the leader
    outage: float  # > 0: instead, every member down for this many seconds


@dataclass
class System:
    name: str
    servers: Servers
    cluster: Cluster
    names: dict[str, str]  # client address -> server name
    leader_of: Callable[[Sequence[str]], str | None]  # the leader these members agree on, or None


async def run_rounds(
    system: System, put: Callable[[bytes], Any], rounds: int, inflight: int, how: Scenario
) -> list[dict[str, float]]:
    """Runs ``rounds`` rounds of scenario ``how`` under ``inflight`` writers calling ``put``."""
    writers = Writers(put, inflight)
    results = []
    leader = system.cluster.write_target
    try:
        for r in range(rounds):
            await asyncio.sleep(SETTLE_S)
            await _poll(lambda: writers.resumed_after(time.monotonic() - 0.5), RECOVERY_TIMEOUT_S, "writes")
            if how.outage:
                result = await _outage(system, writers, how.outage)
            else:
                result = await _leader_stop(system, writers, leader, how.stop)
            results.append(result)
            print(
                f"{system.name} round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()),
                flush=True,
            )
            leader = await asyncio.to_thread(
                wait_for_leader,
                system.servers,
                partial(system.leader_of, system.cluster.endpoints),
                system.name,
            )
    finally:
        await writers.stop()
    print(f"{system.name}: {len(writers.done)} writes acknowledged, {writers.failed} failed", flush=True)
    return results


async def _new_leader(system: System, among: Sequence[str], old: str | None, since: float) -> float:
    """Waits until the members ``among`` agree on a leader other than ``old``; returns when."""
    new: str | None = None
    while new is None or new == old:
        new = await asyncio.to_thread(system.leader_of, among)
        if time.monotonic() - since > RECOVERY_TIMEOUT_S:
            raise RuntimeError(f"{system.name}: no leader {RECOVERY_TIMEOUT_S:.0f} s after the fault")
    return time.monotonic()


async def _leader_stop(system: System, writers: Writers, leader: str, stop: int) -> dict[str, float]:
    """The leader stopped with signal ``stop``, started again once the writes resumed."""
    servers, name = system.servers, system.names[leader]
    survivors = [a for a in system.cluster.endpoints if a != leader]
    killed_at = time.monotonic()
    servers.kill(name, stop)
    elected_at = await _new_leader(system, survivors, leader, killed_at)
    await _poll(partial(writers.resumed_after, elected_at), RECOVERY_TIMEOUT_S, "writes again")
    await asyncio.sleep(SETTLE_S)
    elected, gap = elected_at - killed_at, writers.longest_gap(killed_at)
    await asyncio.to_thread(servers.wait_exit, name)
    servers.start_again(name)
    return {"election_s": elected, "write_gap_s": gap, "after_election_s": gap - elected}


async def _outage(system: System, writers: Writers, seconds: float) -> dict[str, float]:
    """Every member killed, all started again ``seconds`` later: how long after the restart a
    leader is known, and a write is acknowledged."""
    servers, everyone = system.servers, system.cluster.endpoints
    for a in everyone:
        servers.kill(system.names[a])
    for a in everyone:
        await asyncio.to_thread(servers.wait_exit, system.names[a])
    await asyncio.sleep(seconds)
    restarted_at = time.monotonic()
    for a in everyone:
        servers.start_again(system.names[a])
    elected_at = await _new_leader(system, everyone, None, restarted_at)
    await _poll(partial(writers.resumed_after, restarted_at), RECOVERY_TIMEOUT_S, "writes again")
    first = next(t for t in writers.done if t > restarted_at)
    return {
        "election_s": elected_at - restarted_at,
        "first_write_s": first - restarted_at,
        "after_election_s": first - elected_at,
    }


async def measure_dengine(root: Path, rounds: int, inflight: int, how: Scenario) -> list[dict[str, float]]:
    servers = Servers(root)
    try:
        cluster = start_dengine(root, servers)
        names = {a: f"dengine-node{i}" for i, a in enumerate(cluster.endpoints, start=1)}
        async with Client(list(cluster.endpoints), timeout=30) as client:

            async def put(key: bytes) -> None:
                await client.put(key, VALUE)

            system = System("dengine", servers, cluster, names, dengine_leader)
            return await run_rounds(system, put, rounds, inflight, how)
    finally:
        servers.stop()


async def measure_etcd(
    root: Path, etcd: str, rounds: int, inflight: int, how: Scenario
) -> list[dict[str, float]]:
    stubs = root / "etcd-stubs"
    build_etcd_stubs(stubs)
    servers = Servers(root)
    try:
        cluster = start_etcd(root, servers, etcd)
        names = {a: f"etcd-m{i}" for i, a in enumerate(cluster.endpoints, start=1)}
        putter = EtcdPutter(cluster.endpoints, stubs)
        try:
            system = System("etcd", servers, cluster, names, etcd_leader)
            return await run_rounds(system, putter.put, rounds, inflight, how)
        finally:
            await putter.close()
    finally:
        servers.stop()


def summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The median and the largest of each measurement over the rounds."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        out[f"{key[:-2]}_median_s"] = statistics.median(values)
        out[f"{key[:-2]}_max_s"] = max(values)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="faults per system (5)")
    parser.add_argument(
        "--stop", choices=STOP_SIGNALS, default="kill", help="how the leader is stopped (kill: SIGKILL)"
    )
    parser.add_argument(
        "--outage", type=float, default=0.0, help="instead: every member killed for this many seconds"
    )
    parser.add_argument("--inflight", type=int, default=16, help="writers, one put in flight each (16)")
    parser.add_argument("--no-etcd", action="store_true", help="measure dengine only")
    parser.add_argument("--etcd", default="etcd", help="the etcd binary (default: etcd on PATH)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--data-dir", type=Path, default=Path.cwd(), help="parent of the temporary data dir (default: .)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir and the servers' logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.inflight < 1 or args.outage < 0:
        parser.error("--rounds and --inflight must be >= 1, --outage >= 0")
    etcd = None if args.no_etcd else shutil.which(args.etcd)
    how = Scenario(STOP_SIGNALS[args.stop], args.outage)
    results: dict[str, Any] = {
        "rounds": args.rounds,
        "inflight": args.inflight,
        "fault": f"every member down {args.outage:g} s"
        if args.outage
        else f"the leader stopped ({args.stop})",
    }
    with contextlib.ExitStack() as cleanup:
        root = Path(tempfile.mkdtemp(prefix="dengine-failover-", dir=args.data_dir))
        if args.keep:
            print(f"data and logs kept in {root}", flush=True)
        else:
            cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        (root / "dengine").mkdir()
        per_round = {
            "dengine": asyncio.run(measure_dengine(root / "dengine", args.rounds, args.inflight, how))
        }
        if etcd:
            (root / "etcd").mkdir()
            per_round["etcd"] = asyncio.run(
                measure_etcd(root / "etcd", etcd, args.rounds, args.inflight, how)
            )
            results["etcd_version"] = etcd_version(etcd)
    print(f"\n{results['fault']}, seconds, median / max over {args.rounds} rounds:")
    for system, measured in per_round.items():
        results[system] = {"rounds": measured, **summary(measured)}
        summed = results[system]
        line = ", ".join(
            f"{k[:-2]} {summed[k[:-2] + '_median_s']:.3f} / {summed[k[:-2] + '_max_s']:.3f}"
            for k in measured[0]
        )
        print(f"  {system:8} {line}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
