"""Snapshots on a running node: when to take one, taking it without stopping the node, shipping it
to a follower that needs it, and installing one that a leader sends.

* **Policy** (``[snapshot]``): after ``entries`` applied entries, once the log directory holds
  ``bytes``, or ``interval_s`` seconds after the last snapshot if anything was applied since; or on
  demand with :meth:`Node.snapshot`. The first two wait, besides, until the log has grown by
  ``log_factor`` times the last snapshot's size. After each snapshot the log is compacted up to
  ``trailing_entries`` before it (so a slightly lagging follower still catches up from the log)
  and only the newest ``keep`` snapshot files stay.
* **Creating**: the state is frozen between two applied batches. A state machine with
  ``begin_snapshot()`` (the built-in KV store) hands back a writer that serializes the frozen view
  on a worker thread while applies go on; any other state machine's ``snapshot`` runs on a worker
  thread (or is awaited, if async) while applies wait, the event loop keeps serving Raft.
* **Sending**: the file leaves in CRC-checked chunks read by the Rust chunker, optionally capped at
  ``bandwidth_mb_s``; an interrupted transfer resumes from the follower's last good offset.
* **Receiving**: chunks go to the Rust assembler, which checks each CRC and the whole file's
  SHA-256 and publishes the file atomically; only then does the Raft core decide whether to
  install it. Partial files of an abandoned transfer (a new leader, a silent one) are removed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from dengine._core import SnapshotAssembler, SnapshotChunk, SnapshotChunker
from dengine.errors import DengineError, StorageError
from dengine.event_loop import cancelling_itself
from dengine.raft import Message, MsgType, Role, SnapshotInfo
from dengine.snapshot_store import SnapshotFile, SnapshotMeta, SnapshotStore
from dengine.transport.codec import ReceivedChunk
from dengine.v1 import raft_pb2, raft_pb2_grpc

if TYPE_CHECKING:
    from dengine.node import Node

__all__ = ["SnapshotManager", "info_of"]

log = logging.getLogger("dengine.snapshot")
T = TypeVar("T")

MAX_CHUNK_BYTES = 16 << 20
"""Chunks stay well below the transport's 64 MiB message limit whatever ``chunk_bytes`` says."""
_RETRY_AFTER_FAILURE_S = 1.0
_POLICY_PERIOD_S = 0.5
# A received snapshot is flushed to disk every this many bytes while it arrives: on virtual
# disks one flush of a whole large file at the end costs about 1 s per GB, spread out it
# overlaps the transfer. On Linux the assembler already sends each megabyte to the disk as it
# arrives (write-behind), and these flushes find little left; elsewhere they do the spreading.
_FLUSH_EVERY_BYTES = 64 << 20


def info_of(snap: SnapshotFile) -> SnapshotInfo:
    """What the Raft core needs to know of a snapshot file."""
    m = snap.meta
    return SnapshotInfo(m.index, m.term, frozenset(m.voters), frozenset(m.learners))


@dataclass(slots=True)
class _Incoming:
    """A snapshot being received: which one, from whom, and the assembler writing it."""

    key: tuple[int, int, int, int, bytes]  # (leader, term, index, log term, sha256)
    assembler: SnapshotAssembler
    last_activity: float


class SnapshotManager:
    """Owns the node's snapshot directory and every snapshot task of one node."""

    def __init__(self, node: Node, directory: Path) -> None:
        self.node = node
        self.cfg = node.config.snapshot
        self.directory = directory
        self.store: SnapshotStore | None = None
        self.latest: SnapshotFile | None = None
        # Snapshot files must outlive the work on them: one pool thread writes or reads a
        # snapshot, the other serves chunks, so a 1 GB snapshot never holds up log syncs.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"dengine-snap-{node.id}")
        self._creating: asyncio.Future[SnapshotFile | None] | None = None
        self._pinned: collections.Counter[Path] = collections.Counter()
        self._senders: dict[int, asyncio.Task[None]] = {}
        self._chunker: tuple[Path, SnapshotChunker] | None = None
        self._incoming: _Incoming | None = None
        # Offers one at a time: two that overlap (an old leader still sending as a new one
        # starts) would each make an assembler, and the one not kept would leave its partial
        # file behind, known to nobody.
        self._offering = asyncio.Lock()
        self._received: dict[Path, SnapshotFile] = {}
        self._to_restore: set[Path] = set()  # received files the core queued for restoring
        self._last_snapshot_at = time.monotonic()
        self._log_dir = Path(node.config.node.data_dir) / "log"
        self._log_bytes_at_snapshot = 0
        self._growth_check: asyncio.Future[None] | None = None
        self._recheck_at = 0  # the applied index before which the log growth is not measured again
        self._tasks: list[asyncio.Task[Any]] = []
        self.created = 0
        self.installed = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run_to_end(
        self, fn: Callable[..., T], *args: Any, stop: Callable[[], None] | None = None
    ) -> T:
        """:meth:`_run` for work on an open snapshot file. Cancelled (the node stopping), it asks
        the work to ``stop`` and waits until the thread returns before the cancel goes on: what
        follows closes the file, and a thread still using a closed descriptor could write into,
        or read from, whatever file is opened next under the same number."""
        work = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if stop is not None:
                stop()
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([work])
            if not work.cancelled():
                work.exception()  # the cancel is what the caller hears; this is only retrieved
            raise

    # --- start and stop -----------------------------------------------------------------------

    async def load_at_start(self) -> SnapshotFile | None:
        """Removes leftovers of a crash, then restores the state machine and the session table
        from the newest snapshot (verified end to end). A corrupt one stops the start."""
        self.store = store = await self._run(SnapshotStore, self.directory)
        removed = await self._run(store.cleanup)
        for path in removed:
            log.info("node %d: removed %s, left over from an interrupted snapshot", self.node.id, path)
        snap = await self._run(lambda: store.latest(verify=True))
        if snap is not None:
            if snap.meta.addresses:
                self.node.members.base_addresses = dict(snap.meta.addresses)
                self.node.members.addresses = dict(snap.meta.addresses)
            began = time.monotonic()
            await self._restore_state(snap)
            log.info(
                "node %d: restored snapshot at index %d (term %d, %d bytes) in %.2f s",
                self.node.id,
                snap.meta.index,
                snap.meta.term,
                snap.size,
                time.monotonic() - began,
                extra=self._fields(snap.meta.index),
            )
        self.latest = snap
        return snap

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._policy_loop(), name=f"snapshot-policy-{self.node.id}"))

    async def stop(self) -> None:
        tasks: list[asyncio.Future[Any]] = [*self._tasks, *self._senders.values()]
        if self._growth_check is not None:
            tasks.append(self._growth_check)
        if self._creating is not None:
            # Awaited with the rest: it waits on the loop for a state being written to the end.
            tasks.append(self._creating)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._senders.clear()
        # A transfer in progress keeps its partial file until the next start cleans it up.
        # Waited for off the loop: a job that goes on after its cancel (an assembler checking a
        # large partial file, a snapshot being hashed) would otherwise hold up every other node
        # and task on it for seconds.
        await asyncio.to_thread(self._pool.shutdown, True)

    # --- creating ---------------------------------------------------------------------------------

    def on_applied(self) -> None:
        """Checks the entry-count policy after each applied batch."""
        every = self.cfg.entries
        raft = self.node.raft
        if not self.cfg.enabled or not every or raft is None or self._creating is not None:
            return
        # Members spread their snapshots (node n waits (n mod 3) / 8 of the interval longer) so
        # that the whole cluster does not write its state and fsync it at the same moment.
        if raft.applied - self._latest_index() < every + every * (self.node.id % 3) // 8:
            return
        if self._log_factor_applies():
            if self._growth_check is None and raft.applied >= self._recheck_at:
                self._growth_check = asyncio.ensure_future(self._create_if_log_grew())
        else:
            self._begin_create()

    def _log_factor_applies(self) -> bool:
        return bool(self.cfg.log_factor) and self.latest is not None

    async def _log_growth(self) -> int | None:
        """Bytes the log grew by since the newest snapshot was taken; None when the log directory
        holds nothing to measure (a log kept in memory, or by a custom engine somewhere else)."""
        size = await self._run(_directory_bytes, self._log_dir)
        return None if size == 0 else size - self._log_bytes_at_snapshot

    def _log_grew_enough(self, grown: int | None) -> bool:
        """The Raft thesis' expansion factor (§5.1.3): a snapshot writes the whole state, so one
        is worth taking once the log has outgrown the last snapshot ``log_factor`` times; with a
        large state, snapshots then cost in proportion to the writes, not to the state. A log
        that cannot be measured is not held back by it (the entry count alone decides): held,
        it would never be compacted again after the first snapshot."""
        latest = self.latest
        return latest is None or grown is None or grown >= self.cfg.log_factor * latest.size

    async def _create_if_log_grew(self) -> None:
        try:
            if self._log_grew_enough(await self._log_growth()):
                self._begin_create()
            elif self.node.raft is not None:
                # Not yet: look again after another eighth of the entry count.
                self._recheck_at = self.node.raft.applied + max(1, self.cfg.entries // 8)
        finally:
            self._growth_check = None

    def _latest_index(self) -> int:
        return self.latest.meta.index if self.latest is not None else 0

    def _begin_create(self) -> asyncio.Future[SnapshotFile | None]:
        # A snapshot that has finished is not one being taken, even while its done-callback
        # (_created, a loop turn later) has yet to clear it: joined, it would answer at once,
        # without yielding, with a snapshot older than entries applied since; and a caller that
        # asks again until the snapshot covers what was applied would spin without ever letting
        # the loop run that callback (a CI run hung so in test_node_snapshots).
        creating = self._creating
        if creating is None or creating.done():
            creating = self._creating = asyncio.ensure_future(self._create())
            creating.add_done_callback(self._created)
        return creating

    def _created(self, fut: asyncio.Future[SnapshotFile | None]) -> None:
        if self._creating is fut:  # not a newer snapshot begun before this callback ran
            self._creating = None
        if not fut.cancelled() and fut.exception() is not None:
            level = logging.ERROR if self.node.running else logging.DEBUG  # not one refused at a stop
            log.log(
                level, "node %d: snapshot failed: %s", self.node.id, fut.exception(), extra=self._fields()
            )

    def _fields(self, index: int | None = None) -> dict[str, object]:
        """Structured log fields: the node's id and term, and the snapshot's index (or the
        node's commit index when the line is about no one snapshot)."""
        fields = self.node._log_fields("snapshot")
        if index is not None:
            fields["index"] = index
        return fields

    async def create(self) -> SnapshotFile | None:
        """Takes a snapshot now (or joins the one being taken); returns the newest snapshot, or
        None when nothing has been applied yet."""
        creating = self._begin_create()
        try:
            await asyncio.shield(creating)
        except asyncio.CancelledError:
            if cancelling_itself() or not creating.cancelled():
                raise
            # The node's stop cancelled the snapshot, not this caller.
            raise DengineError("the node stopped before the snapshot was taken") from None
        return self.latest

    async def _create(self) -> SnapshotFile | None:
        node, store = self.node, self.store
        raft, sm = node.raft, node.sm
        assert raft is not None and store is not None and node.store is not None
        began = time.monotonic()
        async with node.apply_lock:
            if node.failure is not None:
                # The apply that failed may have changed part of the state past raft.applied:
                # a snapshot of it, restored, would apply those entries twice.
                return self.latest
            if not node.running:
                # A stop cancels the apply task, possibly inside an async apply() that has
                # changed part of the state and not yet counted its entry as applied: the same
                # state ahead of raft.applied. The lock, let go by that cancel, must not let a
                # snapshot of it be taken while the node closes.
                raise DengineError("the node is stopping: no snapshot is taken now")
            index = raft.applied
            voters, learners = raft.conf_at(index)
            if index <= self._latest_index() or not voters:
                # Nothing new, or a joining node before the entry that added it: it does not
                # know the configuration at this point yet.
                return self.latest
            # Read before anything is awaited: a snapshot received meanwhile (installed outside
            # the apply lock) resets the log past ``index``, whose term is then gone.
            meta = SnapshotMeta(
                index,
                node.store.term(index),
                tuple(sorted(voters)),
                tuple(sorted(learners)),
                tuple((c, a, i, tuple(r)) for c, a, i, r in node.sessions.items()),
                tuple(node.members.addresses_at(index).items()),
            )
            # The size policy counts growth from here: entries appended while this snapshot is
            # written and the log compacted belong to the next one.
            log_bytes = await self._run(_directory_bytes, self._log_dir)
            writer = await self._run(store.create, meta)
            try:
                begin = getattr(sm, "begin_snapshot", None)
                background: Callable[[Any], None] | None = None
                if callable(begin):
                    background = begin()  # a frozen view: applies may go on while it is written
                elif inspect.iscoroutinefunction(sm.snapshot):
                    await sm.snapshot(writer.sink)
                else:
                    await _awaited(await self._run_to_end(sm.snapshot, writer.sink))
            except BaseException:
                await self._run(writer.abort)
                raise
        try:
            if background is not None:
                await self._run_to_end(background, writer.sink, stop=getattr(background, "cancel", None))
            snap = await self._run_to_end(writer.commit)
        except BaseException:
            await self._run(writer.abort)
            raise
        self._adopt(snap)
        self.created += 1
        elapsed = time.monotonic() - began
        node.metrics.snapshot_done(snap.size, elapsed)
        log.info(
            "node %d: snapshot at index %d (term %d): %d bytes in %.2f s",
            node.id,
            index,
            meta.term,
            snap.size,
            elapsed,
            extra=self._fields(index),
        )
        await self._compact(index, log_bytes)
        return snap

    def _adopt(self, snap: SnapshotFile) -> None:
        if self.latest is None or snap.meta.index > self.latest.meta.index:
            self.latest = snap
        self._last_snapshot_at = time.monotonic()

    async def _compact(self, index: int, log_bytes: int) -> None:
        """Compacts the log up to ``index`` less the trailing entries. ``log_bytes``: the log
        directory's size when the snapshot at ``index`` was taken."""
        node = self.node
        log_store = node.store
        assert log_store is not None
        upto = index - self.cfg.trailing_entries
        freed = 0
        if upto > log_store.first_index() - 1:
            before = await self._run(_directory_bytes, self._log_dir)
            # On the log's own I/O thread: a compaction never races a sync.
            await asyncio.get_running_loop().run_in_executor(node.io, log_store.compact_prefix, upto)
            freed = max(0, before - await self._run(_directory_bytes, self._log_dir))
        # The size policy counts what the log grew by since the snapshot, less what compaction
        # freed (whole segments are only freed once every entry in them is compacted, so the
        # directory rarely shrinks to zero). Measuring only now would count the entries appended
        # meanwhile as old, and a burst that ended then would never trigger the next snapshot.
        self._log_bytes_at_snapshot = log_bytes - freed
        await self._prune()

    async def _prune(self) -> None:
        """Removes old snapshot files. A failure is logged, not raised: it must not undo (or
        stop the node over) the snapshot just taken or installed."""
        store = self.store
        assert store is not None
        pinned = set(self._pinned)
        if self.latest is not None:
            pinned.add(self.latest.path)
        try:
            removed = await self._run(store.prune, self.cfg.keep, pinned)
        except OSError as exc:
            log.warning("node %d: removing old snapshots failed: %s", self.node.id, exc, extra=self._fields())
            return
        for path in removed:
            log.debug("node %d: removed old snapshot %s", self.node.id, path)

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(_POLICY_PERIOD_S)
            try:
                await self._policy_check()
            except Exception:
                # One failed check (a disk error while measuring the log) must not end the loop:
                # without it no size or interval snapshot is ever taken again, the log grows
                # without bound, and abandoned incoming transfers are never dropped.
                log.exception("node %d: snapshot policy check failed", self.node.id, extra=self._fields())

    async def _policy_check(self) -> None:
        """Takes a snapshot if the interval or the size policy says one is due."""
        cfg = self.cfg
        self._drop_stale_incoming()
        raft = self.node.raft
        if not cfg.enabled or raft is None or self._creating is not None:
            return
        if raft.applied <= self._latest_index():
            return  # nothing applied since the newest snapshot
        # The entry count is checked after each applied batch, but not while a snapshot or a log
        # growth check is under way: a count reached then would otherwise wait for a write that
        # may never come.
        self.on_applied()
        if self._creating is not None:
            return
        due = bool(cfg.interval_s) and time.monotonic() - self._last_snapshot_at >= cfg.interval_s
        if not due and cfg.bytes:
            grown = await self._log_growth()
            due = (
                grown is not None
                and grown >= cfg.bytes
                and (not self._log_factor_applies() or self._log_grew_enough(grown))
            )
        if due:
            self._begin_create()

    # --- sending (leader) ---------------------------------------------------------------------------

    def on_snapshot_needed(self, peer: int) -> None:
        """The core found ``peer``'s next entries compacted: send it the newest snapshot."""
        running = self._senders.get(peer)
        if running is None or running.done():
            self._senders[peer] = asyncio.create_task(self._send(peer), name=f"snapshot-to-{peer}")

    def on_leadership_lost(self) -> None:
        for task in self._senders.values():
            task.cancel()
        self._senders.clear()

    def _send_failed(self, peer: int, exc: Exception) -> None:
        """Logs a failed snapshot send, and counts a failed call as a gRPC error."""
        detail = str(exc)
        if isinstance(exc, grpc.aio.AioRpcError):
            detail = exc.details() or exc.code().name
            self.node.metrics.grpc_error("InstallSnapshot/out", exc.code())
        log.warning(
            "node %d: sending a snapshot to node %d failed: %s",
            self.node.id,
            peer,
            detail,
            extra=self._fields(),
        )

    async def _send(self, peer: int) -> None:
        node, snap = self.node, self.latest
        raft = node.raft
        assert raft is not None and node.transport is not None
        ok = False
        began = time.monotonic()
        try:
            if snap is None:
                raise DengineError("no snapshot to send")
            self._pinned[snap.path] += 1
            chunker = await self._chunker_for(snap)
            header = raft_pb2.SnapshotHeader(
                cluster_id=node.config.cluster.id,
                to=peer,
                term=raft.term,
                index=snap.meta.index,
                log_term=snap.meta.term,
                size=chunker.size,
                sha256=chunker.sha256,
                # Lets a follower that has not appended the change that added this node take it.
                conf_index=node.transport.sender.conf_index,
                conf_term=node.transport.sender.conf_term,
                **{"from": node.id},
            )
            async with node.transport.channel(node.transport.peers[peer]) as channel:
                stub = raft_pb2_grpc.RaftStub(channel)  # type: ignore[no-untyped-call]
                offer = await stub.OfferSnapshot(header, timeout=30)
                if offer.term > raft.term:
                    raise DengineError(f"node {peer} is in a newer term {offer.term}")
                if not offer.needed:
                    ok = True
                else:
                    start = offer.next_offset
                    reply = await stub.InstallSnapshot(self._chunks(chunker, header, start))
                    ok = reply.installed
                    if ok:
                        node.metrics.snapshot_sent(chunker.size - start, time.monotonic() - began)
                    log.info(
                        "node %d: sent snapshot at index %d to node %d: %d bytes from offset %d in %.2f s",
                        node.id,
                        snap.meta.index,
                        peer,
                        chunker.size - start,
                        start,
                        time.monotonic() - began,
                        extra=self._fields(snap.meta.index),
                    )
        except asyncio.CancelledError:
            if cancelling_itself():
                raise
            # Not this task: grpc cancels the call when its chunks fail to come (a read error),
            # and keeps the reason. A failed send like any other: the follower must not stay
            # waiting for a snapshot nobody sends.
            log.warning(
                "node %d: sending a snapshot to node %d failed: its chunks stopped",
                node.id,
                peer,
                extra=self._fields(),
            )
        except (grpc.aio.AioRpcError, DengineError, OSError) as exc:
            self._send_failed(peer, exc)
        finally:
            if snap is not None:
                self._unpin(snap.path)
        if not ok:
            await asyncio.sleep(_RETRY_AFTER_FAILURE_S)
        if node.raft is not None and node.raft.role is Role.LEADER and snap is not None:
            node.raft.report_snapshot(peer, snap.meta.index, ok=ok)
            node.pump()

    async def _chunker_for(self, snap: SnapshotFile) -> SnapshotChunker:
        # Hashing a large file takes a while: one chunker per snapshot, shared by every follower.
        if self._chunker is None or self._chunker[0] != snap.path:
            size = max(1, min(self.cfg.chunk_bytes, MAX_CHUNK_BYTES))
            # A hash known from writing or verifying the file spares a whole pass over it.
            chunker = await self._run(SnapshotChunker, snap.path, size, snap.file_sha256)
            self._chunker = (snap.path, chunker)
        return self._chunker[1]

    async def _chunks(
        self, chunker: SnapshotChunker, header: raft_pb2.SnapshotHeader, start: int
    ) -> AsyncIterator[raft_pb2.SnapshotChunk]:
        rate = self.cfg.bandwidth_mb_s * 1e6
        began = time.monotonic()
        size, sent = chunker.size, 0
        loop = asyncio.get_running_loop()

        def read(offset: int) -> asyncio.Future[SnapshotChunk] | None:
            return loop.run_in_executor(self._pool, chunker.chunk_at, offset) if offset < size else None

        # The next chunk is read from disk while the current one is on the wire.
        ahead = read(start)
        while ahead is not None:
            chunk = await ahead
            ahead = read(chunk.offset + len(chunk.data))
            yield raft_pb2.SnapshotChunk(
                header=header, offset=chunk.offset, data=chunk.data, crc32c=chunk.crc32c
            )
            sent += len(chunk.data)
            if rate:
                early = sent / rate - (time.monotonic() - began)
                if early > 0:
                    await asyncio.sleep(early)

    # --- receiving (follower) ---------------------------------------------------------------------

    async def offer(self, h: raft_pb2.SnapshotHeader) -> raft_pb2.SnapshotOfferResponse:
        """A leader announces a snapshot: say whether it is needed and from where to send it."""
        async with self._offering:
            return await self._offer(h)

    async def _offer(self, h: raft_pb2.SnapshotHeader) -> raft_pb2.SnapshotOfferResponse:
        raft, store = self.node.raft, self.store
        assert raft is not None and store is not None
        if h.term < raft.term or h.index <= raft.commit:
            return raft_pb2.SnapshotOfferResponse(term=raft.term, needed=False)
        key = (getattr(h, "from"), h.term, h.index, h.log_term, bytes(h.sha256))
        inc = self._incoming
        if inc is not None and inc.key != key:
            await self._abandon("another snapshot was offered")
            inc = None
        if inc is None:
            path = store.incoming_path(h.index, h.log_term)
            making = asyncio.get_running_loop().run_in_executor(
                self._pool, SnapshotAssembler, path, h.size, bytes(h.sha256)
            )
            try:
                assembler = await asyncio.shield(making)
            except asyncio.CancelledError:
                # The offer's call went away: the assembler is made all the same, and is aborted
                # once it is, rather than left with its files and nobody to abandon it.
                making.add_done_callback(self._abort_unkept)
                raise
            inc = self._incoming = _Incoming(key, assembler, time.monotonic())
        else:
            # The leader is still at it (each stream of a slow transfer starts with an offer):
            # not a transfer gone silent.
            inc.last_activity = time.monotonic()
        next_offset = await self._run(lambda: inc.assembler.next_offset)
        return raft_pb2.SnapshotOfferResponse(term=raft.term, needed=True, next_offset=next_offset)

    async def _write_stream(
        self, chunks: AsyncIterator[ReceivedChunk]
    ) -> tuple[_Incoming | None, raft_pb2.SnapshotHeader | None]:
        """Writes a stream of chunks through the offered snapshot's assembler; returns it and the
        stream's header (None for an empty stream)."""
        inc: _Incoming | None = None
        header: raft_pb2.SnapshotHeader | None = None
        loop = asyncio.get_running_loop()
        # Each chunk is written while the next one arrives; writes still happen one at a time,
        # in order. What has arrived is flushed to disk now and then on the pool's other thread,
        # so that the last flush (before the reply) stays short.
        writing: asyncio.Future[None] | None = None
        flushing: asyncio.Future[None] | None = None
        unflushed = 0
        try:
            async for c in chunks:
                h = c.header
                key = (getattr(h, "from"), h.term, h.index, h.log_term, bytes(h.sha256))
                if inc is None:
                    inc, header = self._incoming, h
                    if inc is None or inc.key != key:
                        raise ValueError("chunks of a snapshot that was not offered (or was abandoned)")
                elif inc.key != key:
                    raise ValueError("chunks of two different snapshots in one stream")
                if writing is not None:
                    await writing
                writing = loop.run_in_executor(
                    self._pool, inc.assembler.accept_slice, c.buffer, c.start, c.length, c.offset, c.crc32c
                )
                inc.last_activity = time.monotonic()
                unflushed += c.length
                if unflushed >= _FLUSH_EVERY_BYTES and (flushing is None or flushing.done()):
                    if flushing is not None:
                        await flushing  # raises what a failed flush raised
                    flushing = loop.run_in_executor(self._pool, inc.assembler.flush_received)
                    unflushed = 0
        finally:
            if writing is not None:
                await writing
            if flushing is not None:
                await flushing
        return inc, header

    async def receive(self, chunks: AsyncIterator[ReceivedChunk]) -> raft_pb2.InstallSnapshotResponse:
        """Writes the offered snapshot's chunks; once complete and verified, hands it to the core.
        Raises ValueError for chunks that do not belong to the offered snapshot."""
        node, store = self.node, self.store
        raft = node.raft
        assert raft is not None and store is not None
        inc, header = await self._write_stream(chunks)
        if inc is None or header is None:
            raise ValueError("an empty snapshot stream")
        if not await self._run(lambda: inc.assembler.is_complete):
            return raft_pb2.InstallSnapshotResponse(term=raft.term, installed=False)
        if self._incoming is inc:  # not a newer offer that arrived meanwhile
            self._incoming = None
        try:
            path = Path(await self._run(inc.assembler.finish))
            snap = await self._run(lambda: store.load(path, verify=False))
        except Exception:
            await self._run(inc.assembler.abort)
            raise
        if (snap.meta.index, snap.meta.term) != (header.index, header.log_term):
            raise ValueError(
                f"the snapshot's metadata says index {snap.meta.index} term {snap.meta.term}, "
                f"the offer said index {header.index} term {header.log_term}"
            )
        self._received[path] = snap
        self._pinned[path] += 1
        try:
            raft.step(
                Message(
                    MsgType.SNAPSHOT, getattr(header, "from"), node.id, header.term, snapshot=info_of(snap)
                )
            )
            node.pump()
        except StorageError as exc:
            # The log failed under the install (its reset to the snapshot): like every other
            # entry point that drives the core, fail-stop, rather than hand the error to gRPC
            # and go on with a log in an unknown state.
            self._unpin(path)
            self._received.pop(path, None)
            node._storage_failed(exc)
            return raft_pb2.InstallSnapshotResponse(term=raft.term, installed=False)
        if path not in self._to_restore:
            # The core did not take it (a leader of an old term, or this node's log reaches it
            # already): nothing will restore it, so it must not stay pinned and in memory.
            self._unpin(path)
            self._received.pop(path, None)
        return raft_pb2.InstallSnapshotResponse(term=raft.term, installed=True)

    def restore_queued(self, info: SnapshotInfo) -> None:
        """The core queued ``info`` to be restored (``Ready.restore``)."""
        if self.store is not None:
            self._to_restore.add(self.store.incoming_path(info.index, info.term))

    def _unpin(self, path: Path) -> None:
        if self._pinned.get(path, 0) > 0:
            self._pinned[path] -= 1
            if self._pinned[path] <= 0:
                del self._pinned[path]

    async def restore(self, info: SnapshotInfo) -> None:
        """Replaces the state machine with the received snapshot the core accepted."""
        store = self.store
        assert store is not None
        began = time.monotonic()
        path = store.incoming_path(info.index, info.term)
        snap = self._received.pop(path, None)
        if snap is None:  # not received in this process: verify it before trusting it
            snap = await self._run(lambda: store.load(path, verify=True))
        try:
            await self._restore_state(snap)
        finally:
            self._to_restore.discard(path)
            self._unpin(path)
        if snap.meta.addresses:
            self.node.members.restored(dict(snap.meta.addresses))
        self._adopt(snap)
        self.installed += 1
        elapsed = time.monotonic() - began
        self.node.metrics.snapshot_done(snap.size, elapsed)
        log.info(
            "node %d: installed snapshot at index %d (term %d) from the leader in %.2f s",
            self.node.id,
            info.index,
            info.term,
            elapsed,
            extra=self._fields(info.index),
        )
        await self._prune()

    async def _restore_state(self, snap: SnapshotFile) -> None:
        store, sm = self.store, self.node.sm
        assert store is not None
        source = await self._run(store.open_data, snap)
        try:
            if inspect.iscoroutinefunction(sm.restore):
                await sm.restore(source)
            else:
                await _awaited(await self._run_to_end(sm.restore, source))
        finally:
            source.close()
        self.node.sessions.restore(snap.meta.sessions)

    def _drop_stale_incoming(self) -> None:
        inc, raft = self._incoming, self.node.raft
        if inc is None or raft is None:
            return
        idle = time.monotonic() - inc.last_activity
        if raft.term > inc.key[1] or idle > max(10.0, 4 * self.node.config.raft.election_timeout_ms / 1000):
            task = asyncio.ensure_future(self._abandon("its leader moved on or went silent"))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    def _abort_unkept(self, making: asyncio.Future[SnapshotAssembler]) -> None:
        if making.cancelled() or making.exception() is not None:
            return
        with contextlib.suppress(RuntimeError):  # the pool is shut down: the next start cleans up
            self._pool.submit(making.result().abort)

    async def _abandon(self, why: str) -> None:
        inc, self._incoming = self._incoming, None
        if inc is not None:
            log.info("node %d: abandoned a snapshot transfer (%s)", self.node.id, why)
            await self._run(inc.assembler.abort)


def _directory_bytes(path: Path) -> int:
    total = 0
    if not path.is_dir():
        return 0  # an in-memory or custom log store keeps nothing there
    with os.scandir(path) as it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                # The log renamed or removed it since the listing (a preallocated segment put in
                # place, a compacted one deleted): it is counted under its new name, or gone.
                continue
    return total


async def _awaited(result: object) -> None:
    """Awaits what a state machine's ``snapshot`` or ``restore`` returned, if it is awaitable: a
    plain function may return a coroutine (a decorator, a dispatcher), and the protocol allows
    an awaitable; left alone, the snapshot would be written empty, or the state never restored."""
    if inspect.isawaitable(result):
        await result
