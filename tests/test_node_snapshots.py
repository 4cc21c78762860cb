"""Snapshots on real nodes (embedded, real gRPC on 127.0.0.1, real WAL and snapshot files): taken
by policy and on demand, the log compacted behind them, a lagging follower caught up over
InstallSnapshot, restarts from a snapshot plus the log tail, and corrupt or foreign snapshots
refused with a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest

from dengine import snapshotting
from dengine._core import SnapshotChunker
from dengine.config import Config
from dengine.errors import DengineError
from dengine.node import Node
from dengine.snapshot_store import SnapshotError, SnapshotFile, SnapshotMeta, SnapshotStore, SnapshotWriter
from dengine.snapshotting import SnapshotManager
from dengine.transport.codec import ReceivedChunk
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, raft_pb2
from test_node_embedded import Counter, configs, leader_of, run, started, until, with_section
from test_node_membership import joiner_config, with_membership

sys.path.insert(0, str(Path(__file__).parent.parent / "docs" / "examples"))
from sqlite_log_store import SQLiteLogStore


def with_snapshots(cfgs: list[Config], **snapshot: Any) -> list[Config]:
    return with_section(cfgs, "snapshot", **snapshot)


async def propose_all(node: Node, n: int, start: int = 0) -> None:
    await asyncio.gather(*(node.propose(b"1") for _ in range(start, start + n)))


async def left_behind_a_snapshot(
    nodes: list[Node], writes: int, meanwhile: Callable[[Node], Awaitable[None]] | None = None
) -> int:
    """Stops a follower of ``nodes``, lets ``meanwhile(leader)`` run, writes ``writes`` entries
    (a multiple of 100) through the leader, and has the leader snapshot all it applied and
    compact its log past where the follower stopped; returns the follower's position in
    ``nodes``. Restarted, that follower can only catch up by a snapshot."""
    leader = await until(lambda: leader_of(nodes))
    lagging = next(n for n in nodes if n is not leader)
    index = nodes.index(lagging)
    await lagging.stop()
    if meanwhile is not None:
        await meanwhile(leader)
    for _ in range(writes // 100):
        await propose_all(leader, 100)
    store = leader.store
    assert store is not None
    # Policy snapshots are taken in the background: wait for one past index 100.
    await until(lambda: store.first_index() > 100)
    assert leader.snapshots.created >= 1
    # Then one of everything applied, so that no later snapshot compacts the log under the
    # follower after it installed this one (it would need a second).
    while leader.snapshots._latest_index() < leader.raft.applied:  # type: ignore[union-attr]
        await leader.snapshot()
    # The appends the leader sent it meanwhile wait in the transport's queue until an attempt to
    # reach it fails (the backoff is at most a second), and would let it catch up from the log
    # if it came back before then. A failed attempt drops that queue for a new one.
    transport = leader.transport
    assert transport is not None
    queued = transport._queues.get(lagging.id)
    await until(lambda: transport._queues.get(lagging.id) is not queued, timeout=30)
    return index


async def received_chunks(
    chunker: SnapshotChunker, header: raft_pb2.SnapshotHeader, start: int, stop: int
) -> AsyncIterator[ReceivedChunk]:
    """The chunks of ``chunker``'s file from ``start`` to ``stop``, as a follower receives them."""
    offset = start
    while offset < stop:
        c = chunker.chunk_at(offset)
        message = raft_pb2.SnapshotChunk(header=header, offset=c.offset, data=c.data, crc32c=c.crc32c)
        yield ReceivedChunk.parse(message.SerializeToString())
        offset += len(c.data)


def test_a_follower_that_was_down_catches_up_by_snapshot(tmp_path: Path) -> None:
    cfgs = with_snapshots(configs(tmp_path), entries=100, trailing_entries=10, chunk_bytes=64)

    async def main() -> None:
        async with started(cfgs) as nodes:
            index = await left_behind_a_snapshot(nodes, 500)
            leader = await until(lambda: leader_of(nodes))
            nodes[index] = back = Node(cfgs[index], state_machine=Counter())
            await back.start()
            await until(lambda: isinstance(back.sm, Counter) and back.sm.n == 500)
            # The install is counted once the restored state is adopted, a moment after the
            # state machine shows it.
            await until(lambda: back.snapshots.installed == 1)
            assert back.store is not None and back.store.first_index() > 100
            # The transfer left no partial files behind, and the received snapshot is durable.
            files = sorted(p.name for p in (tmp_path / f"n{index + 1}" / "snapshots").iterdir())
            assert any(f.endswith(".snap") for f in files), files
            assert not any(f.endswith((".partial", ".progress")) for f in files), files
            # Replication goes on from the log after the snapshot.
            await propose_all(leader, 10)
            await until(lambda: isinstance(back.sm, Counter) and back.sm.n == 510)

    run(main)


def test_restart_from_a_snapshot_plus_the_log_tail(tmp_path: Path) -> None:
    (cfg,) = with_snapshots(configs(tmp_path, 1), entries=0, trailing_entries=5)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 40)
            snap = await node.snapshot()
            assert snap is not None and snap.meta.index == node.raft.applied  # type: ignore[union-attr]
            assert node.store is not None and node.store.first_index() == snap.meta.index - 5 + 1
            assert await node.snapshot() == snap, "nothing new applied: the same snapshot"
            metrics = node.metrics.render().decode()
            assert "dengine_snapshots_total" in metrics and "dengine_snapshot_duration_seconds" in metrics
            snapshots_total = next(
                line for line in metrics.splitlines() if line.startswith("dengine_snapshots_total")
            )
            assert snapshots_total.endswith(" 1.0"), snapshots_total
            await propose_all(node, 7)  # the tail after the snapshot
        async with Node(cfg, state_machine=Counter()) as again:
            assert isinstance(again.sm, Counter) and again.sm.n >= 40, "restored from the snapshot"
            assert again.status().snapshot_index == snap.meta.index
            await until(lambda: leader_of([again]))
            assert await again.propose(b"1") == b"48", "and the tail re-applied on top of it"

    run(main)


def test_a_snapshot_asked_for_as_the_last_one_finishes_covers_what_was_applied_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot that has finished, its done-callback not yet run (a loop turn later), is not
    joined: a new one is taken. Joined, it answered at once with a snapshot older than the last
    applied entry, without yielding, and the loop of left_behind_a_snapshot (ask until the
    snapshot covers what was applied) spun for ever: a CI run hung in the first test above."""
    (cfg,) = with_snapshots(configs(tmp_path, 1), entries=0)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 10)
            store = node.snapshots.store
            assert store is not None
            # The snapshot's commit waits for the gate: an entry is applied meanwhile, after
            # the state was frozen, so that the snapshot under way ends before the last entry.
            gate = threading.Event()
            create = store.create

            def gated_create(meta: SnapshotMeta) -> SnapshotWriter:
                writer = create(meta)
                commit = writer.commit

                def gated_commit() -> SnapshotFile:
                    gate.wait(10)
                    return commit()

                monkeypatch.setattr(writer, "commit", gated_commit)
                return writer

            monkeypatch.setattr(store, "create", gated_create)
            first = asyncio.ensure_future(node.snapshot())
            await until(lambda: node.snapshots._creating)
            creating = node.snapshots._creating
            assert creating is not None
            await node.propose(b"1")
            gate.set()
            # Polled a loop turn at a time, the snapshot is seen done before its done-callback ran.
            while not creating.done():
                await asyncio.sleep(0)
            assert node.snapshots._creating is creating, "its done-callback has not run yet"
            snap = await node.snapshot()
            assert snap is not None and snap.meta.index == node.raft.applied  # type: ignore[union-attr]
            await first

    run(main)


def test_a_corrupt_snapshot_file_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    (cfg,) = configs(tmp_path, 1)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 10)
            snap = await node.snapshot()
        assert snap is not None
        data = bytearray(snap.path.read_bytes())
        data[snap.data_offset] ^= 0xFF
        snap.path.write_bytes(bytes(data))
        with pytest.raises(SnapshotError, match=snap.path.name):
            await Node(cfg, state_machine=Counter()).start()
        # The failed start released the data dir: with the damage repaired it starts again.
        data[snap.data_offset] ^= 0xFF
        snap.path.write_bytes(bytes(data))
        async with Node(cfg, state_machine=Counter()) as again:
            assert isinstance(again.sm, Counter) and again.sm.n == 10

    run(main)


def test_leftovers_of_an_interrupted_snapshot_are_removed_at_start(tmp_path: Path) -> None:
    (cfg,) = configs(tmp_path, 1)
    store = SnapshotStore(tmp_path / "n1" / "snapshots")
    (store.directory / "snap-00000000000000000009-00000000000000000002.snap.partial").write_bytes(b"x")
    (store.directory / "snap-00000000000000000009-00000000000000000002.snap.progress").write_bytes(b"x")

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()):
            pass

    run(main)
    assert list(store.directory.iterdir()) == []


def test_a_log_compacted_past_the_newest_snapshot_is_refused(tmp_path: Path) -> None:
    (cfg,) = with_snapshots(configs(tmp_path, 1), trailing_entries=0)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 10)
            snap = await node.snapshot()
        assert snap is not None
        snap.path.unlink()  # an operator deleted the only snapshot the log depends on
        with pytest.raises(DengineError, match="entries in between are missing"):
            await Node(cfg, state_machine=Counter()).start()

    run(main)


def test_an_interrupted_transfer_resumes_and_an_abandoned_one_leaves_nothing(tmp_path: Path) -> None:
    cfgs = with_snapshots(configs(tmp_path), entries=0, chunk_bytes=100)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            follower = next(n for n in nodes if n is not leader)
            await propose_all(leader, 50)
            snap = await leader.snapshot()
            assert snap is not None and leader.raft is not None and follower.raft is not None
            chunker = SnapshotChunker(snap.path, 100)
            header = raft_pb2.SnapshotHeader(
                cluster_id="embedded",
                to=follower.id,
                term=leader.raft.term,
                index=snap.meta.index + 1000,  # beyond the follower's commit, so it is wanted
                log_term=snap.meta.term,
                size=chunker.size,
                sha256=chunker.sha256,
                **{"from": leader.id},
            )

            def chunks(start: int, stop: int) -> AsyncIterator[ReceivedChunk]:
                return received_chunks(chunker, header, start, stop)

            offer = await follower.snapshots.offer(header)
            assert offer.needed and offer.next_offset == 0
            cut = chunker.size // 2 // 100 * 100
            reply = await follower.snapshots.receive(chunks(0, cut))
            assert not reply.installed, "half a snapshot is not installed"
            incoming = follower.snapshots._incoming
            assert incoming is not None
            incoming.last_activity -= 100  # long ago: a slow transfer's next stream comes late
            again = await follower.snapshots.offer(header)
            assert again.next_offset == cut, "the second attempt resumes where the first stopped"
            assert follower.snapshots._incoming is incoming
            assert incoming.last_activity > time.monotonic() - 10, "the offer counts as activity"
            # A chunk for another snapshot is refused.
            other = raft_pb2.SnapshotHeader()
            other.CopyFrom(header)
            other.index += 1

            async def foreign() -> AsyncIterator[ReceivedChunk]:
                c = chunker.chunk_at(cut)
                yield ReceivedChunk.of(
                    raft_pb2.SnapshotChunk(header=other, offset=c.offset, data=c.data, crc32c=c.crc32c)
                )

            with pytest.raises(ValueError, match="not offered"):
                await follower.snapshots.receive(foreign())
            # The leader moves on (a new term): the half-received files are removed.
            directory = follower.snapshots.directory
            assert any(p.name.endswith(".partial") for p in directory.iterdir())
            follower.raft.term += 1
            await until(
                lambda: not any(p.name.endswith((".partial", ".progress")) for p in directory.iterdir())
            )

    run(main)


def test_policies_by_age_and_by_log_size_and_disabled_snapshots(tmp_path: Path) -> None:
    by_age = with_snapshots(configs(tmp_path / "age", 1), entries=0, interval_s=1, keep=1)[0]
    by_size = with_snapshots(configs(tmp_path / "size", 1), entries=0, bytes=20_000, keep=1)[0]
    never = with_snapshots(configs(tmp_path / "off", 1), enabled=False, entries=10)[0]

    async def main() -> None:
        for cfg, expect in ((by_age, True), (by_size, True), (never, False)):
            node = Node(cfg, state_machine=Counter())
            async with node:
                await until(lambda n=node: leader_of([n]))  # type: ignore[misc]
                await propose_all(node, 600)
                if expect:
                    await until(lambda n=node: n.snapshots.created > 0, timeout=10)  # type: ignore[misc]
                    await propose_all(node, 600)
                    await until(lambda n=node: n.snapshots.created > 1, timeout=10)  # type: ignore[misc]
                else:
                    await asyncio.sleep(1.5)  # several policy checks
                    assert node.snapshots.created == 0
                directory = node.snapshots.directory
                if expect:  # keep = 1: older files go once the new one is in place
                    await until(lambda d=directory: len(list(d.glob("*.snap"))) == 1)  # type: ignore[misc]
                else:
                    assert not list(directory.glob("*.snap"))

    run(main)


def test_members_spread_their_entry_count_snapshots(tmp_path: Path) -> None:
    # Node n waits (n mod 3) / 8 of the interval longer: here 225, 250 and 200 entries for nodes
    # 1, 2 and 3, so that a cluster's members do not all write and fsync their state at once.
    cfgs = with_snapshots(configs(tmp_path), entries=200)

    async def main() -> None:
        async with started(cfgs) as nodes:
            assert [n.id for n in nodes] == [1, 2, 3]
            leader = await until(lambda: leader_of(nodes))
            await propose_all(leader, 235)  # 236 entries with the leader's first one, under 250
            await until(lambda: nodes[0].snapshots.created == 1 and nodes[2].snapshots.created == 1)
            assert all(n.raft is not None and n.raft.applied < 250 for n in nodes)
            assert nodes[1].snapshots.created == 0
            third, first = nodes[2].snapshots.latest, nodes[0].snapshots.latest
            assert third is not None and third.meta.index >= 200
            assert first is not None and first.meta.index >= 225
            await propose_all(leader, 20)
            await until(lambda: nodes[1].snapshots.created == 1)

    run(main)


def test_the_size_policy_counts_entries_written_while_the_last_snapshot_was_taken(
    tmp_path: Path,
) -> None:
    """Log growth is measured from the snapshot's own point. A burst written while the previous
    snapshot was being taken and the log compacted still counts, and triggers the next snapshot
    even when nothing is written after it."""
    (cfg,) = with_snapshots(configs(tmp_path, 1), entries=0, bytes=20_000, trailing_entries=0, keep=1)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 600)  # about 32 KB of log: the policy takes a snapshot
            # Counted once written, but under way until its compaction is done too: a snapshot
            # asked for before that would join it instead of taking a new one.
            await until(lambda: node.snapshots.created == 1 and node.snapshots._creating is None)
            compact = node.snapshots._compact
            bursts: list[int] = []

            async def burst_then_compact(*args: Any) -> None:
                if not bursts:  # the next snapshot: another 32 KB lands before its compaction
                    bursts.append(1)
                    await propose_all(node, 600)
                await compact(*args)

            node.snapshots._compact = burst_then_compact  # type: ignore[method-assign, assignment]
            await propose_all(node, 10)  # something new to snapshot
            await node.snapshot()
            assert node.snapshots.created == 2 and bursts
            await until(lambda: node.snapshots.created == 3, timeout=10)

    run(main)


def test_an_entry_count_reached_while_a_snapshot_was_taken_is_not_left_waiting(tmp_path: Path) -> None:
    """Entries applied while a snapshot is under way (here: before its compaction is done) do
    not start the next one then; once it is done, the count they reached does, without waiting
    for another write."""
    (cfg,) = with_snapshots(configs(tmp_path, 1), entries=50, log_factor=0.0, trailing_entries=0, keep=1)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            compact = node.snapshots._compact
            bursts: list[int] = []

            async def burst_then_compact(*args: Any) -> None:
                if not bursts:  # past the next entry count, applied while the first is under way
                    bursts.append(1)
                    await propose_all(node, 120)
                await compact(*args)

            node.snapshots._compact = burst_then_compact  # type: ignore[method-assign, assignment]
            await propose_all(node, 60)  # the first snapshot, by the entry count
            await until(lambda: node.snapshots.created == 2, timeout=10)
            latest = node.snapshots.latest
            assert bursts and latest is not None and latest.meta.index >= 150

    run(main)


class Bulky(Counter):
    """A counter whose state takes 200 KB on disk, like a store holding many keys."""

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(str(self.n).encode().ljust(200_000))

    def restore(self, source: BinaryIO) -> None:
        self.n = int(source.read().strip())


@pytest.mark.parametrize("log_factor", [2.0, 0.0])
def test_the_entry_count_waits_until_the_log_outgrew_the_last_snapshot(
    tmp_path: Path, log_factor: float
) -> None:
    """Raft thesis §5.1.3: a snapshot writes the whole state, so with a large state the entry
    count alone would snapshot far more bytes than the writes it saves the log from."""
    (cfg,) = with_snapshots(configs(tmp_path, 1), entries=50, log_factor=log_factor, keep=1)

    async def main() -> None:
        async with Node(cfg, state_machine=Bulky()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 10)
            await node.snapshot()  # 200 KB: the next waits for 400 KB of log (with the factor)
            assert node.snapshots.created == 1
            await propose_all(node, 120)  # over the entry count, but a few KB of log
            if not log_factor:
                await until(lambda: node.snapshots.created == 2)
                return
            await asyncio.sleep(0.5)
            assert node.snapshots.created == 1
            for _ in range(5):  # 5 x 20 x 5 KB: past 400 KB
                await asyncio.gather(*(node.propose(b"1".rjust(5_000)) for _ in range(20)))
            await until(lambda: node.snapshots.created == 2)

    run(main)


def test_a_bandwidth_cap_spaces_out_the_chunks(tmp_path: Path) -> None:
    (cfg,) = with_snapshots(configs(tmp_path, 1), chunk_bytes=10_000, bandwidth_mb_s=0.2)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            big = tmp_path / "big.bin"
            big.write_bytes(bytes(100_000))
            chunker = SnapshotChunker(big, 10_000)
            began = asyncio.get_running_loop().time()
            sent = [c async for c in node.snapshots._chunks(chunker, raft_pb2.SnapshotHeader(), 0)]
            elapsed = asyncio.get_running_loop().time() - began
            assert sum(len(c.data) for c in sent) == 100_000
            # 100 kB at 0.2 MB/s cannot leave in less than half a second (a lower bound only).
            assert elapsed >= 0.45, elapsed

    run(main)


class WrittenInTheBackground(Counter):
    """A counter whose snapshots are written by a writer handed out by ``begin_snapshot`` (as the
    built-in store does), which waits for ``go`` before it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.go = threading.Event()
        self.wrote: list[str | BaseException] = []

    def begin_snapshot(self) -> Callable[[BinaryIO], None]:
        state = str(self.n).encode()

        def write(sink: BinaryIO) -> None:
            self.writing.set()
            self.go.wait(5)
            try:
                sink.write(state)
            except BaseException as exc:
                self.wrote.append(exc)
                raise
            self.wrote.append("written")

        return write


def test_a_node_stopped_while_its_state_is_written_waits_for_the_writer_then_discards_the_file(
    tmp_path: Path,
) -> None:
    """Stopping discards a snapshot being written, closing and removing its file: only once the
    thread writing it is done with it. Closed under a running writer, the file's descriptor
    could be reused by the next file opened, and the writer would write into that one. The
    loop serves on meanwhile: the stop waits for the writer without blocking it."""
    (cfg,) = configs(tmp_path, 1)
    sm = WrittenInTheBackground()

    async def main() -> None:
        node = Node(cfg, state_machine=sm)
        await node.start()
        await until(lambda: leader_of([node]))
        await propose_all(node, 5)
        creating = asyncio.ensure_future(node.snapshot())
        await until(sm.writing.is_set)
        stopping = asyncio.ensure_future(node.stop())
        await asyncio.sleep(0.3)  # the stop cancels the snapshot meanwhile
        assert not stopping.done(), "the stop did not wait for the writer"
        sm.go.set()
        await asyncio.wait_for(stopping, 10)
        # The caller was not cancelled: it hears why its snapshot was not taken.
        with pytest.raises(DengineError, match="stopped before the snapshot was taken"):
            await creating
        assert sm.wrote == ["written"], "the file was closed under the writer"
        left = sorted(p.name for p in (tmp_path / "n1" / "snapshots").iterdir())
        assert left == [], left

    run(main)


def test_a_node_that_failed_applying_takes_no_snapshot(tmp_path: Path) -> None:
    """After a failure of the apply machinery the state may hold part of a batch that the
    applied index does not count; a snapshot of it, restored, would apply those entries again.
    A snapshot asked for in the moment before the failed node lets go of everything (one may be
    waiting for the apply lock) writes nothing."""
    (cfg,) = configs(tmp_path, 1)

    async def main() -> None:
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 5)
            node.failure = "the node stopped after an apply failure: a bug (staged by the test)"
            assert await node.snapshot() is None
            assert sorted((tmp_path / "n1" / "snapshots").iterdir()) == []

    run(main)


class SlowToRestore(Counter):
    """A counter whose restore, once ``armed``, waits for ``go`` before it reads its source."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.restoring = threading.Event()
        self.go = threading.Event()
        self.read: list[bytes | BaseException] = []

    def restore(self, source: BinaryIO) -> None:
        if self.armed:
            self.restoring.set()
            self.go.wait(5)
            try:
                self.read.append(source.read())
            except BaseException as exc:
                self.read.append(exc)
                raise
        super().restore(source)


def test_a_restore_cancelled_midway_keeps_its_source_open_until_it_returns(tmp_path: Path) -> None:
    """A restore that is cancelled (the node stopping) closes the snapshot it reads only once
    the thread reading it is done: closed under it, the descriptor could be another file's."""
    (cfg,) = configs(tmp_path, 1)
    sm = SlowToRestore()

    async def main() -> None:
        async with Node(cfg, state_machine=sm) as node:
            await until(lambda: leader_of([node]))
            await propose_all(node, 5)
            snap = await node.snapshot()
            assert snap is not None
            sm.armed = True
            restoring = asyncio.ensure_future(node.snapshots._restore_state(snap))
            await until(sm.restoring.is_set)
            restoring.cancel()
            await asyncio.sleep(0.2)
            assert not restoring.done(), "the cancel did not wait for the restore"
            sm.go.set()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(restoring, 10)
            assert sm.read == [b"5"], "the source was closed under the restore"

    run(main)


def test_a_node_that_fails_while_its_state_is_written_stops_serving_at_once(tmp_path: Path) -> None:
    """A fail-stop waits for a snapshot being written to finish before it lets go of the data
    dir; meanwhile the node must already look gone to peers and clients (they go elsewhere),
    not take their requests and drop them."""
    (cfg,) = configs(tmp_path, 1)
    sm = WrittenInTheBackground()

    async def main() -> None:
        node = Node(cfg, state_machine=sm)
        await node.start()
        try:
            await until(lambda: leader_of([node]))
            await propose_all(node, 3)
            creating = asyncio.ensure_future(node.snapshot())
            await until(sm.writing.is_set)
            node._fail_stop(RuntimeError("a bug (staged by the test)"), "an apply failure")
            await asyncio.sleep(0.5)
            async with grpc.aio.insecure_channel(cfg.node.listen) as channel:
                stub = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Status(cluster_pb2.StatusRequest(), timeout=2)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, "still serving"
            sm.go.set()
            with pytest.raises(DengineError, match="stopped before the snapshot was taken"):
                await creating
        finally:
            sm.go.set()
            await node.stop()

    run(main)


def growing_cluster(tmp_path: Path) -> tuple[list[Config], Config]:
    """Three members that snapshot every 100 entries and promote a caught-up learner, and the
    config of a fourth node that joins them."""
    membership: dict[str, Any] = {"promote": "auto", "caught_up_for_ms": 200, "max_lag_entries": 10}
    cfgs = with_snapshots(with_membership(configs(tmp_path), **membership), entries=100, trailing_entries=10)
    return cfgs, joiner_config(tmp_path, 4, cfgs[0], **membership)


def test_a_follower_that_catches_up_by_snapshot_can_reach_the_members_it_brings(tmp_path: Path) -> None:
    """A member added in the part of the log a snapshot covers is named only by the snapshot:
    a follower that was down meanwhile and catches up by that snapshot must learn its address
    (to send it votes and answers, and to take its messages) without waiting for a restart."""
    cfgs, cfg4 = growing_cluster(tmp_path)

    async def main() -> None:
        async with started(cfgs) as nodes:

            async def add_node_4(leader: Node) -> None:
                joiner = Node(cfg4, state_machine=Counter(), join=leader.config.node.listen)
                await joiner.start()
                nodes.append(joiner)
                await until(lambda: 4 in leader.raft.conf.voters, timeout=20)  # type: ignore[union-attr]

            index = await left_behind_a_snapshot(nodes, 400, add_node_4)
            nodes[index] = back = Node(cfgs[index], state_machine=Counter())
            await back.start()
            await until(lambda: back.snapshots.installed == 1, timeout=20)
            assert back.members.addresses.get(4) == cfg4.node.listen
            assert back.transport is not None and 4 in back.transport.members
            assert 4 in back.transport.peers

    run(main)


def test_a_send_whose_chunks_fail_is_reported_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When reading the snapshot's chunks fails, grpc cancels the call and keeps the reason:
    the send must still count as failed, or the leader would wait for it for the rest of its
    term and send the follower nothing more. The next attempt gets it through."""
    cfgs = with_snapshots(configs(tmp_path), entries=100, trailing_entries=10, chunk_bytes=64)
    real = SnapshotManager._chunks
    failed: list[int] = []

    async def chunks_failing_once(self: SnapshotManager, *args: Any) -> AsyncIterator[Any]:
        if not failed:
            failed.append(1)
            raise OSError("a read error (staged by the test)")
            yield  # an async generator
        async for chunk in real(self, *args):
            yield chunk

    monkeypatch.setattr(SnapshotManager, "_chunks", chunks_failing_once)

    async def main() -> None:
        async with started(cfgs) as nodes:
            index = await left_behind_a_snapshot(nodes, 300)
            nodes[index] = back = Node(cfgs[index], state_machine=Counter())
            await back.start()
            await until(lambda: isinstance(back.sm, Counter) and back.sm.n == 300, timeout=20)
            assert failed == [1]

    run(main)


def test_an_install_whose_pruning_fails_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing old snapshot files after an install can fail (another prune raced it, a file
    the disk cannot delete): the install stands, and the node goes on."""
    cfgs = with_snapshots(configs(tmp_path), entries=100, trailing_entries=10, chunk_bytes=64)

    def failing(self: SnapshotStore, *args: Any) -> list[Any]:
        raise OSError("cannot list or delete (staged by the test)")

    async def main() -> None:
        async with started(cfgs) as nodes:
            index = await left_behind_a_snapshot(nodes, 300)
            leader = await until(lambda: leader_of(nodes))
            nodes[index] = back = Node(cfgs[index], state_machine=Counter())
            await back.start()
            monkeypatch.setattr(SnapshotStore, "prune", failing)
            monkeypatch.setattr(SnapshotStore, "list", failing)
            await until(lambda: back.snapshots.installed == 1, timeout=20)
            assert back.failure is None
            assert await leader.propose(b"1") == b"301"
            await until(lambda: isinstance(back.sm, Counter) and back.sm.n == 301)

    run(main)


def test_a_received_snapshot_the_core_does_not_take_is_not_kept_pinned(tmp_path: Path) -> None:
    """A snapshot whose transfer completes after its leader's term ended (or that this node's
    log already covers) is refused by the core and never restored: nothing may keep it pinned,
    or held in memory, for the rest of the process."""
    (sender_cfg,) = with_snapshots(configs(tmp_path / "a", 1), entries=0, chunk_bytes=100)
    (receiver_cfg,) = configs(tmp_path / "b", 1)

    async def main() -> None:
        async with (
            Node(sender_cfg, state_machine=Counter()) as sender,
            Node(receiver_cfg, state_machine=Counter()) as receiver,
        ):
            await until(lambda: leader_of([sender]) and leader_of([receiver]))
            await propose_all(sender, 50)
            snap = await sender.snapshot()
            assert snap is not None and sender.raft is not None and receiver.raft is not None
            chunker = SnapshotChunker(snap.path, 100)
            header = raft_pb2.SnapshotHeader(
                cluster_id="embedded",
                to=receiver.id,
                term=receiver.raft.term,
                index=snap.meta.index,
                log_term=snap.meta.term,
                size=chunker.size,
                sha256=chunker.sha256,
                **{"from": 2},
            )
            assert (await receiver.snapshots.offer(header)).needed

            receiver.raft.term += 1  # its leader's term ended while the chunks were on the way
            await receiver.snapshots.receive(received_chunks(chunker, header, 0, chunker.size))
            assert receiver.snapshots.installed == 0
            assert receiver.snapshots._pinned == {} and receiver.snapshots._received == {}

    run(main)


def test_a_node_that_joins_by_a_snapshot_taken_before_it_was_added_stays(tmp_path: Path) -> None:
    """A joining node is sent the newest snapshot, taken before it was added: the configuration
    it then holds does not name it yet. That is not its removal (the entry adding it comes
    next): it must go on, catch up, and be promoted."""
    cfgs, cfg4 = growing_cluster(tmp_path)

    async def main() -> None:
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            for _ in range(3):
                await propose_all(leader, 100)
            store = leader.store
            assert store is not None
            await until(lambda: store.first_index() > 100)
            while leader.snapshots._latest_index() < leader.raft.applied:  # type: ignore[union-attr]
                await leader.snapshot()
            joiner = Node(cfg4, state_machine=Counter(), join=leader.config.node.listen)
            await joiner.start()
            nodes.append(joiner)
            await until(lambda: joiner.snapshots.installed == 1, timeout=20)
            await until(lambda: 4 in leader.raft.conf.voters, timeout=20)  # type: ignore[union-attr]
            await asyncio.sleep(1.0)  # more than an election timeout
            assert joiner.failure is None, joiner.failure
            assert await leader.propose(b"1") == b"301"
            await until(lambda: isinstance(joiner.sm, Counter) and joiner.sm.n == 301)

    run(main)


class GatedAsyncCounter:
    """A counter whose async ``apply`` of ``b"100"`` changes the state, then waits on ``gate``
    (I/O, a lock) before it returns: an entry cut in two by any cancel that lands meanwhile."""

    def __init__(self) -> None:
        self.n = 0
        self.gate: asyncio.Event | None = None

    async def apply(self, index: int, command: bytes) -> bytes:
        self.n += int(command)
        if self.gate is not None and command == b"100":
            await self.gate.wait()
        return str(self.n).encode()

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(str(self.n).encode())

    def restore(self, source: BinaryIO) -> None:
        self.n = int(source.read())


def test_a_node_stopped_inside_an_async_apply_takes_no_snapshot_of_half_an_entry(tmp_path: Path) -> None:
    """A stop cancels the apply task inside an entry whose apply() has changed the state but not
    returned: the state is ahead of what counts as applied. A snapshot waiting for the apply lock
    then must not take that state as of the last applied entry, or the restarted node applies
    the entry a second time and its replica differs from the others for good."""
    cfgs = configs(tmp_path)

    async def main() -> None:
        machines = [GatedAsyncCounter() for _ in cfgs]
        nodes = [Node(c, state_machine=sm) for c, sm in zip(cfgs, machines, strict=True)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            at = next(i for i, n in enumerate(nodes) if n is not leader)
            follower, machine = nodes[at], machines[at]
            await propose_all(leader, 5)
            await until(lambda: machine.n == 5)
            machine.gate = asyncio.Event()  # never set: its apply of b"100" stays inside the entry
            assert await leader.propose(b"100") == b"105"
            await until(lambda: machine.n == 105)
            snapshot = asyncio.ensure_future(follower.snapshot())  # waits for the apply lock
            await asyncio.sleep(0.05)
            await follower.stop(transfer_leadership=False)
            (outcome,) = await asyncio.gather(snapshot, return_exceptions=True)
            assert follower.snapshots.latest is None, "a snapshot of half an entry was taken"
            restarted = GatedAsyncCounter()
            nodes[at] = Node(cfgs[at], state_machine=restarted)
            await nodes[at].start()
            await until(lambda: restarted.n == 105)
            await asyncio.sleep(0.2)
            assert restarted.n == 105, "the entry cut in two was applied twice"
            # The caller of snapshot() hears that the stop refused it.
            assert isinstance(outcome, DengineError) and "stop" in str(outcome), outcome
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


def test_a_failed_policy_check_leaves_the_snapshot_policy_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size policy measures the log directory; one failure there (a disk error) used to end
    the policy loop silently: no size or interval snapshot ever again, the log growing for good."""
    (cfg,) = with_snapshots(configs(tmp_path, n=1), entries=0, bytes=1, log_factor=0)
    measure = snapshotting._directory_bytes
    failures = [OSError(5, "Input/output error")]

    def failing_once(path: Path) -> int:
        if failures:
            raise failures.pop()
        return measure(path)

    async def main() -> None:
        async with started([cfg]) as (node,):
            await until(lambda: leader_of([node]))
            monkeypatch.setattr(snapshotting, "_directory_bytes", failing_once)
            await node.propose(b"1")
            await until(lambda: not failures)
            await node.propose(b"1")
            await until(lambda: node.snapshots.created >= 1)

    run(main)


def test_a_log_file_removed_while_the_log_is_measured_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log renames a preallocated segment into place and deletes compacted ones while the
    snapshot thread measures the directory: a file listed and then gone is not an error."""
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x" * 10)
    listing = os.scandir

    def removing_b(entries: Iterator[os.DirEntry[str]]) -> Iterator[os.DirEntry[str]]:
        for entry in entries:
            if entry.name == "b":
                os.unlink(entry.path)  # gone between the listing and its stat
            yield entry

    @contextlib.contextmanager
    def listing_then_removing(path: Path) -> Iterator[Iterator[os.DirEntry[str]]]:
        with listing(path) as entries:
            yield removing_b(entries)

    monkeypatch.setattr(os, "scandir", listing_then_removing)
    assert snapshotting._directory_bytes(tmp_path) == 20


def test_offers_that_overlap_leave_no_partial_file_behind(tmp_path: Path) -> None:
    """Two leaders' offers at once (an old one still sending as a new one starts) each made an
    assembler; the one not kept left its partial file, which no abandon could reach."""
    (cfg,) = configs(tmp_path, n=1)

    async def main() -> None:
        async with started([cfg]) as (node,):
            await until(lambda: leader_of([node]))
            assert node.raft is not None

            def offer_from(leader: int, term: int) -> raft_pb2.SnapshotHeader:
                return raft_pb2.SnapshotHeader(
                    cluster_id="embedded",
                    to=node.id,
                    term=term,
                    index=1000 * term,
                    log_term=term,
                    size=1 << 20,
                    sha256=bytes(32),
                    **{"from": leader},
                )

            term = node.raft.term
            answers = await asyncio.gather(
                node.snapshots.offer(offer_from(2, term + 1)), node.snapshots.offer(offer_from(3, term + 2))
            )
            assert all(a.needed for a in answers)
            await node.snapshots._abandon("the transfer went silent")
            store = node.snapshots.store
            assert store is not None
            left = [p.name for p in store.directory.iterdir() if p.suffix in (".partial", ".progress")]
            assert left == [], "an assembler nobody kept left its files"

    run(main)


class ResetFails(SQLiteLogStore):
    """The storage guide's engine, whose reset to a received snapshot can be made to fail."""

    fail_reset = False

    def reset(self, index: int, term: int) -> None:
        if self.fail_reset:
            raise OSError(5, "Input/output error")
        super().reset(index, term)


def test_a_log_that_fails_to_take_a_received_snapshot_stops_the_node(tmp_path: Path) -> None:
    """The install resets the log to the snapshot; a failure there used to go back to the leader
    as the call's error while the node went on with a log in an unknown state."""
    cfgs = with_snapshots(configs(tmp_path), entries=100, trailing_entries=10)

    async def main() -> None:
        nodes = [
            Node(c, state_machine=Counter(), log_store=ResetFails(tmp_path / f"sql{i}"))
            for i, c in enumerate(cfgs)
        ]
        for n in nodes:
            await n.start()
        try:
            at = await left_behind_a_snapshot(nodes, 300)
            store = ResetFails(tmp_path / f"sql{at}")
            store.fail_reset = True
            nodes[at] = Node(cfgs[at], state_machine=Counter(), log_store=store)
            await nodes[at].start()
            lagging = nodes[at]
            await until(lambda: lagging.failure is not None, timeout=20)
            assert "ResetFails.reset() failed: OSError" in str(lagging.failure)
            await asyncio.wait_for(lagging.wait_stopped(), 10)
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


def test_stopping_waits_for_snapshot_work_without_holding_up_the_loop(tmp_path: Path) -> None:
    """Work on the snapshot threads that goes on after the stop cancelled it (an assembler
    checking a large partial file) is waited for off the loop: other nodes and tasks on it go on."""
    (cfg,) = configs(tmp_path, n=1)

    async def main() -> None:
        node = Node(cfg, state_machine=Counter())
        await node.start()
        await until(lambda: leader_of([node]))
        busy = threading.Event()

        def long_job() -> None:
            busy.set()
            time.sleep(1.5)

        node.snapshots._pool.submit(long_job)
        await until(busy.is_set)
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.ensure_future(ticker())
        await node.stop()
        ticking.cancel()
        assert max(gaps) < 0.75, f"the loop was held up {max(gaps):.2f} s by the stop"

    run(main)


@pytest.mark.parametrize("engine", ["memory", "elsewhere"])
def test_a_log_kept_outside_the_log_directory_is_still_compacted_by_the_entry_count(
    tmp_path: Path, engine: str
) -> None:
    """The log factor holds a snapshot back until the log directory has outgrown the last one;
    a log kept in memory or by a custom engine somewhere else leaves that directory empty, and
    used to get one snapshot only, its log then growing for good."""
    (cfg,) = with_snapshots(configs(tmp_path, n=1), entries=100, trailing_entries=10)
    if engine == "memory":
        (cfg,) = with_section([cfg], "storage", engine="memory")

    async def main() -> None:
        store = ResetFails(tmp_path / "sql") if engine == "elsewhere" else None
        async with Node(cfg, state_machine=Counter(), log_store=store) as node:
            await until(lambda: leader_of([node]))
            for _ in range(5):
                await propose_all(node, 100)
            await until(lambda: node.snapshots.created >= 2)
            assert node.store is not None
            await until(lambda: node.store is not None and node.store.first_index() > 300)

    run(main)


def test_a_snapshot_taken_while_a_received_one_resets_the_log_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower's own snapshot reads the log's term at its index; a snapshot received from the
    leader meanwhile (installed outside the apply lock) resets the log past that index. Read
    after the snapshot's first await, the term was gone and the snapshot failed."""
    (cfg,) = configs(tmp_path, n=1)
    measure = snapshotting._directory_bytes

    async def main() -> None:
        async with started([cfg]) as (node,):
            await until(lambda: leader_of([node]))
            await propose_all(node, 5)
            store, raft = node.store, node.raft
            assert store is not None and raft is not None
            applied, term = raft.applied, raft.term

            def measured_as_the_log_is_reset(path: Path) -> int:
                store.reset(applied + 10, term)  # what installing a received snapshot does
                return measure(path)

            monkeypatch.setattr(snapshotting, "_directory_bytes", measured_as_the_log_is_reset)
            snap = await node.snapshot()
            assert snap is not None and (snap.meta.index, snap.meta.term) == (applied, term)

    run(main)
