"""How long the KV state machine stops applying while it snapshots, with and without the background path.

Run:  python benchmarks/bench_snapshot_stall.py [--gb 1.0] [--value-bytes 256] [--seconds 600]
                                                [--dir DIR] [--verify] [--out RESULT.json]

It builds a KVStateMachine holding about ``--gb`` x 10^9 bytes of keys and values (keys
b"key%012d", values of ``--value-bytes``) by restoring a generated snapshot, about 1.5 times as
fast as applying the puts. Then the main thread applies commands back to back (overwrites of
random keys, plus inserts between existing keys and deletes, which make the key index copy its
chunks) while a worker thread runs the writer of ``begin_snapshot()`` into a file under ``--dir``
and fsyncs it. Measured: the time ``begin_snapshot()`` itself takes (the freeze), the writer's
duration and bytes/s, and the gaps between consecutive applies on the main thread (the largest is
the "apply stall"; the writer's part of it is a GIL hand-over, about the interpreter's switch
interval, whatever the size of the state). For comparison it then times a plain blocking
``snapshot()`` into a file with fsync: the stall the node would see without the background path.
``--seconds`` bounds the background phase: a writer still running then is cancelled and reported
as such.

Large gaps are attributed: the longest time the apply thread waited within one gap (off the CPU
or out of the GIL, i.e. what the writer thread can cause) is reported apart from the longest time
one apply computed by itself, and garbage collections over 1 ms are listed (none since the
store lives in Rust: its keys and values are no Python objects).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import struct
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dengine.kv import (
    SNAPSHOT_MAGIC,
    KVSnapshotCancelledError,
    KVSnapshotWriter,
    KVStateMachine,
    encode_delete,
    encode_put,
)

# The snapshot layout, from the dengine.kv module docstring.
SNAP_HEAD = struct.Struct("<8sIQQQ")
KV_HEAD = struct.Struct("<QQQII")
KEY_BYTES = len(b"key%012d" % 0)
BYTES_PER_KEY_IN_MEMORY = 300  # measured on CPython 3.11: objects, dict slot, index slot, besides value


def make_value(key: bytes, size: int) -> bytes:
    """A value that differs per key, so nothing is shared or compressible by accident."""
    return (key * (size // len(key) + 1))[:size]


def generate_snapshot(path: Path, keys: int, value_bytes: int) -> None:
    """Writes a valid KV snapshot of ``keys`` keys, each put once (revision i + 1)."""
    crc = 0
    buf = bytearray(SNAP_HEAD.pack(SNAPSHOT_MAGIC, 1, keys, keys, keys))
    pack = KV_HEAD.pack
    with path.open("wb", buffering=0) as f:
        for i in range(keys):
            key = b"key%012d" % i
            buf += pack(i + 1, i + 1, 1, KEY_BYTES, value_bytes)
            buf += key
            buf += make_value(key, value_bytes)
            if len(buf) >= 1 << 20:
                crc = zlib.crc32(buf, crc)
                f.write(buf)
                buf.clear()
        buf += struct.pack("<I", zlib.crc32(buf, crc))
        f.write(buf)


def build(root: Path, keys: int, value_bytes: int) -> tuple[KVStateMachine, dict[str, float]]:
    path = root / "generated.snap"
    began = time.perf_counter()
    generate_snapshot(path, keys, value_bytes)
    generated = time.perf_counter()
    sm = KVStateMachine()
    with path.open("rb") as f:
        sm.restore(f)
    restored = time.perf_counter()
    path.unlink()
    return sm, {"generate_s": generated - began, "restore_s": restored - generated}


def make_commands(keys: int, value_bytes: int, count: int, seed: int) -> list[bytes]:
    """Commands for the apply loop: 80% overwrites, 10% inserts between keys, 10% deletes."""
    rng = random.Random(seed)
    commands = []
    for _ in range(count):
        key = b"key%012d" % rng.randrange(keys)
        choice = rng.random()
        if choice < 0.8:
            commands.append(encode_put(key, make_value(key[::-1], value_bytes)))
        elif choice < 0.9:
            commands.append(encode_put(key + b"+", make_value(key, value_bytes)))
        else:
            commands.append(encode_delete(key))
    return commands


class GcWatch:
    """Records the garbage collections over 1 ms that run while it is on, as (generation, seconds)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0
        self.on = True
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        if took > 1e-3:
            self.pauses.append((info["generation"], took))


class ApplyLoop:
    """Applies commands on this thread until told to stop, recording the gap after each apply.

    For gaps over 1 ms it also records how much of it this thread spent on the CPU: a gap it spent
    computing is its own apply's doing (a dict growing, a garbage collection), one it spent off the
    CPU is waiting, for the GIL (held by the writer) or for a CPU.
    """

    def __init__(self, sm: KVStateMachine, commands: list[bytes]) -> None:
        self.sm = sm
        self.commands = commands
        self.next = 0

    def run(self, stop: threading.Event, max_seconds: float) -> tuple[array[int], list[tuple[int, int]]]:
        sm = self.sm
        commands = self.commands
        n = len(commands)
        gaps: array[int] = array("q")
        long_gaps: list[tuple[int, int]] = []  # (wall ns, this thread's CPU ns)
        index = sm.last_applied
        deadline = time.perf_counter_ns() + int(max_seconds * 1e9)
        last = time.perf_counter_ns()
        last_cpu = time.thread_time_ns()
        i = self.next
        while not stop.is_set() and last < deadline:
            index += 1
            sm.apply(index, commands[i % n])
            i += 1
            now = time.perf_counter_ns()
            cpu = time.thread_time_ns()
            gaps.append(now - last)
            if now - last > 1_000_000:
                long_gaps.append((now - last, cpu - last_cpu))
            last = now
            last_cpu = cpu
        self.next = i
        return gaps, long_gaps


def gap_stats(
    gaps: array[int], long_gaps: list[tuple[int, int]], seconds: float, watch: GcWatch
) -> dict[str, Any]:
    ordered = sorted(gaps)
    stats = {
        "applies": len(ordered),
        "applies_per_s": len(ordered) / seconds,
        "gap_p50_us": ordered[len(ordered) // 2] / 1e3,
        "gap_p99_us": ordered[int(len(ordered) * 0.99)] / 1e3,
        "gap_p999_us": ordered[int(len(ordered) * 0.999)] / 1e3,
        "gap_max_ms": ordered[-1] / 1e6,
        "gaps_over_10ms": sum(wall > 10_000_000 for wall, _ in long_gaps),
        # The longest time this thread was kept off the CPU or out of the GIL within one gap.
        "waiting_max_ms": max((max(0, wall - cpu) for wall, cpu in long_gaps), default=0) / 1e6,
        # The longest time one apply itself computed (dict resize, garbage collection).
        "busy_max_ms": max((cpu for _, cpu in long_gaps), default=0) / 1e6,
        "longest_gaps_ms": [
            {"wall": wall / 1e6, "cpu": cpu / 1e6} for wall, cpu in sorted(long_gaps, reverse=True)[:5]
        ],
        "gc_pauses_over_1ms": watch.pauses,
        "gc_max_ms": max((took for _, took in watch.pauses), default=0) * 1e3,
        "full_gcs": sum(generation == 2 for generation, _ in watch.pauses),
    }
    watch.pauses = []
    return stats


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Runs ``write(file)`` on a new file, fsyncs it, returns its size."""
    with path.open("wb", buffering=0) as f:
        write(f)
        os.fsync(f.fileno())
    return path.stat().st_size


def measure_baseline(loop: ApplyLoop, seconds: float, watch: GcWatch) -> dict[str, Any]:
    began = time.perf_counter()
    gaps, long_gaps = loop.run(threading.Event(), seconds)
    return gap_stats(gaps, long_gaps, time.perf_counter() - began, watch)


def run_writer(writer: KVSnapshotWriter, path: Path, outcome: dict[str, Any], stop: threading.Event) -> None:
    """The worker thread: the background snapshot into ``path``, with fsync."""
    began = time.perf_counter()
    try:
        outcome["bytes"] = write_file(path, writer)
        outcome["status"] = "done"
    except KVSnapshotCancelledError:
        outcome["status"] = "cancelled"
    except BaseException as exc:
        outcome["status"] = f"failed: {exc!r}"
    outcome["seconds"] = time.perf_counter() - began
    stop.set()


def measure_background(
    sm: KVStateMachine, loop: ApplyLoop, path: Path, seconds: float, watch: GcWatch
) -> dict[str, Any]:
    freezes = []
    for _ in range(21):  # one freeze is too short to time alone on a noisy machine
        frozen_at = time.perf_counter()
        sm.begin_snapshot().cancel()
        freezes.append(time.perf_counter() - frozen_at)
    frozen_at = time.perf_counter()
    writer = sm.begin_snapshot()
    freeze_s = time.perf_counter() - frozen_at
    outcome: dict[str, Any] = {"bytes": 0}
    stop = threading.Event()
    thread = threading.Thread(target=run_writer, args=(writer, path, outcome, stop), name="snapshot-writer")
    began = time.perf_counter()
    thread.start()
    gaps, long_gaps = loop.run(stop, seconds)
    if not stop.is_set():
        writer.cancel()
    thread.join()
    return {
        "freeze_ms": freeze_s * 1e3,
        "freeze_and_cancel_median_ms": sorted(freezes)[10] * 1e3,
        "status": outcome["status"],
        "snapshot_s": outcome["seconds"],
        "snapshot_bytes": outcome["bytes"],
        "mb_per_s": outcome["bytes"] / outcome["seconds"] / 1e6,
        "revision": writer.revision,
        "last_applied": writer.last_applied,
        **gap_stats(gaps, long_gaps, time.perf_counter() - began, watch),
    }


def verify(path: Path, background: dict[str, Any]) -> None:
    copy = KVStateMachine()
    with path.open("rb") as f:
        copy.restore(f)
    if (copy.revision, copy.last_applied) != (background["revision"], background["last_applied"]):
        sys.exit(f"background snapshot is at the wrong point: {copy.revision}, {copy.last_applied}")
    background["verified_keys"] = len(copy)


def measure_blocking(sm: KVStateMachine, path: Path) -> dict[str, Any]:
    began = time.perf_counter()
    size = write_file(path, sm.snapshot)
    took = time.perf_counter() - began
    return {"snapshot_s": took, "snapshot_bytes": size, "mb_per_s": size / took / 1e6}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.0, help="key + value bytes, in 10^9 (default 1.0)")
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=600.0, help="bound on the background phase")
    parser.add_argument("--baseline-seconds", type=float, default=10.0, help="apply loop with no snapshot")
    parser.add_argument("--dir", type=Path, default=None, help="where snapshot files go (a real disk)")
    parser.add_argument("--verify", action="store_true", help="restore the background snapshot and check it")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    keys = int(args.gb * 1e9 / (KEY_BYTES + args.value_bytes))
    need = keys * (args.value_bytes + BYTES_PER_KEY_IN_MEMORY)
    if platform.system() == "Linux" and need * (2.2 if args.verify else 1.2) > mem_available():
        sys.exit(f"not enough memory: about {need / 2**30:.1f} GiB needed per copy of the state")
    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "gb": args.gb,
        "value_bytes": args.value_bytes,
        "keys": keys,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
    }
    with tempfile.TemporaryDirectory(prefix="dengine-snap-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"building {keys:,} keys ({args.gb:g} GB of keys and values) ...", flush=True)
        sm, results["build"] = build(root, keys, args.value_bytes)
        loop = ApplyLoop(sm, make_commands(keys, args.value_bytes, 500_000, seed=1))
        watch = GcWatch()
        results["baseline"] = measure_baseline(loop, args.baseline_seconds, watch)
        path = root / "background.snap"
        results["background"] = measure_background(sm, loop, path, args.seconds, watch)
        if args.verify and results["background"]["status"] == "done":
            verify(path, results["background"])
        path.unlink(missing_ok=True)
        results["blocking"] = measure_blocking(sm, root / "blocking.snap")
        watch.on = False
    results["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print_table(results)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


def print_table(r: dict[str, Any]) -> None:
    b, g, base, blk = r["build"], r["background"], r["baseline"], r["blocking"]
    lines = [
        ("state", f"{r['keys']:,} keys, {r['gb']:g} GB of keys+values, {r['value_bytes']}-byte values"),
        (
            "build",
            f"{b['generate_s'] + b['restore_s']:.1f} s "
            f"(generate {b['generate_s']:.1f} s + restore {b['restore_s']:.1f} s)",
        ),
        (
            "begin_snapshot() freeze",
            f"{g['freeze_ms']:.3f} ms (median of 21 begin+cancel: {g['freeze_and_cancel_median_ms']:.3f} ms)",
        ),
        (
            "background snapshot",
            f"{g['status']}: {g['snapshot_s']:.2f} s, {g['snapshot_bytes'] / 1e9:.2f} GB, "
            f"{g['mb_per_s']:.0f} MB/s (file + fsync)",
        ),
        (
            "blocking snapshot()",
            f"{blk['snapshot_s']:.2f} s, {blk['mb_per_s']:.0f} MB/s: the stall without it",
        ),
        ("peak RSS", f"{r['max_rss_gib']:.2f} GiB"),
    ]
    for name, value in lines:
        print(f"{name:<26}{value}")
    print()
    rows = [
        ("apply loop", "during snapshot", "no snapshot"),
        ("applies/s", f"{g['applies_per_s']:,.0f}", f"{base['applies_per_s']:,.0f}"),
    ]
    for name, field, scale in [
        ("gap p50 (us)", "gap_p50_us", 1.0),
        ("gap p99 (us)", "gap_p99_us", 1.0),
        ("gap p99.9 (us)", "gap_p999_us", 1.0),
        ("max gap = apply stall (ms)", "gap_max_ms", 1.0),
        ("  longest wait in a gap (ms)", "waiting_max_ms", 1.0),
        ("  longest own work (ms)", "busy_max_ms", 1.0),
    ]:
        rows.append((name, f"{g[field] * scale:.1f}", f"{base[field] * scale:.1f}"))
    rows.append(("gaps over 10 ms", str(g["gaps_over_10ms"]), str(base["gaps_over_10ms"])))
    rows.append(("longest GC pause (ms)", f"{g['gc_max_ms']:.1f}", f"{base['gc_max_ms']:.1f}"))
    rows.append(("full GCs over 1 ms", str(g["full_gcs"]), str(base["full_gcs"])))
    for name, during, without in rows:
        print(f"{name:<30}{during:>16}{without:>14}")


if __name__ == "__main__":
    main()
