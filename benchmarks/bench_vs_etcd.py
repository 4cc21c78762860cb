"""dengine against etcd, side by side, with the same load generator.

Each system runs as a local 3-node cluster on 127.0.0.1, started by this script in a temporary
directory (under ``--data-dir``, by default the current directory, so that fsync reaches a real
disk), one system at a time:

* dengine: three ``python -m dengine serve`` processes, driven through ``dengine.client.Client``
  (``put`` for writes, ``get`` for linearizable reads; the client coalesces concurrent calls into
  ``Batch`` RPCs and follows the leader).
* etcd (only if an ``etcd`` binary is on PATH and ``--no-etcd`` is not given): three members with
  default settings (fsync on), driven with the thinnest client there is: stubs generated at run
  time from ``benchmarks/etcd_kv.proto``, one unary ``grpc.aio`` call per operation. Writes go to
  the leader; linearizable reads (``serializable=false``) go round-robin to all members, as
  dengine's client does with reads.

Load: P client processes x C operations in flight, each operation on a random key among
``key-000000`` .. ``key-<keys-1>`` with a 256-byte value, for ``--seconds`` after ``--warmup``.
An operation counts when it completes inside the measured window. The read workloads run on
pre-loaded keys. Workloads (P x C): write-1 (1 x 1), write-sat (2 x 256), write-sat-txn
(2 x 256; etcd's clients pack concurrent puts into Txn requests of up to 128, as dengine's pack
them into Batch RPCs), read-1 (1 x 1), read-sat (2 x 256).

Client processes of both systems, and dengine's nodes, run grpc with the I/O manager setting of
``dengine.grpc_tuning`` where it applies (unless ``GRPC_EXPERIMENTS`` is set already), and
the event loop ``--event-loop`` names (``dengine.event_loop``; uvloop where installed by default).

Run:  python benchmarks/bench_vs_etcd.py [--seconds 10] [--workloads write-sat,read-sat]
          [--processes P] [--inflight C] [--keys 100000] [--out results.json] [--no-etcd]
          [--event-loop auto|uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc

from dengine import event_loop
from dengine.client import Client
from dengine.devcluster import free_ports, write_configs
from dengine.event_loop import EVENT_LOOPS
from dengine.grpc_tuning import recommended_experiments
from dengine.v1 import cluster_pb2, cluster_pb2_grpc
from proc_cpu import cpu_seconds

PROTO = Path(__file__).resolve().parent / "etcd_kv.proto"
VALUE = bytes(random.Random(256).getrandbits(8) for _ in range(256))
WORKLOADS: dict[str, tuple[str, int, int]] = {  # name: (kind, processes, in flight per process)
    "write-1": ("write", 1, 1),
    "write-sat": ("write", 2, 256),
    # etcd's clients pack concurrent puts into Txns (up to 128, etcd's default --max-txn-ops),
    # as dengine's client packs them into Batch RPCs: the fairer comparison of the two designs.
    "write-sat-txn": ("write-txn", 2, 256),
    "read-1": ("read", 1, 1),
    "read-sat": ("read", 2, 256),
}
SYSTEMS = ("dengine", "etcd")
OP_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0
PRELOAD_TIMEOUT_S = 1200.0
STOP_GRACE_S = 10.0
PRELOAD_PROCESSES = 2
PRELOAD_INFLIGHT = 256
ETCD_MAX_TXN_OPS = 128


def key_of(i: int) -> bytes:
    return b"key-%06d" % i


# --- the client side: one worker process ------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one worker process does; sent to it pickled."""

    system: str
    kind: str  # write | read | preload
    endpoints: tuple[str, ...]
    write_target: str  # etcd: the leader's client address
    inflight: int
    keys: int
    seed: int
    stub_dir: str = ""
    preload_range: tuple[int, int] = (0, 0)
    event_loop: str = "auto"  # the worker's (dengine.event_loop), for both systems alike


class Driver:
    """One operation per call; ``write``/``read`` return whether the key was there afterwards."""

    async def write(self, key: bytes) -> bool:
        raise NotImplementedError

    async def write_coalesced(self, key: bytes) -> bool:
        """A write packed with concurrent ones into one request (dengine's client always does)."""
        return await self.write(key)

    async def read(self, key: bytes) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class DengineDriver(Driver):
    def __init__(self, job: Job) -> None:
        self.client = Client(list(job.endpoints), timeout=OP_TIMEOUT_S)

    async def write(self, key: bytes) -> bool:
        await self.client.put(key, VALUE)
        return True

    async def read(self, key: bytes) -> bool:
        return await self.client.get(key) is not None

    async def close(self) -> None:
        await self.client.close()


class EtcdDriver(Driver):
    def __init__(self, job: Job) -> None:
        if job.stub_dir not in sys.path:
            sys.path.insert(0, job.stub_dir)
        self.pb: Any = importlib.import_module("etcd_kv_pb2")
        pb_grpc: Any = importlib.import_module("etcd_kv_pb2_grpc")
        self.channels: dict[str, Any] = {a: grpc.aio.insecure_channel(a) for a in job.endpoints}
        self.writer: Any = pb_grpc.KVStub(self.channels[job.write_target])
        self.readers: list[Any] = [pb_grpc.KVStub(self.channels[a]) for a in job.endpoints]
        self.next_reader = job.seed
        self.txn_queue: list[tuple[bytes, asyncio.Future[bool]]] = []
        self.txns: set[asyncio.Task[None]] = set()  # in flight (the loop keeps only weak refs)

    async def write(self, key: bytes) -> bool:
        await self.writer.Put(self.pb.PutRequest(key=key, value=VALUE), timeout=OP_TIMEOUT_S)
        return True

    async def write_coalesced(self, key: bytes) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.txn_queue.append((key, future))
        if len(self.txn_queue) == 1:
            asyncio.get_running_loop().call_soon(self._send_txns)
        return await future

    def _send_txns(self) -> None:
        queued, self.txn_queue = self.txn_queue, []
        batch: list[tuple[bytes, asyncio.Future[bool]]] = []
        for key, future in queued:
            # etcd refuses a txn that puts one key twice, and more than 128 operations.
            if len(batch) == ETCD_MAX_TXN_OPS or any(k == key for k, _ in batch):
                self._start_txn(batch)
                batch = []
            batch.append((key, future))
        if batch:
            self._start_txn(batch)

    def _start_txn(self, batch: list[tuple[bytes, asyncio.Future[bool]]]) -> None:
        task = asyncio.ensure_future(self._txn(batch))
        self.txns.add(task)
        task.add_done_callback(self.txns.discard)

    async def _txn(self, batch: list[tuple[bytes, asyncio.Future[bool]]]) -> None:
        ops = [self.pb.RequestOp(request_put=self.pb.PutRequest(key=k, value=VALUE)) for k, _ in batch]
        try:
            await self.writer.Txn(self.pb.TxnRequest(success=ops), timeout=OP_TIMEOUT_S)
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
        else:
            for _, future in batch:
                future.set_result(True)

    async def read(self, key: bytes) -> bool:
        self.next_reader += 1
        stub = self.readers[self.next_reader % len(self.readers)]
        response: Any = await stub.Range(self.pb.RangeRequest(key=key), timeout=OP_TIMEOUT_S)
        return len(response.kvs) == 1

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


@dataclass
class Tally:
    latencies: array[float] = field(default_factory=lambda: array("d"))
    missing: int = 0
    errors: int = 0
    first_error: str = ""


async def _measure(driver: Driver, job: Job, conn: Connection) -> dict[str, Any]:
    ops: dict[str, Callable[[bytes], Awaitable[bool]]] = {
        "write": driver.write,
        "write-txn": driver.write_coalesced,
        "read": driver.read,
    }
    op = ops[job.kind]
    await op(key_of(0))  # connects, and finds the leader
    conn.send(("ready", None))
    go, begin, end = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    offset = time.perf_counter() - time.time()  # wall-clock instants from the parent -> perf_counter
    go, begin, end = go + offset, begin + offset, end + offset
    await asyncio.sleep(max(0.0, go - time.perf_counter()))
    rng = random.Random(job.seed)
    tally = Tally()

    async def lane() -> None:
        while (t0 := time.perf_counter()) < end:
            try:
                found = await op(key_of(rng.randrange(job.keys)))
            except Exception as exc:
                tally.errors += 1
                tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"[:500]
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if begin <= t1 <= end:
                tally.latencies.append(t1 - t0)
                tally.missing += not found

    cpu0 = time.process_time()
    await asyncio.gather(*(lane() for _ in range(job.inflight)))
    return {
        "latencies": tally.latencies.tobytes(),
        "missing": tally.missing,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "cpu_s": time.process_time() - cpu0,
    }


async def _preload(driver: Driver, job: Job) -> dict[str, Any]:
    todo = iter(range(*job.preload_range))

    async def lane() -> None:
        for i in todo:
            await driver.write(key_of(i))

    await asyncio.gather(*(lane() for _ in range(job.inflight)))
    return {"written": job.preload_range[1] - job.preload_range[0]}


async def _work(job: Job, conn: Connection) -> dict[str, Any]:
    driver: Driver = DengineDriver(job) if job.system == "dengine" else EtcdDriver(job)
    try:
        return await (_preload(driver, job) if job.kind == "preload" else _measure(driver, job, conn))
    finally:
        await driver.close()


def worker_main(job: Job, conn: Connection) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    try:
        result = event_loop.run(_work(job, conn), loop=job.event_loop)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        conn.send(("done", result))
    finally:
        conn.close()


# --- the server side: clusters in child processes -----------------------------------------------------


class Servers:
    """Child server processes, each in its own session (Ctrl-C reaches the parent only, which
    stops them in order: SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.argv: dict[str, list[str]] = {}
        self.logs: list[IO[bytes]] = []
        self.killed: set[str] = set()  # on purpose, by kill(): not a failure

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115  # closed by stop()
        self.logs.append(log)
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs = [(n, p) for n, p in self.procs if n != name]
        self.procs.append((name, proc))
        self.argv[name] = argv
        self.killed.discard(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to server ``name``, without waiting (``wait_exit``); ``start_again(name)``
        brings it back on the same data."""
        for n, proc in self.procs:
            if n == name:
                self.killed.add(name)
                proc.send_signal(sig)

    def wait_exit(self, name: str, timeout: float = STOP_GRACE_S) -> None:
        """Waits until server ``name`` exits; SIGKILL after ``timeout`` seconds."""
        for n, proc in self.procs:
            if n == name:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def start_again(self, name: str) -> None:
        self.start(name, self.argv[name])

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None and name not in self.killed:
                log = (self.root / f"{name}.log").read_text(errors="replace").splitlines()[-20:]
                tail = "\n  ".join(log)
                raise RuntimeError(f"{name} exited with status {proc.returncode}; its log ends:\n  {tail}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the servers so far (Linux; 0 elsewhere)."""
        return cpu_seconds(proc.pid for _, proc in self.procs)

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


@dataclass(frozen=True)
class Cluster:
    endpoints: tuple[str, ...]
    write_target: str


def start_dengine(root: Path, servers: Servers) -> Cluster:
    configs = write_configs(root, 3, "bench", None)
    for i, path in enumerate(configs, start=1):
        servers.start(f"dengine-node{i}", [sys.executable, "-m", "dengine", "serve", "--config", str(path)])
    endpoints = tuple(
        line.split('"')[1]
        for path in configs
        for line in path.read_text().splitlines()
        if line.startswith("listen")
    )
    return Cluster(endpoints, wait_for_leader(servers, lambda: dengine_leader(endpoints), "dengine"))


def wait_for_leader(servers: Servers, leader: Callable[[], str | None], system: str) -> str:
    """Polls ``leader()`` until it names the leader's client address."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (address := leader()) is None:
        servers.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system}: no leader known to all members after {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
    return address


def dengine_leader(endpoints: Sequence[str], timeout: float = 1.0) -> str | None:
    """The leader's client address, if every node in ``endpoints`` answers and names it."""
    views: set[tuple[int, str]] = set()
    for endpoint in endpoints:
        with grpc.insecure_channel(endpoint) as channel:
            stub = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
            try:
                status = stub.Status(cluster_pb2.StatusRequest(), timeout=timeout)
                views.add((status.leader_id, status.leader_address))
            except grpc.RpcError:
                return None
    if len(views) == 1 and (view := views.pop())[0] != 0:
        return view[1]
    return None


def _etcd_metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=1.0) as response:
        text: str = response.read().decode()
    metrics = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("etcd_server_has_leader", "etcd_server_is_leader"):
            metrics[name] = float(value)
    return metrics


def start_etcd(root: Path, servers: Servers, etcd: str) -> Cluster:
    ports = free_ports(6)
    clients = [f"127.0.0.1:{p}" for p in ports[:3]]
    peers = [f"http://127.0.0.1:{p}" for p in ports[3:]]
    initial = ",".join(f"m{i}={peer}" for i, peer in enumerate(peers, start=1))
    for i, (client, peer) in enumerate(zip(clients, peers, strict=True), start=1):
        servers.start(
            f"etcd-m{i}",
            [
                etcd,
                f"--name=m{i}",
                f"--data-dir={root / f'm{i}'}",
                f"--listen-client-urls=http://{client}",
                f"--advertise-client-urls=http://{client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={initial}",
                f"--initial-cluster-token=bench-{os.getpid()}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
                "--log-level=warn",
            ],
        )
    return Cluster(tuple(clients), wait_for_leader(servers, lambda: etcd_leader(clients), "etcd"))


def etcd_leader(clients: Sequence[str]) -> str | None:
    """The leader's client address, if every member in ``clients`` has a leader and one is it."""
    leaders = []
    for client in clients:
        try:
            metrics = _etcd_metrics(client)
        except (OSError, ValueError):
            return None
        if metrics.get("etcd_server_has_leader") != 1:
            return None
        if metrics.get("etcd_server_is_leader") == 1:
            leaders.append(client)
    return leaders[0] if len(leaders) == 1 else None


def build_etcd_stubs(out: Path) -> None:
    import grpc_tools  # noqa: PLC0415  # only needed for etcd
    from grpc_tools import protoc  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    argv = [
        "protoc",
        f"-I{PROTO.parent}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO),
    ]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO}")


# --- the parent: running workers and merging their results -------------------------------------------


@dataclass
class Runner:
    args: argparse.Namespace
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))

    def _spawn(self, jobs: Sequence[Job]) -> list[tuple[SpawnProcess, Connection]]:
        workers = []
        for job in jobs:
            parent_end, child_end = self.ctx.Pipe()
            mine = dataclasses.replace(job, event_loop=self.args.event_loop)
            proc: SpawnProcess = self.ctx.Process(target=worker_main, args=(mine, child_end), daemon=True)
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        return workers

    @staticmethod
    def _receive(
        worker: tuple[SpawnProcess, Connection], expect: str, timeout: float, servers: Servers
    ) -> Any:
        proc, conn = worker
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            servers.check()
            if not proc.is_alive() and not conn.poll(0):
                raise RuntimeError(f"a worker process died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"a worker did not answer within {timeout:.0f} s")
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise RuntimeError(f"a worker process died (exit code {proc.exitcode})") from None
        if kind != expect:
            raise RuntimeError(f"a worker failed: {payload}")
        return payload

    @staticmethod
    def _reap(workers: list[tuple[SpawnProcess, Connection]]) -> None:
        for proc, conn in workers:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()

    def preload(self, system: str, cluster: Cluster, servers: Servers, stub_dir: str) -> None:
        keys = self.args.keys
        began = time.perf_counter()
        step = math.ceil(keys / PRELOAD_PROCESSES)
        jobs = [
            Job(
                system=system,
                kind="preload",
                endpoints=cluster.endpoints,
                write_target=cluster.write_target,
                inflight=PRELOAD_INFLIGHT,
                keys=keys,
                seed=i,
                stub_dir=stub_dir,
                preload_range=(lo, min(keys, lo + step)),
            )
            for i, lo in enumerate(range(0, keys, step))
        ]
        workers = self._spawn(jobs)
        try:
            for worker in workers:
                self._receive(worker, "done", PRELOAD_TIMEOUT_S, servers)
        finally:
            self._reap(workers)
        took = time.perf_counter() - began
        print(f"  {system}: pre-loaded {keys} keys in {took:.1f} s ({keys / took:,.0f} puts/s)", flush=True)

    def measure(
        self, system: str, workload: str, cluster: Cluster, servers: Servers, stub_dir: str
    ) -> dict[str, Any]:
        kind, processes, inflight = self.shape(workload)
        seconds, warmup = self.args.seconds, self.args.warmup
        seed = random.getrandbits(32)
        jobs = [
            Job(
                system=system,
                kind=kind,
                endpoints=cluster.endpoints,
                write_target=cluster.write_target,
                inflight=inflight,
                keys=self.args.keys,
                seed=seed + i,
                stub_dir=stub_dir,
            )
            for i in range(processes)
        ]
        workers = self._spawn(jobs)
        try:
            for worker in workers:
                self._receive(worker, "ready", READY_TIMEOUT_S, servers)
            go = time.time() + 0.2
            begin, end = go + warmup, go + warmup + seconds
            for _, conn in workers:
                conn.send((go, begin, end))
            time.sleep(max(0.0, begin - time.time()))
            cpu0 = servers.cpu_seconds()
            time.sleep(max(0.0, end - time.time()))
            server_cpu = servers.cpu_seconds() - cpu0
            results = [
                self._receive(w, "done", warmup + seconds + OP_TIMEOUT_S + 30, servers) for w in workers
            ]
        finally:
            self._reap(workers)
        latencies = array("d")
        for r in results:
            latencies.frombytes(r["latencies"])
        ordered = sorted(latencies)
        summary = {
            "ops": len(ordered),
            "seconds": seconds,
            "ops_per_s": len(ordered) / seconds,
            "p50_ms": percentile(ordered, 0.50) * 1e3,
            "p99_ms": percentile(ordered, 0.99) * 1e3,
            "errors": sum(r["errors"] for r in results),
            "missing": sum(r["missing"] for r in results),
            "client_cpu_cores": sum(r["cpu_s"] for r in results) / (seconds + warmup),
            "server_cpu_cores": server_cpu / seconds,
        }
        first_error = next((r["first_error"] for r in results if r["first_error"]), "")
        if first_error:
            summary["first_error"] = first_error
        return summary

    def shape(self, workload: str) -> tuple[str, int, int]:
        kind, processes, inflight = WORKLOADS[workload]
        return kind, self.args.processes or processes, self.args.inflight or inflight

    def run_system(self, system: str, root: Path, etcd: str | None) -> dict[str, dict[str, Any]]:
        root.mkdir()
        servers = Servers(root)
        results: dict[str, dict[str, Any]] = {}
        try:
            stub_dir = ""
            if system == "etcd":
                assert etcd is not None
                stub_dir = str(root / "stubs")
                build_etcd_stubs(Path(stub_dir))
                cluster = start_etcd(root, servers, etcd)
            else:
                cluster = start_dengine(root, servers)
            print(f"{system}: 3 nodes up, leader {cluster.write_target}", flush=True)
            preloaded = False
            for workload in self.args.workloads:
                if self.shape(workload)[0] == "read" and not preloaded:
                    self.preload(system, cluster, servers, stub_dir)
                    preloaded = True
                r = self.measure(system, workload, cluster, servers, stub_dir)
                results[workload] = r
                print(
                    f"  {system} {workload}: {r['ops_per_s']:,.0f} ops/s, p50 {r['p50_ms']:.2f} ms, "
                    f"p99 {r['p99_ms']:.2f} ms, errors {r['errors']}, missing {r['missing']}, "
                    f"cpu server {r['server_cpu_cores']:.2f} / client {r['client_cpu_cores']:.2f} cores",
                    flush=True,
                )
                if r.get("first_error"):
                    print(f"    first error: {r['first_error']}", flush=True)
        finally:
            servers.stop()
        return results


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (NaN when there are none)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def report(results: dict[str, dict[str, dict[str, Any]]], runner: Runner) -> dict[str, Any]:
    rows = {}
    for workload in runner.args.workloads:
        _, processes, inflight = runner.shape(workload)
        d = results.get("dengine", {}).get(workload)
        e = results.get("etcd", {}).get(workload)
        rows[workload] = {
            "processes": processes,
            "inflight": inflight,
            "dengine": d,
            "etcd": e,
            "dengine_over_etcd": {
                metric: ratio(d[metric] if d else None, e[metric] if e else None)
                for metric in ("ops_per_s", "p50_ms", "p99_ms")
            },
        }
    return rows


def print_table(rows: dict[str, Any]) -> None:
    def system(r: dict[str, Any] | None, width: int) -> str:
        if r is None:
            return f"{'-':>{width}} {'-':>7} {'-':>7}"
        return f"{r['ops_per_s']:>{width},.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"

    def times(value: float | None, width: int) -> str:
        return f"{'-' if value is None else f'{value:.2f}x':>{width}}"

    header = (
        f"{'workload':<13} {'P x C':>7} | {'dengine ops/s':>13} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'etcd ops/s':>10} {'p50 ms':>7} {'p99 ms':>7} | {'ops/s':>7} {'p50':>6} {'p99':>6}"
    )
    print()
    print(f"{'dengine / etcd':>{len(header)}}")
    print(header)
    print("-" * len(header))
    for workload, row in rows.items():
        q = row["dengine_over_etcd"]
        shape = f"{row['processes']}x{row['inflight']}"
        print(
            f"{workload:<13} {shape:>7} | {system(row['dengine'], 13)} | {system(row['etcd'], 10)} | "
            f"{times(q['ops_per_s'], 7)} {times(q['p50_ms'], 6)} {times(q['p99_ms'], 6)}"
        )


def client_defaults() -> dict[str, Any]:
    """What the dengine side runs with: ``Client``'s defaults (recorded in the JSON)."""
    params = inspect.signature(Client).parameters
    return {
        "client": "dengine.client.Client: put / get, coalesced into Batch RPCs",
        "linger_ms": params["linger_ms"].default,
        "max_batch": params["max_batch"].default,
    }


def etcd_version(etcd: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [etcd, "--version"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
        return out.splitlines()[0] if out else ""
    return ""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="dengine vs etcd: the same load generator against two local 3-node clusters."
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per workload (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (1)")
    parser.add_argument("--processes", type=int, help="client processes, for every workload run")
    parser.add_argument("--inflight", type=int, help="operations in flight per process, for every workload")
    parser.add_argument("--keys", type=int, default=100_000, help="key space (100000), pre-loaded for reads")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, in order (default {','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="event loop of dengine's nodes and both systems' client workers (auto: uvloop if installed)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--no-etcd", action="store_true", help="measure dengine only")
    parser.add_argument("--etcd", default="etcd", help="the etcd binary (default: etcd on PATH)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path.cwd(), help="parent of the temporary data dir (default: .)"
    )
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"unknown workload(s) {unknown}; choose among {', '.join(WORKLOADS)}")
    if args.seconds <= 0 or args.warmup < 0 or args.keys < 1:
        parser.error("--seconds must be > 0, --warmup >= 0 and --keys >= 1")
    if (args.processes is not None and args.processes < 1) or (
        args.inflight is not None and args.inflight < 1
    ):
        parser.error("--processes and --inflight must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Even when started with SIGINT ignored (a background job of a script), Ctrl-C / kill -INT stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    etcd = None if args.no_etcd else shutil.which(args.etcd)
    if etcd is None and not args.no_etcd:
        print(f"note: no {args.etcd!r} binary on PATH; measuring dengine only", file=sys.stderr)
    # Every process started from here (dengine's nodes, both systems' client workers) runs grpc
    # with the setting dengine's README recommends: the same for etcd's clients as for dengine's.
    recommended = recommended_experiments()
    if recommended is not None:
        os.environ.setdefault("GRPC_EXPERIMENTS", recommended)
    grpc_experiments = os.environ.get("GRPC_EXPERIMENTS")
    os.environ["DENGINE_NODE_EVENT_LOOP"] = args.event_loop  # dengine serve's node.event_loop
    runner = Runner(args)
    load_at_start = os.getloadavg()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(
            prefix="bench-vs-etcd-", dir=args.data_dir, ignore_cleanup_errors=True
        ) as tmp:
            for system in SYSTEMS:
                if system == "etcd" and etcd is None:
                    continue
                results[system] = runner.run_system(system, Path(tmp) / system, etcd)
    except KeyboardInterrupt:
        print("\ninterrupted: every cluster and worker was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nfailed: {exc}\n(every cluster and worker was stopped)", file=sys.stderr)
        return 1
    rows = report(results, runner)
    print_table(rows)
    if args.out:
        document = {
            "config": {
                "seconds": args.seconds,
                "warmup": args.warmup,
                "keys": args.keys,
                "value_bytes": len(VALUE),
                "cpus": os.cpu_count(),
                "load_average_at_start": load_at_start,
                "load_average_at_end": os.getloadavg(),
                "etcd": etcd_version(etcd) if etcd else None,
                "etcd_client": "grpc.aio, one unary RPC per operation; writes to the leader, "
                "linearizable reads round-robin over the members",
                "dengine_client": client_defaults(),
                "grpc_experiments_of_clients_and_dengine_nodes": grpc_experiments,
                "event_loop_of_clients_and_dengine_nodes": event_loop.resolve(args.event_loop),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            "workloads": rows,
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
