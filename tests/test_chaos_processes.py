"""Chaos on real processes, checked for linearizability: several `dengine.Client`s run random
puts, gets (linearizable and lease), compare-and-swaps and deletes on a few keys of a 3-process
cluster, while a seeded nemesis kills nodes with SIGKILL (the leader half of the time, now and then
all three at once), freezes them with SIGSTOP past the election timeout, cuts the leader off from
its followers (by freezing them) and then kills it, moves leadership (`TransferLeader`),
cuts what a node hears from its peers, replaces members (in place, or by a new machine on a new
address: the clients must learn it), and brings everything back.
Every call is recorded with its invocation and answer times; a call that failed is recorded as
unanswered (it may have taken effect). After the cluster heals, every key is read once more and
the whole history must be linearizable against the KV model (`dengine.testing.linearizability`):
a lost acknowledged write, a write applied twice, a stale lease read or a read that goes back in
time all fail it. A watch on the same keys runs through it all from revision 1: it must deliver
every event once, in revision order, and end at the state the final reads see.

The simulation suite runs the same check over thousands of seeded schedules; this test is the
one where the faults are the operating system's: real kill -9 between fsyncs, real frozen
processes whose monotonic clocks run on, real gRPC reconnects. Longer runs for a soak:
``DENGINE_CHAOS_SECONDS=600 DENGINE_CHAOS_SEED=7 python -m pytest tests/test_chaos_processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import grpc
import pytest

from dengine.client import Client, Consistency, WatchEvent
from dengine.errors import DengineError, RequestFailed
from dengine.testing.linearizability import HistoryRecorder, KVInput, KVModel, check
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

from cluster_procs import ProcCluster, running_cluster, wait_for
from net_proxy import Mode

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")

SECONDS = float(os.environ.get("DENGINE_CHAOS_SECONDS", "20"))
SEED = int(os.environ.get("DENGINE_CHAOS_SEED", "1"))
KEYS = [b"chaos/%d" % i for i in range(5)]
CLIENTS = 4
CALL_TIMEOUT = 3.0

SingleFault = Literal["cut", "kill", "stop"]


class Nemesis:
    """Injects one fault at a time (now and then on two nodes at once, or a crash of every
    node), each healed before the next, so that the cluster keeps a majority most of the time
    and clients make progress.

    It also replaces members (the leader now and then): in place (the voter removed, its process
    killed and its disk wiped, and a node with a new id joining on the same address, a machine
    replaced under its old host name), or by a new machine on a new address that joins first,
    the old voter being removed once the new one is promoted. After a few of those none of the
    addresses the clients started with may be left. The faults that follow strike whatever the
    membership is then, a learner still catching up included.
    """

    def __init__(self, cluster: ProcCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.faults: list[str] = []
        self.members = list(range(1, cluster.n + 1))  # the processes that should be running
        self.joined: set[int] = set()  # restarted with --join until they know the cluster
        self.replaced = 0

    def start(self, i: int) -> None:
        join = self.cluster.address(next(m for m in self.members if m != i)) if i in self.joined else None
        self.cluster.start(i, join=join)

    async def _target(self) -> int:
        # The leader half of the time (asked off the loop: a frozen node answers nothing).
        leader = await self._leader() if self.rng.random() < 0.5 else None
        return leader or self.rng.choice(self.members)

    async def _leader(self) -> int | None:
        return await asyncio.to_thread(self.cluster.leader, self.members)

    def _cluster_stub(self, node: int) -> cluster_pb2_grpc.ClusterStub:
        return cluster_pb2_grpc.ClusterStub(self.cluster.channels[node])  # type: ignore[no-untyped-call]

    def _transfer(self, target: int) -> None:
        """Asks the leader to hand over to ``target`` (0: the most up-to-date voter), as
        ``dengine leader transfer`` does; refused or failed transfers are part of the game."""
        leader = self.cluster.leader(self.members)
        if leader is None:
            return
        try:
            self._cluster_stub(leader).TransferLeader(cluster_pb2.TransferLeaderRequest(id=target), timeout=3)
            self.faults.append(f"transfer {leader} -> {target or 'any'}")
        except grpc.RpcError as exc:
            self.faults.append(f"transfer {leader} -> {target or 'any'}: {exc.code().name}")

    def _settled_leader(self, old: int) -> int | None:
        """The leader, if the configuration is three voters (``old`` among them) and no learner."""
        c = self.cluster
        leader = c.leader(self.members)
        status = c.status(leader) if leader is not None else None
        if leader is None or status is None:
            return None
        if len(status.voters) != 3 or status.learners or old not in status.voters:
            return None
        return leader

    def _remove(self, leader: int, old: int) -> bool:
        try:
            self._cluster_stub(leader).RemoveMember(cluster_pb2.RemoveMemberRequest(id=old), timeout=5)
        except grpc.RpcError as exc:
            # Committed or not, it is unknown: leave the node be (if it was removed after all,
            # the cluster goes on without it, and later removals shrink it further).
            self.faults.append(f"remove {old}: {exc.code().name}")
            return False
        self.cluster.kill(old)
        shutil.rmtree(self.cluster.root / f"data{old}")
        self.members.remove(old)
        self.joined.discard(old)
        return True

    def _join(self, new: int) -> None:
        self.members.append(new)
        self.joined.add(new)
        self.start(new)

    def _replace(self, old: int) -> None:
        """Replaces voter ``old``, from a settled configuration of three voters: half the time in
        place (removed and wiped first, the new node joining on its address), half the time by a
        new machine on a new address that joins first, ``old`` being removed once it is a voter.
        Then no address the clients were given may be left: they must have learned the others."""
        c = self.cluster
        leader = self._settled_leader(old)
        if leader is None:
            return
        new = max(c.procs) + 1
        if self.rng.random() < 0.5:
            if not self._remove(leader, old):
                return
            c.add_joiner(new, replacing=old)
            self._join(new)
            self.faults.append(f"replace {old} by {new} in place (leader {leader})")
        else:
            c.add_joiner(new)
            self._join(new)
            self.faults.append(f"add {new}, then remove {old}")
            promoted = None
            deadline = time.monotonic() + 20
            while promoted is None and time.monotonic() < deadline:
                leader = c.leader(self.members) or 0
                status = c.status(leader) if leader else None
                promoted = leader if status is not None and new in status.voters else None
                time.sleep(0.2)
            if promoted is None or not self._remove(promoted, old):
                return  # the next replacement waits for a settled configuration
        self.replaced += 1

    async def run(self, until: float) -> None:
        rng, c = self.rng, self.cluster
        halfway = time.monotonic() + (until - time.monotonic()) / 2
        while time.monotonic() < until:
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            roll = rng.random()
            down = rng.uniform(0.5, 1.5)  # always past the 400 ms election timeout
            if roll < 0.1 or (not self.replaced and time.monotonic() > halfway):
                # Every run replaces at least one member.
                await asyncio.to_thread(self._replace, await self._target())
            elif roll < 0.2:
                self.faults.append("kill -9 all")
                for i in self.members:
                    c.kill(i)
                await asyncio.sleep(down / 2)
                for i in self.members:
                    self.start(i)
            elif roll < 0.32:
                # The leader cut off from every follower, then crashed: what it took alone must
                # not have been acknowledged (it never reached a majority).
                leader = await self._leader() or rng.choice(self.members)
                others = [i for i in self.members if i != leader]
                self.faults.append(f"SIGSTOP all but node {leader}, kill -9 it")
                for i in others:
                    c.kill(i, signal.SIGSTOP)
                await asyncio.sleep(down / 2)
                c.kill(leader)
                for i in others:
                    c.kill(i, signal.SIGCONT)
                await asyncio.sleep(down / 2)
                self.start(leader)
            elif roll < 0.4:
                await asyncio.to_thread(self._transfer, rng.choice([0, *self.members]))
            else:
                kind: SingleFault = "cut" if roll < 0.6 else "kill" if roll < 0.8 else "stop"
                victim = await self._target()
                faults = [self._one_node(kind, victim, down)]
                if rng.random() < 0.25:
                    # A second node fails while the first is down (a majority lost for a while),
                    # in its own way, starting a little later.
                    second = rng.choice([m for m in self.members if m != victim])
                    kind2: SingleFault = rng.choice(["cut", "kill", "stop"])
                    faults.append(self._one_node(kind2, second, down, delay=rng.uniform(0, down / 2)))
                await asyncio.gather(*faults)
            # Give the cluster a moment to serve again before the next fault.
            await asyncio.sleep(rng.uniform(0.5, 1.0))

    async def _one_node(self, kind: SingleFault, victim: int, down: float, *, delay: float = 0) -> None:
        """``victim`` killed with SIGKILL, frozen with SIGSTOP, or cut off from what its peers
        send (its own messages still arrive: an asymmetric partition, which pre-vote and
        check-quorum keep from disrupting the others), for ``down`` seconds."""
        c = self.cluster
        await asyncio.sleep(delay)
        if kind == "cut" and victim not in c.proxy_ports:
            kind = "stop"  # a node added on a new address has no proxy in front of it
        if kind == "cut":
            mode: Mode = "blackhole" if self.rng.random() < 0.7 else "drop"
            self.faults.append(f"{mode} links to node {victim}")
            await asyncio.to_thread(self._link, victim, mode)
            await asyncio.sleep(down)
            await asyncio.to_thread(self._link, victim, "pass")
        elif kind == "kill":
            self.faults.append(f"kill -9 node {victim}")
            c.kill(victim)
            await asyncio.sleep(down)
            self.start(victim)
        else:
            self.faults.append(f"SIGSTOP node {victim}")
            c.kill(victim, signal.SIGSTOP)
            await asyncio.sleep(down)
            c.kill(victim, signal.SIGCONT)

    def _link(self, node: int, mode: Mode) -> None:
        assert self.cluster.proxies is not None
        self.cluster.proxies.set(self.cluster.proxy_ports[node], mode)

    def heal(self) -> None:
        """Thaws the frozen members, restarts the dead ones and mends every link; returns once
        they all serve under one leader, every replacement promoted."""
        c = self.cluster
        for i in self.members:
            if i in c.proxy_ports:
                self._link(i, "pass")
            if c.procs[i].poll() is None:
                c.procs[i].send_signal(signal.SIGCONT)
            else:
                self.start(i)

        def settled() -> bool:
            leader = c.leader(self.members)
            status = c.status(leader) if leader else None
            return status is not None and set(status.voters) >= set(self.joined) and not status.learners

        wait_for(settled, 60, f"the replacements {sorted(self.joined)} to be promoted")
        c.wait_ready(timeout=30)


async def client_loop(
    endpoints: list[str],
    cid: int,
    rng: random.Random,
    *,
    history: HistoryRecorder,
    seen: dict[bytes, bytes | None],
    until: float,
) -> int:
    """Random operations until ``until``; returns how many were answered."""
    answered = 0
    n = 0
    async with Client(endpoints, timeout=CALL_TIMEOUT) as client:
        while time.monotonic() < until:
            n += 1
            key = rng.choice(KEYS)
            value = b"c%d-%d" % (cid, n)
            roll = rng.random()
            if roll < 0.3:
                consistency: Consistency = "lease" if rng.random() < 0.5 else "linearizable"
                op = history.invoke(cid, KVInput("get", key))
                try:
                    kv = await client.get(key, consistency=consistency)
                except DengineError:
                    continue  # an unanswered read: the checker drops it
                seen[key] = kv.value if kv is not None else None
                history.complete(op, seen[key])
            elif roll < 0.65:
                op = history.invoke(cid, KVInput("put", key, value))
                try:
                    await client.put(key, value)
                except DengineError:
                    continue  # may have been applied: left unanswered
                seen[key] = value
                history.complete(op, None)
            elif roll < 0.9:
                # Expect what some client last saw there (often still current, sometimes not).
                expected = seen.get(key)
                op = history.invoke(cid, KVInput("cas", key, value, expected))
                try:
                    result = await client.cas(key, expected, value)
                except DengineError:
                    continue
                if result.succeeded:
                    seen[key] = value
                history.complete(op, result.succeeded)
            else:
                op = history.invoke(cid, KVInput("delete", key))
                try:
                    deleted = await client.delete(key)
                except DengineError:
                    continue
                seen[key] = None
                history.complete(op, deleted.deleted)
            answered += 1
    return answered


# Snapshots every thousand entries, and a log kept only 200 entries behind them: a node that was
# down for a second or two catches up by InstallSnapshot, under the same faults.
FREQUENT_SNAPSHOTS = "\n[snapshot]\nentries = 1000\nlog_factor = 0\ntrailing_entries = 200\n"


def snapshot_events(cluster: ProcCluster) -> dict[str, int]:
    """How many snapshots the nodes took and installed, from their logs (over every restart)."""
    text = "".join(log.read_text() for log in cluster.root.glob("node*.log"))
    return {
        "taken": text.count(": snapshot at index"),
        "installed": text.count(": installed snapshot at index"),
    }


@pytest.mark.parametrize("frequent_snapshots", [False, True], ids=["snapshots-default", "snapshots-frequent"])
def test_random_faults_keep_the_history_linearizable(tmp_path: Path, frequent_snapshots: bool) -> None:
    extra = FREQUENT_SNAPSHOTS if frequent_snapshots else ""
    with running_cluster(tmp_path, extra_toml=extra, proxied=True) as cluster:
        run_chaos(cluster, expect_snapshots=frequent_snapshots)


class Watcher:
    """Watches every key of the test from revision 1 through all the faults, resuming as the
    client does (on another node, from the last revision seen). When no node still holds the
    history it needs (each restored a later snapshot), it starts again from now: a gap the
    client reports as ``OUT_OF_RANGE``, which only a run whose nodes took snapshots may meet."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.events: list[WatchEvent] = []
        self.restarts: list[int] = []  # the revision a watch could not resume from

    async def run(self) -> None:
        start = 1
        async with Client(self.endpoints, timeout=CALL_TIMEOUT) as client:
            while True:
                try:
                    async for event in client.watch(b"chaos/", start_revision=start):
                        self.events.append(event)
                        start = event.revision + 1
                except RequestFailed as exc:
                    if exc.code != "OUT_OF_RANGE":
                        raise
                    self.restarts.append(start)
                    start = 0
                except DengineError:
                    await asyncio.sleep(0.1)  # no node answered in time: try again

    def state(self) -> dict[bytes, bytes | None]:
        """The keys' values after every event seen, in order."""
        values: dict[bytes, bytes | None] = dict.fromkeys(KEYS)
        for e in self.events:
            values[e.kv.key] = e.kv.value if e.type == "put" else None
        return values


def check_watch(
    watcher: Watcher, final: dict[bytes, bytes | None], *, restarts_allowed: bool, summary: str
) -> None:
    """Each event once, in revision order, together making the final state; and without a
    restart, every revision from the first."""
    revisions = [e.revision for e in watcher.events]
    assert all(a < b for a, b in itertools.pairwise(revisions)), summary
    assert watcher.state() == final, summary
    if not watcher.restarts:
        assert revisions == list(range(1, len(revisions) + 1)), summary
    else:
        assert restarts_allowed, f"only restored snapshots drop watch history\n{summary}"


def run_chaos(cluster: ProcCluster, *, expect_snapshots: bool) -> None:
    endpoints = [cluster.address(i) for i in range(1, cluster.n + 1)]
    rng = random.Random(SEED)
    history = HistoryRecorder()
    seen: dict[bytes, bytes | None] = {}
    nemesis = Nemesis(cluster, random.Random(rng.random()))
    watcher = Watcher(endpoints)
    final: dict[bytes, bytes | None] = {}

    async def main() -> list[int]:
        watching = asyncio.create_task(watcher.run())
        until = time.monotonic() + SECONDS
        clients = [
            client_loop(endpoints, cid, random.Random(rng.random()), history=history, seen=seen, until=until)
            for cid in range(CLIENTS)
        ]
        try:
            counts = await asyncio.gather(nemesis.run(until), *clients)
            await asyncio.to_thread(nemesis.heal)
            current = [cluster.address(m) for m in nemesis.members]  # perhaps none of the first
            async with Client(current, timeout=20) as client:
                for key in KEYS:
                    op = history.invoke(CLIENTS, KVInput("get", key))
                    kv = await client.get(key)
                    final[key] = kv.value if kv is not None else None
                    history.complete(op, final[key])
            # The watch catches up with the final state (or the test fails here).
            deadline = time.monotonic() + 30
            while watcher.state() != final and time.monotonic() < deadline and not watching.done():
                await asyncio.sleep(0.1)
            if watching.done() and watching.exception() is not None:
                raise AssertionError(
                    f"the watch failed after {len(watcher.events)} events"
                ) from watching.exception()
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        return [n for n in counts if n is not None]

    answered = asyncio.run(main())  # on a failure, running_cluster thaws and kills every node

    ops = history.history()
    result = check(ops, KVModel(), budget=2_000_000)
    snapshots = snapshot_events(cluster)
    summary = (
        f"{len(ops)} operations, {sum(answered)} answered, {len(watcher.events)} watched events "
        f"(restarted at {watcher.restarts}), snapshots {snapshots}, faults: {nemesis.faults}"
    )
    print(summary)
    assert result.ok is True, f"{result}\n{summary}"
    check_watch(watcher, final, restarts_allowed=snapshots["taken"] > 0, summary=summary)
    # Not a vacuous pass: the clients got work done through the faults, and there were faults.
    assert sum(answered) >= 20 * SECONDS, summary
    assert len(nemesis.faults) >= SECONDS / 6, summary
    assert nemesis.replaced >= 1, summary
    if expect_snapshots:
        assert snapshots["taken"] > 0, summary
