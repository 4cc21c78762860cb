"""``dengine demo``: a local 3-node cluster that loses its leader and keeps every acknowledged write.

It starts three ``dengine serve`` processes in a temporary directory, writes a few thousand keys
through :class:`dengine.client.Client`, shows the cluster status, kills the leader with SIGKILL,
times the election of a new one, reads back every acknowledged write, restarts the killed node
and watches it catch up, then stops everything and cleans up. It exits 0 only if every check
passed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from dengine.client import Client
from dengine.devcluster import write_configs
from dengine.errors import DengineError
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

KEYS = 3000


class DemoFailed(Exception):
    pass


class _Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.configs = write_configs(root, 3, "demo", None)
        self.addresses = [
            line.split('"')[1]
            for path in self.configs
            for line in path.read_text().splitlines()
            if line.startswith("listen")
        ]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started = time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.2f}s] {msg}", flush=True)

    def start(self, i: int) -> None:
        log = open(self.root / f"node{i}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "dengine", "serve", "--config", str(self.configs[i - 1])],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    async def status(self, i: int) -> cluster_pb2.StatusResponse | None:
        async with grpc.aio.insecure_channel(self.addresses[i - 1]) as ch:
            try:
                stub = cluster_pb2_grpc.ClusterStub(ch)  # type: ignore[no-untyped-call]
                resp: cluster_pb2.StatusResponse = await stub.Status(cluster_pb2.StatusRequest(), timeout=1)
                return resp
            except grpc.RpcError:
                return None

    async def leader(self, exclude: int | None = None) -> int | None:
        for i in range(1, 4):
            if i != exclude and self.procs[i].poll() is None:
                s = await self.status(i)
                if s is not None and s.role == "leader":
                    return i
        return None

    async def wait(self, what: str, cond: Callable[[], object], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = cond()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)
        raise DemoFailed(f"timed out waiting for {what}")

    async def table(self) -> None:
        print(
            f"    {'id':>2}  {'address':<21} {'role':<10} {'term':>4} {'commit':>7} {'applied':>7} {'lag':>5}"
        )
        statuses = {i: await self.status(i) for i in range(1, 4)}
        leader = next((s for s in statuses.values() if s is not None and s.role == "leader"), None)
        lags = {p.id: p.lag for p in leader.peers} if leader is not None else {}
        for i, s in statuses.items():
            if s is None:
                print(f"    {i:>2}  {self.addresses[i - 1]:<21} {'down':<10}")
            else:
                lag = 0 if s.role == "leader" else lags.get(i, 0)
                print(
                    f"    {s.id:>2}  {s.address:<21} {s.role:<10} {s.term:>4} {s.commit_index:>7} "
                    f"{s.applied_index:>7} {lag:>5}"
                )

    async def run(self) -> None:
        # SIGTERM cancels the demo at its next await, like Ctrl-C, so main() stops the nodes and
        # removes the temp dir (the default action would kill only this process and leave both).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        self.say(f"starting a 3-node cluster in {self.root}")
        for i in range(1, 4):
            self.start(i)
        await self.wait("a leader", self.leader)
        first = await self.leader()
        self.say(f"node {first} was elected leader")

        async with Client(self.addresses, timeout=30) as client:
            t = time.perf_counter()
            await asyncio.gather(*(client.put(b"key-%05d" % n, b"value-%05d" % n) for n in range(KEYS)))
            took = time.perf_counter() - t
            self.say(f"wrote {KEYS:,} keys in {took:.2f}s ({KEYS / took:,.0f} writes/s, each acknowledged)")
            await self.table()

            old = await self.leader()
            assert old is not None
            self.procs[old].kill()
            self.procs[old].wait()
            killed_at = time.perf_counter()
            self.say(f"killed the leader, node {old}, with SIGKILL")
            await self.wait("a new leader", lambda: self.leader(exclude=old))
            new = await self.leader(exclude=old)
            self.say(f"node {new} was elected leader {time.perf_counter() - killed_at:.2f}s after the kill")

            t = time.perf_counter()
            values = await asyncio.gather(*(client.get(b"key-%05d" % n) for n in range(KEYS)))
            missing = [n for n, kv in enumerate(values) if kv is None or kv.value != b"value-%05d" % n]
            if missing:
                raise DemoFailed(f"{len(missing)} acknowledged writes are missing, e.g. key-{missing[0]:05d}")
            self.say(
                f"read back all {KEYS:,} acknowledged writes (linearizable) in {time.perf_counter() - t:.2f}s"
            )

            await client.put(b"after-failover", b"yes")
            self.start(old)
            self.say(f"restarted node {old}")
            t = time.perf_counter()

            async with Client([self.addresses[old - 1]], timeout=1) as restarted:

                async def caught_up() -> bool:
                    s = await self.status(old)
                    leader = await self.status(new) if new else None
                    if not (s and leader and s.applied_index >= leader.commit_index and s.role == "follower"):
                        return False
                    # The write made while it was down, read from its own state (a stale read).
                    try:
                        kv = await restarted.get(b"after-failover", consistency="stale")
                    except DengineError:
                        return False
                    return kv is not None and kv.value == b"yes"

                await self.wait(f"node {old} to catch up", caught_up)
            self.say(
                f"node {old} caught up in {time.perf_counter() - t:.2f}s "
                "(it serves the write made while it was down)"
            )
            await self.table()
        self.say("stopping the cluster")
        self.stop_all()


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Outside the event loop (before it starts, after it ends) SIGTERM is handled as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main() -> int:
    with tempfile.TemporaryDirectory(prefix="dengine-demo-") as tmp:
        demo = _Demo(Path(tmp))
        try:
            asyncio.run(demo.run())
        except (DemoFailed, AssertionError) as exc:
            demo.say(f"FAILED: {exc}")
            return 1
        except DengineError as exc:  # a client call that failed (cluster unavailable, deadline, ...)
            demo.say(f"FAILED: {type(exc).__name__}: {exc}")
            return 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            demo.say("interrupted")
            return 130
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
            demo.stop_all()
            if os.environ.get("DENGINE_DEMO_KEEP_LOGS"):
                for log in sorted(Path(tmp).glob("*.log")):
                    print(log.read_text())
        demo.say("cleaned up; demo passed: no acknowledged write was lost")
    return 0
