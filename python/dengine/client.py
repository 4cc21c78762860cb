"""``dengine.Client``: the async client of a standalone dengine cluster (``dengine serve``).

* It takes a list of endpoints, finds the leader, and follows it across leader changes.
* Every call has a deadline; transient failures and leader changes are retried with backoff
  within it. A node whose call fails outright (gone, frozen, cut off) is passed over for a while
  (:mod:`dengine.endpoints`), so that after a leader dies the calls reach the new one as soon as
  it is elected.
* Writes are exactly-once: each carries ``(client id, sequence)``, so a retry of a write whose
  first attempt committed (but whose answer was lost) returns the first result instead of
  applying again.
* Concurrent calls from many coroutines are coalesced into batches: everything issued in the
  same event-loop turn leaves together (``linger_ms`` waits longer, but asyncio timers round up
  to a millisecond). One RPC per operation cannot go past what a gRPC server does per second, a
  batch of 128 can. Batches travel over one long-lived ``BatchStream`` per node
  (:mod:`dengine.batch_stream`), or as unary ``Batch`` calls to a node without it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

import grpc
from google.protobuf.message import DecodeError

from dengine._core import (
    decode_kv_batch_response,
    encode_kv_get_operation,
    encode_kv_write_operation,
    join_kv_operations,
)
from dengine.batch_stream import BatchStream, CallFailed, reached
from dengine.client_admin import ClusterAdmin, Membership, membership_of
from dengine.endpoints import Endpoints, retry_delay
from dengine.errors import (
    CompareFailed,
    DeadlineExceeded,
    DengineError,
    NotFound,
    OutcomeUnknownAtDeadline,
    OutcomeUnknownError,
    RequestFailed,
    Unavailable,
)
from dengine.event_loop import cancelling_itself
from dengine.kv import MAX_BATCH_OPERATIONS, WATCH_PROGRESS_INTERVAL_S, KeyValue, new_key_value
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

if TYPE_CHECKING:
    from dengine.tls import ClientTLS

__all__ = [
    "CasResult",
    "Client",
    "CompareFailed",
    "DeadlineExceeded",
    "DeleteResult",
    "KeyValue",
    "Membership",
    "NotFound",
    "OutcomeUnknownAtDeadline",
    "PutResult",
    "RequestFailed",
    "SyncClient",
    "Unavailable",
    "WatchEvent",
]

Consistency = Literal["linearizable", "lease", "stale"]
_CONSISTENCY = {"linearizable": kv_pb2.LINEARIZABLE, "lease": kv_pb2.LEASE, "stale": kv_pb2.STALE}
_LEADER_HINT = re.compile(r"leader=(\d+)@(\S*)")
# How long a node that did not know BatchStream is sent unary Batch calls before the stream is
# tried again: a rolling upgrade gives it the stream without the client's knowing.
UNARY_RECHECK_S = 60.0
WATCH_MEMBERS_REFRESH_S = 2.0
"""How often a watch that stays on one node asks again for the members' addresses (with
``discover_members``): a client that only watches never follows a leader, and so would hear of
no member added after it connected."""
_RETRYABLE = {"UNAVAILABLE", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED", "CANCELLED"}
# Most bytes of operations in one batch (one larger operation goes alone): a message over the
# 64 MiB limit would fail its whole stream, again at every retry, until the deadline.
MAX_BATCH_BYTES = 8 << 20
# A call that fails as a whole with one of these may have failed after the node took its batch.
_MAYBE_APPLIED = {"UNKNOWN", "INTERNAL"}
# A batch that reached a node and failed as a whole with one of these may have been applied: the
# others are refusals a node makes before it proposes anything.
_MAYBE_TAKEN = {
    "UNKNOWN",
    "INTERNAL",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "ABORTED",
    "DATA_LOSS",
}
# How a node says that it stopped waiting for a write it proposed (dengine.node's
# OutcomeUnknownError, sent as a per-operation UNAVAILABLE so that the write is retried).
_OUTCOME_UNKNOWN_TEXT = "outcome is unknown"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # gRPC waits longer and longer between attempts to reconnect to a node that is down (up to two
    # minutes), and fails every call to it at once meanwhile: a cluster back after a minute's
    # outage stayed out of this client's reach for another 17 s. Tries every second at most
    # instead, a refused connection being all a down node costs.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


@dataclass(frozen=True, slots=True)
class PutResult:
    """A put's store revision, and the key-value it replaced when asked for (``prev_kv``)."""

    revision: int
    prev: KeyValue | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: bool
    revision: int
    prev: KeyValue | None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue
    prev: KeyValue | None
    revision: int


@dataclass(frozen=True, slots=True)
class CasResult:
    succeeded: bool
    revision: int
    current: KeyValue | None
    """On failure, the current value, so a caller can retry without a read."""


def _kv(m: kv_pb2.KeyValue | None) -> KeyValue | None:
    if m is None or not m.key:
        return None
    return new_key_value(m.key, m.value, m.create_revision, m.mod_revision, m.version)


# A batch's operations travel as bytes built and read by Rust (dengine_core::kv::wire): a write's
# answer is (op code, flag, revision, key-value fields or None), the flag being found, deleted or
# succeeded (False for a put), the key-value the previous, current or read one; or "CODE: details".
_PUT, _DELETE, _CAS, _GET = 1, 2, 3, 4
_PUT_PREV = 5  # a put with prev_kv set, answered as a put
KVFields = tuple[bytes, bytes, int, int, int]
Answer = tuple[int, bool, int, KVFields | None]


def _kv_of(fields: KVFields | None) -> KeyValue | None:
    if fields is None or not fields[0]:
        return None
    return new_key_value(*fields)


def _fields(m: kv_pb2.KeyValue) -> KVFields:
    return (m.key, m.value, m.create_revision, m.mod_revision, m.version)


def _answer_of(r: kv_pb2.OperationResult) -> Answer | str:
    """An answer read by the protobuf library, as the Rust reader gives it: for responses that
    are not in the canonical form the Rust reader takes."""
    kind = r.WhichOneof("result")
    if kind is None:
        return "INTERNAL: the server sent an empty result"
    if kind == "error":
        return r.error
    if kind == "put":
        return (_PUT, False, r.put.revision, _fields(r.put.prev) if r.put.HasField("prev") else None)
    if kind == "get":
        return (_GET, r.get.found, r.get.revision, _fields(r.get.kv) if r.get.HasField("kv") else None)
    if kind == "delete":
        m = r.delete
        return (_DELETE, m.deleted, m.revision, _fields(m.prev) if m.HasField("prev") else None)
    c = r.cas
    return (_CAS, c.succeeded, c.revision, _fields(c.current) if c.HasField("current") else None)


def _read_answers(raw: bytes) -> list[Answer | str]:
    answers = decode_kv_batch_response(raw)
    if answers is not None:
        return answers
    return [_answer_of(r) for r in kv_pb2.BatchResponse.FromString(raw).results]


@dataclass(slots=True)
class _Pending:
    op: bytes  # the Operation message, serialized
    kind: int  # _PUT, _DELETE, _CAS or _GET: the answer it expects
    future: asyncio.Future[Answer]
    deadline: float
    sequence: int  # the write's session sequence; 0 for a read
    attempts: int = 0
    maybe_applied: bool = False  # a write: an attempt may have reached a node and been applied
    alone: bool = False  # sent in a batch of its own (a batch with it was too large)


def _deadline_error(p: _Pending, code: str, message: str) -> DengineError:
    """What the caller of ``p`` hears when its deadline ends it; ``code`` and ``message`` are
    those of its last attempt. A write that may have been applied: its outcome is unknown
    (never "unavailable", a failure). Otherwise a deadline error when the last attempt ran out
    of time, or :class:`Unavailable` when no node could take it."""
    last = f"after {p.attempts + 1} attempts (last: {code} {message})"
    if p.maybe_applied:
        return OutcomeUnknownAtDeadline(f"the deadline passed {last}; the write may have been applied")
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"deadline exceeded {last}")
    return Unavailable(f"no node could serve the request: {code} {message}")


def _new_events(
    response: kv_pb2.WatchResponse, next_revision: int, delivered: set[tuple[int, bytes]]
) -> tuple[list[WatchEvent], int, set[tuple[int, bytes]]]:
    """The events of a watch ``response`` not yet delivered, and where the watch then stands:
    the revision to resume from, and the events of that revision already delivered."""
    fresh: list[WatchEvent] = []
    for e in response.events:
        ident = (e.revision, e.kv.key)
        if e.revision < next_revision or ident in delivered:
            continue
        if e.revision > next_revision:
            next_revision, delivered = e.revision, set()
        delivered.add(ident)
        kv = _kv(e.kv) or KeyValue(e.kv.key, b"", 0, e.revision, 0)
        kind: Literal["put", "delete"] = "put" if e.type == kv_pb2.WatchEvent.PUT else "delete"
        fresh.append(WatchEvent(kind, kv, _kv(e.prev) if e.HasField("prev") else None, e.revision))
    if response.revision >= next_revision:
        # The node sent everything under the prefix up to its revision (a progress notice says
        # so too): a resumed watch starts after it, and does not ask for history that a quiet
        # prefix never needed (and that no node may hold any more).
        next_revision, delivered = response.revision + 1, set()
    return fresh, next_revision, delivered


class Client(ClusterAdmin):
    """An async client of a dengine cluster. Use ``async with Client([...]) as c:``.

    Besides the key-value operations it runs the cluster's operations through the leader:
    :meth:`members`, :meth:`add_learner`, :meth:`promote`, :meth:`remove_member`,
    :meth:`replace_member` and :meth:`transfer_leader` (see :mod:`dengine.client_admin`).

    ``timeout`` is the default deadline of a call, retries included; ``attempt_timeout`` bounds
    one attempt on one node. Concurrent calls are coalesced into batches of up to ``max_batch``
    operations and :data:`MAX_BATCH_BYTES` bytes, after waiting ``linger_ms`` for company. A
    watch that hears nothing from its node for ``watch_idle_timeout`` seconds resumes on another
    node: nodes that follow a leader send a progress notice every second, so silence means the
    node froze or was cut off.

    With ``discover_members`` (the default) the client asks each new leader it finds for the
    members' addresses (a watch asks again every :data:`WATCH_MEMBERS_REFRESH_S`) and tries them
    too when no leader is known, so that it keeps reaching the cluster after members it was
    given are replaced. The addresses are those the nodes advertise (``node.advertise``), as in
    the leader hints a client follows anyway.

    ``client_id`` names the client's session (by default a random 62-bit id). Writes are
    exactly-once by ``(client_id, sequence)`` and sequences start at 1 in every client, so an id
    must never serve two clients at once, nor a new client after another used it.

    ``credentials`` enables TLS: gRPC channel credentials, or a :class:`dengine.tls.ClientTLS`
    whose files are read again when they change, so that a rotated client certificate is
    presented without a restart.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = 10.0,
        linger_ms: float = 0.0,
        max_batch: int = 512,
        client_id: int | None = None,
        credentials: grpc.ChannelCredentials | ClientTLS | None = None,
        attempt_timeout: float = 5.0,
        watch_idle_timeout: float = 5.0,
        discover_members: bool = True,
    ) -> None:
        addresses = (
            [e.strip() for e in endpoints.split(",")] if isinstance(endpoints, str) else list(endpoints)
        )
        if not addresses or not all(addresses):
            raise ValueError("at least one endpoint (host:port) is required")
        batch_ok = 1 <= max_batch <= MAX_BATCH_OPERATIONS
        if not batch_ok or linger_ms < 0 or timeout <= 0 or attempt_timeout <= 0:
            raise ValueError(
                f"max_batch must be 1 to {MAX_BATCH_OPERATIONS} (a node refuses larger batches), "
                "linger_ms >= 0, timeout and attempt_timeout > 0"
            )
        if watch_idle_timeout <= WATCH_PROGRESS_INTERVAL_S:
            raise ValueError(
                f"watch_idle_timeout must exceed the {WATCH_PROGRESS_INTERVAL_S:g} s between progress notices"
            )
        # One attempt stuck on a node that can no longer answer (removed, cut off) must not use up
        # the whole deadline: after this long the request is retried elsewhere (exactly-once, by
        # its session).
        self.attempt_timeout = attempt_timeout
        self._endpoints = Endpoints(addresses)
        self.discover_members = discover_members
        self._discovered_at: str | None = None  # the leader last asked for the members
        self._discovery: asyncio.Task[None] | None = None
        self.timeout = timeout
        self.linger = linger_ms / 1000
        self.max_batch = max_batch
        # From the OS, not the random module: a program that seeds it (tests, simulations, workers
        # started alike) would give its clients one id, and their writes each other's results.
        self.client_id = client_id or secrets.randbits(62) + 1
        self._seq = 0
        # The writes in issue order, with their futures: those whose call is over (answered,
        # failed or given up by their caller) are dropped lazily from the front.
        self._in_order: collections.deque[tuple[int, asyncio.Future[Answer]]] = collections.deque()
        self._credentials = credentials
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first operation
        self.watch_idle_timeout = watch_idle_timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._channel_generation: dict[str, int] = {}  # of the ClientTLS files each was built with
        self._stubs: dict[str, kv_pb2_grpc.KVStub] = {}
        self._batch_calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self._batch_streams: dict[str, BatchStream] = {}
        # Nodes that did not know BatchStream (an older version), and when that was seen: Batch
        # calls instead, until the stream is tried again (the node may have been upgraded).
        self._unary_only: dict[str, float] = {}
        self._queue: list[_Pending] = []
        self._flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        # Operations waiting for their retry, by id: close() fails them rather than leave them
        # to a timer (a SyncClient's loop stops after close(), and the timer would never fire).
        self._retrying: dict[int, tuple[asyncio.TimerHandle, _Pending]] = {}
        self._closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the client: calls waiting to be retried fail with
        :class:`~dengine.errors.DengineError`, and those on the wire end first."""
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        queued, self._queue = self._queue, []
        for p in queued:
            self._refuse_closed(p)
        retrying, self._retrying = self._retrying, {}
        for handle, p in retrying.values():
            handle.cancel()
            self._refuse_closed(p)
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for stream in self._batch_streams.values():
            await stream.close()
        self._batch_streams.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()
        self._batch_calls.clear()

    @property
    def leader(self) -> str | None:
        """The address this client currently believes leads the cluster."""
        return self._endpoints.leader

    @property
    def endpoints(self) -> list[str]:
        """The addresses tried when no leader is known: those given, then the members learned."""
        return list(self._endpoints.addresses)

    def _follow(self, address: str) -> None:
        """Takes ``address`` for the leader's; the first time it is, asks it for the members."""
        self._endpoints.leader = address
        if self.discover_members and address != self._discovered_at and not self._closed:
            self._discovered_at = address
            if self._discovery is not None:
                self._discovery.cancel()
            self._discovery = asyncio.ensure_future(self._discover(address))

    async def _discover(self, address: str, hops: int = 1) -> None:
        stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
        try:
            status: cluster_pb2.StatusResponse = await stub.Status(
                cluster_pb2.StatusRequest(), timeout=self.attempt_timeout
            )
        except grpc.aio.AioRpcError:
            return  # asked again at the next leader change
        if status.role == "leader":  # only the leader's view lists every member
            self._endpoints.learn(list(membership_of(status).addresses.values()))
        elif hops and status.leader_address and status.leader_address != address:
            await self._discover(status.leader_address, hops - 1)

    def _learn_members_via(self, address: str) -> None:
        """Asks the node at ``address`` who leads, and the leader for the members, unless that is
        under way: a client that only watches (and so never follows a leader) learns them too,
        and outlives the members it was given."""
        if self.discover_members and not self._closed and (self._discovery is None or self._discovery.done()):
            self._discovery = asyncio.ensure_future(self._discover(address))

    def _ask_members_again(self, address: str, *, since: float) -> float:
        """:meth:`_learn_members_via` ``address`` if the watch there last did at ``since``, more
        than :data:`WATCH_MEMBERS_REFRESH_S` ago; returns when it last did. A watch can stay on one
        node for hours while every other member is replaced: without asking again, the client
        would know none of the cluster's addresses once that node goes too."""
        now = time.monotonic()
        if now - since < WATCH_MEMBERS_REFRESH_S:
            return since
        self._learn_members_via(address)
        return now

    # --- operations -------------------------------------------------------------------------------

    def _write(
        self, op: int, key: bytes, value: bytes, expected: bytes | None, timeout: float | None
    ) -> asyncio.Future[Answer]:
        """Queues a write under the next sequence of this client's session, which carries (client
        id, its sequence, lowest sequence outstanding).

        A sequence stops being outstanding once its call is over, however it ended: answered,
        refused, failed (its outcome unknown, or its deadline passed) or cancelled by its caller.
        Replicas then forget its result, and that is safe: their ``acked_below`` only rises and a
        sequence below it whose result they no longer hold is refused as stale, so a late copy
        of it was either applied once before, or is never applied. Holding it back instead
        would make every replica keep every later result of this client."""
        self._seq = seq = self._seq + 1
        in_order = self._in_order
        while in_order and in_order[0][1].done():
            in_order.popleft()
        first = in_order[0][0] if in_order else seq
        operation = encode_kv_write_operation(op, key, value, expected, (self.client_id, seq, first))
        future = self._submit(operation, _PUT if op == _PUT_PREV else op, timeout, seq)
        in_order.append((seq, future))
        return future

    async def put(
        self, key: bytes, value: bytes, *, prev_kv: bool = False, timeout: float | None = None
    ) -> PutResult:
        """Sets ``key`` to ``value``, once, however often the request is retried. With
        ``prev_kv`` the result's ``prev`` is the key-value the put replaced (None for a new key);
        without it, always None, and no replica copies the old value for the answer."""
        _, _, revision, prev = await self._write(_PUT_PREV if prev_kv else _PUT, key, value, None, timeout)
        return PutResult(revision, None if prev is None else _kv_of(prev))

    async def get(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        strict: bool = False,
        timeout: float | None = None,
    ) -> KeyValue | None:
        """The key's value and metadata, or ``None`` when it is absent (``strict``: raises
        :class:`~dengine.errors.NotFound` instead)."""
        op = encode_kv_get_operation(key, _CONSISTENCY[consistency])
        _, found, revision, kv = await self._submit(op, _GET, timeout)
        if not found and strict:
            raise NotFound(key, revision)
        return _kv_of(kv) if found else None

    async def delete(self, key: bytes, *, strict: bool = False, timeout: float | None = None) -> DeleteResult:
        """Removes ``key``; ``deleted`` says whether it existed (``strict``: a missing key raises
        :class:`~dengine.errors.NotFound`)."""
        _, deleted, revision, prev = await self._write(_DELETE, key, b"", None, timeout)
        if not deleted and strict:
            raise NotFound(key, revision)
        return DeleteResult(deleted, revision, _kv_of(prev))

    async def cas(
        self,
        key: bytes,
        expected: bytes | None,
        value: bytes,
        *,
        strict: bool = False,
        timeout: float | None = None,
    ) -> CasResult:
        """Sets ``key`` to ``value`` if its value is ``expected`` (``None``: if it is absent).
        ``succeeded`` says whether it did (``strict``: a mismatch raises
        :class:`~dengine.errors.CompareFailed`, which carries the current value)."""
        _, succeeded, revision, fields = await self._write(_CAS, key, value, expected, timeout)
        current = _kv_of(fields)
        if not succeeded and strict:
            raise CompareFailed(key, current, revision)
        return CasResult(succeeded, revision, current)

    async def range(
        self,
        prefix: bytes = b"",
        *,
        limit: int | None = None,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
    ) -> list[KeyValue]:
        """The keys starting with ``prefix``, in byte order, with their values and revisions: at
        most ``limit`` of them (None or 0: all of them, as etcd's Range), read with
        ``consistency`` (any node can serve it; ``linearizable`` is confirmed with the leader)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0, got {limit}")
        request = kv_pb2.RangeRequest(prefix=prefix, limit=limit or 0, consistency=_CONSISTENCY[consistency])
        response: kv_pb2.RangeResponse = await self._call_unary("Range", request, timeout)
        return [kv for kv in (_kv(m) for m in response.kvs) if kv is not None]

    async def watch(self, prefix: bytes = b"", *, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Events for keys under ``prefix``, from ``start_revision`` (0: from now on), forever.

        When a node goes away, freezes or is cut off from its leader (it then stops sending the
        progress notices, and ``watch_idle_timeout`` runs out), the watch resumes on another one
        from the last revision seen, without gaps and without repeating an event already
        delivered. Raises :class:`~dengine.errors.RequestFailed` (``OUT_OF_RANGE``) when no node
        it can reach still holds the history from that revision (each restored a later snapshot
        or dropped the events from its bounded history; nodes whose calls fail outright are not
        waited for): read the current state and watch again from there. Raises
        :class:`~dengine.errors.DengineError` when the client is closed (it never just ends).
        """
        if start_revision == 0:
            # "From now": pin now to a revision, so that a resumed stream neither skips nor replays.
            now: kv_pb2.RangeResponse = await self._call_unary(
                "Range", kv_pb2.RangeRequest(prefix=prefix, limit=1), None
            )
            start_revision = now.revision + 1
        next_revision = start_revision
        delivered: set[tuple[int, bytes]] = set()  # events of ``next_revision`` already yielded
        attempts = 0
        compacted: set[str] = set()  # nodes whose history no longer reaches ``next_revision``
        while not self._closed:
            address = self._endpoints.pick()
            stub = self._stub(address)
            call = stub.Watch(kv_pb2.WatchRequest(prefix=prefix, start_revision=next_revision))
            asked = self._ask_members_again(address, since=float("-inf"))  # at once, on a new stream
            try:
                while True:
                    asked = self._ask_members_again(address, since=asked)
                    try:
                        response = await asyncio.wait_for(call.read(), self.watch_idle_timeout)
                    except asyncio.CancelledError:
                        if self._closed and not cancelling_itself():
                            raise DengineError("the client is closed") from None  # close() ended the call
                        raise
                    except asyncio.TimeoutError:  # not TimeoutError: the two differ before Python 3.11
                        # Not even a progress notice: the node froze, or lost the cluster.
                        self._endpoints.call_failed(address, "DEADLINE_EXCEEDED")
                        self._endpoints.leader = None
                        break
                    if response is grpc.aio.EOF:
                        break
                    self._endpoints.answered(address)
                    attempts = 0
                    compacted.clear()
                    fresh, next_revision, delivered = _new_events(response, next_revision, delivered)
                    for event in fresh:
                        yield event
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
                self._call_failed(address, code, details)
                self._endpoints.leader = None  # any node can serve a watch: rotate
                if code == "OUT_OF_RANGE":
                    # That node restored a snapshot past our revision; another may still hold
                    # the history. When none that answers does, the events in between are gone
                    # (waiting for a node that is down, or an address no longer a member's, would
                    # keep the watch silent for ever).
                    compacted.add(address)
                    reachable = {a for a in self._endpoints.addresses if not self._endpoints.is_down(a)}
                    if compacted >= (reachable or set(self._endpoints.addresses)):
                        raise RequestFailed(code, details) from exc
            finally:
                call.cancel()
            attempts += 1
            await asyncio.sleep(retry_delay(attempts, first=0.05, cap=1.0))
        # Ending quietly would read as "no more events" to the loop consuming the watch.
        raise DengineError("the client is closed")

    # --- coalescing and retries ---------------------------------------------------------------------

    def _submit(
        self, op: bytes, kind: int, timeout: float | None, sequence: int = 0
    ) -> asyncio.Future[Answer]:
        """Queues an operation for the next batch; the future gives its answer. Callers await it
        directly: at tens of thousands of operations a second, each coroutine layer counts."""
        if self._closed:
            raise DengineError("the client is closed")
        loop = self._loop
        if loop is None:
            # Asked once (a client's channels serve one loop anyway): asyncio.get_running_loop()
            # makes a getpid() system call each time on CPython 3.11, as much as the rest here.
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        self._enqueue(_Pending(op, kind, future, time.monotonic() + (timeout or self.timeout), sequence))
        return future

    @staticmethod
    def _refuse_closed(p: _Pending) -> None:
        if not p.future.done():
            if p.sequence and p.maybe_applied:  # an earlier attempt may have been applied
                p.future.set_exception(OutcomeUnknownError("the client is closed; the write may be applied"))
            else:
                p.future.set_exception(DengineError("the client is closed"))

    def _enqueue(self, pending: _Pending) -> None:
        if self._closed:  # a retry that came due after close()
            self._refuse_closed(pending)
            return
        self._queue.append(pending)
        loop = self._loop
        assert loop is not None, "an operation was submitted first"
        if len(self._queue) >= self.max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = (
                loop.call_later(self.linger, self._flush) if self.linger else loop.call_soon(self._flush)
            )

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._queue:
            count, size = 0, 0
            for p in self._queue[: self.max_batch]:
                if count and (p.alone or size + len(p.op) > MAX_BATCH_BYTES):
                    break
                count, size = count + 1, size + len(p.op)
                if p.alone:
                    break
            batch, self._queue = self._queue[:count], self._queue[count:]
            # Not sent: an operation whose caller gave up on it while it waited here.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            assert self._loop is not None
            task = self._loop.create_task(self._send_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _send_batch(self, batch: list[_Pending]) -> None:
        address = self._endpoints.pick()
        # The batch gets the node's attempt time, or all its callers have left if less: one
        # short deadline must not cut the attempt of the others (on a batch stream, a batch
        # without an answer in time ends the stream and every batch on it). An operation whose
        # own deadline comes first fails alone, by its own timer.
        now = time.monotonic()
        left = max(p.deadline for p in batch) - now
        callers_time = left < self.attempt_timeout
        timeout = max(0.05, min(self.attempt_timeout, left))
        end = now + timeout
        assert self._loop is not None
        for p in batch:
            if p.deadline < end - 0.01:  # those ending with the batch fail with it
                self._loop.call_at(p.deadline, self._expire, p)
        try:
            raw = await self._call_batch(
                address, join_kv_operations([p.op for p in batch]), timeout, callers_time=callers_time
            )
        except asyncio.CancelledError:
            # The client's close() was cancelled while it waited for this batch (or the loop is
            # shutting down): its callers still hear an outcome, not silence. It may have been
            # sent.
            for p in batch:
                if p.sequence:
                    p.maybe_applied = True
                self._refuse_closed(p)
            raise
        except CallFailed as exc:
            self._batch_failed(address, batch, exc, callers_time)
            return
        self._endpoints.answered(address)
        try:
            answers = _read_answers(raw)
        except DecodeError:
            answers = []
        garbled = len(answers) != len(batch)
        if garbled:
            answers = ["INTERNAL: the server's answer to a batch does not match it"] * len(batch)
        wrote = False
        for p, answer in zip(batch, answers, strict=True):
            if isinstance(answer, str) or answer[0] != p.kind:
                text = (
                    answer if isinstance(answer, str) else "INTERNAL: the server answered another operation"
                )
                code, _, message = text.partition(": ")
                self._on_failure(address, code, message)
                whole_call = garbled or not isinstance(answer, str)
                taken = whole_call or _OUTCOME_UNKNOWN_TEXT in message
                self._retry_or_fail(p, code, message, whole_call=whole_call, taken=taken)
                continue
            try:  # no done() check first: this loop runs for every operation
                p.future.set_result(answer)
            except asyncio.InvalidStateError:
                continue  # its caller gave up on it (or its deadline passed)
            wrote = wrote or p.kind != _GET
        if wrote and self._endpoints.leader is None:
            self._follow(address)  # it took writes: it leads

    def _batch_failed(self, address: str, batch: list[_Pending], exc: CallFailed, callers_time: bool) -> None:
        """The call carrying ``batch`` to ``address`` failed as a whole."""
        if exc.code == "RESOURCE_EXHAUSTED" and len(batch) > 1:
            self._split(batch, reached(exc))
            return
        if callers_time and exc.code == "DEADLINE_EXCEEDED" and not exc.silent:
            self._on_failure(address, exc.code, exc.details)  # the callers' time ran out, not the node's
        else:
            self._call_failed(address, exc.code, exc.details)
        # The node is gone or frozen while another may serve: no reason to wait.
        at_once = self._endpoints.go_elsewhere_now(address)
        taken = exc.code in _MAYBE_TAKEN and reached(exc)
        for p in batch:
            self._retry_or_fail(p, exc.code, exc.details, at_once=at_once, whole_call=True, taken=taken)

    def _split(self, batch: list[_Pending], sent: bool) -> None:
        """A batch too large for one message, as a request or, once the node applied it, as its
        answer (say, puts asking for previous values of many megabytes): each operation goes
        again at once, in a batch of its own. A write the node applied is then answered from its
        session (the same sequence), not applied a second time."""
        for p in batch:
            if sent and p.sequence:
                p.maybe_applied = True
            if p.future.done():
                continue
            p.alone = True
            p.attempts += 1
            self._enqueue(p)

    @staticmethod
    def _expire(p: _Pending) -> None:
        """``p``'s deadline passed while its batch was out: it fails now (its batch goes on for
        the others). A write may have reached the node."""
        if not p.future.done():
            if p.sequence:
                p.maybe_applied = True
            p.future.set_exception(_deadline_error(p, "DEADLINE_EXCEEDED", "no answer before the deadline"))

    def _call_failed(self, address: str, code: str, details: str) -> None:
        """A call to ``address`` failed as a whole (not one operation the node answered)."""
        if code == "UNAVAILABLE":
            self._renew_channel_if_files_changed(address)
        self._endpoints.call_failed(address, code)
        self._on_failure(address, code, details)

    def _on_failure(self, address: str, code: str, details: str) -> None:
        # A refusal that names the leader points there, whatever its code: a follower's NOT_LEADER
        # names another node, an overloaded leader (UNAVAILABLE) names itself, to be retried
        # after a backoff rather than by way of a follower.
        # Followed even to a node on time out: a node's hint is newer than what this client saw
        # (after an outage, the new leader's time out would keep the client away from it). A
        # stale hint, at a leader that died, costs one refused call, retried elsewhere at once.
        hint = _LEADER_HINT.search(details)
        if hint and hint.group(2):
            self._follow(hint.group(2))
        elif address == self._endpoints.leader:
            self._endpoints.leader = None  # it stopped leading or stopped answering

    def _retry_or_fail(
        self,
        p: _Pending,
        code: str,
        message: str,
        *,
        at_once: bool = False,
        whole_call: bool = False,
        taken: bool = False,
    ) -> None:
        """Queues ``p`` again after a backoff (``at_once``: without one, for another node), or
        fails it: a refusal that retrying cannot change, or its deadline passed. ``whole_call``:
        the failure is not a node's answer to ``p`` but the call's (or an answer that cannot be
        read), so a write may have been applied all the same. ``taken``: this attempt may have
        been applied; a write that runs out of time after such an attempt is reported as an
        unknown outcome, never as a failure."""
        if taken and p.sequence:
            p.maybe_applied = True
        if p.future.done():
            return
        if code not in _RETRYABLE:
            if p.sequence and (p.maybe_applied or (whole_call and code in _MAYBE_APPLIED)):
                # Not a refusal: this attempt, or an earlier one, may have been applied.
                p.future.set_exception(
                    OutcomeUnknownError(
                        f"the call failed ({code}: {message}) after an attempt that may have been "
                        "applied; the write may be applied"
                    )
                )
                return
            p.future.set_exception(RequestFailed(code, message))
            return
        remaining = p.deadline - time.monotonic()
        if remaining <= 0:
            p.future.set_exception(_deadline_error(p, code, message))
            return
        p.attempts += 1
        if at_once:
            self._enqueue(p)
            return
        delay = retry_delay(p.attempts)
        if delay >= remaining:  # an attempt made at the deadline could only fail, or leave it unknown
            p.future.set_exception(_deadline_error(p, code, message))
            return
        assert self._loop is not None, "p was submitted"
        self._retrying[id(p)] = (self._loop.call_later(delay, self._retry, p), p)

    def _retry(self, p: _Pending) -> None:
        del self._retrying[id(p)]
        self._enqueue(p)

    async def _call_unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """Calls read-only ``method`` of the KV service, retrying within the deadline; each
        attempt gets at most ``attempt_timeout``, so that a frozen node costs one attempt, not
        the whole deadline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        attempts = 0
        while True:
            address = self._endpoints.pick()
            stub = self._stub(address)
            wait = min(self.attempt_timeout, deadline - time.monotonic())
            try:
                answer = await getattr(stub, method)(request, timeout=max(0.05, wait))
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
                self._call_failed(address, code, details)
                if code not in _RETRYABLE:
                    raise RequestFailed(code, details) from exc
                attempts += 1
                if time.monotonic() >= deadline:
                    if code == "DEADLINE_EXCEEDED":
                        raise DeadlineExceeded(
                            f"{method}: deadline exceeded after {attempts} attempts (last: {code} {details})"
                        ) from exc
                    raise Unavailable(f"no node could serve {method}: {code} {details}") from exc
            else:
                self._endpoints.answered(address)
                return answer
            await self._wait_to_retry(address, attempts)

    async def _call_batch(
        self, address: str, request: bytes, timeout: float, *, callers_time: bool = False
    ) -> bytes:
        """One attempt at a serialized ``BatchRequest`` on the node at ``address``: over its
        batch stream, or a unary ``Batch`` call to a node without one. Raises
        :class:`CallFailed`. ``callers_time``: see :meth:`BatchStream.call`."""
        seen = self._unary_only.get(address)
        if seen is None or time.monotonic() - seen >= UNARY_RECHECK_S:
            stream = self._batch_streams.get(address)
            if stream is None or stream.broken is not None:
                stream = self._batch_streams[address] = BatchStream(self._channel(address))
            try:
                answer = await stream.call(request, timeout, callers_time=callers_time)
            except CallFailed as exc:
                if exc.code != "UNIMPLEMENTED":
                    raise
                self._unary_only[address] = time.monotonic()
            else:
                if seen is not None:  # it has the stream now
                    del self._unary_only[address]
                return answer
        try:
            raw: bytes = await self._batch_call(address)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from None  # sent: reached() decides
        return raw

    def _batch_call(self, address: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        """The Batch method taking and giving raw bytes (cached like the stubs)."""
        call = self._batch_calls.get(address)
        if call is None:
            call = self._batch_calls[address] = self._channel(address).unary_unary("/dengine.v1.KV/Batch")
        return call

    def _stub(self, address: str) -> kv_pb2_grpc.KVStub:
        # Cached: a stub registers every method of the service with the channel when built.
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = kv_pb2_grpc.KVStub(self._channel(address))  # type: ignore[no-untyped-call]
        return stub

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            options = CHANNEL_OPTIONS
            credentials, files = self._credentials, self._tls_files()
            if files is not None:
                credentials = files.channel_credentials()  # the files as they are now
                self._channel_generation[address] = files.generation
            ch = (
                grpc.aio.secure_channel(address, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(address, options=options)
            )
            self._channels[address] = ch
        return ch

    def _renew_channel_if_files_changed(self, address: str) -> None:
        """A node that could not be reached is given a new channel if the TLS files changed
        since its channel was built: gRPC reconnects a channel with the credentials it was made
        with, so a rotated (or corrected) certificate would otherwise never be presented."""
        files = self._tls_files()
        if files is None or address not in self._channels:
            return
        files.refresh()
        if self._channel_generation.get(address) == files.generation:
            return
        old = self._channels.pop(address)
        self._stubs.pop(address, None)
        self._batch_calls.pop(address, None)
        # Its calls were failing anyway: they end with it, and their callers retry on the new one.
        task = asyncio.ensure_future(self._close_channel(old, self._batch_streams.pop(address, None)))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _tls_files(self) -> ClientTLS | None:
        # Told apart without importing dengine.tls (and cryptography with it) for every client.
        credentials = self._credentials
        if credentials is None or isinstance(credentials, grpc.ChannelCredentials):
            return None
        return credentials

    @staticmethod
    async def _close_channel(channel: grpc.aio.Channel, stream: BatchStream | None) -> None:
        if stream is not None:
            await stream.close()
        await channel.close()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _blocking(
    method: Callable[Concatenate[Client, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[SyncClient, _P], _R]:
    """``method`` of :class:`Client` as a :class:`SyncClient` method: the same arguments, the
    result once the call has run on the sync client's loop."""

    @functools.wraps(method)
    def call(self: SyncClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        result: _R = self._run(method(self._client, *args, **kwargs))
        return result

    call.__qualname__ = f"SyncClient.{method.__name__}"
    return call


class SyncClient:
    """A blocking wrapper of :class:`Client` for scripts and REPLs: the same methods, without
    ``await``. It runs its own event loop on a background thread; ``close()`` (or ``with``)
    stops it."""

    def __init__(self, endpoints: Sequence[str] | str, **options: Any) -> None:
        import threading  # noqa: PLC0415

        self._closed = False
        self._calls: set[concurrent.futures.Future[Any]] = set()  # of every thread, for close()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dengine-client", daemon=True)
        self._thread.start()
        try:
            self._client: Client = self._run(self._make(endpoints, options))
        except BaseException:
            self._closed = True
            self._stop_loop()  # its thread must not outlive a constructor that failed
            raise

    @staticmethod
    async def _make(endpoints: Sequence[str] | str, options: dict[str, Any]) -> Client:
        return Client(endpoints, **options)

    def _run(self, coro: Any) -> Any:
        if self._closed:
            coro.close()
            raise DengineError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._calls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:  # ended by close(), from another thread
                raise DengineError("the client is closed") from None
            raise
        finally:
            self._calls.discard(future)

    # The same methods as Client's, each run to completion on this client's loop.
    put = _blocking(Client.put)
    get = _blocking(Client.get)
    delete = _blocking(Client.delete)
    cas = _blocking(Client.cas)
    range = _blocking(Client.range)
    members = _blocking(Client.members)
    add_learner = _blocking(Client.add_learner)
    promote = _blocking(Client.promote)
    remove_member = _blocking(Client.remove_member)
    replace_member = _blocking(Client.replace_member)
    transfer_leader = _blocking(Client.transfer_leader)

    def close(self) -> None:
        """Closes the client and stops its loop; calls other threads are blocked in fail with
        :class:`~dengine.errors.DengineError`."""
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._stop_loop()

    async def _shutdown(self) -> None:
        await self._client.close()
        # What is still running (an admin call between two attempts, say) ends now.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        for future in list(self._calls):
            future.cancel()  # never started: its caller hears the client is closed
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
