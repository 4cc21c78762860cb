"""``dengine cluster``: a local N-node cluster in child processes, for development.

Each node is a ``dengine serve`` process with its own config and data directory under the data
dir (a temporary one unless given). A data dir that already holds node configs is restarted as
it is (same size, same ports), because the membership stored in its logs and snapshots names
those addresses; a run that asks for another size is refused before anything is written. The
command prints the endpoints, then waits; Ctrl-C or SIGTERM stops every node gracefully (SIGTERM,
then SIGKILL after a grace period). A node that exits is reported with its exit code and the
reason its log gives.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


def existing_configs(root: Path) -> list[Path]:
    """The ``node<i>.toml`` files a previous run wrote in ``root`` (node 1, 2, ... up to the first gap)."""
    paths: list[Path] = []
    while (path := root / f"node{len(paths) + 1}.toml").is_file():
        paths.append(path)
    return paths


def _read_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _last_serve_error(log: Path, offset: int) -> str | None:
    """The last ``dengine serve:`` line written to ``log`` after ``offset`` (a node's startup refusal)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line for line in reversed(lines) if line.startswith("dengine serve:")), None)


def _reuse_problem(root: Path, stored: list[dict[str, Any]], args: argparse.Namespace) -> str | None:
    """Why the cluster already in ``root`` cannot be restarted as ``args`` ask, or None if it can."""
    n = len(stored)
    if args.nodes is not None and args.nodes != n:
        return f"{root} holds a {n}-node cluster; use --nodes {n} or another --data-dir"
    if args.cluster_id is not None and args.cluster_id != stored[0]["cluster"]["id"]:
        cluster_id = stored[0]["cluster"]["id"]
        return f"{root} holds cluster {cluster_id!r}; drop --cluster-id or use another --data-dir"
    if args.base_port is not None and stored[0]["node"]["listen"] != f"127.0.0.1:{args.base_port}":
        return (
            f"{root} holds a cluster that listens on {stored[0]['node']['listen']}; "
            "drop --base-port or use another --data-dir"
        )
    return None


def _report_exits(procs: list[subprocess.Popen[bytes]], logs: list[tuple[Path, int]]) -> bool:
    """Prints each node that exited, with its exit code and its own reason; True if any did."""
    dead = [(i, p.returncode) for i, p in enumerate(procs, start=1) if p.poll() is not None]
    for i, code in dead:
        log_path, offset = logs[i - 1]
        reason = _last_serve_error(log_path, offset) or f"see {log_path}"
        print(f"node {i} exited with code {code}: {reason}", file=sys.stderr)
    return bool(dead)


def _prepare(root: Path, args: argparse.Namespace) -> tuple[list[Path], list[dict[str, Any]]] | str:
    """The node configs to start (reused from ``root`` or written there), or why not (nothing written)."""
    configs = existing_configs(root)
    if configs:
        # A second run restarts the same cluster: the membership stored in its logs and snapshots
        # names these addresses, so new ports (or another size) would leave it without a quorum.
        stored = [_read_config(path) for path in configs]
        problem = _reuse_problem(root, stored, args)
        if problem:
            return problem
        print(f"reusing the {len(configs)} node configs in {root}")
        return configs, stored
    root.mkdir(parents=True, exist_ok=True)
    configs = write_configs(root, args.nodes or 3, args.cluster_id or "dev", args.base_port)
    return configs, [_read_config(path) for path in configs]


def cluster_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine cluster",
        description="Start a local development cluster in child processes; Ctrl-C stops it. "
        "Run again with the same --data-dir, it restarts the same cluster: same nodes, same ports.",
        epilog="example: dengine cluster --nodes 3 --data-dir ./dev-cluster",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        choices=[1, 3, 5, 7],
        help="cluster size (default 3, or the size of the cluster already in --data-dir)",
    )
    parser.add_argument("--data-dir", type=Path, help="keep configs and data here (default: a temp dir)")
    parser.add_argument("--cluster-id", help="cluster id of a new cluster (default dev)")
    parser.add_argument("--base-port", type=int, help="first port of a new cluster (default: free ports)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = cluster_parser()
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dengine-cluster-")))
        else:
            root = args.data_dir
        prepared = _prepare(root, args)
        if isinstance(prepared, str):
            print(f"dengine cluster: {prepared}", file=sys.stderr)
            return 2
        configs, stored = prepared
        n = len(configs)
        # Installed before the first node starts: a Ctrl-C or SIGTERM at any moment after that
        # (the default SIGINT raised KeyboardInterrupt between the endpoints line and here, and
        # the nodes went on running, orphaned) stops every node. The handler only sets a flag:
        # threading.Event.set() from a handler deadlocks when the signal lands while the main
        # thread holds the Event's lock inside Event.wait() (the command then hung for ever).
        stopped: list[int] = []

        def on_signal(signum: int, frame: object) -> None:
            stopped.append(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        procs = []
        logs: list[tuple[Path, int]] = []
        for path in configs:
            log_path = path.with_suffix(".log")
            log = stack.enter_context(open(log_path, "ab"))
            logs.append((log_path, log.tell()))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dengine", "serve", "--config", str(path)], stdout=log, stderr=log
                )
            )
        endpoints = ",".join(str(config["node"]["listen"]) for config in stored)
        print(f"started {n} nodes in {root}")
        print(f"endpoints: {endpoints}")
        print(f"export DENGINE_ENDPOINTS={endpoints}")
        print("logs: node<i>.log beside the configs; Ctrl-C stops the cluster", flush=True)

        while not stopped:
            if _report_exits(procs, logs):
                print("stopping the cluster", file=sys.stderr)
                break
            time.sleep(0.2)
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
        return 0 if stopped else 1
