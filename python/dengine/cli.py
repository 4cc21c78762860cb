"""The ``dengine`` command line: ``demo`` and ``serve`` here, the other commands in the modules
:data:`OWN_PARSERS` names.

``dengine demo --log-store`` (the write-ahead-log crash demo) lives here: a child process writes
to a real WAL and is killed with SIGKILL mid-stream, then the log is reopened and every write the
child saw acknowledged (synced) is checked. The cluster demo is in :mod:`dengine.demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dengine import __version__
from dengine.grpc_tuning import tune_grpc
from dengine.storage import Entry, WalLogStore

_BATCH = 256
_PAYLOAD = 256


def _payload(index: int) -> bytes:
    """Deterministic content so the reader can verify every byte it gets back."""
    stamp = index.to_bytes(8, "little")
    return (stamp * (_PAYLOAD // len(stamp) + 1))[:_PAYLOAD]


def _writer(path: str) -> int:
    """Child side of the demo: append and sync forever, reporting each durable index."""
    store = WalLogStore(path, segment_bytes=4 << 20)
    next_index = store.last_index() + 1
    while True:
        batch = [Entry(i, 1, _payload(i)) for i in range(next_index, next_index + _BATCH)]
        store.append(batch)
        durable = store.sync()
        next_index += _BATCH
        sys.stdout.write(f"{durable}\n")
        sys.stdout.flush()


def _demo(seconds: float) -> int:
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.2f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dengine-demo-") as tmp:
        path = os.path.join(tmp, "log")
        say(f"starting a writer process on a fresh write-ahead log in {path}")
        child = subprocess.Popen(
            [sys.executable, "-m", "dengine.cli", "_demo-writer", path],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        acked = 0
        deadline = time.monotonic() + seconds
        for line in child.stdout:
            acked = int(line)
            if time.monotonic() >= deadline:
                break
        say(f"writer acknowledged {acked:,} durable entries")
        say(f"({_PAYLOAD}-byte payloads, one fsync per batch of {_BATCH})")
        child.kill()  # SIGKILL on POSIX: no chance to flush or clean up
        child.wait()
        say("killed the writer with SIGKILL in the middle of its next batch")

        t0 = time.perf_counter()
        with WalLogStore(path) as store:
            reopen_ms = (time.perf_counter() - t0) * 1000
            last = store.last_index()
            torn = store.torn_tail
            say(f"reopened the log in {reopen_ms:.1f} ms: entries 1..{last:,}")
            if torn is not None:
                say(
                    f"recovery cut a torn tail of {torn[2]} bytes at offset {torn[1]} of {Path(torn[0]).name}"
                )
            checked = 0
            lo = 1
            while lo <= acked:
                for e in store.entries(lo, acked + 1, max_bytes=4 << 20):
                    if e.data != _payload(e.index) or e.term != 1:
                        say(f"FAILED: entry {e.index} came back damaged")
                        return 1
                    checked += 1
                lo = 1 + checked
        if last < acked or checked != acked:
            say(f"FAILED: {acked - checked} acknowledged entries are missing")
            return 1
        say(f"verified all {checked:,} acknowledged entries byte for byte: nothing acknowledged was lost")
    say("cleaned up; demo passed")
    return 0


# These commands own their whole argument list (their own parsers and --help):
# (module, main function, parser function).
OWN_PARSERS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("cluster",): ("dengine.devcluster", "main", "cluster_parser"),
    ("kv",): ("dengine.kvcli", "kv_main", "kv_parser"),
    ("status",): ("dengine.kvcli", "status_main", "status_parser"),
    ("leader", "transfer"): ("dengine.kvcli", "leader_main", "leader_parser"),
    ("snapshot", "create"): ("dengine.kvcli", "snapshot_main", "snapshot_parser"),
    ("member",): ("dengine.kvcli", "member_main", "member_parser"),
    ("recover",): ("dengine.recovery", "recover_main", "recover_parser"),
    ("certs", "init"): ("dengine.tls", "certs_main", "certs_parser"),
    ("completion",): ("dengine.completion", "main", "completion_parser"),
}


def main_parser() -> argparse.ArgumentParser:
    """The top-level parser (the commands in :data:`OWN_PARSERS` appear as placeholders)."""
    parser = argparse.ArgumentParser(
        prog="dengine", description="dengine: a Raft consensus engine for Python."
    )
    parser.add_argument("--version", action="version", version=f"dengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="a local 3-node cluster loses its leader to kill -9 and keeps every acknowledged write",
        description="Starts a 3-node cluster in a temporary directory, writes a few thousand keys, "
        "kills the leader with SIGKILL, times the failover, verifies every acknowledged write, "
        "restarts the killed node and watches it catch up. Exits 0 only if every check passed. "
        "With --log-store: the same promise for the write-ahead log alone (a writer process "
        "killed mid-batch).",
    )
    demo.add_argument("--log-store", action="store_true", help="run the write-ahead-log crash demo instead")
    demo.add_argument("--seconds", type=float, default=2.0, help="--log-store: how long the writer runs")
    writer = sub.add_parser("_demo-writer", help=argparse.SUPPRESS)
    writer.add_argument("path")
    serve = sub.add_parser(
        "serve",
        help="run a node with the built-in KV store",
        description="Runs one node of a cluster with the built-in key-value state machine. Settings come "
        "from the TOML file, then DENGINE_* environment variables, then these flags. "
        "SIGTERM or SIGINT stops it gracefully.",
        epilog="example: dengine serve --config node1.toml --log-format json",
    )
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--id", type=int, help="node.id")
    serve.add_argument("--listen", help="node.listen (host:port)")
    serve.add_argument("--data-dir", help="node.data_dir")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback listen address without TLS"
    )
    serve.add_argument(
        "--join",
        metavar="ADDR",
        help="join the running cluster that ADDR belongs to: ask its leader to add this node as a learner",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    serve.add_argument("--log-format", choices=["text", "json"], help="log.format")
    serve.add_argument("--debug", action="store_true", help="show tracebacks for startup errors")
    sub.add_parser("cluster", help="run a local development cluster (see dengine cluster --help)")
    sub.add_parser("kv", help="put, get, delete, cas, range, watch (see dengine kv --help)")
    sub.add_parser("status", help="the cluster's nodes, roles, indexes and lag (see dengine status --help)")
    leader = sub.add_parser("leader", help="leadership (see dengine leader transfer --help)")
    leader.add_argument("action", choices=["transfer"])
    sub.add_parser("member", help="add-learner, promote, remove, replace, list (see dengine member --help)")
    sub.add_parser(
        "recover",
        help="a majority lost for good: make a stopped node the only voter (see dengine recover --help)",
    )
    snapshot = sub.add_parser("snapshot", help="snapshots (see dengine snapshot create --help)")
    snapshot.add_argument("action", choices=["create"])
    certs = sub.add_parser("certs", help="development certificates for TLS (see dengine certs init --help)")
    certs.add_argument("action", choices=["init"])
    sub.add_parser("completion", help="a shell completion script (see dengine completion --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dengine`` console script."""
    tune_grpc()  # before any command imports grpc (see dengine.grpc_tuning)
    args_list = list(sys.argv[1:] if argv is None else argv)
    for prefix, (module, function, _) in OWN_PARSERS.items():
        if tuple(args_list[: len(prefix)]) == prefix:
            handler = getattr(importlib.import_module(module), function)
            code: int = handler(args_list[len(prefix) :])
            return code
    parser = main_parser()
    args = parser.parse_args(args_list)
    if args.command == "demo":
        if args.log_store:
            return _demo(args.seconds)
        from dengine.demo import main as cluster_demo  # noqa: PLC0415

        return cluster_demo()
    if args.command == "serve":
        return _serve(args)
    return _writer(args.path)


def _serve(args: argparse.Namespace) -> int:
    from dengine import event_loop  # noqa: PLC0415 - keeps `dengine --help` fast
    from dengine.config import Config  # noqa: PLC0415
    from dengine.errors import ConfigError, DengineError  # noqa: PLC0415
    from dengine.logs import configure_logging  # noqa: PLC0415
    from dengine.server import serve  # noqa: PLC0415

    flags = {
        "node.id": args.id,
        "node.listen": args.listen,
        "node.data_dir": args.data_dir,
        "node.insecure": True if args.insecure else None,
        "cluster.initial_state": "existing" if args.join else None,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    try:
        config = Config.load(args.config, overrides={k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        print(f"dengine serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.level, config.log.format)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # the signal handler stops it; this is a fallback
            event_loop.run(serve(config, join=args.join), loop=config.node.event_loop)
    except DengineError as exc:
        # Startup problems (TLS files, a data dir in use, a port taken) are one clear line.
        if args.debug:
            raise
        print(f"dengine serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
