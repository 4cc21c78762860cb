"""PySyncObj 0.3.17 counterpart of ``bench_embedded.py``: 3 nodes in 3 processes on 127.0.0.1, a
replicated dict with a ``@replicated`` ``set(key, value)``, 256-byte values, proposals issued from
the leader's process with many in flight (each completion callback issues the next call), for a
fixed duration. Reports the same JSON keys as ``bench_embedded.py``.

Not like for like on durability: PySyncObj does not fsync (its default journal is in memory, and
this benchmark keeps PySyncObj's defaults), while dengine's WAL fsyncs every batch.

The two followers are this same file run with ``--follower``; while a follower leads, it hands
leadership to the measuring node (PySyncObj's ``transferLeadership``), so proposals always start on
the leader.

Needs ``pip install pysyncobj==0.3.17`` (not a dengine dependency).

Run:  python benchmarks/bench_pysyncobj.py [--seconds 10] [--inflight 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated

from dengine.devcluster import free_ports

VALUE = b"v" * 256
SUCCESS = 0  # pysyncobj.FAIL_REASON.SUCCESS
SETUP_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0


class ReplicatedDict(SyncObj):  # type: ignore[misc]
    def __init__(self, self_addr: str, partners: list[str]) -> None:
        super().__init__(self_addr, partners, SyncObjConf())
        self._data: dict[bytes, bytes] = {}

    @replicated  # type: ignore[untyped-decorator]
    def set(self, key: bytes, value: bytes) -> None:
        self._data[key] = value


def stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def follower(self_addr: str, partners: list[str], measuring_addr: str) -> None:
    stop = threading.Event()
    stop_on_signals(stop)
    parent = os.getppid()
    obj = ReplicatedDict(self_addr, partners)
    next_transfer = 0.0

    def hand_over() -> None:
        # Runs on PySyncObj's tick thread, so it may call into the node directly.
        nonlocal next_transfer
        now = time.monotonic()
        if obj._isLeader() and now >= next_transfer:
            next_transfer = now + 1.0
            obj.transferLeadership(measuring_addr)

    obj.addOnTickCallback(hand_over)
    try:
        # Also stop if the parent died without cleaning up.
        while not stop.wait(0.2) and os.getppid() == parent:
            pass
    finally:
        obj.destroy_synchronous()


class Load:
    """Keeps ``inflight`` calls outstanding until ``stop_at``; every completion issues the next."""

    def __init__(self, obj: ReplicatedDict, inflight: int, stop_at: float) -> None:
        self.obj = obj
        self.stop_at = stop_at
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[int, int] = {}
        self.outstanding = inflight
        self.last_done = time.perf_counter()
        self.drained = threading.Event()
        self.counters = [0] * inflight

    def issue(self, w: int) -> None:
        i = self.counters[w]
        self.counters[w] = i + 1
        self.obj.set(b"key-%d-%d" % (w, i % 1000), VALUE, callback=self.callback(w, time.perf_counter()))

    def callback(self, w: int, started: float) -> Callable[[Any, int], None]:
        def done(result: Any, err: int) -> None:
            now = time.perf_counter()
            with self.lock:
                if err == SUCCESS:
                    self.latencies.append(now - started)
                else:
                    self.errors[err] = self.errors.get(err, 0) + 1
                if now < self.stop_at:
                    again = True
                else:
                    again = False
                    self.outstanding -= 1
                    self.last_done = now
                    if self.outstanding == 0:
                        self.drained.set()
            if again:
                self.issue(w)

        return done


def check_alive(followers: list[subprocess.Popen[bytes]]) -> None:
    if any(f.poll() is not None for f in followers):
        raise RuntimeError("a follower process exited")


def run(seconds: float, inflight: int) -> dict[str, float]:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    followers: list[subprocess.Popen[bytes]] = []
    obj: ReplicatedDict | None = None
    try:
        for i in (1, 2):
            partners = [a for a in addrs if a != addrs[i]]
            followers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--follower", addrs[i], ",".join(partners), addrs[0]]
                )
            )
        obj = ReplicatedDict(addrs[0], addrs[1:])
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not obj._isLeader():
            if time.monotonic() > deadline:
                raise RuntimeError("the measuring node did not become leader")
            check_alive(followers)
            time.sleep(0.05)
        obj.set(b"warmup", VALUE, sync=True, timeout=10)

        began = time.perf_counter()
        load = Load(obj, inflight, began + seconds)
        for w in range(inflight):
            load.issue(w)
        deadline = time.monotonic() + seconds + DRAIN_TIMEOUT_S
        while not load.drained.wait(0.2):
            check_alive(followers)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{load.outstanding} calls still outstanding after the run")
        took = load.last_done - began
    finally:
        if obj is not None:
            obj.destroy_synchronous()
        for f in followers:
            f.terminate()
        for f in followers:
            try:
                f.wait(timeout=10)
            except subprocess.TimeoutExpired:
                f.kill()
                f.wait()
    if load.errors:
        print(f"failed calls (FAIL_REASON: count), not counted: {load.errors}", file=sys.stderr)
    latencies = sorted(load.latencies)
    return {
        "ops": len(latencies),
        "seconds": took,
        "ops_per_s": len(latencies) / took,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "inflight": inflight,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--inflight", type=int, default=2000)
    # Internal: run one follower node (SELF_ADDR PARTNER,PARTNER MEASURING_ADDR).
    parser.add_argument("--follower", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follower:
        self_addr, partners, measuring_addr = args.follower
        follower(self_addr, partners.split(","), measuring_addr)
        return
    try:
        result = run(args.seconds, args.inflight)
    except KeyboardInterrupt:
        sys.exit(130)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
