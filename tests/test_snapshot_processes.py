"""Snapshots with real `dengine serve` processes: a follower that was down while 100,000 writes
were made and compacted catches up by InstallSnapshot and ends with the leader's exact state;
disk usage stays bounded over a long write run; a corrupt snapshot file stops a node's start
with a clear error; `dengine snapshot create` works from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dengine.client import Client
from dengine.snapshot_store import SnapshotStore

from cluster_procs import ProcCluster, running_cluster, wait_for

SNAPSHOTS = """
[snapshot]
entries = {entries}
trailing_entries = {trailing}

[storage]
segment_bytes = {segment}
"""


def write_keys(cluster: ProcCluster, count: int, prefix: str, inflight: int = 512) -> None:
    """Writes ``count`` keys through the client (coalesced batches), all acknowledged."""
    endpoints = ",".join(cluster.address(i) for i in range(1, cluster.n + 1))

    async def main() -> None:
        async with Client(endpoints, timeout=60) as client:
            sem = asyncio.Semaphore(inflight)

            async def one(k: int) -> None:
                async with sem:
                    await client.put(f"{prefix}{k:07d}".encode(), b"v" * 64)

            await asyncio.gather(*(one(k) for k in range(count)))

    asyncio.run(main())


def cli(cluster: ProcCluster, *args: str, among: list[int] | None = None) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(cluster.address(i) for i in (among or range(1, cluster.n + 1)))
    return subprocess.run(
        [sys.executable, "-m", "dengine", *args, "--endpoints", endpoints, "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_follower_down_for_100000_writes_catches_up_by_snapshot(tmp_path: Path) -> None:
    extra = SNAPSHOTS.format(entries=20000, trailing=1000, segment=1 << 20)
    with running_cluster(tmp_path, extra_toml=extra) as cluster:
        leader = cluster.wait_leader()
        follower = next(i for i in range(1, 4) if i != leader)
        cluster.kill(follower)
        write_keys(cluster, 100_000, "k")
        leader = cluster.wait_leader()
        status = cluster.status(leader)
        assert status is not None and status.snapshot_index > 0 and status.first_index > 50_000, status
        cluster.start(follower)
        wait_for(
            lambda: (s := cluster.status(follower)) is not None and s.applied_index >= status.commit_index,
            120,
            "the restarted follower to catch up",
        )
        caught_up = cluster.status(follower)
        assert caught_up is not None and caught_up.first_index > 50_000, (
            "by snapshot, not by replaying the log"
        )
        log = (tmp_path / f"node{follower}.log").read_text()
        assert "installed snapshot" in log
        # Every node snapshots its state now: with no writes in flight the files must be identical.
        result = cli(cluster, "snapshot", "create", "--output", "json")
        assert result.returncode == 0, result.stderr
        taken = json.loads(result.stdout)
        assert len({t["index"] for t in taken}) == 1, taken
        files = []
        for i in range(1, 4):
            snap = SnapshotStore(tmp_path / f"data{i}" / "snapshots").latest(verify=True)
            assert snap is not None and snap.meta.index == taken[0]["index"]
            files.append(snap.path.read_bytes())
        assert files[0] == files[1] == files[2], "the follower's state equals the leader's, byte for byte"


def test_disk_usage_stays_bounded_during_a_long_write_run(tmp_path: Path) -> None:
    extra = SNAPSHOTS.format(entries=4000, trailing=500, segment=256 << 10)
    with running_cluster(tmp_path, extra_toml=extra) as cluster:
        sizes, logs = [], []
        for _ in range(8):
            # The same 6,000 keys again each round: the state stays the same size, the log grows.
            write_keys(cluster, 6000, "r-", inflight=256)
            sizes.append(dir_bytes(tmp_path / "data1"))
            logs.append(dir_bytes(tmp_path / "data1" / "log"))
        # 48,000 entries of ~100 bytes would be ~5 MB of log; compaction keeps the disk flat.
        assert max(sizes[2:]) <= 1.5 * sizes[1] + (1 << 20), sizes
        assert max(logs) < 2 << 20, logs
        status = cluster.status(1)
        assert status is not None and status.first_index > 40_000


def test_a_corrupt_snapshot_file_is_detected_at_start(tmp_path: Path) -> None:
    cluster = ProcCluster(tmp_path, 1)
    cluster.start_all()
    try:
        cluster.wait_leader()
        write_keys(cluster, 100, "c")
        result = cli(cluster, "snapshot", "create")
        assert result.returncode == 0, result.stderr
        assert "snapshot at index" in result.stdout
        cluster.kill(1, signal.SIGTERM)
        snap = SnapshotStore(tmp_path / "data1" / "snapshots").latest()
        assert snap is not None
        with open(snap.path, "r+b") as f:
            f.seek(snap.data_offset + 10)
            byte = f.read(1)
            f.seek(snap.data_offset + 10)
            f.write(bytes([byte[0] ^ 0x55]))
        proc = subprocess.run(
            [sys.executable, "-m", "dengine", "serve", "--config", str(tmp_path / "node1.toml")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert snap.path.name in last and "SHA-256" in last, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        cluster.stop_all()
