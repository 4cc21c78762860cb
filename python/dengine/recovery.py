"""``dengine recover``: bring back a cluster that lost a majority of its voters for good.

Raft elects a leader and commits only with a majority of voters. When most of a cluster's
machines are gone for good (their disks lost, not merely down), the survivors can never again
elect a leader, and no membership change can commit to remove the lost members. The data is still
on the survivors.

This command rewrites the membership of one stopped survivor: it appends to that node's log one
membership entry (``ConfOp.RECOVER``) that makes the node the only voter of its cluster. On its
next start the node elects itself, commits its whole log and serves. Members are then added back
one at a time, as in any cluster (``dengine serve --join``, ``dengine member ...``).

Rules that keep it safe:

- The node keeps every entry it holds, those past its commit index included: a write
  acknowledged by the old majority may be committed there with a member now lost. (etcd's
  ``--force-new-cluster`` drops them instead.) Recover the survivor with the most log: the one
  with the highest ``(last term, last index)``, which ``--dry-run`` prints without changing
  anything.
- Only a stopped node can be recovered: the write-ahead log refuses a data directory that a
  running node holds.
- The lost members must never come back with their old data. Two of them could still elect a
  leader of the old membership among themselves. Wipe their data directories first and add them
  as new members (``--join``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dengine import identity
from dengine.config import Config
from dengine.errors import ConfigError, DengineError
from dengine.identity import Identity
from dengine.node import log_dir, log_needs_reset_to, node_raft_config, open_node_log, snapshot_dir
from dengine.raft import Raft
from dengine.raft.membership import ConfChange, ConfOp
from dengine.raft.payload import conf_change
from dengine.snapshot_store import SnapshotStore
from dengine.snapshotting import info_of
from dengine.storage import Entry

__all__ = ["Recovery", "RecoveryError", "recover", "recover_main", "recover_parser"]


class RecoveryError(DengineError):
    """The node cannot be recovered as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :func:`recover` found in the node's data directory, and what it did."""

    node_id: int
    voters_before: tuple[int, ...]
    """The voters of the membership in force before."""
    learners_before: tuple[int, ...]
    last_index: int
    """The last log entry the node held (its snapshot's index if its log was empty)."""
    last_term: int
    commit: int
    """The commit index the node had recorded: entries past it are kept, and will commit."""
    snapshot_index: int
    """The newest snapshot's index (0: none)."""
    index: int
    """The index of the membership entry appended (or that would be, in a dry run); 0 if the node
    already was its cluster's only voter."""
    term: int
    applied: bool
    """Whether the entry was written (False in a dry run, or when nothing was needed)."""


def recover(config: Config, *, dry_run: bool = False) -> Recovery:
    """Makes node ``config.node.id`` the only voter of its cluster by appending a membership
    entry to its log (see the module docstring). The node must be stopped. With ``dry_run``, reads
    and reports without writing. Raises :class:`RecoveryError` when there is nothing to recover."""
    if config.storage.engine == "memory":
        raise RecoveryError("storage.engine = 'memory' keeps nothing on disk: there is nothing to recover")
    data_dir = Path(config.node.data_dir)
    stored = identity.read(data_dir)
    if stored is not None:
        # Before anything is read or written: a wrong --data-dir (or node.id) would make another
        # node the only voter of a cluster it knows nothing of.
        refusal = stored.refusal(
            Identity(config.cluster.id, config.node.id, ()), data_dir / identity.FILE_NAME, initial=False
        )
        if refusal is not None:
            raise RecoveryError(refusal.detail)
    if not log_dir(config).exists():
        raise RecoveryError(
            f"{config.node.data_dir} holds no log: node {config.node.id} has nothing to recover from"
        )
    store = open_node_log(config)
    try:
        snapshots = snapshot_dir(config)
        snap = SnapshotStore(snapshots).latest(verify=True) if snapshots.is_dir() else None
        info = None
        if snap is not None:
            info = info_of(snap)
            if log_needs_reset_to(store, info):
                # As a start would, finish the install, so that the new entry follows the snapshot.
                if dry_run:
                    raise RecoveryError(
                        f"node {config.node.id} crashed while installing snapshot {snap.path}; "
                        "start it once (or recover without --dry-run) to finish the install"
                    )
                store.reset(info.index, info.term)
        if store.last_index() == 0:
            raise RecoveryError(
                f"node {config.node.id} holds no log entries and no snapshot: nothing to recover; "
                "start a new cluster instead"
            )
        raft = Raft(node_raft_config(config), store, snapshot=info)
        voters, learners = raft.conf.voters, raft.learners
        last = store.last_index()
        found = Recovery(
            node_id=config.node.id,
            voters_before=tuple(sorted(voters)),
            learners_before=tuple(sorted(learners)),
            last_index=last,
            last_term=store.term(last),
            commit=raft.commit,
            snapshot_index=info.index if info is not None else 0,
            index=0,
            term=raft.term,
            applied=False,
        )
        node_id = config.node.id
        if voters == {node_id} and not learners:
            return found
        change = ConfChange(
            ConfOp.RECOVER,
            node_id,
            frozenset({node_id}),
            frozenset(),
            {node_id: config.node.advertise},
            nonce=secrets.randbits(63),
        )
        entry = Entry(last + 1, raft.term, conf_change(change))
        if not dry_run:
            store.append([entry])
            store.sync()
        return dataclasses.replace(found, index=entry.index, applied=not dry_run)
    finally:
        store.close()


def recover_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine recover",
        description="Makes a stopped node the only voter of its cluster, keeping all its data,\n"
        "after a majority of the cluster's voters was lost for good. Start it afterwards with\n"
        "dengine serve, then add members back with dengine serve --join.\n\n"
        "Never restart the lost members with their old data: wipe them and add them as new\n"
        "members. Recover the survivor with the highest last term and index (--dry-run shows them).",
        epilog="examples:\n"
        "  dengine recover --config node1.toml --dry-run\n"
        "  dengine recover --config node1.toml --yes\n"
        "exit codes: 0 recovered (or already the only voter), 1 refused, 2 usage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the node's TOML configuration file")
    parser.add_argument("--data-dir", help="node.data_dir (overrides the file)")
    parser.add_argument("--dry-run", action="store_true", help="show what the node holds; change nothing")
    parser.add_argument("--yes", action="store_true", help="do it without asking (for scripts)")
    parser.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    return parser


def _describe(r: Recovery) -> str:
    lines = [
        f"node {r.node_id}: voters {list(r.voters_before)}, learners {list(r.learners_before)}",
        f"  log up to index {r.last_index} (term {r.last_term}), commit index {r.commit}, "
        f"newest snapshot at {r.snapshot_index or 'none'}",
    ]
    if r.index == 0:
        lines.append(f"node {r.node_id} already is the only voter of its cluster: nothing to do")
    elif r.applied:
        lines.append(
            f"node {r.node_id} is now the only voter of its cluster (membership entry at index "
            f"{r.index}, term {r.term}); start it with dengine serve, then add members with --join"
        )
    else:
        lines.append(f"would make node {r.node_id} the only voter (membership entry at index {r.index})")
    return "\n".join(lines)


def recover_main(argv: Sequence[str]) -> int:
    """``dengine recover``; returns the exit code."""
    args = recover_parser().parse_args(argv)
    overrides = {"node.data_dir": args.data_dir} if args.data_dir else {}
    try:
        config = Config.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"dengine recover: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run and not args.yes:
        if not sys.stdin.isatty():
            print(
                "dengine recover: this rewrites the node's membership; pass --yes to confirm "
                "(or --dry-run to look first)",
                file=sys.stderr,
            )
            return 2
        answer = input(
            f"Make node {config.node.id} the only voter of cluster {config.cluster.id!r}? "
            "The lost members must never return with their old data. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("dengine recover: nothing changed", file=sys.stderr)
            return 1
    try:
        result = recover(config, dry_run=args.dry_run)
    except DengineError as exc:
        print(f"dengine recover: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(_describe(result))
    return 0
