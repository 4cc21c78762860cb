"""The node runtime: one asyncio event loop driving the pure Raft core over gRPC and a real disk.

Everything the core asks for happens here: ticks on a timer, messages through the peer transport,
log syncs on an I/O thread (the Rust store releases the GIL, so the loop keeps running), committed
entries applied in order to the user's state machine, and proposals and reads resolved for their
callers. Nothing blocks the loop: the only slow operations (fsync) run off it.

Rule for failing commands: if the state machine's ``apply`` raises, the entry still counts as
applied on every replica (they all raise alike, since ``apply`` is deterministic), the proposer
gets :class:`~dengine.errors.ApplyError` carrying the message, and the node keeps running.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import inspect
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc

from dengine import _core, apply_thread, identity
from dengine._core import Entry, EntryBatch
from dengine.cluster_service import ClusterService, add_cluster_service
from dengine.errors import (
    ApplyError,
    DengineError,
    LeaderOverloadedError,
    LeadershipTransferError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDroppedError,
    StorageError,
)
from dengine.event_loop import running_loop_name
from dengine.identity import Identity
from dengine.kv import KVStateMachine
from dengine.log_sync import LogSyncer
from dengine.members import MembershipManager
from dengine.metrics import MetricsServer, NodeMetrics, serve_metrics
from dengine.proposals import Proposal, Waiter, WriteGroup
from dengine.raft import Raft, ReadState, Role, SnapshotInfo, SoftState
from dengine.raft import payload as envelope
from dengine.raft.membership import ConfOp
from dengine.raft.progress import ProgressState
from dengine.raft.sessions import (
    ANSWERED_OUTCOMES,
    Answer,
    Outcome,
    SessionTable,
    apply_committed,
    apply_entry_async,
)
from dengine.removal import RemovalWatch
from dengine.snapshot_store import SnapshotFile
from dengine.snapshotting import SnapshotManager, info_of
from dengine.state_machine import StateMachine
from dengine.storage import (
    LogStore,
    MemoryLogStore,
    WalLogStore,
    guarded,
    open_custom_log_store,
)
from dengine.transport.codec import Sender
from dengine.transport.peers import GRPC_OPTIONS, MAX_MESSAGE_BYTES, PeerTransport, add_raft_service

if TYPE_CHECKING:
    from dengine.config import Config
    from dengine.raft.config import RaftConfig
    from dengine.tls import NodeTLS

__all__ = ["Node", "NodeStatus", "PeerInfo"]

log = logging.getLogger("dengine.node")
T = TypeVar("T")
# How long a new commit index may wait for an append to carry it before the leader sends it on
# its own. Under load the next append comes first: at 2 ms it did not, since the clients' own
# turn (answers out, the next batch in) takes longer, and an announcement followed nearly every
# batch, 43% of the peer messages at write-sat. An idle cluster's followers apply up to 20 ms
# later; a linearizable read on a follower gets the commit index from its own heartbeat round.
_ANNOUNCE_DELAY_S = 0.020
Consistency = Literal["linearizable", "lease", "stale"]


_UNKNOWN = "{}; the write's outcome is unknown: it may still be applied"


def _copy_refusal(exc: NotLeaderError | ProposalDroppedError) -> Exception:
    # One exception object per waiting caller: tracebacks must not be shared between them.
    if isinstance(exc, NotLeaderError):
        return NotLeaderError(exc.leader, str(exc))
    if isinstance(exc, LeaderOverloadedError):
        return LeaderOverloadedError(exc.held, exc.size, exc.limit)
    return ProposalDroppedError(str(exc))


@dataclass(frozen=True, slots=True)
class PeerInfo:
    id: int
    address: str
    match: int
    lag: int
    inflight: int
    state: str


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A snapshot of what this node knows, for ``dengine status`` and the Cluster service."""

    id: int
    cluster_id: str
    address: str
    role: str
    term: int
    leader: int | None
    commit: int
    applied: int
    first_index: int
    last_index: int
    voters: tuple[int, ...]
    learners: tuple[int, ...]
    peers: tuple[PeerInfo, ...] = field(default_factory=tuple)
    snapshot_index: int = 0


APPLY_CHUNK = 512
"""Committed entries applied between two turns of the event loop (see ``Node._apply_chunks``)."""

MAX_COMMAND_BYTES = MAX_MESSAGE_BYTES - (1 << 20)
"""Largest command a node proposes: an entry must fit one peer message, with room to spare for
the entry's framing and the message's other fields."""
_SESSION_HEAD = envelope.SESSION_HEADER
_STALE_CODE = ANSWERED_OUTCOMES.index(Outcome.STALE)
_SESSION_KIND = envelope.SESSION_KIND


def join_marker(config: Config) -> Path:
    """The file whose presence says this node joined a running cluster (``--join``)."""
    return Path(config.node.data_dir) / "joined"


def log_dir(config: Config) -> Path:
    """Where the node's log store keeps the log."""
    return Path(config.node.data_dir) / "log"


def snapshot_dir(config: Config) -> Path:
    """Where the node keeps its snapshots."""
    return Path(config.node.data_dir) / "snapshots"


def node_raft_config(config: Config) -> RaftConfig:
    """The Raft core's configuration for this node. A node that joined a running cluster knows no
    configuration of its own: it learns the cluster's from the log or a snapshot, never from its
    config file."""
    raft_config = config.raft_config()
    if join_marker(config).exists():
        raft_config = dataclasses.replace(raft_config, voters=frozenset(), learners=frozenset())
    return raft_config


def log_needs_reset_to(store: LogStore, snapshot: SnapshotInfo) -> bool:
    """Whether the log does not continue ``snapshot`` yet: a crash came after a received snapshot
    was stored but before the log was reset to it, and the reset is still to be done."""
    return snapshot.index > store.last_index() or store.term(snapshot.index) != snapshot.term


def open_node_log(config: Config) -> LogStore:
    """Opens the log store ``config`` names (``storage.engine``) in the node's data directory.
    The built-in WAL refuses a directory another process has open."""
    storage = config.storage
    if storage.engine == "memory":
        return MemoryLogStore()
    path = log_dir(config)
    if storage.engine == "file":
        return WalLogStore(path, segment_bytes=storage.segment_bytes, preallocate=storage.preallocate)
    engine = storage.load_log_store_class()
    return open_custom_log_store(storage.engine, engine, path)


class Node:
    """One dengine node, embedded in an asyncio program::

    async with Node(Config.load("node1.toml"), state_machine=Counter()) as node:
        result = await node.propose(b"incr")
        n = await node.read(lambda sm: sm.n)
    """

    # The loop the node runs on, and its thread, set by start(). Asked once: asyncio.get_running_loop()
    # makes a getpid() system call each time on CPython 3.11 (its check for a forked process),
    # 0.39 us a call here against 0.19 us for creating the future itself.
    _loop: asyncio.AbstractEventLoop
    _loop_thread: int
    # Metrics bookkeeping: how many of _pending are proposed again (counted already when first
    # proposed), the peers with per-peer series, and the commit index the metrics show.
    _pending_resent = 0
    _peer_series: frozenset[int] = frozenset()
    _commit_shown = 0

    def __init__(
        self,
        config: Config,
        state_machine: StateMachine,
        *,
        log_store: LogStore | None = None,
        extra_services: Callable[[grpc.aio.Server, Node], None] | None = None,
        join: str | None = None,
    ) -> None:
        """``join``: the address of any member of a running cluster this new node asks to be
        added to (as a learner); it then learns the cluster's configuration from the leader."""
        self.config = config
        self.id = config.node.id
        self.sm = state_machine
        self._store_override = log_store
        self._join = join
        self._join_marker = join_marker(config)
        self._tls: NodeTLS | None = None
        self._extra_services = extra_services
        self._async_apply = inspect.iscoroutinefunction(state_machine.apply)
        self.raft: Raft | None = None
        self.store: LogStore | None = None
        self.server: grpc.aio.Server | None = None
        self.transport: PeerTransport | None = None
        self.sessions = SessionTable()
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dengine-io-{self.id}")
        self._tasks: list[asyncio.Task[None]] = []
        # From the OS, not the random module (see dengine.Client): a process that seeds it and
        # restarts would reuse its sequences under the same id, and get old results back.
        self._client_id = secrets.randbits(62) + 1
        # This node's last sequence, and its lowest one that may still be waiting (every lower
        # one was answered).
        self._seq, self._local_low = 0, 1
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self._removal = RemovalWatch(self.id, self.config.raft.election_timeout_ms / 1000)
        self._leaving: asyncio.TimerHandle | None = None  # the stop of a node that left
        # Proposals someone waits for, by (client id, sequence); what the apply loop answers.
        self._waiters: dict[tuple[int, int], Proposal] = {}
        self._resubmitted_for: tuple[int, int | None] = (0, None)
        self._proposed_again_at = 0.0  # time.monotonic() of the last _propose_again
        # (last index, time proposed, count) of batches proposed here as leader, oldest first:
        # what the propose-to-commit histogram measures.
        self._commit_clock: collections.deque[tuple[int, float, int]] = collections.deque()
        self._read_ctx = 0
        # The clock ticks are counted against (replaceable in tests, to model a paused process).
        self._clock: Callable[[], float] = time.monotonic
        self._next_tick_at = math.inf  # no tick before the ticker starts
        self._reads: dict[int, asyncio.Future[None]] = {}
        self._syncer: LogSyncer | None = None
        # The built-in store's apply thread, made on first use; False where there can be none.
        self._apply_thread: apply_thread.ApplyThread | Literal[False] | None = None
        self._apply_queue: asyncio.Queue[Sequence[Entry] | SnapshotInfo] = asyncio.Queue()
        self._apply_busy = False  # the apply task holds an item it took from the queue
        self._announce_timer: asyncio.TimerHandle | None = None
        self._announce_for = 0  # the commit index the announce timer was armed for
        # Held while a batch is applied: a snapshot freezes the state between two batches.
        self.apply_lock = asyncio.Lock()
        # Clear while an entry is half applied or a snapshot half restored (see _state_settled).
        self._settled, self._settle_waiters = _set_event(), 0
        self.snapshots = SnapshotManager(self, snapshot_dir(config))
        self.members = MembershipManager(self)
        self._start_snapshot: SnapshotInfo | None = None
        self._stopped = asyncio.Event()
        self.failure: str | None = None
        """Why the node stopped by itself (a storage or apply failure, its removal), once it has."""
        self._running = False
        self._release: asyncio.Future[None] | None = None
        self.leader_changes = 0
        self.metrics = NodeMetrics(self.id, config.cluster.id)
        self._metrics_server: MetricsServer | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _open_store(self) -> LogStore:
        store = self._store_override
        if store is None:
            return open_node_log(self.config)
        # A store object the program hands over is guarded like a configured custom engine: a
        # failure of any of its methods stops the node instead of breaking a loop callback.
        return guarded(store)

    async def start(self) -> None:
        """Opens the log, restores the newest snapshot, starts serving peers (and any extra
        services) and begins ticking."""
        self._loop = loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.store = await loop.run_in_executor(self.io, self._open_store)
        try:
            await self._continue_log_after(await self.snapshots.load_at_start())
            await self._start_serving()
        except BaseException:
            # Leave nothing behind (the data dir lock above all) so that a corrected retry works.
            if self.server is not None:
                await self.server.stop(grace=0)
            if self._syncer is not None:
                await self._syncer.close()
            await self.snapshots.stop()
            await loop.run_in_executor(self.io, self.store.close)
            raise
        self._running = True
        self.snapshots.start()
        if (
            self._join is not None
            and self.raft is not None
            and not (self.raft.conf.voters | self.raft.learners)
        ):
            advertise = self.config.node.advertise or self.config.node.listen
            self._tasks.append(
                asyncio.create_task(
                    self.members.join(self._join, advertise, credentials=self._channel_credentials()),
                    name=f"join-{self.id}",
                )
            )
        self._tasks.append(asyncio.create_task(self._ticker(), name=f"ticker-{self.id}"))
        self._tasks.append(asyncio.create_task(self._apply_loop(), name=f"apply-{self.id}"))
        loop_name = running_loop_name()
        log.info(
            "node %d listening on %s (cluster %s, event loop %s)",
            self.id,
            self.config.node.listen,
            self.config.cluster.id,
            loop_name,
        )
        if self.config.node.event_loop not in ("auto", loop_name):
            log.warning(
                "node.event_loop is %r, but node %d runs on the %s loop its program started: "
                "the key chooses the loop of dengine serve; a program that embeds a node runs it "
                "with dengine.event_loop.run(..., loop=%r)",
                self.config.node.event_loop,
                self.id,
                loop_name,
                self.config.node.event_loop,
            )
        self.pump()

    async def _continue_log_after(self, snap: SnapshotFile | None) -> None:
        """Makes the log continue the snapshot the node restarts from (if any)."""
        store = self.store
        assert store is not None
        first = store.first_index()
        if snap is None:
            if first > 1:
                raise DengineError(
                    f"the log starts after index {first - 1} but {self.snapshots.directory} holds no "
                    "snapshot: entries in between are missing"
                )
            return
        info = self._start_snapshot = info_of(snap)
        if first - 1 > info.index:
            raise DengineError(
                f"the log starts after index {first - 1} but the newest snapshot "
                f"({snap.path}) ends at {info.index}: entries in between are missing"
            )
        if log_needs_reset_to(store, info):
            # The crash came after a received snapshot was stored but before the log was reset
            # to it: finish what the install began.
            await asyncio.get_running_loop().run_in_executor(self.io, store.reset, info.index, info.term)

    async def _start_serving(self) -> None:
        assert self.store is not None
        # Only a node with nothing on disk joins; --join given again to a member that already
        # holds data (an original member, or a joined one restarting) changes nothing.
        fresh = self.store.last_index() == 0 and self._start_snapshot is None
        if self._join is not None and fresh and not self._join_marker.exists():
            await asyncio.get_running_loop().run_in_executor(self.io, _write_marker, self._join_marker)
        raft_config = node_raft_config(self.config)
        self.raft = Raft(raft_config, self.store, seed=secrets.randbits(32), snapshot=self._start_snapshot)
        # Before this node can vote or send anything: is the data dir its own?
        await self._refuse_lost_data(fresh)
        await asyncio.get_running_loop().run_in_executor(self.io, self._claim_data_dir)
        self._syncer = LogSyncer(
            self.store, self.io, self._on_synced, self._on_sync_failed, self.metrics.observe_fsync
        )
        members = dict(self.members.addresses)
        self.transport = PeerTransport(
            self.id,
            self.config.cluster.id,
            members,
            self._on_message,
            channel_credentials=self._channel_credentials if self.config.tls.enabled else None,
        )
        self.transport.snapshots = self.snapshots
        self.transport.on_unknown_to = self._refused_as_unknown
        self.transport.takes_outsider = self._takes_outsider
        self.transport.on_grpc_error = self.metrics.grpc_error
        # No SO_REUSEPORT (grpc's default): a second node given a port already in use must fail
        # to start, not share it and answer half the requests with another cluster's state.
        self.server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
        add_raft_service(self.server, self.transport)
        add_cluster_service(self.server, ClusterService(self))
        if self._extra_services is not None:
            self._extra_services(self.server, self)
        listen = self.config.node.listen
        creds = self._server_credentials()
        try:
            port = (
                self.server.add_secure_port(listen, creds)
                if creds is not None
                else self.server.add_insecure_port(listen)
            )
        except RuntimeError as exc:  # grpc 1.85 raises where older versions returned 0
            raise DengineError(f"cannot listen on {listen} (node.listen): {exc}") from None
        if port == 0:
            raise DengineError(f"cannot listen on {listen} (node.listen)")
        await self.server.start()
        if self.config.node.metrics_listen:
            host, _, port = self.config.node.metrics_listen.rpartition(":")
            try:
                self._metrics_server = await serve_metrics(
                    self.metrics, host.strip("[]"), int(port), readiness=self.readiness
                )
            except OSError as exc:
                raise DengineError(
                    f"cannot serve metrics on {self.config.node.metrics_listen}: {exc.strerror or exc}"
                ) from exc
        self.transport.start()

    def _tls_files(self) -> NodeTLS | None:
        """The node's TLS files, loaded once and read again when they change (None: no TLS)."""
        tls = self.config.tls
        if not tls.enabled:
            return None
        if self._tls is None:
            from dengine.tls import NodeTLS  # noqa: PLC0415 - optional feature

            self._tls = NodeTLS(
                tls.cert_file,
                tls.key_file,
                tls.ca_file,
                require_client_auth=tls.client_auth,
                on_load=lambda expiry: self.metrics.set_tls_expiry(expiry.timestamp()),
            )
        return self._tls

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        files = self._tls_files()
        return None if files is None else files.server_credentials()

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        files = self._tls_files()
        return None if files is None else files.channel_credentials()

    async def stop(self, *, transfer_leadership: bool = True) -> None:
        """Stops gracefully: hands leadership to another voter first when possible, then stops
        serving, flushes the log and closes it. A restart on the same data dir recovers. After a
        fail-stop (a storage failure), waits until everything the node held is released."""
        if self._release is not None:
            await asyncio.shield(self._release)
            return
        if not self._running:
            return
        raft = self.raft
        assert raft is not None and self.store is not None
        if transfer_leadership and raft.role is Role.LEADER and len(raft.conf.voters) > 1:
            try:
                successor = await self.move_leader(timeout=self.config.raft.election_timeout_ms / 1000)
                log.info("node %d: handed leadership to node %d before stopping", self.id, successor)
            except DengineError as exc:
                log.info("node %d: no leadership transfer before stopping: %s", self.id, exc)
        if self._release is not None or not self._running:
            # A fail-stop, or another stop(), while the leadership was being handed over.
            if self._release is not None:
                await asyncio.shield(self._release)
            return
        self._running = False
        self._release = asyncio.ensure_future(self._release_everything("the node stopped"))
        await asyncio.shield(self._release)
        log.info("node %d stopped", self.id)

    async def _release_everything(self, why: str) -> None:
        """Stops serving and closes the log, the transport and every task; fails what still
        waits with ``why``. Once, whether the node stops or fail-stops."""
        assert self.store is not None and self.transport is not None and self.server is not None
        if self._announce_timer is not None:
            self._announce_timer.cancel()
        if self._leaving is not None:
            self._leaving.cancel()
        tasks = [*self._tasks, *self.members.tasks()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        store, server = self.store, self.server
        # Serving stops first: a snapshot still being written can take seconds to finish, and
        # meanwhile peers and clients must see a node that is gone, not one that takes their
        # requests and drops them.
        steps: list[Callable[[], Awaitable[object]]] = [lambda: server.stop(grace=0.2), self.snapshots.stop]
        if self._syncer is not None:
            steps.append(self._syncer.close)
        if self._apply_thread:
            steps.append(self._close_apply_thread)
        steps.append(self.transport.close)
        if self._metrics_server is not None:
            steps.append(self._metrics_server.close)
        steps.append(lambda: asyncio.get_running_loop().run_in_executor(self.io, store.close))
        for step in steps:
            try:
                await step()
            except Exception:
                # After a storage failure the store may fail to close too: the rest still goes.
                log.exception("node %d: error while releasing its resources", self.id)
        self.io.shutdown(wait=True)
        self._fail_everything_waiting(why)
        self._stopped.set()

    def _fail_everything_waiting(self, why: str) -> None:
        for key in list(self._waiters):
            self._fail_waiters(key, lambda: OutcomeUnknownError(_UNKNOWN.format(why)), "unknown")
        for rf in self._reads.values():
            if not rf.done():
                rf.set_exception(DengineError(why))

    async def wait_stopped(self) -> None:
        """Returns once the node has stopped and released everything: after :meth:`stop`, or
        after a fail-stop (``failure`` then says why)."""
        await self._stopped.wait()

    # --- inputs to the core -----------------------------------------------------------------------

    async def _ticker(self) -> None:
        self._next_tick_at = self._clock() + self.config.raft.tick_ms / 1000
        while True:
            await asyncio.sleep(max(0.0, self._next_tick_at - self._clock()))
            self._run_due_ticks()

    def _run_due_ticks(self) -> None:
        """Runs every tick whose time has come, all at once. The core measures time in ticks,
        and a pause of the whole process (SIGSTOP, a frozen VM, a long GC) stops them: the ticks
        it slept through must run before anything is judged by them. Above all a leader's lease,
        which would otherwise look fresh to a leader that slept through its successor's
        election. So this also runs before a lease read and before each peer message, and tells
        the core when it ran several at once (``Raft.note_pause``)."""
        raft = self.raft
        now = self._clock()
        if raft is None or not self._running or now < self._next_tick_at:
            return
        interval = self.config.raft.tick_ms / 1000
        periodic = False
        ran = 0
        try:
            while self._next_tick_at <= now:
                self._next_tick_at += interval
                raft.tick()
                ran += 1
                periodic = periodic or raft.ticks_since_start % 10 == 0
            if ran > 1:
                raft.note_pause(ran)
            self.pump()
        except StorageError as exc:
            self._storage_failed(exc)
            return
        if periodic:
            self.members.expire()
            if raft.role is Role.LEADER:
                self._update_peer_metrics()
                self.members.tick()
            if self._waiters:
                self._propose_again()

    def _update_peer_metrics(self) -> None:
        peers = self.status().peers
        for p in peers:
            self.metrics.set_peer(p.id, p.match, p.lag, p.inflight)
        current = frozenset(p.id for p in peers)
        for gone in self._peer_series - current:
            self.metrics.remove_peer(gone)  # it left the cluster: no series frozen at its last values
        self._peer_series = current

    def _on_message(self, m: Any) -> None:
        assert self.raft is not None
        if not self._running:
            return
        if self._removal.watching:
            self._removal.heard_from(m.src)
        self._run_due_ticks()
        try:
            self.raft.step(m)
            self.pump()
        except StorageError as exc:
            self._storage_failed(exc)

    # --- proposals --------------------------------------------------------------------------------

    async def propose(self, command: bytes, *, timeout: float | None = None) -> bytes:
        """Replicates ``command`` and returns what ``apply`` returned for it, once it is committed
        and applied on this node. Proposals made together are batched into one append."""
        fut, key = self._submit(command)
        if timeout is not None:
            return await self._wait(fut, key, timeout)
        try:  # awaited here rather than through _wait: one coroutine less on the hot path
            return await fut
        except BaseException:
            self._gave_up(fut, key)
            raise

    async def propose_session(
        self,
        client_id: int,
        sequence: int,
        command: bytes,
        *,
        first_outstanding: int = 0,
        timeout: float | None = None,
    ) -> bytes:
        """Like :meth:`propose` for a client with its own session: a retry with the same
        ``(client_id, sequence)``, through this node or any other, is applied once and answered
        with the first result (Raft thesis §6.3)."""
        fut = self.submit_session(client_id, sequence, command, first_outstanding)
        return await self._wait(fut, (client_id, sequence), timeout)

    async def _wait(self, fut: asyncio.Future[bytes], key: tuple[int, int], timeout: float | None) -> bytes:
        try:
            return await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
        except BaseException:
            self._gave_up(fut, key)
            raise

    def _gave_up(self, fut: asyncio.Future[bytes], key: tuple[int, int]) -> None:
        if not fut.done() or fut.cancelled():
            self._forget(fut, key)

    def submit(self, command: bytes) -> asyncio.Future[bytes]:
        """:meth:`propose` without the coroutine: returns the future of the result at once, for
        callers that propose many commands together and await them all. A caller that gives up
        waiting cancels the future; the command may still be applied."""
        return self._submit(command)[0]

    def _submit(self, command: bytes) -> tuple[asyncio.Future[bytes], tuple[int, int]]:
        if not self._running or _thread_id() != self._loop_thread or len(command) > MAX_COMMAND_BYTES:
            self._check_submission(command)  # one test on the hot path; this one says what is wrong
        self._seq = seq = self._seq + 1
        client, low, waiters = self._client_id, self._local_low, self._waiters
        # Sequences no longer waiting were answered (or given up); sequences only grow, so the
        # lowest one still waiting only moves up.
        while low < seq and (client, low) not in waiters:
            low += 1
        self._local_low = low
        key = (client, seq)
        fut: asyncio.Future[bytes] = self._loop.create_future()
        # The envelope of session_command, packed directly: this node's ids are valid by construction.
        payload = _SESSION_HEAD.pack(_SESSION_KIND, client, seq, low) + command
        # _enqueue inlined (this runs for every embedded write): a new sequence has no waiter yet.
        waiters[key] = Proposal(payload, time.monotonic(), fut)
        self._pending.append(payload)
        if not self._flush_scheduled:
            self._schedule_flush()
        return fut, key

    def _check_submission(self, command: bytes) -> None:
        """Refuses, before anything is proposed, what could never be answered."""
        if not self._running:
            raise DengineError(self.failure or "the node is not running")
        self._check_loop_thread("propose")
        if len(command) > MAX_COMMAND_BYTES:
            # It could never reach a follower (one peer message): never committed, never failed.
            raise ValueError(
                f"a command of {len(command)} bytes is larger than the {MAX_COMMAND_BYTES} bytes "
                "a node replicates in one entry"
            )

    def _check_loop_thread(self, what: str) -> None:
        if not self._running:
            raise DengineError(self.failure or "the node is not running")  # (no loop thread yet)
        if _thread_id() != self._loop_thread:
            # Its future would belong to the node's loop: the caller's await fails, and a
            # proposal is applied all the same (a retry would apply it twice).
            raise DengineError(
                f"{what} from a thread other than the node's event loop's: use "
                f"asyncio.run_coroutine_threadsafe(node.{what}(...), loop) with the node's loop"
            )

    def submit_session(
        self, client_id: int, sequence: int, command: bytes, first_outstanding: int = 0
    ) -> asyncio.Future[bytes]:
        """:meth:`propose_session` without the coroutine (see :meth:`submit`)."""
        self._check_submission(command)
        fut: asyncio.Future[bytes] = self._loop.create_future()
        wrapped = envelope.session_command(client_id, sequence, command, min(first_outstanding, sequence))
        self._enqueue((client_id, sequence), wrapped, fut, time.monotonic())
        return fut

    def submit_group(self, keys: list[tuple[int, int]], payloads: list[bytes]) -> WriteGroup:
        """Proposes session writes together, ``keys[i]`` being ``(client id, sequence)`` of the
        session envelope ``payloads[i]`` already wraps; the group's future gives one answer per
        write. A caller that gives up calls :meth:`forget_group`."""
        if not self._running:
            raise DengineError(self.failure or "the node is not running")
        group = WriteGroup(len(keys), self._loop)
        now = time.monotonic()
        for key, payload, slot in zip(keys, payloads, group.slots, strict=True):
            self._enqueue(key, payload, slot, now)
        return group

    def forget_group(self, keys: list[tuple[int, int]], group: WriteGroup) -> None:
        """Nobody waits for ``group`` any more (see :meth:`_forget`). A group answered in full
        has no slot left waiting."""
        if group.slots:
            for key, slot in zip(keys, group.slots, strict=True):
                self._forget(slot, key)
            group.release()

    def _enqueue(self, key: tuple[int, int], payload: bytes, waiter: Waiter, now: float) -> None:
        """Records ``waiter`` as waiting for ``key`` (proposed at ``now``, ``time.monotonic()``)
        and queues ``payload`` for the next append."""
        proposal = self._waiters.get(key)
        if proposal is None:
            self._waiters[key] = Proposal(payload, now, waiter)
        else:  # the same write again, say a client's retry: one answer serves every waiter
            proposal.futures.append(waiter)
            proposal.resent = True
        self._pending.append(payload)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Appends what is pending at the end of this loop turn (or after ``raft.propose_linger_ms``)."""
        self._flush_scheduled = True
        loop = self._loop
        linger = self.config.raft.propose_linger_ms / 1000
        if linger > 0:
            loop.call_later(linger, self._flush)
        else:
            loop.call_soon(self._flush)

    def _forget(self, fut: Waiter, key: tuple[int, int]) -> None:
        """A waiter gave up: once nobody waits on its proposal, the bookkeeping goes (the entry
        is no longer proposed again after a leader change)."""
        proposal = self._waiters.get(key)
        if proposal is not None and fut in proposal.futures:
            proposal.futures.remove(fut)
            if not proposal.futures:
                del self._waiters[key]

    def _fail_waiters(self, key: tuple[int, int], make: Callable[[], Exception], reason: str) -> None:
        """Fails the proposal ``key`` for everyone waiting for it here, counted as failed for
        ``reason`` (a label of ``dengine_proposals_failed_total``)."""
        proposal = self._waiters.pop(key, None)
        if proposal is not None:
            self.metrics.proposals(1, failed_reason=reason)
            for fut in proposal.futures:
                if not fut.done():
                    fut.set_exception(make())

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        resent, self._pending_resent = self._pending_resent, 0
        if not batch or self.raft is None:
            return
        self.metrics.proposals(len(batch) - resent)  # each proposal once, when first proposed
        try:
            indexes = self.raft.propose(batch)
            if indexes is not None:
                self.metrics.observe_append_batch(len(batch))
                self._commit_clock.append((indexes[1], time.monotonic(), len(batch)))
        except StorageError as exc:
            self._storage_failed(exc)
            return
        except (NotLeaderError, ProposalDroppedError) as exc:
            if isinstance(exc, NotLeaderError) and exc.leader is None and self.config.raft.forward_proposals:
                return  # no leader right now: proposed again as soon as one is elected
            reason = (
                "not_leader"
                if isinstance(exc, NotLeaderError)
                else "overloaded"
                if isinstance(exc, LeaderOverloadedError)
                else "dropped"
            )
            refusal = exc
            for p in batch:
                d = envelope.decode(p)
                key = (d.client_id, d.sequence)
                proposal = self._waiters.get(key)
                if proposal is not None and proposal.resent:
                    # An earlier copy may be in the log and apply yet: its waiters keep waiting,
                    # and it is proposed again later (_propose_again). Not a failed proposal.
                    continue
                self._fail_waiters(key, lambda: _copy_refusal(refusal), reason)
            return
        self.pump()

    def _resubmit(self) -> None:
        """Proposes every waiting payload again (through a new leader, or because one waited too
        long), marking each as resent: an earlier copy may be in the log.

        Not for ever: a copy is harmless only while the session table remembers the write, and
        it forgets a client after ``expire_after`` entries of silence, or after ``max_clients``
        others were active. A payload that waited through half the smaller of the two without
        being answered is not proposed again; its callers are told its outcome is unknown."""
        raft = self.raft
        applied = raft.applied if raft is not None else 0
        window = min(self.sessions.expire_after, self.sessions.max_clients) // 2
        queued = set(self._pending)
        waiting = []
        for key, p in list(self._waiters.items()):
            if p.waiting_since < 0:
                p.waiting_since = applied
            elif applied - p.waiting_since > window:
                why = _UNKNOWN.format(
                    f"it waited while {applied - p.waiting_since} entries were applied; the write is not "
                    "proposed again, as its session may be forgotten by now"
                )
                self._fail_waiters(key, functools.partial(OutcomeUnknownError, why), "unknown")
                continue
            p.resent = True
            if p.payload not in queued:
                waiting.append(p.payload)
        if not waiting:
            return
        self._pending.extend(waiting)
        self._pending_resent += len(waiting)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _propose_again(self) -> None:
        """Proposes every waiting payload again when the oldest has waited an election timeout
        (at most once per election timeout). A leader drops forwarded proposals it cannot take,
        while it is over ``raft.max_unapplied_bytes`` or handing leadership over; a broken peer
        stream loses what it carried; and a payload proposed again that this node refused
        waits here (an earlier copy may be in the log). Without this, a ``propose`` without a
        timeout could wait forever. Sessions make every further copy harmless."""
        now = time.monotonic()
        wait = self.config.raft.election_timeout_ms / 1000
        oldest = next(iter(self._waiters.values()))
        if now - oldest.started >= wait and now - self._proposed_again_at >= wait:
            self._proposed_again_at = now
            self._resubmit()

    def transfer_leadership(self, target: int | None = None) -> int:
        """Asks the leader (this node) to hand leadership to ``target`` (default: the most
        up-to-date voter); returns the target. Proposals are refused until it completes.
        :meth:`move_leader` also waits for the outcome."""
        self._check_loop_thread("transfer_leadership")
        assert self.raft is not None
        chosen = self.raft.transfer_leadership(target)
        self.pump()
        return chosen

    async def move_leader(self, target: int | None = None, *, timeout: float | None = None) -> int:
        """Hands leadership to ``target`` (default: the most up-to-date voter) and waits until it
        leads; returns its id. Only on the leader (``NotLeaderError``).

        A transfer is best effort: the target may be down or unable to catch up, and the leader
        abandons it after an election timeout and goes on leading. That, another node winning
        the election, or ``timeout`` seconds (default: two election timeouts) passing first,
        raise :class:`~dengine.errors.LeadershipTransferError`; retrying is safe. Asking the
        leader to hand over to itself changes nothing and returns its id, so that a retried or
        scripted "make node N the leader" succeeds once it does.
        """
        raft = self.raft
        assert raft is not None
        if target == self.id and raft.role is Role.LEADER and raft.lead_transferee is None:
            return self.id
        chosen = self.transfer_leadership(target)
        election = self.config.raft.election_timeout_ms / 1000
        deadline = time.monotonic() + (2 * election if timeout is None else timeout)
        while time.monotonic() < deadline and self._running:
            if raft.role is Role.LEADER and raft.lead_transferee is None:
                raise LeadershipTransferError(
                    f"node {chosen} did not take over within the election timeout ({election:g} s): "
                    f"it may be down or unable to catch up; node {self.id} still leads (a target that "
                    "was only slow may still take over when it gets the request)"
                )
            if raft.role is not Role.LEADER and raft.lead is not None:
                if raft.lead != chosen:
                    raise LeadershipTransferError(f"node {raft.lead} was elected instead of node {chosen}")
                return chosen
            await asyncio.sleep(self.config.raft.tick_ms / 1000)
        raise LeadershipTransferError(f"no leader change to node {chosen} was seen in time")

    # --- membership -------------------------------------------------------------------------------

    def on_removed(self) -> None:
        """This node is no longer a member: nothing waiting here will be answered by it, so the
        callers hear it now (a client retries elsewhere; its session keeps the write exactly
        once)."""
        removed = _UNKNOWN.format("this node was removed from the cluster")
        for key in list(self._waiters):
            self._fail_waiters(key, lambda: OutcomeUnknownError(removed), "unknown")
        for rf in self._reads.values():
            if not rf.done():
                rf.set_exception(NotLeaderError(None, "this node was removed from the cluster"))

    async def _refuse_lost_data(self, fresh: bool) -> None:
        """Refuses to start a member on an empty data dir when a leader has seen it hold entries:
        it lost its data (see ``dengine.identity``). A node that joins is asked about too: a
        wiped member given --join would be told it is a member already, and go on with nothing."""
        assert self.store is not None
        cluster = self.config.cluster
        if (
            not fresh
            or self.store.hard_state().term != 0
            or self._store_override is not None
            or self.config.storage.engine == "memory"  # every start is empty: tests only
        ):
            return
        addresses = dict(cluster.members)
        if self._join is not None:
            addresses[0] = self._join  # a member it was told to join through, under no id
        evidence = await identity.seen_holding_data(
            self.id, cluster.id, addresses, self._channel_credentials()
        )
        if evidence is not None:
            raise DengineError(
                f"node {self.id} starts on an empty data dir ({self.config.node.data_dir}), but {evidence}: "
                "its data is lost, or node.data_dir is wrong. A node that lost its data must not vote "
                "as the member it was (it may have voted, and acknowledged entries, that it no longer "
                "remembers): restore its data dir, or replace it with a new member (`dengine member "
                f"replace {self.id} NEW_ID ADDRESS`, the new node started with --join on an empty "
                "data dir)"
            )

    def _claim_data_dir(self) -> None:
        """Refuses a data dir that belongs to another node, another cluster or other initial
        members; records this node's identity in one that holds nothing yet (``dengine.identity``)."""
        raft, store = self.raft, self.store
        assert raft is not None and store is not None
        cluster = self.config.cluster
        # A node that joined takes its configuration from the cluster, never from its file.
        joined = self._join_marker.exists() or self.id not in cluster.members
        mine = Identity(cluster.id, self.id, () if joined else tuple(sorted(cluster.members)))
        data_dir = Path(self.config.node.data_dir)
        stored = identity.read(data_dir)
        hs = store.hard_state()
        blank = store.last_index() == 0 and self._start_snapshot is None and hs.term == 0 and hs.vote is None
        if stored is not None and not blank:
            refusal = stored.refusal(mine, data_dir / identity.FILE_NAME, initial=raft.conf_index == 0)
            if refusal is not None:
                raise refusal
        elif stored != mine:
            identity.write(data_dir, mine)

    def _takes_outsider(self, src: int, conf_index: int, conf_term: int) -> bool:
        """For the transport: see ``Raft.takes_outsider``."""
        return self.raft is not None and self.raft.takes_outsider(src, conf_index, conf_term)

    def _stamp_sender(self, raft: Raft, transport: PeerTransport) -> None:
        """Makes the transport name the configuration in force on the messages it sends next."""
        conf = raft.conf_id
        sender = transport.sender
        if (sender.conf_index, sender.conf_term) != conf or not sender.address:
            transport.sender = Sender(*conf, self.config.node.advertise)

    def _refused_as_unknown(self, peer: int) -> None:
        """A peer refused this node's messages as coming from a node not in its configuration;
        a majority of voters doing so means this node was removed (see ``dengine.removal``)."""
        raft = self.raft
        if raft is None or not self._running:
            return
        now = time.monotonic()
        self._removal.refused_by(peer, now)
        refusing = self._removal.removed_by(
            raft.conf.voters, raft.learners, now, leaving=raft.own_removal_pending
        )
        if refusing is None:
            return
        why = (
            f"voters {', '.join(map(str, refusing))} of its configuration no longer know it; "
            "to serve again it must be added as a new member, with an empty data dir"
        )
        self._leave(why)

    def _leave(self, why: str) -> None:
        """Stops a node that is no longer a member, saying why."""
        raft = self.raft
        if raft is None or not self._running:
            return
        log.error(
            "node %d: removed from cluster %r: %s; stopping",
            self.id,
            self.config.cluster.id,
            why,
            extra={"node_id": self.id, "term": raft.term, "event": "membership"},
        )
        self._fail_stop(DengineError(why), "its removal from the cluster")

    def _leave_if_removed(self) -> None:
        """A node that applied the entry removing it (a leader that removed itself: it alone
        learns the commit) stops, as one told by its peers does, after an election timeout in
        which it hands over and the others elect. Only that entry counts: a joining node that
        installs a snapshot taken before it was added is not in that configuration either,
        and is about to be sent the entry that adds it."""
        raft = self.raft
        if raft is None or self._leaving is not None or raft.applied < raft.conf_index:
            return
        cc = raft.conf_change
        if cc is None or cc.op is not ConfOp.REMOVE or cc.node_id != self.id:
            return
        if self.id in raft.conf.voters or self.id in raft.learners:
            return
        why = f"the configuration committed at index {raft.conf_index} no longer holds it"
        delay = self.config.raft.election_timeout_ms / 1000
        self._leaving = asyncio.get_running_loop().call_later(delay, self._leave, why)

    async def add_learner(self, node_id: int, address: str) -> None:
        """Adds ``node_id`` at ``address`` as a learner (it receives the log, does not vote);
        returns once the change is committed. Only on the leader (``NotLeaderError``)."""
        self._check_loop_thread("add_learner")
        await self.members.change(ConfOp.ADD_LEARNER, node_id, address=address)

    async def promote(self, node_id: int, *, force: bool = False) -> None:
        """Makes learner ``node_id`` a voter; refused while it lags more than
        ``membership.max_lag_entries`` behind, unless ``force``."""
        self._check_loop_thread("promote")
        await self.members.promote(node_id, force=force)

    async def remove_member(self, node_id: int) -> None:
        """Removes a voter or learner; removing the leader (this node) commits the change, then
        hands leadership to the most up-to-date remaining voter."""
        self._check_loop_thread("remove_member")
        await self.members.change(ConfOp.REMOVE, node_id)

    async def replace_member(self, old_id: int, new_id: int, address: str, *, timeout: float = 120.0) -> None:
        """Replaces voter ``old_id`` with a new node: adds it as a learner, waits until it has
        caught up, promotes it, then removes ``old_id``."""
        self._check_loop_thread("replace_member")
        await self.members.replace(old_id, new_id, address, timeout=timeout)

    # --- snapshots --------------------------------------------------------------------------------

    async def snapshot(self) -> SnapshotFile | None:
        """Takes a snapshot of the applied state now (or waits for the one being taken), compacts
        the log behind it, and returns the newest snapshot (None if nothing was applied yet).
        Raises :class:`~dengine.errors.DengineError` if the node is not running, or stops before
        the snapshot is taken."""
        if not self._running:
            raise DengineError(self.failure or "the node is not running")
        self._check_loop_thread("snapshot")
        return await self.snapshots.create()

    # --- reads ------------------------------------------------------------------------------------

    async def read(self, fn: Callable[[Any], T], consistency: Consistency | None = None) -> T:
        """Runs ``fn(state_machine)`` and returns its result.

        ``linearizable`` (the default) confirms with a quorum that this node's state is current
        (ReadIndex); ``lease`` trusts the leader's lease instead of a round trip; ``stale`` reads
        this node's state as it is, which may lag.
        """
        if not self._running:
            # Nothing would answer a read round; and after a failure the state may be wrong.
            raise DengineError(self.failure or "the node is not running")
        self._check_loop_thread("read")
        consistency = consistency or self.config.read.default_consistency
        self.metrics.read(consistency)
        if consistency == "stale":
            await self._state_settled()
            return _read_with(fn, self.sm)
        if consistency not in ("linearizable", "lease"):
            raise ValueError(f"consistency must be linearizable, lease or stale, got {consistency!r}")
        raft = self.raft
        assert raft is not None
        if consistency == "lease":
            self._run_due_ticks()
        self._read_ctx += 1
        ctx = self._read_ctx
        fut: asyncio.Future[None] = self._loop.create_future()
        self._reads[ctx] = fut
        try:
            raft.read_index(ctx, lease=consistency == "lease")
            self.pump()
            await fut
        finally:
            self._reads.pop(ctx, None)
        await self._state_settled()
        return _read_with(fn, self.sm)

    async def _state_settled(self) -> None:
        """Waits until no entry is half applied and no snapshot half restored, so that a read
        function sees the state between two entries (at or after its read index): an async
        ``apply`` may await in the middle of an entry, and a restore replaces the state piece by
        piece. Returns at once otherwise; the caller reads before it awaits anything else."""
        if self._settled.is_set():
            return
        self._settle_waiters += 1
        try:
            while not self._settled.is_set():
                await self._settled.wait()
        finally:
            self._settle_waiters -= 1
        if not self._running:
            # Woken by a stop or a failure, which may have cut an entry short.
            raise DengineError(self.failure or "the node is not running")

    # --- the driver loop ----------------------------------------------------------------------------

    def _observe_commits(self, commit: int) -> None:
        now = time.monotonic()
        clock = self._commit_clock
        while clock and clock[0][0] <= commit:
            _, proposed_at, count = clock.popleft()
            self.metrics.observe_commit_latency(now - proposed_at, count)

    def pump(self) -> None:
        """Carries out everything the protocol core has ready: persists, sends, applies, answers.
        The node calls it after each input; a program embedding a node never needs to."""
        raft = self.raft
        transport = self.transport
        assert raft is not None and transport is not None
        if self._commit_clock:
            self._observe_commits(raft.commit)
        if raft.commit != self._commit_shown:
            # Here, not only after an apply: a commit that applies slowly must show as a gap.
            self._commit_shown = raft.commit
            self.metrics.set_indexes(raft.commit, raft.applied)
        while raft.has_ready():
            rd = raft.ready()
            if rd.sync is not None and self._syncer is not None:
                self._syncer.want(rd.sync)
            # The apply loop is woken before the peer streams: the callers waiting for these
            # entries are answered without waiting behind the gRPC writes of this round.
            if rd.restore is not None:
                self.snapshots.restore_queued(rd.restore)
                self._apply_queue.put_nowait(rd.restore)
            if rd.committed and not self._apply_here(rd.committed):
                self._apply_queue.put_nowait(rd.committed)
            if rd.messages:
                self._stamp_sender(raft, transport)
                for m in rd.messages:
                    transport.send(m)
            for peer in rd.snapshot_needed:
                self.snapshots.on_snapshot_needed(peer)
            if rd.reads or rd.failed_reads:
                self._answer_reads(rd.reads, rd.failed_reads)
            if rd.soft_state is not None:
                self._on_soft_state(rd.soft_state)
        if self._announce_timer is None and raft.commit_unannounced:
            self._announce_for = raft.commit
            self._announce_timer = asyncio.get_running_loop().call_later(_ANNOUNCE_DELAY_S, self._announce)
        self.members.sync()

    def _announce(self) -> None:
        self._announce_timer = None
        if self._running and self.raft is not None:
            try:
                self.raft.announce_commit(self._announce_for)
                self.pump()
            except StorageError as exc:
                self._storage_failed(exc)

    def _answer_reads(self, reads: list[ReadState], failed: list[int]) -> None:
        for r in reads:
            fut = self._reads.get(r.context)
            if fut is not None and not fut.done():
                fut.set_result(None)
        for ctx in failed:
            fut = self._reads.get(ctx)
            if fut is not None and not fut.done():
                assert self.raft is not None
                fut.set_exception(
                    NotLeaderError(self.raft.lead, "leadership changed before the read was confirmed")
                )

    def _on_soft_state(self, s: SoftState) -> None:
        if s.leader is not None and (s.term, s.leader) != self._resubmitted_for:
            self._resubmitted_for = (s.term, s.leader)
            self._resubmit()
        self.metrics.set_role(s.role, s.term, s.leader)
        if s.role is not Role.LEADER:
            self.metrics.clear_peers()
            self._peer_series = frozenset()
            self.snapshots.on_leadership_lost()
        if s.role is Role.LEADER:
            self.leader_changes += 1
        log.info(
            "node %d is %s in term %d (leader %s)",
            self.id,
            s.role.value,
            s.term,
            s.leader,
            extra=self._log_fields("role"),
        )

    def _log_fields(self, event: str) -> dict[str, object]:
        """The structured fields of a log line about this node: its id, term and commit index."""
        raft = self.raft
        return {
            "node_id": self.id,
            "term": raft.term if raft is not None else 0,
            "index": raft.commit if raft is not None else 0,
            "event": event,
        }

    def _on_synced(self, seq: int, durable: int) -> None:
        if self._running and self.raft is not None:
            try:
                self.raft.synced(seq, durable)
                self.pump()
            except StorageError as exc:
                self._storage_failed(exc)

    def _storage_failed(self, exc: StorageError) -> None:
        # A failed append (a full disk, a failed fsync at a segment's end) leaves the log in an
        # unknown state, as a failed sync does (the store refuses further work): stop, and say so.
        log.critical(
            "node %d: the log store failed, stopping: %s", self.id, exc, extra=self._log_fields("error")
        )
        self._fail_stop(exc)

    def _on_sync_failed(self, exc: DengineError) -> None:
        # After a failed fsync the page cache may have dropped writes the store cannot redo:
        # the only safe course is to stop participating (fail-stop) and say so loudly.
        log.critical("node %d: log sync failed, stopping: %s", self.id, exc, extra=self._log_fields("error"))
        self._fail_stop(exc)

    def _fail_stop(self, exc: Exception, failure: str = "a storage failure") -> None:
        if not self._running:
            return
        self._running = False
        why = self.failure = f"the node stopped after {failure}: {exc}"
        self._fail_everything_waiting(why)
        # Stop serving at once: peers and clients then see a node that is down, and go elsewhere,
        # rather than one that accepts requests and never answers. The data dir is released too.
        self._release = asyncio.ensure_future(self._release_everything(why))

    async def _apply_loop(self) -> None:
        try:
            await self._apply_committed_forever()
        except asyncio.CancelledError:
            if self._running:
                # Not a stop (which cancels this task once the node no longer runs): a
                # CancelledError came out of the state machine (Python 3.10 cannot tell it from
                # this task's own, see dengine.raft.sessions). Nothing would apply any more.
                self._apply_failed(RuntimeError("a CancelledError escaped the state machine"))
            raise
        except Exception as exc:
            self._apply_failed(exc)
            raise

    def _apply_failed(self, exc: Exception) -> None:
        # A bug, not a command's failure (those are contained per command): what this node
        # would apply next could not be trusted, so it stops rather than leave callers hanging.
        log.critical("node %d: applying failed, stopping: %s", self.id, exc, extra=self._log_fields("error"))
        self._fail_stop(exc, "an apply failure")

    async def _apply_committed_forever(self) -> None:
        while True:
            item = await self._apply_queue.get()
            # Until the item is applied, nothing is applied around it (_apply_here): between a
            # snapshot letting go of the apply lock and this task taking it, the lock looks free
            # and the queue empty, yet this task holds earlier entries.
            self._apply_busy = True
            try:
                await self._apply_item(item)
            finally:
                self._apply_busy = False
            self._after_apply()
            self.pump()

    def _after_apply(self) -> None:
        raft = self.raft
        assert raft is not None
        self.metrics.set_indexes(raft.commit, raft.applied)
        self.snapshots.on_applied()
        self._leave_if_removed()

    async def _apply_item(self, item: Sequence[Entry] | SnapshotInfo) -> None:
        raft = self.raft
        assert raft is not None
        async with self.apply_lock:
            if isinstance(item, SnapshotInfo):
                self._settled.clear()  # a restore replaces the state piece by piece
                try:
                    await self._install(item)
                finally:
                    self._settled.set()
                last = item.index
            elif self._async_apply:
                for entry in item:
                    self._settled.clear()  # an async apply may await in the middle of an entry
                    try:
                        a = await apply_entry_async(entry, self.sessions, self.sm.apply)  # type: ignore[arg-type]
                    finally:
                        self._settled.set()
                    if a.client_id:
                        key = (a.client_id, a.sequence)
                        self._answer(key, a.outcome, a.result, a.error, time.monotonic())
                    if self._settle_waiters:
                        await asyncio.sleep(0)  # the reads waiting run now, between two entries
                last = item[-1].index
            else:
                await self._apply_chunks(item)
                last = item[-1].index
            raft.applied_to(last)

    def _apply_here(self, entries: Sequence[Entry]) -> bool:
        """Applies a few committed entries on the spot when nothing else is being applied or
        waits to be, and returns True; False leaves them to the apply task. Handing them over
        costs a turn of the loop, and the commit of a lone write waits for it: about 60-100 µs
        of a write at one in flight. Only where someone waits for an answer (a follower's
        acknowledgements do not wait behind its applies). Larger batches, an async state
        machine, a snapshot being taken or installed, or entries already queued go the usual
        way, in order."""
        if (
            not self._waiters
            or not self._running
            or self._async_apply
            or len(entries) >= apply_thread.MIN_ENTRIES
            or self._apply_busy
            or self.apply_lock.locked()
            or not self._apply_queue.empty()
        ):
            return False
        raft = self.raft
        assert raft is not None
        try:
            self._apply_part(entries, self._native_target())
            raft.applied_to(entries[-1].index)
            self._after_apply()
        except Exception as exc:
            self._apply_failed(exc)
        return True

    def _native_target(self) -> object:
        """The built-in store's native apply, or None while its events are watched (see
        ``KVStateMachine.native_target``). Asked again before each part of a batch: a watch may
        have subscribed meanwhile, and then the rest goes through the state machine, which
        publishes its events."""
        return self.sm.native_target() if isinstance(self.sm, KVStateMachine) else None

    def _apply_part(self, entries: Sequence[Entry], target: object) -> None:
        """Applies ``entries`` on the loop's thread (through ``target``, if not None) and
        answers their waiters."""
        run = self.sm.apply if target is None else target
        answered = apply_committed(entries, self.sessions, run, self._waiters)  # type: ignore[arg-type]
        if answered:
            self._answer_applied(answered)

    async def _apply_chunks(self, entries: Sequence[Entry]) -> None:
        """Applies committed entries a chunk at a time, answering each chunk's waiters before the
        next. Between chunks the loop lets the answered callers run, so the writes they make next
        are proposed while the rest is applied: answering a whole commit at once would make
        callers with many writes in flight wait for each other, one round trip per batch. A node
        with nobody waiting (a follower) lets its loop go too: its acknowledgements of new
        entries, which the leader's commits wait for, do not queue behind a whole commit."""
        raft = self.raft
        assert raft is not None
        for start in range(0, len(entries), APPLY_CHUNK):
            chunk = entries[start : start + APPLY_CHUNK]
            done = 0
            while done < len(chunk):
                part = chunk[done:] if done else chunk
                target = self._native_target()
                thread = self._thread_for(part, target)
                if thread is None:
                    self._apply_part(part, target)
                    done += len(part)
                    continue
                answered, count = await thread.apply(part, self._waiters, self._answer_applied)  # type: ignore[arg-type]
                done += count
                if answered:
                    self._answer_applied(answered)
            if start + APPLY_CHUNK < len(entries):
                raft.applied_to(chunk[-1].index)
                await asyncio.sleep(0)

    def _thread_for(self, chunk: Sequence[Entry], target: object) -> apply_thread.ApplyThread | None:
        """The apply thread, if ``chunk`` should go to it: a large framed batch for the built-in
        store (``target``); see :mod:`dengine.apply_thread`."""
        if not isinstance(target, _core.KvStore) or not isinstance(chunk, EntryBatch):
            return None
        if len(chunk) < apply_thread.MIN_ENTRIES or self._apply_thread is False:
            return None
        if self._apply_thread is None:
            self._apply_thread = apply_thread.ApplyThread.start(target, self.sessions) or False
        return self._apply_thread or None

    async def _close_apply_thread(self) -> None:
        if self._apply_thread:
            self._apply_thread.close()

    async def _install(self, info: SnapshotInfo) -> None:
        try:
            await self.snapshots.restore(info)
        except Exception as exc:
            # The log was already reset to the snapshot: without its state this node cannot go on.
            log.critical(
                "node %d: cannot install the snapshot at index %d: %s",
                self.id,
                info.index,
                exc,
                extra=self._log_fields("error"),
            )
            self._fail_stop(exc)
            raise
        # Proposals waiting here whose entries the snapshot covers get their recorded results.
        for key in list(self._waiters):
            if self.sessions.lookup(*key) is Outcome.DUPLICATE:
                result, error = self.sessions.stored(*key)
                self._answer(key, Outcome.DUPLICATE, result, error, time.monotonic())

    def _answer_applied(self, answered: list[Answer]) -> None:
        """:meth:`_answer` for each proposal of a committed batch, with the usual case, one
        caller and a result, handled inline: at tens of thousands a second, the calls add up."""
        waiters, started = self._waiters, []
        for key, code, result, error, _ in answered:
            proposal = waiters.pop(key, None)
            if proposal is None:
                continue
            started.append(proposal.started)
            futures = proposal.futures
            if code != _STALE_CODE and error is None and len(futures) == 1:
                # No done() check first, nor contextlib.suppress: this runs for every write.
                try:  # noqa: SIM105
                    futures[0].set_result(result if result is not None else b"")
                except asyncio.InvalidStateError:
                    pass  # its caller gave up on it
            else:
                self._settle(proposal, ANSWERED_OUTCOMES[code], result, error)
        self.metrics.observe_apply_latencies(time.monotonic(), started)

    def _answer(
        self, key: tuple[int, int], outcome: Outcome, result: bytes | None, error: str | None, now: float
    ) -> None:
        """Hands the outcome of the proposal ``key`` to everyone waiting for it here."""
        proposal = self._waiters.pop(key, None)
        if proposal is None:
            return
        self.metrics.observe_apply_latency(now - proposal.started)
        self._settle(proposal, outcome, result, error)

    def _settle(self, proposal: Proposal, outcome: Outcome, result: bytes | None, error: str | None) -> None:
        if outcome is Outcome.STALE or error is not None:
            self.metrics.proposals(1, failed_reason="stale" if outcome is Outcome.STALE else "apply_error")
        for fut in proposal.futures:
            if fut.done():
                continue
            if outcome is Outcome.STALE:
                fut.set_exception(ProposalDroppedError(error or "proposal overtaken; retry"))
            elif error is not None:
                fut.set_exception(ApplyError(error))
            else:
                fut.set_result(result if result is not None else b"")

    # --- status -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the node is serving: started, and not stopping, stopped or failed."""
        return self._running

    @property
    def leader_id(self) -> int | None:
        """The leader this node currently follows (itself when leading); None while there is none
        or the node has not started."""
        return self.raft.lead if self.raft is not None else None

    def status(self) -> NodeStatus:
        """This node's view of the cluster: role, term, leader, indexes, members, and on the leader
        each peer's progress (what ``dengine status`` shows)."""
        raft, store = self.raft, self.store
        assert raft is not None and store is not None
        members = self.members.addresses
        last = store.last_index()
        peers = tuple(
            PeerInfo(
                p,
                members.get(p, ""),
                pr.match,
                max(0, last - pr.match),
                len(pr.inflight),
                pr.state.value if isinstance(pr.state, ProgressState) else str(pr.state),
            )
            for p, pr in sorted(raft.progress.items())
            if p != self.id
        )
        return NodeStatus(
            id=self.id,
            cluster_id=self.config.cluster.id,
            address=self.config.node.advertise or self.config.node.listen,
            role=raft.role.value,
            term=raft.term,
            leader=raft.lead,
            commit=raft.commit,
            applied=raft.applied,
            first_index=store.first_index(),
            last_index=last,
            voters=tuple(sorted(raft.conf.voters)),
            learners=tuple(sorted(raft.learners)),
            peers=peers,
            snapshot_index=self.snapshots.latest.meta.index if self.snapshots.latest else 0,
        )

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether this node is ready to serve: running, a member of the cluster (voter or
        learner), and following a leader it knows (or leading). With what it knows, for the
        ``/readyz`` and ``/health`` probes: ``reason`` says why not when it is not ready.

        A node cut off from the leader stops being ready within an election timeout: it then
        campaigns and knows no leader until one is elected (a leader without a quorum steps down
        in the same time, with ``check_quorum``)."""
        raft = self.raft
        if not self._running or raft is None:
            return False, {"id": self.id, "reason": self.failure or "the node is not running"}
        facts: dict[str, object] = {
            "id": self.id,
            "role": raft.role.value,
            "term": raft.term,
            "leader": raft.lead,
            "commit": raft.commit,
            "applied": raft.applied,
        }
        if self.id not in raft.conf.voters and self.id not in raft.learners:
            reason = "not a member of the cluster (yet)"
        elif raft.lead is None:
            reason = "no leader known: an election is under way, or this node is cut off"
        else:
            reason = ""
        return not reason, {**facts, "reason": reason}


_thread_id = threading.get_ident


def _read_with(fn: Callable[[Any], T], sm: object) -> T:
    result = fn(sm)
    if inspect.isawaitable(result):
        # Awaited, it would read across entries applied meanwhile: not the state of one moment.
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError("a read function runs between two entries and must return a value, not an awaitable")
    return result


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def _write_marker(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("this node joined a running cluster: it takes its configuration from the cluster\n")
        f.flush()
        os.fsync(f.fileno())
