"""Snapshot transfer throughput on loopback and restart time from a large snapshot plus a log tail.

Run:  python benchmarks/bench_snapshot.py [--mb 1024] [--tail 100000] [--chunk-kib 1024]
                                          [--dir DIR] [--out RESULT.json]

Three embedded nodes, each in its own process (multiprocessing 'spawn', one ``asyncio.run`` of one
``dengine.node.Node`` per process), real gRPC on 127.0.0.1 and real WAL and snapshot files under a
temporary directory. The state machine is ``Blob``: ``b"grow:<n>"`` extends its state to ``n``
deterministic pseudo-random bytes (every replica builds the same bytes), ``snapshot`` writes the
blob in 8 MiB pieces and ``restore`` reads it back.

Phase 1, transfer: nodes 1 and 2 start (a quorum of the three), the leader grows the blob to
``--mb`` MiB in 64 MiB steps, takes a snapshot on demand (policy ``entries=0``,
``trailing_entries=0``, so the log is compacted to nothing behind it), then node 3 starts with an
empty data dir and must catch up by InstallSnapshot. Measured from the nodes' own log lines (logger
``dengine.snapshot``, forwarded to the parent with their wall-clock time): the leader's "sent
snapshot ... B bytes ... in S s" (S covers the chunker setup, which hashes the file, the offer and
the whole chunk stream up to the follower's verified reply) and the follower's "installed snapshot
... in S s" (the restore of the state machine from the file). Throughput = B / S. The parent also
times the chunker setup alone (``SnapshotChunker`` over the leader's file: its SHA-256 pass) so the
stream itself can be told apart, and the end to end time from node 3's ``start()`` to its applied
index reaching the snapshot's.

Phase 2, restart: with node 3 holding the snapshot, the leader commits ``--tail`` tiny commands
(``b"noop"``, snapshot policy off so they stay in every log), node 3 stops, and a fresh process
restarts it on the same data dir while nodes 1 and 2 keep running. Measured: ``Node.start()`` (opening
the log, verifying the snapshot's SHA-256 and restoring the blob, serving), then the time until its
applied index reaches the last index (the leader's heartbeat tells it the commit; the tail is
applied from its own log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from queue import Empty
from typing import Any, BinaryIO

from dengine._core import SnapshotChunker
from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.node import Node

MIB = 1 << 20
PIECE = 64 * MIB
IO_PIECE = 8 * MIB
LENGTH = struct.Struct("<Q")
SENT = re.compile(r"sent snapshot at index (\d+) to node (\d+): (\d+) bytes from offset (\d+) in ([\d.]+) s")
INSTALLED = re.compile(r"installed snapshot at index (\d+) .* in ([\d.]+) s")
RESTORED = re.compile(r"restored snapshot at index (\d+) .*\((?:term \d+, )?(\d+) bytes\) in ([\d.]+) s")


class Blob:
    """A state machine holding one large deterministic byte string."""

    _base: bytes | None = None

    def __init__(self) -> None:
        self.data = bytearray()
        self.noops = 0

    @classmethod
    def base(cls) -> bytes:
        # One 64 MiB random piece per process; piece k is it rotated by k * 4097 bytes, so the
        # whole blob is incompressible yet cheap to build (a memcpy per piece, not 64 MiB of PRNG).
        if cls._base is None:
            cls._base = random.Random(20240229).randbytes(PIECE)
        return cls._base

    def apply(self, index: int, command: bytes) -> bytes:
        if command.startswith(b"grow:"):
            self._grow(int(command[5:]))
            return str(len(self.data)).encode()
        self.noops += 1
        return b""

    def _grow(self, n: int) -> None:
        base = self.base()
        while len(self.data) < n:
            k, off = divmod(len(self.data), PIECE)
            r = (k * 4097) % PIECE
            piece = base[r:] + base[:r]
            self.data += piece[off : off + min(PIECE - off, n - len(self.data))]

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(LENGTH.pack(len(self.data)))
        view = memoryview(self.data)
        for i in range(0, len(view), IO_PIECE):
            sink.write(view[i : i + IO_PIECE])

    def restore(self, source: BinaryIO) -> None:
        (size,) = LENGTH.unpack(source.read(LENGTH.size))
        data = bytearray(size)
        view = memoryview(data)
        pos = 0
        while pos < size:
            piece = source.read(min(IO_PIECE, size - pos))
            if not piece:
                raise EOFError(f"snapshot ends at {pos} of {size} bytes")
            view[pos : pos + len(piece)] = piece
            pos += len(piece)
        self.data = data


# --- worker process ---------------------------------------------------------------------------------


class _Forward(logging.Handler):
    """Sends each log record's message and wall-clock time to the parent."""

    def __init__(self, node_id: int, events: Any) -> None:
        super().__init__(logging.INFO)
        self.node_id = node_id
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.put((self.node_id, record.created, record.name, record.getMessage()))


def worker(cfg: dict[str, Any], conn: Connection, events: Any, wait_for: int) -> None:
    config = Config.from_dict(cfg)
    root = logging.getLogger("dengine")
    root.setLevel(logging.INFO)
    root.addHandler(_Forward(config.node.id, events))
    asyncio.run(_serve(config, conn, wait_for))


async def _serve(config: Config, conn: Connection, wait_for: int) -> None:
    Blob.base()  # built before the clock starts
    blob = Blob()
    node = Node(config, state_machine=blob)
    started_at = time.time()
    await node.start()
    serving_at = time.time()
    assert node.raft is not None
    reply: dict[str, Any] = {"started_at": started_at, "serving_at": serving_at, "applied": node.raft.applied}
    if wait_for:
        while node.raft.applied < wait_for:
            await asyncio.sleep(0.002)
        reply["applied_at"] = time.time()
        reply["applied"] = node.raft.applied
    conn.send(reply)
    loop = asyncio.get_running_loop()
    while True:
        name, arg = await loop.run_in_executor(None, conn.recv)
        try:
            answer = await _handle(node, blob, name, arg)
        except Exception as exc:  # reported to the parent, which fails loudly
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if name == "stop":
            await node.stop(transfer_leadership=False)
        conn.send(answer)
        if name == "stop":
            return


def _status(node: Node, blob: Blob) -> dict[str, Any]:
    s = node.status()
    return {
        "role": s.role,
        "term": s.term,
        "leader": s.leader,
        "applied": s.applied,
        "commit": s.commit,
        "first_index": s.first_index,
        "last_index": s.last_index,
        "snapshot_index": s.snapshot_index,
        "installed": node.snapshots.installed,
        "blob_bytes": len(blob.data),
        "at": time.time(),
    }


async def _grow(node: Node, blob: Blob, total: int) -> dict[str, Any]:
    began = time.perf_counter()
    size = 0
    while size < total:
        size = min(total, size + PIECE)
        await node.propose(b"grow:%d" % size, timeout=120)
    return {"elapsed": time.perf_counter() - began, **_status(node, blob)}


async def _noops(node: Node, blob: Blob, arg: tuple[int, int]) -> dict[str, Any]:
    count, batch = arg
    began = time.perf_counter()
    for done in range(0, count, batch):
        n = min(batch, count - done)
        await asyncio.gather(*(node.propose(b"noop", timeout=120) for _ in range(n)))
    return {"elapsed": time.perf_counter() - began, **_status(node, blob)}


async def _snapshot(node: Node, blob: Blob, _: Any) -> dict[str, Any]:
    began = time.perf_counter()
    snap = await node.snapshot()
    assert snap is not None
    return {
        "elapsed": time.perf_counter() - began,
        "index": snap.meta.index,
        "size": snap.size,
        "path": str(snap.path),
        **_status(node, blob),
    }


async def _wait_applied(node: Node, blob: Blob, arg: tuple[int, float]) -> dict[str, Any]:
    target, timeout = arg
    deadline = time.monotonic() + timeout
    assert node.raft is not None
    while node.raft.applied < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"applied {node.raft.applied} < {target} after {timeout} s")
        await asyncio.sleep(0.002)
    return _status(node, blob)


async def _crc(node: Node, blob: Blob, _: Any) -> dict[str, Any]:
    return {"crc": await asyncio.to_thread(zlib.crc32, blob.data), "bytes": len(blob.data)}


async def _plain_status(node: Node, blob: Blob, _: Any) -> dict[str, Any]:
    return _status(node, blob)


_COMMANDS: dict[str, Callable[[Node, Blob, Any], Awaitable[dict[str, Any]]]] = {
    "status": _plain_status,
    "stop": _plain_status,
    "grow": _grow,
    "noops": _noops,
    "snapshot": _snapshot,
    "wait_applied": _wait_applied,
    "crc": _crc,
}


async def _handle(node: Node, blob: Blob, name: str, arg: Any) -> dict[str, Any]:
    command = _COMMANDS.get(name)
    if command is None:
        raise ValueError(f"unknown command {name!r}")
    return await command(node, blob, arg)


# --- parent -----------------------------------------------------------------------------------------


class Proc:
    def __init__(self, ctx: Any, cfg: dict[str, Any], events: Any, wait_for: int = 0) -> None:
        self.id = int(cfg["node"]["id"])
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=worker, args=(cfg, child, events, wait_for), name=f"node{self.id}", daemon=True
        )
        self.process.start()
        self.pid = self.process.pid

    def recv(self, timeout: float = 600.0) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"node {self.id} (pid {self.pid}) did not answer in {timeout} s")
        reply: dict[str, Any] = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"node {self.id}: {reply['error']}")
        return reply

    def call(self, name: str, arg: Any = None, timeout: float = 600.0) -> dict[str, Any]:
        self.conn.send((name, arg))
        return self.recv(timeout)

    def stop(self) -> dict[str, Any]:
        reply = self.call("stop", timeout=60)
        self.process.join(30)
        return reply


def configs(root: Path, chunk_bytes: int) -> list[dict[str, Any]]:
    ports = free_ports(3)
    members = {str(i): f"127.0.0.1:{p}" for i, p in enumerate(ports, start=1)}
    return [
        {
            "node": {
                "id": i,
                "listen": members[str(i)],
                "data_dir": str(root / f"n{i}"),
                "metrics_listen": "",
            },
            "cluster": {"id": "bench-snapshot", "members": members},
            "raft": {"tick_ms": 20, "heartbeat_ms": 60, "election_timeout_ms": 2000},
            "snapshot": {
                "entries": 0,
                "bytes": 0,
                "interval_s": 0,
                "trailing_entries": 0,
                "keep": 1,
                "chunk_bytes": chunk_bytes,
            },
        }
        for i in range(1, 4)
    ]


def wait_events(
    events: Any, wanted: dict[str, tuple[int, re.Pattern[str]]], timeout: float, log: list[Any]
) -> dict[str, tuple[Any, re.Match[str]]]:
    """Waits for log lines of given nodes matching given patterns (in any order); every event
    seen goes to ``log``."""
    found: dict[str, tuple[Any, re.Match[str]]] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(wanted):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(wanted) - set(found))
            raise TimeoutError(f"no log lines for {missing} in {timeout} s")
        try:
            ev = events.get(timeout=min(remaining, 1.0))
        except Empty:
            continue
        log.append(ev)
        for key, (node, pattern) in wanted.items():
            if key not in found and ev[0] == node and (m := pattern.search(ev[3])):
                found[key] = (ev, m)
    return found


def drain(events: Any, log: list[Any]) -> None:
    while True:
        try:
            log.append(events.get_nowait())
        except Empty:
            return


def leader_of(procs: list[Proc], timeout: float = 30.0) -> Proc:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.call("status")["role"] == "leader":
                return p
        time.sleep(0.05)
    raise TimeoutError("no leader")


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds used by ``pids``) so far: their
    difference over a window is what other programs took from the benchmark."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    machine = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
    ours = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rpartition(")")[2].split()
            ours += (int(parts[11]) + int(parts[12])) / tick
        except OSError:
            pass
    return machine, ours


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    root = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=args.dir))
    cfgs = configs(root, args.chunk_kib * 1024)
    log: list[Any] = []
    result: dict[str, Any] = {
        "mb": args.mb,
        "blob_bytes": args.mb * MIB,
        "tail_entries": args.tail,
        "chunk_bytes": args.chunk_kib * 1024,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    procs: dict[int, Proc] = {}
    try:
        leader = phase1(ctx, cfgs, procs, events, log, args=args, result=result)
        if args.tail:
            phase2(ctx, cfgs, procs, events, log, args=args, result=result, leader=leader)
        result["peak_rss_mib"] = {str(i): rss_mib(p.pid) for i, p in procs.items()}
    finally:
        for p in procs.values():
            try:
                if p.process.is_alive():
                    p.stop()
            except Exception as exc:  # best effort cleanup
                print(f"stopping node {p.id}: {exc}", file=sys.stderr)
                p.process.kill()
        drain(events, log)
        if args.keep:
            print(f"data kept in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    result["snapshot_log"] = [
        {"node": n, "t": round(t, 3), "msg": msg} for n, t, name, msg in log if name == "dengine.snapshot"
    ]
    return result


def phase1(
    ctx: Any,
    cfgs: list[dict[str, Any]],
    procs: dict[int, Proc],
    events: Any,
    log: list[Any],
    *,
    args: argparse.Namespace,
    result: dict[str, Any],
) -> Proc:
    """Builds the state on nodes 1 and 2, snapshots it, then node 3 joins and catches up by snapshot."""
    for i in (1, 2):
        procs[i] = Proc(ctx, cfgs[i - 1], events)
    for i in (1, 2):
        procs[i].recv(120)
    leader = leader_of([procs[1], procs[2]])
    print(f"leader: node {leader.id}; growing the blob to {args.mb} MiB ...", flush=True)
    grown = leader.call("grow", args.mb * MIB)
    result["grow_s"] = grown["elapsed"]
    snap = leader.call("snapshot")
    result["snapshot"] = {"index": snap["index"], "file_bytes": snap["size"], "create_s": snap["elapsed"]}
    print(
        f"snapshot at index {snap['index']}: {snap['size']} bytes in {snap['elapsed']:.2f} s; "
        f"leader log now starts at {snap['first_index']}",
        flush=True,
    )
    other = procs[2] if leader.id == 1 else procs[1]
    other.call("wait_applied", (snap["index"], 120))
    drain(events, log)

    print("starting node 3 with an empty data dir ...", flush=True)
    procs[3] = p3 = Proc(ctx, cfgs[2], events, wait_for=snap["index"])
    pids = [os.getpid(), *(p.pid for p in procs.values())]
    cpu_before, wall_before = cpu_seconds(pids), time.monotonic()
    got = wait_events(events, {"sent": (leader.id, SENT), "installed": (3, INSTALLED)}, 1200, log)
    (sent_ev, sent), (inst_ev, inst) = got["sent"], got["installed"]
    started = p3.recv(600)
    cpu_after, wall = cpu_seconds(pids), time.monotonic() - wall_before
    machine, ours = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
    result["transfer_window_cpu"] = {
        "wall_s": wall,
        "machine_busy_cpu_s": machine,
        "benchmark_cpu_s": ours,
        "other_programs_cpu_s": max(0.0, machine - ours),
        "loadavg_1m": os.getloadavg()[0],
    }
    sent_bytes, sent_s = int(sent.group(3)), float(sent.group(5))
    transfer = {
        "bytes": sent_bytes,
        "from_offset": int(sent.group(4)),
        "leader_send_s": sent_s,
        "throughput_mb_s": sent_bytes / sent_s / 1e6,
        "throughput_mib_s": sent_bytes / sent_s / MIB,
        "install_restore_s": float(inst.group(2)),
        "node3_start_s": started["serving_at"] - started["started_at"],
        "node3_start_to_sent_logged_s": sent_ev[1] - started["started_at"],
        "node3_start_to_installed_s": inst_ev[1] - started["started_at"],
        "node3_start_to_applied_s": started["applied_at"] - started["started_at"],
    }
    crc_leader = leader.call("crc")
    crc_3 = p3.call("crc")
    transfer["replica_identical"] = crc_leader == crc_3
    st3 = p3.call("status")
    transfer["node3_installed_count"] = st3["installed"]
    # The chunker setup alone (what the leader does before the first chunk: a SHA-256 pass).
    began = time.perf_counter()
    SnapshotChunker(Path(snap["path"]), args.chunk_kib * 1024)
    transfer["chunker_setup_s_parent_warm_cache"] = time.perf_counter() - began
    transfer["stream_only_estimate_mb_s"] = (
        sent_bytes / max(1e-9, sent_s - transfer["chunker_setup_s_parent_warm_cache"]) / 1e6
    )
    result["transfer"] = transfer
    print(
        f"transfer: {sent_bytes} bytes in {sent_s:.2f} s = {transfer['throughput_mb_s']:.1f} MB/s; "
        f"install (restore) {transfer['install_restore_s']:.2f} s; identical={transfer['replica_identical']}",
        flush=True,
    )

    return leader


def phase2(
    ctx: Any,
    cfgs: list[dict[str, Any]],
    procs: dict[int, Proc],
    events: Any,
    log: list[Any],
    *,
    args: argparse.Namespace,
    result: dict[str, Any],
    leader: Proc,
) -> None:
    """Commits a log tail on top of node 3's snapshot, then restarts node 3 and times it."""
    p3 = procs[3]
    print(f"proposing {args.tail} noops ...", flush=True)
    tail = leader.call("noops", (args.tail, args.batch), timeout=1800)
    last = tail["last_index"]
    result["tail_propose_s"] = tail["elapsed"]
    p3.call("wait_applied", (last, 300))
    p3_status = p3.stop()
    del procs[3]
    drain(events, log)
    result["node3_before_restart"] = {
        k: p3_status[k] for k in ("first_index", "last_index", "snapshot_index", "applied")
    }
    print(
        f"node 3 stopped with snapshot at {p3_status['snapshot_index']} and log "
        f"{p3_status['first_index']}..{p3_status['last_index']}; restarting ...",
        flush=True,
    )
    procs[3] = p3 = Proc(ctx, cfgs[2], events, wait_for=last)
    _, restored = wait_events(events, {"restored": (3, RESTORED)}, 600, log)["restored"]
    again = p3.recv(600)
    st3 = p3.call("status")
    restart = {
        "target_index": last,
        "start_s": again["serving_at"] - again["started_at"],
        "snapshot_restore_s": float(restored.group(3)),
        "snapshot_bytes": int(restored.group(2)),
        "start_to_applied_s": again["applied_at"] - again["started_at"],
        "tail_apply_after_serving_s": again["applied_at"] - again["serving_at"],
        "installed_after_restart": st3["installed"],
        "blob_bytes": st3["blob_bytes"],
    }
    result["restart"] = restart


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="blob size in MiB (default 1024)")
    ap.add_argument("--tail", type=int, default=100_000, help="log tail entries for the restart (0: skip)")
    ap.add_argument("--batch", type=int, default=2000, help="concurrent proposals per batch for the tail")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="[snapshot] chunk_bytes in KiB")
    ap.add_argument("--dir", default=None, help="parent directory of the data dirs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    result = run(args)
    t = result.get("transfer", {})
    r = result.get("restart", {})
    cpu = result.get("transfer_window_cpu", {})
    rows = [
        ("snapshot size", f"{result['snapshot']['file_bytes'] / 1e6:.1f} MB"),
        ("snapshot create (leader)", f"{result['snapshot']['create_s']:.2f} s"),
        ("transfer (leader send)", f"{t.get('leader_send_s', 0):.2f} s"),
        ("transfer throughput", f"{t.get('throughput_mb_s', 0):.1f} MB/s (target >= 200)"),
        (
            "  CPU (node 3 start->applied): ours / others",
            f"{cpu.get('benchmark_cpu_s', 0):.1f} s / {cpu.get('other_programs_cpu_s', 0):.1f} s "
            f"of {(os.cpu_count() or 1) * cpu.get('wall_s', 0):.1f} s",
        ),
        ("  chunker setup (SHA-256)", f"{t.get('chunker_setup_s_parent_warm_cache', 0):.2f} s"),
        ("install restore (follower)", f"{t.get('install_restore_s', 0):.2f} s"),
        ("node 3 start -> applied", f"{t.get('node3_start_to_applied_s', 0):.2f} s"),
    ]
    if r:
        rows += [
            (f"restart: Node.start() ({r['snapshot_bytes'] / 1e6:.0f} MB snap)", f"{r['start_s']:.2f} s"),
            ("  of which snapshot restore", f"{r['snapshot_restore_s']:.2f} s"),
            (f"restart: start -> applied {r['target_index']}", f"{r['start_to_applied_s']:.2f} s"),
            ("  tail apply after serving", f"{r['tail_apply_after_serving_s']:.2f} s"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
