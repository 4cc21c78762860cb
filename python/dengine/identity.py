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

A data dir that is wholly gone (a wiped disk, a mistyped path) leaves no file to compare. A node
starting on nothing asks the other members first (:func:`seen_holding_data`), as etcd does before
it bootstraps a member: if a leader has seen this node hold entries, its data was lost, and it
must not vote as the member it was (it may have voted in terms, and acknowledged entries, that
it no longer remembers: with one more node lagging, its vote could elect a leader that misses
acknowledged writes). A leader's view of its followers is not durable, so after a restart of the
whole cluster this cannot be told; it is a guard against the common case, not a proof.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from dengine.errors import ConfigError
from dengine.snapshot_store import fsync_directory
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

__all__ = ["FILE_NAME", "Identity", "read", "seen_holding_data", "write"]

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
        if initial and self.voters and other.voters and set(other.voters) != set(self.voters):
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
    fsync_directory(data_dir)


async def seen_holding_data(
    node_id: int,
    cluster_id: str,
    addresses: Mapping[int, str],
    credentials: grpc.ChannelCredentials | None,
    timeout_s: float = 1.0,
) -> str | None:
    """What says that node ``node_id``, starting on an empty data dir, held data before: a leader
    of ``cluster_id`` among ``addresses`` (the members it knows of, and any leader they name)
    that has seen it hold entries. None when no such leader answers so within ``timeout_s``
    (down, not leading, or never saw it)."""

    async def status(address: str) -> cluster_pb2.StatusResponse | None:
        channel = (
            grpc.aio.insecure_channel(address)
            if credentials is None
            else grpc.aio.secure_channel(address, credentials)
        )
        async with channel:
            stub = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
            try:
                answer: cluster_pb2.StatusResponse = await stub.Status(
                    cluster_pb2.StatusRequest(), timeout=timeout_s
                )
            except grpc.RpcError:
                return None
            return answer

    asked = {a for m, a in addresses.items() if m != node_id}
    answers = await asyncio.gather(*(status(a) for a in asked))
    # A leader outside the given members (they changed since) is named by its followers.
    named = {s.leader_address for s in answers if s is not None and s.leader_address} - asked
    answers += await asyncio.gather(*(status(a) for a in named))
    for s in answers:
        if s is None or s.cluster_id != cluster_id or s.role != "leader":
            continue
        for peer in s.peers:
            if peer.id == node_id and peer.match_index > 0:
                return f"leader {s.id} (term {s.term}) has seen it hold the log up to {peer.match_index}"
    return None
