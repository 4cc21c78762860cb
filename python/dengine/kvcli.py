"""``dengine kv ...`` and ``dengine status``: the key-value and cluster commands of the CLI.

Exit codes: 0 ok, 1 key not found or compare-and-swap failed (or a request the cluster refused
as its state stands: a membership change to a node that is not a member, a watch from a
revision no node holds), 2 usage error (an argument the cluster calls invalid too), 3 cluster
unavailable (or deadline exceeded). Errors are one line on stderr; ``--debug`` shows tracebacks.
``--output json`` prints one JSON document per result, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from dengine.client import Client, DeadlineExceeded, KeyValue, RequestFailed, Unavailable
from dengine.client_admin import membership_of
from dengine.errors import DengineError
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

if TYPE_CHECKING:
    from dengine.tls import ClientTLS

DEFAULT_ENDPOINTS = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
EXIT_OK, EXIT_FALSE, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
# Refusals the cluster answered (its state says no), and refusals of the request as given.
_REFUSED = frozenset({"FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS", "OUT_OF_RANGE"})
_INVALID = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="backslashreplace")


def _kv_json(kv: KeyValue | None) -> dict[str, Any] | None:
    if kv is None:
        return None
    return {
        "key": _text(kv.key),
        "value": _text(kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    }


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoints",
        default=os.environ.get("DENGINE_ENDPOINTS", DEFAULT_ENDPOINTS),
        help="comma-separated host:port list (default: $DENGINE_ENDPOINTS, else the local dev cluster)",
    )
    p.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default 10)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    # Distinct dests: "key" is also the positional key of the kv commands.
    p.add_argument(
        "--ca", dest="tls_ca", help="TLS: CA certificate (PEM) that signed the nodes' certificates"
    )
    p.add_argument("--cert", dest="tls_cert", help="TLS: client certificate (PEM), for mTLS clusters")
    p.add_argument("--key", dest="tls_key", help="TLS: the client certificate's private key (PEM)")


def _tls_files(args: argparse.Namespace) -> ClientTLS | None:
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    from dengine.tls import ClientTLS  # noqa: PLC0415 - only with TLS

    # Read again when they change: a long `kv watch` presents a rotated certificate when it
    # reconnects.
    return ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    files = _tls_files(args)
    return None if files is None else files.channel_credentials()


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)


def kv_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine kv",
        description="Read and write the built-in key-value store of a dengine cluster.",
        epilog="examples:\n  dengine kv put greeting hello\n  dengine kv put greeting hi --prev-kv\n"
        "  dengine kv get greeting --consistency stale\n"
        "  dengine kv cas counter 1 2\n  dengine kv range app/ --limit 10 --output json\n"
        "  dengine kv watch app/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="op", required=True)
    put = sub.add_parser("put", help="set a key")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--prev-kv", action="store_true", help="also print the value the put replaced")
    get = sub.add_parser("get", help="read a key (exit 1 if absent)")
    get.add_argument("key")
    delete = sub.add_parser("delete", help="remove a key (exit 1 if absent)")
    delete.add_argument("key")
    cas = sub.add_parser("cas", help="set a key only if it holds EXPECTED (exit 1 if not)")
    cas.add_argument("key")
    cas.add_argument("expected", nargs="?", help="the value it must hold now (omit with --absent)")
    cas.add_argument("value")
    cas.add_argument("--absent", action="store_true", help="succeed only if the key does not exist")
    rng = sub.add_parser("range", help="list keys under a prefix, in key order")
    rng.add_argument("prefix", nargs="?", default="")
    rng.add_argument("--limit", type=int, default=0)
    watch = sub.add_parser("watch", help="print changes under a prefix as they happen (Ctrl-C stops)")
    watch.add_argument("prefix", nargs="?", default="")
    watch.add_argument("--from", dest="start", type=int, default=0, help="start at this revision")
    for p in (get, rng):
        p.add_argument("--consistency", choices=["linearizable", "lease", "stale"], default="linearizable")
    for p in (put, get, delete, cas, rng, watch):
        _common(p)
    return parser


async def _put(client: Client, args: argparse.Namespace) -> int:
    r = await client.put(args.key.encode(), args.value.encode(), prev_kv=args.prev_kv)
    if args.output == "json":
        shown: dict[str, object] = {"revision": r.revision}
        if args.prev_kv:
            shown["prev"] = _kv_json(r.prev)
        print(json.dumps(shown))
    else:
        print(f"OK (revision {r.revision})")
        if args.prev_kv:
            print("was absent" if r.prev is None else f"was {_text(r.prev.value)}")
    return EXIT_OK


async def _get(client: Client, args: argparse.Namespace) -> int:
    kv = await client.get(args.key.encode(), consistency=args.consistency)
    if args.output == "json":
        print(json.dumps({"found": kv is not None, "kv": _kv_json(kv)}))
    elif kv is not None:
        print(_text(kv.value))
    else:
        print(f"{args.key}: not found", file=sys.stderr)
    return EXIT_OK if kv is not None else EXIT_FALSE


async def _delete(client: Client, args: argparse.Namespace) -> int:
    d = await client.delete(args.key.encode())
    if args.output == "json":
        print(json.dumps({"deleted": d.deleted, "revision": d.revision}))
    else:
        print("deleted" if d.deleted else f"{args.key}: not found")
    return EXIT_OK if d.deleted else EXIT_FALSE


async def _cas(client: Client, args: argparse.Namespace) -> int:
    if args.absent == (args.expected is not None):
        print("dengine kv cas: give EXPECTED or --absent, not both", file=sys.stderr)
        return EXIT_USAGE
    expected = None if args.absent else args.expected.encode()
    c = await client.cas(args.key.encode(), expected, args.value.encode())
    if args.output == "json":
        print(json.dumps({"succeeded": c.succeeded, "revision": c.revision, "current": _kv_json(c.current)}))
    elif c.succeeded:
        print(f"OK (revision {c.revision})")
    else:
        now = "absent" if c.current is None else repr(_text(c.current.value))
        print(f"compare failed: {args.key} is {now}", file=sys.stderr)
    return EXIT_OK if c.succeeded else EXIT_FALSE


async def _range(client: Client, args: argparse.Namespace) -> int:
    kvs = await client.range(args.prefix.encode(), limit=args.limit or None, consistency=args.consistency)
    if args.output == "json":
        print(json.dumps([_kv_json(kv) for kv in kvs]))
    else:
        for kv in kvs:
            print(f"{_text(kv.key)}\t{_text(kv.value)}")
    return EXIT_OK


async def _watch(client: Client, args: argparse.Namespace) -> int:
    async for e in client.watch(args.prefix.encode(), start_revision=args.start):
        if args.output == "json":
            print(json.dumps({"type": e.type, "revision": e.revision, "kv": _kv_json(e.kv)}), flush=True)
        else:
            shown = "" if e.type == "delete" else f" = {_text(e.kv.value)}"
            print(f"{e.revision} {e.type} {_text(e.kv.key)}{shown}", flush=True)
    return EXIT_OK


_OPS = {"put": _put, "get": _get, "delete": _delete, "cas": _cas, "range": _range, "watch": _watch}


async def _kv(args: argparse.Namespace) -> int:
    async with Client(args.endpoints, timeout=args.timeout, credentials=_tls_files(args)) as client:
        return await _OPS[args.op](client, args)


def _run(coro_main: Any, args: argparse.Namespace, prog: str) -> int:
    try:
        result: int = asyncio.run(coro_main(args))
        return result
    except KeyboardInterrupt:
        return EXIT_OK
    except (Unavailable, DeadlineExceeded) as exc:
        if args.debug:
            raise
        print(f"{prog}: cluster unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RequestFailed as exc:
        if args.debug:
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return (
            EXIT_USAGE if exc.code in _INVALID else EXIT_FALSE if exc.code in _REFUSED else EXIT_UNAVAILABLE
        )
    except (DengineError, ValueError) as exc:
        if args.debug:
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def kv_main(argv: Sequence[str]) -> int:
    args = kv_parser().parse_args(argv)
    return _run(_kv, args, "dengine kv")


async def _statuses(args: argparse.Namespace) -> list[tuple[str, cluster_pb2.StatusResponse | None]]:
    """Each endpoint's Status answer, or None where it did not answer."""
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    credentials = _credentials(args)
    rows: list[tuple[str, cluster_pb2.StatusResponse | None]] = []
    for address in endpoints:
        async with _channel(address, credentials) as ch:
            try:
                stub = cluster_pb2_grpc.ClusterStub(ch)  # type: ignore[no-untyped-call]
                s = await stub.Status(cluster_pb2.StatusRequest(), timeout=min(args.timeout, 2.0))
                rows.append((address, s))
            except grpc.aio.AioRpcError:
                rows.append((address, None))
    return rows


async def _status(args: argparse.Namespace) -> int:
    rows = await _statuses(args)
    leader = next((s for _, s in rows if s is not None and s.role == "leader"), None)
    lags = {p.id: p.lag for p in leader.peers} if leader else {}
    if args.output == "json":
        out = [
            {"address": a, "health": "down"}
            if s is None
            else {
                "id": s.id,
                "address": a,
                "role": s.role,
                "term": s.term,
                "leader": s.leader_id or None,
                "commit": s.commit_index,
                "applied": s.applied_index,
                "lag": 0 if s.role == "leader" else lags.get(s.id),
                "health": "ok",
            }
            for a, s in rows
        ]
        print(json.dumps(out))
    else:
        header = ("ID", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG")
        print("{:>3}  {:<21} {:<13} {:>5} {:>8} {:>8} {:>6}  HEALTH".format(*header))
        for a, s in rows:
            if s is None:
                print(f"{'-':>3}  {a:<21} {'-':<13} {'-':>5} {'-':>8} {'-':>8} {'-':>6}  down")
            else:
                lag = 0 if s.role == "leader" else lags.get(s.id, "?")
                print(
                    f"{s.id:>3}  {a:<21} {s.role:<13} {s.term:>5} {s.commit_index:>8} {s.applied_index:>8} "
                    f"{lag!s:>6}  ok"
                )
    if all(s is None for _, s in rows):
        print("dengine status: no node answered", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine status",
        description="Show every node's role, term, commit and applied index, lag and health.",
        epilog="example: dengine status --endpoints 127.0.0.1:7001,127.0.0.1:7002 --output json",
    )
    _common(parser)
    return parser


def status_main(argv: Sequence[str]) -> int:
    parser = status_parser()
    return _run(_status, parser.parse_args(argv), "dengine status")


def _admin_client(args: argparse.Namespace) -> Client:
    """A client for one cluster operation: through the leader, found from the endpoints given
    (and only those: an operator's command goes where it was pointed)."""
    return Client(args.endpoints, timeout=args.timeout, credentials=_tls_files(args), discover_members=False)


async def _transfer(args: argparse.Namespace) -> int:
    async with _admin_client(args) as client:
        leader = await client.transfer_leader(args.id)
    print(json.dumps({"leader": leader}) if args.output == "json" else f"leadership handed to node {leader}")
    return EXIT_OK


def leader_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine leader transfer",
        description="Hand leadership to node ID (default: the most up-to-date voter) with TimeoutNow.",
        epilog="example: dengine leader transfer 2",
    )
    parser.add_argument("id", type=int, nargs="?", help="the node to lead next")
    _common(parser)
    return parser


def leader_main(argv: Sequence[str]) -> int:
    parser = leader_parser()
    return _run(_transfer, parser.parse_args(argv), "dengine leader transfer")


async def _snapshot(args: argparse.Namespace) -> int:
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    credentials = _credentials(args)
    if args.output != "json":
        # Serializing a large state takes a while: say what is happening before waiting.
        print(f"taking a snapshot on {len(endpoints)} node(s)...", file=sys.stderr, flush=True)

    async def one(address: str) -> dict[str, Any]:
        async with _channel(address, credentials) as ch:
            stub = cluster_pb2_grpc.ClusterStub(ch)  # type: ignore[no-untyped-call]
            try:
                r = await stub.Snapshot(cluster_pb2.SnapshotRequest(), timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                return {"address": address, "error": f"{exc.code().name}: {exc.details()}"}
            return {"address": address, "index": r.index, "term": r.term, "bytes": r.bytes}

    results = await asyncio.gather(*(one(a) for a in endpoints))
    if args.output == "json":
        print(json.dumps(results))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['address']:<21} failed: {r['error']}")
            else:
                where = f"index {r['index']} (term {r['term']})"
                print(f"{r['address']:<21} snapshot at {where}, {r['bytes']} bytes")
    failed = sum("error" in r for r in results)
    if failed == len(results):
        print("dengine snapshot create: no node took a snapshot", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK if not failed else EXIT_UNAVAILABLE


def snapshot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine snapshot create",
        description="Ask each node (every endpoint) to snapshot its applied state now and compact its "
        "log; prints each snapshot's index, term and size. Exit 3 if any node failed.",
        epilog="example: dengine snapshot create --endpoints 127.0.0.1:7001 --output json",
    )
    _common(parser)
    return parser


def snapshot_main(argv: Sequence[str]) -> int:
    parser = snapshot_parser()
    return _run(_snapshot, parser.parse_args(argv), "dengine snapshot create")


async def _member(args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = [s for _, s in await _statuses(args) if s is not None]
        if not rows:
            raise Unavailable("no node answered")
        ms = membership_of(next((r for r in rows if r.role == "leader"), rows[0]))
        out = [
            {"id": m, "role": "voter" if m in ms.voters else "learner", "address": ms.addresses.get(m, "")}
            for m in sorted({*ms.voters, *ms.learners})
        ]
        if args.output == "json":
            print(json.dumps(out))
        else:
            for r in out:
                print(f"{r['id']:>3}  {r['role']:<8} {r['address']}")
        return EXIT_OK
    async with _admin_client(args) as client:
        if args.action == "add-learner":
            m = await client.add_learner(args.id, args.address)
        elif args.action == "replace":
            quiet = args.output == "json"
            m = await client.replace_member(
                args.old,
                args.new,
                args.address,
                timeout=args.wait,
                progress=None if quiet else _throttled_progress("dengine member replace"),
            )
        elif args.action == "promote":
            m = await client.promote(args.id, force=args.force)
        else:
            m = await client.remove_member(args.id)
    voters, learners = list(m.voters), list(m.learners)
    if args.output == "json":
        print(json.dumps({"voters": voters, "learners": learners}))
    else:
        print(f"voters {voters}, learners {learners}")
    return EXIT_OK


def _throttled_progress(prog: str) -> Callable[[str], None]:
    """Prints progress to stderr, at most every few seconds (a replacement can wait minutes)."""
    last = [0.0]

    def say(text: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 3.0:
            last[0] = now
            print(f"{prog}: {text}", file=sys.stderr, flush=True)

    return say


def member_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine member",
        description="Change the cluster's membership, one server at a time, through the leader.",
        epilog="examples:\n  dengine member add-learner 4 10.0.0.4:7001\n  dengine member promote 4\n"
        "  dengine member remove 2\n  dengine member list --output json\n"
        "  dengine member replace 2 4 10.0.0.4:7001   # add 4, wait for it to catch up, promote it, remove 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add-learner", help="add a node that receives the log but does not vote yet")
    add.add_argument("id", type=int)
    add.add_argument("address", help="host:port the node listens on")
    promote = sub.add_parser("promote", help="make a learner a voter (refused while it lags, unless --force)")
    promote.add_argument("id", type=int)
    promote.add_argument("--force", action="store_true", help="promote even if it is far behind")
    remove = sub.add_parser("remove", help="remove a voter or learner (the leader too: it hands over)")
    remove.add_argument("id", type=int)
    replace = sub.add_parser(
        "replace",
        help="replace voter OLD by node NEW at ADDRESS: add it as a learner, wait until it has caught "
        "up (start it meanwhile with dengine serve --join), promote it, remove OLD; safe to run again",
    )
    replace.add_argument("old", type=int)
    replace.add_argument("new", type=int)
    replace.add_argument("address", help="host:port the new node listens on")
    replace.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for the whole replacement (default 120)"
    )
    listing = sub.add_parser("list", help="the members and their roles")
    for p in (add, promote, remove, replace, listing):
        _common(p)
    return parser


def member_main(argv: Sequence[str]) -> int:
    parser = member_parser()
    return _run(_member, parser.parse_args(argv), "dengine member")
