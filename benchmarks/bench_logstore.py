"""Benchmark of the WAL log store: append throughput, single-append latency against raw
os.write + os.fsync, and reopen time and memory of a 1,000,000-entry log.

Run:  python benchmarks/bench_logstore.py [--dir DIR] [--out benchmarks/results/logstore.json]

DIR must be on the disk you care about (not tmpfs), since fsync cost is what is measured.
Entries are built before the clock starts: the numbers are the store's cost (encode, CRC,
write(2), fsync), not the cost of making Python objects.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dengine.storage import Entry, WalLogStore

PAYLOAD = bytes(range(256))
RECORD_BYTES = 28 + len(PAYLOAD)  # framing + payload, what one entry costs on disk


def append_throughput(root: Path, batch: int, total: int, preallocate: bool) -> dict[str, float]:
    """Appends `total` entries in batches of `batch`, one sync per batch."""
    batches = [[Entry(i, 1, PAYLOAD) for i in range(lo, lo + batch)] for lo in range(1, total + 1, batch)]
    lat: list[float] = []
    with WalLogStore(root / f"append-{batch}-{preallocate}", preallocate=preallocate) as store:
        began = time.perf_counter()
        for b in batches:
            t = time.perf_counter()
            store.append(b)
            store.sync()
            lat.append(time.perf_counter() - t)
        took = time.perf_counter() - began
    entries = len(batches) * batch
    return {
        "batch": batch,
        "preallocate": preallocate,
        "entries": entries,
        "seconds": took,
        "entries_per_s": entries / took,
        "mb_per_s": entries * RECORD_BYTES / took / 1e6,
        "batch_p50_ms": statistics.median(lat) * 1e3,
        "batch_p99_ms": sorted(lat)[int(len(lat) * 0.99)] * 1e3,
    }


def pipelined_group_commit(root: Path, batch: int, total: int) -> dict[str, float]:
    """How a runtime drives the store: one thread appends batches back to back while another
    syncs in a loop, so each fsync overlaps the next appends and covers whatever arrived."""
    batches = [[Entry(i, 1, PAYLOAD) for i in range(lo, lo + batch)] for lo in range(1, total + 1, batch)]
    entries = len(batches) * batch
    syncs = 0
    with WalLogStore(root / f"pipelined-{batch}") as store:

        def syncer() -> None:
            nonlocal syncs
            while store.sync() < entries:
                syncs += 1

        began = time.perf_counter()
        t = threading.Thread(target=syncer)
        t.start()
        for b in batches:
            store.append(b)
        t.join()
        took = time.perf_counter() - began
    return {
        "batch": batch,
        "entries": entries,
        "seconds": took,
        "entries_per_s": entries / took,
        "fsyncs": syncs + 1,
        "entries_per_fsync": entries / (syncs + 1),
    }


def single_append_vs_raw(root: Path, n: int, preallocate: bool) -> dict[str, float]:
    """One 256-byte entry + sync, against os.write + os.fsync of the same number of bytes,
    interleaved so both see the same disk conditions."""
    raw_path = root / "raw.bin"
    fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    record = b"r" * RECORD_BYTES
    store_lat: list[float] = []
    raw_lat: list[float] = []
    with WalLogStore(root / f"single-{preallocate}", preallocate=preallocate) as store:
        for i in range(1, n + 1):
            e = [Entry(i, 1, PAYLOAD)]
            t = time.perf_counter()
            store.append(e)
            store.sync()
            store_lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            os.write(fd, record)
            os.fsync(fd)
            raw_lat.append(time.perf_counter() - t)
    os.close(fd)
    s50, r50 = statistics.median(store_lat), statistics.median(raw_lat)
    return {
        "n": n,
        "preallocate": preallocate,
        "store_p50_us": s50 * 1e6,
        "raw_p50_us": r50 * 1e6,
        "store_mean_us": statistics.fmean(store_lat) * 1e6,
        "raw_mean_us": statistics.fmean(raw_lat) * 1e6,
        "ratio_p50": s50 / r50,
    }


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reopen_child(path: str) -> None:
    """Runs in a fresh process: opens the log and prints time and RSS growth as JSON."""
    before = _rss_kib()
    t = time.perf_counter()
    store = WalLogStore(path)
    took = time.perf_counter() - t
    after = _rss_kib()
    last = store.last_index()
    # Reading a few ranges must not pull the log into memory either.
    for lo in range(1, last, last // 10):
        store.entries(lo, lo + 1000)
    after_reads = _rss_kib()
    store.close()
    print(
        json.dumps(
            {
                "entries": last,
                "open_seconds": took,
                "rss_growth_mb": (after - before) / 1024,
                "rss_growth_after_reads_mb": (after_reads - before) / 1024,
            }
        )
    )


def reopen_large(root: Path, n: int) -> dict[str, float]:
    path = root / "large"
    with WalLogStore(path) as store:
        for lo in range(1, n + 1, 4096):
            store.append([Entry(i, 1 + i // 250_000, PAYLOAD) for i in range(lo, min(lo + 4096, n + 1))])
        store.sync()
    out = subprocess.run(
        [sys.executable, __file__, "--reopen-child", str(path)], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout)
    result["log_mb_on_disk"] = sum(p.stat().st_size for p in path.glob("*.wal")) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", help="where to write the logs (default: a temp dir)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--reopen-child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    args = parser.parse_args()
    if args.reopen_child:
        reopen_child(args.reopen_child)
        return
    scale = 10 if args.quick else 1
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="dengine-bench-") as tmp:
        root = Path(tmp)
        results = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            },
            "append": [
                append_throughput(root, batch, count // scale, preallocate)
                for preallocate in (True, False)
                for batch, count in ((1, 3000), (64, 64_000), (1024, 1_024_000))
            ],
            "pipelined": pipelined_group_commit(root, 1024, 1024 * 1000 // scale),
            "single_append_vs_raw": [
                single_append_vs_raw(root, 3000 // scale, preallocate) for preallocate in (True, False)
            ],
            "reopen": reopen_large(root, 1_000_000 // scale),
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
