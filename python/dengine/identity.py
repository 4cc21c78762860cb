"""Whose data a data dir holds: the cluster, the node and the initial voters it was started with.

A data dir holds a node's vote and its log, and Raft's safety rests on both. Started under another
node's id it would cast that node's vote a second time in a term, or vouch for entries that node
never acknowledged; started in another cluster it would mix two histories. Started with other
initial members (``dengine cluster --data-dir ./dev --nodes 1`` after a three-node run), a node whose
log holds no membership change takes its voters from ``cluster.members`` and could elect itself
alone over a log that misses writes its old peers committed: the next start of the old cluster
would then overwrite acknowledged writes with it.

So the first start that writes anything records the three in ``identity.json``, and every later
start compares: a mismatch stops the node before it takes part in any election, with a message
that says which key is wrong. The initial voters only count while the configuration in force is
still the initial one (no membership change and no snapshot in the log); a data dir that holds
nothing yet (no entry, no vote, no snapshot) is claimed anew. Data dirs from before the file
existed are claimed on their next start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from dengine.errors import ConfigError

__all__ = ["FILE_NAME", "Identity", "read", "write"]

FILE_NAME = "identity.json"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Identity:
    """What a data dir belongs to. ``voters`` is empty for a node that joined a running cluster
    (it takes its configuration from the cluster, never from its file)."""

    cluster: str
    node: int
    voters: tuple[int, ...]

    def refusal(self, other: Identity, path: Path, *, initial: bool) -> ConfigError | None:
        """Why a node that is ``other`` must not start on this data dir (None: it may).
        ``initial``: whether its configuration in force is still the initial one."""
        if other.cluster != self.cluster:
            return ConfigError(
                f"the data dir belongs to cluster {self.cluster!r} ({path}), and this node's "
                f"cluster.id is {other.cluster!r}: a data dir never changes clusters; check "
                "node.data_dir and cluster.id",
                key="cluster.id",
            )
        if other.node != self.node:
            return ConfigError(
                f"the data dir belongs to node {self.node} ({path}), and this node's node.id is "
                f"{other.node}: a node must never start on another node's vote and log; check "
                "node.data_dir and node.id",
                key="node.id",
            )
        if initial and self.voters and set(other.voters) != set(self.voters):
            return ConfigError(
                f"cluster.members lists voters {_ids(other.voters)}, but this node was first started "
                f"with {_ids(self.voters)} ({path}) and no membership change is in its log since: "
                "the initial members cannot change after the first start (change them with "
                "`dengine member ...`, or `dengine recover` a cluster that lost its majority)",
                key="cluster.members",
            )
        return None


def _ids(voters: Collection[int]) -> str:
    return "{" + ", ".join(map(str, sorted(voters))) + "}"


def read(data_dir: Path) -> Identity | None:
    """The identity recorded in ``data_dir`` (None if there is none); a damaged file is an error
    that names it, never taken for a missing one."""
    path = data_dir / FILE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", key="node.data_dir") from None
    try:
        doc = json.loads(text)
        if doc.get("format") != _FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, this dengine reads {_FORMAT}")
        cluster, node, voters = doc["cluster"], doc["node"], doc["voters"]
        if not isinstance(cluster, str) or type(node) is not int or not isinstance(voters, list):
            raise ValueError("cluster, node or voters has the wrong type")
        if not all(type(v) is int for v in voters):
            raise ValueError("voters must be node ids")
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(
            f"{path} is damaged ({exc}); it records which node of which cluster the data dir "
            "belongs to: restore it from a backup, or delete it only if you are sure the data dir "
            "is this node's",
            key="node.data_dir",
        ) from None
    return Identity(cluster, node, tuple(sorted(voters)))


def write(data_dir: Path, identity: Identity) -> None:
    """Records ``identity`` in ``data_dir``, durably (written aside, synced, renamed in)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / FILE_NAME
    aside = data_dir / (FILE_NAME + ".tmp")
    doc = {
        "format": _FORMAT,
        "cluster": identity.cluster,
        "node": identity.node,
        "voters": list(identity.voters),
    }
    with open(aside, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(aside, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
