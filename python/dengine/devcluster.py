"""``dengine cluster``: a local N-node cluster in child processes, for development.

Each node is a ``dengine serve`` process with its own config and data directory under the data
dir (a temporary one unless given). The command prints the endpoints, then waits; Ctrl-C or
SIGTERM stops every node gracefully (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

GRACE_SECONDS = 10.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago (for local clusters and tests)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_configs(root: Path, n: int, cluster_id: str, base_port: int | None) -> list[Path]:
    """Writes ``node<i>.toml`` for each node and returns their paths."""
    ports = [base_port + i for i in range(n)] if base_port else free_ports(n)
    members = ", ".join(f'{i} = "127.0.0.1:{p}"' for i, p in enumerate(ports, start=1))
    paths = []
    for i in range(1, n + 1):
        path = root / f"node{i}.toml"
        path.write_text(
            f'[node]\nid = {i}\nlisten = "127.0.0.1:{ports[i - 1]}"\n'
            f'data_dir = "{(root / f"node{i}").as_posix()}"\nmetrics_listen = ""\n\n'
            f'[cluster]\nid = "{cluster_id}"\nmembers = {{ {members} }}\n'
        )
        paths.append(path)
    return paths


def cluster_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine cluster",
        description="Start a local development cluster in child processes; Ctrl-C stops it.",
        epilog="example: dengine cluster --nodes 3 --data-dir ./dev-cluster",
    )
    parser.add_argument("--nodes", type=int, default=3, choices=[1, 3, 5, 7], help="cluster size (default 3)")
    parser.add_argument("--data-dir", type=Path, help="keep configs and data here (default: a temp dir)")
    parser.add_argument("--cluster-id", default="dev", help="cluster id (default dev)")
    parser.add_argument("--base-port", type=int, help="first port (default: free ports)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = cluster_parser()
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dengine-cluster-")))
        else:
            root = args.data_dir
            root.mkdir(parents=True, exist_ok=True)
        configs = write_configs(root, args.nodes, args.cluster_id, args.base_port)
        procs = []
        for path in configs:
            log = stack.enter_context(open(path.with_suffix(".log"), "ab"))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dengine", "serve", "--config", str(path)], stdout=log, stderr=log
                )
            )
        endpoints = ",".join(
            line.split('"')[1]
            for path in configs
            for line in path.read_text().splitlines()
            if line.startswith("listen")
        )
        print(f"started {args.nodes} nodes in {root}")
        print(f"endpoints: {endpoints}")
        print(f"export DENGINE_ENDPOINTS={endpoints}")
        print("logs: node<i>.log beside the configs; Ctrl-C stops the cluster", flush=True)

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.2):
            dead = [i for i, p in enumerate(procs, start=1) if p.poll() is not None]
            if dead:
                print(f"node(s) {dead} exited; stopping the cluster", file=sys.stderr)
                break
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        print("cluster stopped", flush=True)
        return 0 if stop.is_set() else 1
