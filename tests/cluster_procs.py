"""Real dengine server processes on 127.0.0.1 for integration tests: start, kill -9, SIGSTOP,
restart, and talk to them over real gRPC."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from dengine.devcluster import free_ports
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

from net_proxy import Proxies

T = TypeVar("T")


def wait_for(cond: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def running_cluster(root: Path, n: int = 3, **options: Any) -> Iterator[ProcCluster]:
    """A started cluster whose every node serves and knows the leader, stopped (every process
    killed) on exit."""
    c = ProcCluster(root, n, **options)
    c.start_all()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop_all()


class ProcCluster:
    def __init__(
        self,
        root: Path,
        n: int = 3,
        *,
        cluster_id: str = "test-cluster",
        tls_dir: Path | None = None,
        extra_toml: str = "",
        proxied: bool = False,
    ) -> None:
        """``extra_toml`` is appended to every node's configuration file (more sections).
        ``proxied``: nodes reach each other through ``self.proxies`` (network faults); node
        ``i`` advertises its proxy's address, and listens behind it on ``port(i)``."""
        self.root = root
        self.n = n
        self.cluster_id = cluster_id
        ports = free_ports(3 * n if proxied else 2 * n)
        self.ports, self.metrics_ports = ports[:n], ports[n : 2 * n]
        self.proxy_ports = {i: p for i, p in enumerate(ports[2 * n :], start=1)}
        pairs = [(self.proxy_ports[i], self.ports[i - 1]) for i in self.proxy_ports]
        self.proxies = Proxies(pairs) if proxied else None
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.extra_ports: dict[int, int] = {}
        members = ", ".join(f'{i} = "{self.peer_address(i)}"' for i in range(1, n + 1))
        for i in range(1, n + 1):
            (root / f"node{i}.toml").write_text(
                f"""
[node]
id = {i}
listen = "127.0.0.1:{self.ports[i - 1]}"
advertise = "{self.peer_address(i)}"
data_dir = "{root / f"data{i}"}"
metrics_listen = "127.0.0.1:{self.metrics_ports[i - 1]}"

[cluster]
id = "{cluster_id}"
members = {{ {members} }}

[raft]
tick_ms = 20
heartbeat_ms = 60
election_timeout_ms = 400
"""
                + (
                    f"""
[tls]
enabled = true
ca_file = "{tls_dir / "ca.pem"}"
cert_file = "{tls_dir / f"node{i}.pem"}"
key_file = "{tls_dir / f"node{i}-key.pem"}"
client_auth = true
"""
                    if tls_dir
                    else ""
                )
                + extra_toml
            )
        if tls_dir is None:
            self.channels = {i: grpc.insecure_channel(self.address(i)) for i in range(1, n + 1)}
        else:
            creds = grpc.ssl_channel_credentials(
                (tls_dir / "ca.pem").read_bytes(),
                (tls_dir / "client-key.pem").read_bytes(),
                (tls_dir / "client.pem").read_bytes(),
            )
            self.channels = {i: grpc.secure_channel(self.address(i), creds) for i in range(1, n + 1)}

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.port(i)}"

    def port(self, i: int) -> int:
        return self.ports[i - 1] if i <= self.n else self.extra_ports[i]

    def peer_address(self, i: int) -> str:
        """Where the other nodes reach node ``i`` (its proxy's address when proxied)."""
        return f"127.0.0.1:{self.proxy_ports[i]}" if i in self.proxy_ports else self.address(i)

    def add_joiner(self, i: int, *, replacing: int | None = None) -> str:
        """Writes the configuration of a new node ``i`` that will join the running cluster
        (``start(i, join=...)``); returns its address. ``replacing``: take over that removed
        member's addresses (a replacement machine under the old host name) rather than a new
        port."""
        if replacing is None:
            (port,) = free_ports(1)
        else:
            port = self.port(replacing)
            if replacing in self.proxy_ports:
                self.proxy_ports[i] = self.proxy_ports[replacing]
        self.extra_ports[i] = port
        text = (self.root / "node1.toml").read_text()
        text = text.replace("id = 1\n", f"id = {i}\n", 1)
        text = text.replace(f'listen = "127.0.0.1:{self.ports[0]}"', f'listen = "127.0.0.1:{port}"')
        text = text.replace(f'advertise = "{self.peer_address(1)}"', f'advertise = "{self.peer_address(i)}"')
        text = text.replace(f'data_dir = "{self.root / "data1"}"', f'data_dir = "{self.root / f"data{i}"}"')
        text = text.replace(f'metrics_listen = "127.0.0.1:{self.metrics_ports[0]}"', 'metrics_listen = ""')
        text = text.replace("[cluster]\n", '[cluster]\ninitial_state = "existing"\n', 1)
        (self.root / f"node{i}.toml").write_text(text)
        self.channels[i] = grpc.insecure_channel(self.address(i))
        return self.address(i)

    def start(self, i: int, *, join: str | None = None, env: dict[str, str] | None = None) -> None:
        """Starts node ``i`` (its output appended to ``node<i>.log``); ``env`` adds variables."""
        log = open(self.root / f"node{i}.log", "ab")  # noqa: SIM115 - owned by the process
        extra = ["--join", join] if join else []
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "dengine", "serve", "--config", str(self.root / f"node{i}.toml"), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def start_all(self) -> None:
        for i in range(1, self.n + 1):
            self.start(i)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        p.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            p.wait(timeout=20)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(timeout=20)
        for ch in self.channels.values():
            ch.close()
        if self.proxies is not None:
            self.proxies.close()

    def kv(self, i: int) -> kv_pb2_grpc.KVStub:
        return kv_pb2_grpc.KVStub(self.channels[i])  # type: ignore[no-untyped-call]

    def status(self, i: int, timeout: float = 1.0) -> cluster_pb2.StatusResponse | None:
        try:
            stub = cluster_pb2_grpc.ClusterStub(self.channels[i])  # type: ignore[no-untyped-call]
            resp: cluster_pb2.StatusResponse = stub.Status(cluster_pb2.StatusRequest(), timeout=timeout)
            return resp
        except grpc.RpcError:
            return None

    def leader(self, among: list[int] | None = None) -> int | None:
        """The node that is leader according to itself and that a majority agrees on."""
        ids = among or [i for i, p in self.procs.items() if p.poll() is None]
        views = {i: self.status(i) for i in ids}
        leaders = [i for i, s in views.items() if s is not None and s.role == "leader"]
        if len(leaders) != 1:
            return None
        agree = sum(1 for s in views.values() if s is not None and s.leader_id == leaders[0])
        return leaders[0] if agree >= self.n // 2 + 1 or agree == len(ids) else None

    def wait_leader(self, timeout: float = 15.0, among: list[int] | None = None) -> int:
        return wait_for(lambda: self.leader(among), timeout, "a leader")

    def wait_ready(self, timeout: float = 20.0) -> int:
        """Waits until every running node answers and names the same leader; returns it.

        A majority agreeing on a leader is not enough for a test that talks to a follower next:
        under load the last node may still be starting, and its port refuses connections.
        """

        def ready() -> int | None:
            views = [self.status(i) for i, p in self.procs.items() if p.poll() is None]
            if not views or any(v is None or v.leader_id == 0 for v in views):
                return None
            leaders = {v.leader_id for v in views if v is not None}
            return leaders.pop() if len(leaders) == 1 else None

        return wait_for(ready, timeout, "every node serving under one leader")

    def put(self, key: bytes, value: bytes, timeout: float = 10.0) -> int:
        """Puts through whoever leads, retrying across leader changes; returns the node used."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None:
                try:
                    self.kv(leader).Put(kv_pb2.PutRequest(key=key, value=value), timeout=2)
                    return leader
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"put {key!r} did not succeed in {timeout}s")
            time.sleep(0.05)

    def get(self, i: int, key: bytes, consistency: kv_pb2.Consistency = kv_pb2.LINEARIZABLE) -> bytes | None:
        resp = self.kv(i).Get(kv_pb2.GetRequest(key=key, consistency=consistency), timeout=3)
        return resp.kv.value if resp.found else None

    def try_get(self, i: int, key: bytes, consistency: kv_pb2.Consistency = kv_pb2.STALE) -> bytes | None:
        """Like :meth:`get`, but None while the node is unreachable (for polling)."""
        try:
            return self.get(i, key, consistency)
        except grpc.RpcError:
            return None

    def probe(self, i: int, path: str) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON body of node ``i``'s ``/readyz`` or ``/health`` (status 0
        and an empty body while the node does not answer)."""
        url = f"http://127.0.0.1:{self.metrics_ports[i - 1]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    def scrape(self, i: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[i - 1]}/metrics", timeout=3) as r:
            text: str = r.read().decode()
        return text


def tls_cli(endpoints: str, certs: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs ``dengine <args>`` against ``endpoints`` with the client certificate of ``certs``
    (a directory written by ``dengine certs init``)."""
    tls = [
        "--ca",
        str(certs / "ca.pem"),
        "--cert",
        str(certs / "client.pem"),
        "--key",
        str(certs / "client-key.pem"),
    ]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dengine", *args, "--endpoints", endpoints, *tls]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    return cli
