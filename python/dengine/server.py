"""Standalone mode: a node running the built-in KV state machine behind the KV and Cluster gRPC
services (``dengine serve``).

Writes that reach a follower are answered ``FAILED_PRECONDITION`` with the leader's address in
the details, formatted ``not leader; leader=<id>@<address>`` (``leader=0@`` when none is known):
clients go to the leader directly rather than paying an extra hop through a forwarding follower.
An overloaded leader (``raft.max_unapplied_bytes``) answers ``UNAVAILABLE`` naming itself the
same way, so that clients back off and come back to it. Reads are served by any node: a
linearizable read on a follower asks the leader for the read index (one small message), then
reads locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf.message import DecodeError

from dengine._core import count_protobuf_field, encode_kv_write_answers, parse_kv_session_writes
from dengine.cluster_service import decoding, leader_details, leader_hint
from dengine.config import Config
from dengine.errors import (
    ApplyError,
    DengineError,
    LeaderOverloadedError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDroppedError,
)
from dengine.gc_tuning import tune_gc
from dengine.kv import (
    _OP_CAS,
    _OP_DELETE,
    _OP_PUT,
    MAX_BATCH_OPERATIONS,
    WATCH_PROGRESS_INTERVAL_S,
    KeyValue,
    KVCompactedError,
    KVStateMachine,
    ResultFields,
    WatchEvent,
    decode_result,
    encode_cas,
    encode_delete,
    encode_put,
    unpack_result,
)
from dengine.node import Node
from dengine.v1 import kv_pb2, kv_pb2_grpc

log = logging.getLogger("dengine.server")
T = TypeVar("T")

_CONSISTENCY: dict[int, str] = {
    kv_pb2.LINEARIZABLE: "linearizable",
    kv_pb2.LEASE: "lease",
    kv_pb2.STALE: "stale",
}
MAX_KEY = 64 << 10
MAX_VALUE = 16 << 20
# The most key and value bytes one answer carries: under the 64 MiB gRPC message limit with room
# for the rest. A larger answer is refused before it is built (RESOURCE_EXHAUSTED), not built and
# then refused by gRPC: gets of one large key, a few bytes each, would otherwise make the node
# copy it thousands of times.
MAX_ANSWER_BYTES = 48 << 20
MAX_BATCH = MAX_BATCH_OPERATIONS
# Batches of one BatchStream worked on at once; a client sending more waits in gRPC's flow control.
STREAM_WINDOW = 256
# Events waiting for one watcher, at most: a watcher further behind (its client reads slower
# than the writes come, or not at all) is ended RESOURCE_EXHAUSTED, and its client resumes from
# the last revision it received, from the history. Without a bound a client that never read
# made its node hold every later event, twice over.
WATCH_QUEUE_MAX_BYTES = 64 << 20
WATCH_QUEUE_MAX_EVENTS = 100_000
# About the most bytes of events in one watch response: a backlog goes out in several, of whole
# revisions each (one larger revision goes alone). As one message, a backlog of hundreds of MB
# took seconds to build and passed the receive limit, at every retry.
WATCH_RESPONSE_BYTES = 4 << 20


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _kv(kv: KeyValue | None) -> kv_pb2.KeyValue | None:
    return None if kv is None else _kv_of(kv)


def _fill_kv(m: kv_pb2.KeyValue, kv: KeyValue) -> None:
    m.key = kv.key
    m.value = kv.value
    m.create_revision = kv.create_revision
    m.mod_revision = kv.mod_revision
    m.version = kv.version


def _kv_of(kv: KeyValue) -> kv_pb2.KeyValue:
    m = kv_pb2.KeyValue()
    _fill_kv(m, kv)
    return m


def _bounded_range(sm: KVStateMachine, prefix: bytes, limit: int | None) -> list[KeyValue]:
    try:
        return sm.range(prefix, limit, max_bytes=MAX_ANSWER_BYTES)
    except ValueError as exc:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None


def _check_key(key: bytes) -> None:
    if not key or len(key) > MAX_KEY:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"key must be 1 to {MAX_KEY} bytes")


def _check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"value exceeds {MAX_VALUE} bytes")


# Answers are filled in place: building a message and passing it to its parent's constructor
# copies it, which made answering a write cost 2.5 times as much. They are filled from the flat
# fields of the result bytes (kv.unpack_result), without KVResult and KeyValue objects between.
def _fill_prev(m: kv_pb2.KeyValue, r: ResultFields) -> None:
    m.key = r[3]  # type: ignore[assignment]  # only called when the key is there
    m.value = r[4]
    m.create_revision = r[5]
    m.mod_revision = r[6]
    m.version = r[7]


def _fields(raw: bytes) -> ResultFields:
    fields = unpack_result(raw)
    if fields is not None:
        return fields
    res = decode_result(raw)  # an error result, or damage: the checked decoder says which
    p = res.prev
    if p is None:
        return (res.ok, res.revision, res.deleted, None, b"", 0, 0, 0)
    return (res.ok, res.revision, res.deleted, p.key, p.value, p.create_revision, p.mod_revision, p.version)


def _fill_put(m: kv_pb2.PutResponse, raw: bytes) -> None:
    r = _fields(raw)
    m.revision = r[1]
    if r[3] is not None:
        _fill_prev(m.prev, r)


def _fill_delete(m: kv_pb2.DeleteResponse, raw: bytes) -> None:
    r = _fields(raw)
    m.deleted = r[0]
    m.revision = r[1]
    if r[3] is not None:
        _fill_prev(m.prev, r)


def _fill_cas(m: kv_pb2.CompareAndSwapResponse, raw: bytes) -> None:
    r = _fields(raw)
    m.succeeded = r[0]
    m.revision = r[1]
    if not r[0] and r[3] is not None:  # a failed swap reports the current key-value
        _fill_prev(m.current, r)


class _Write(NamedTuple):
    """A validated write: the command to propose and how to answer once it is applied."""

    kind: str  # the Operation field and response: put, delete or cas
    command: bytes
    session: kv_pb2.Session | None
    fill: Callable[[Any, bytes], None]  # writes the result bytes into the response message


_RESPONSES: dict[str, Callable[[], Any]] = {
    "put": kv_pb2.PutResponse,
    "delete": kv_pb2.DeleteResponse,
    "cas": kv_pb2.CompareAndSwapResponse,
}


def _session(
    r: kv_pb2.PutRequest | kv_pb2.DeleteRequest | kv_pb2.CompareAndSwapRequest,
) -> kv_pb2.Session | None:
    if not r.HasField("session"):
        return None
    s = r.session
    if s.client_id and not s.sequence:
        # Refused here, per operation: the node would raise proposing it (after the writes of
        # its batch ahead of it were proposed), which failed the whole call or stream.
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a session write needs a sequence >= 1")
    return s


def _prepare_put(r: kv_pb2.PutRequest) -> _Write:
    _check_key(r.key)
    _check_value(r.value)
    return _Write("put", encode_put(r.key, r.value, prev_kv=r.prev_kv), _session(r), _fill_put)


def _prepare_delete(r: kv_pb2.DeleteRequest) -> _Write:
    _check_key(r.key)
    return _Write("delete", encode_delete(r.key), _session(r), _fill_delete)


def _prepare_cas(r: kv_pb2.CompareAndSwapRequest) -> _Write:
    _check_key(r.key)
    _check_value(r.value)
    if r.has_expected:
        _check_value(r.expected)  # encode_cas would refuse it, as a ValueError no one answers
    return _Write(
        "cas", encode_cas(r.key, r.expected if r.has_expected else None, r.value), _session(r), _fill_cas
    )


def _prepare(op: kv_pb2.Operation) -> _Write:
    kind = op.WhichOneof("op")
    if kind == "put":
        return _prepare_put(op.put)
    if kind == "delete":
        return _prepare_delete(op.delete)
    if kind == "cas":
        return _prepare_cas(op.cas)
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty operation")


def _status_of(exc: RequestError | DengineError) -> tuple[grpc.StatusCode, str]:
    """The status a request refused with ``exc`` is answered with: a node's own errors (not
    leading, stopping) are UNAVAILABLE, which clients retry."""
    if isinstance(exc, RequestError):
        return exc.code, exc.details
    return grpc.StatusCode.UNAVAILABLE, str(exc)


_Tally = dict[grpc.StatusCode, int]
"""Failed operations of one batch, by status code: counted in the metrics once per batch."""


def _error_text(exc: RequestError | DengineError, tally: _Tally | None = None) -> str:
    """How a failed operation of a batch is answered: ``CODE: details``; counted in ``tally``."""
    code, details = _status_of(exc)
    if tally is not None:
        tally[code] = tally.get(code, 0) + 1
    return f"{code.name}: {details}"


def _set_error(slot: kv_pb2.OperationResult, exc: RequestError | DengineError, tally: _Tally) -> None:
    slot.error = _error_text(exc, tally)


_OP_KINDS = {_OP_PUT: "put", _OP_DELETE: "delete", _OP_CAS: "cas"}  # the write kinds of a batch
_FILLS: dict[str, Callable[[Any, bytes], None]] = {"put": _fill_put, "delete": _fill_delete, "cas": _fill_cas}


def _answers_message(ops: bytes, answers: list[bytes | str]) -> kv_pb2.BatchResponse:
    """The response for writes answered with results the Rust encoder left to this one."""
    response = kv_pb2.BatchResponse()
    for op, answer in zip(ops, answers, strict=True):
        slot = response.results.add()
        if isinstance(answer, str):
            slot.error = answer
        else:
            kind = _OP_KINDS[op]
            _FILLS[kind](getattr(slot, kind), answer)
    return response


class KVService(kv_pb2_grpc.KVServicer):
    def __init__(self, node: Node, sm: KVStateMachine) -> None:
        self.node = node
        self.sm = sm
        self.watch_queues: set[WatchQueue] = set()  # one per open watch

    def _leader_details(self, leader: int | None) -> str:
        return leader_details(self.node, leader)

    def _check_leader(self) -> None:
        raft = self.node.raft
        if raft is None or raft.lead != self.node.id:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, self._leader_details(raft.lead if raft else None)
            )

    def _submit(self, w: _Write) -> asyncio.Future[bytes]:
        if w.session is not None and w.session.client_id:
            # A client session: exactly-once across retries, even through other nodes.
            s = w.session
            return self.node.submit_session(s.client_id, s.sequence, w.command, s.first_outstanding)
        return self.node.submit(w.command)

    def _write_error(self, exc: BaseException) -> RequestError | BaseException:
        """The status a failed proposal is answered with."""
        if isinstance(exc, NotLeaderError):
            return RequestError(grpc.StatusCode.FAILED_PRECONDITION, self._leader_details(exc.leader))
        if isinstance(exc, LeaderOverloadedError):
            # It names this node as the leader: the client backs off and comes back here.
            return RequestError(grpc.StatusCode.UNAVAILABLE, f"{exc}; {leader_hint(self.node, self.node.id)}")
        if isinstance(exc, (ProposalDroppedError, OutcomeUnknownError)):
            # Retryable: a client's retry carries the same session, so it applies at most once.
            return RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
        if isinstance(exc, ApplyError):
            return RequestError(grpc.StatusCode.INTERNAL, str(exc))
        return exc

    async def _write(self, w: _Write) -> Any:
        self._check_leader()
        try:
            raw = await self._submit(w)
        except (NotLeaderError, ProposalDroppedError, OutcomeUnknownError, ApplyError) as exc:
            raise self._write_error(exc) from exc
        response = _RESPONSES[w.kind]()
        w.fill(response, raw)
        return response

    async def _writes(
        self, ops: list[kv_pb2.Operation], slots: list[kv_pb2.OperationResult], tally: _Tally
    ) -> None:
        """Proposes every write of a batch together (one append, one fsync), waits for all of
        them on their futures, without a task per operation, and answers each in its slot."""
        prepared: list[tuple[kv_pb2.OperationResult, _Write, asyncio.Future[bytes]]] = []
        try:
            self._check_leader()
            for op, slot in zip(ops, slots, strict=True):
                try:
                    w = _prepare(op)
                except RequestError as exc:
                    _set_error(slot, exc, tally)
                    continue
                prepared.append((slot, w, self._submit(w)))
        except (RequestError, DengineError) as exc:
            submitted = {id(p[0]) for p in prepared}
            for slot in slots:
                if id(slot) not in submitted and not slot.HasField("error"):
                    _set_error(slot, exc, tally)
        for slot, w, f in prepared:
            # One by one rather than gathered: they complete together, so this suspends about
            # once, where gather adds a callback and an event-loop turn per future.
            try:
                raw = await f
            except Exception as exc:
                failure = self._write_error(exc)
                if not isinstance(failure, (RequestError, DengineError)):
                    raise
                _set_error(slot, failure, tally)
                continue
            w.fill(getattr(slot, w.kind), raw)

    async def _read(self, fn: Callable[[KVStateMachine], T], consistency: int, count: int = 1) -> T:
        """``fn`` run as one read of ``count`` client reads (the gets of a batch): each is counted
        in ``dengine_reads_total``, as the node counts the one read it serves."""
        mode = _CONSISTENCY.get(consistency)
        if mode is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown consistency {consistency}")
        if count > 1:
            self.node.metrics.read(mode, count - 1)  # node.read counts the one read it serves
        raft = self.node.raft
        if mode == "lease" and raft is not None and not raft.cfg.lease_reads:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "lease reads are off on this node (raft.check_quorum = false); ask for a linearizable read",
            )
        try:
            return await self.node.read(fn, mode)  # type: ignore[arg-type]  # checked just above
        except NotLeaderError as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, self._leader_details(exc.leader)) from exc

    async def _put(self, r: kv_pb2.PutRequest) -> kv_pb2.PutResponse:
        response: kv_pb2.PutResponse = await self._write(_prepare_put(r))
        return response

    async def _get(self, r: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        _check_key(r.key)
        kv, rev = await self._read(lambda sm: (sm.get(r.key), sm.revision), r.consistency)
        return kv_pb2.GetResponse(found=kv is not None, kv=_kv(kv), revision=rev)

    async def _delete(self, r: kv_pb2.DeleteRequest) -> kv_pb2.DeleteResponse:
        response: kv_pb2.DeleteResponse = await self._write(_prepare_delete(r))
        return response

    async def _cas(self, r: kv_pb2.CompareAndSwapRequest) -> kv_pb2.CompareAndSwapResponse:
        response: kv_pb2.CompareAndSwapResponse = await self._write(_prepare_cas(r))
        return response

    async def _call(self, context: Any, work: Awaitable[T], method: str) -> T:
        try:
            return await work
        except (RequestError, DengineError) as exc:
            code, details = _status_of(exc)
            self.node.metrics.grpc_error(method, code)
            await context.abort(code, details)
            raise AssertionError("unreachable") from exc
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise  # context.abort: counted where it was called
        except Exception:
            self.node.metrics.grpc_error(method, grpc.StatusCode.UNKNOWN)  # gRPC answers UNKNOWN
            raise

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        return await self._call(context, self._put(request), "Put")

    async def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
        return await self._call(context, self._get(request), "Get")

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> kv_pb2.DeleteResponse:
        return await self._call(context, self._delete(request), "Delete")

    async def CompareAndSwap(
        self, request: kv_pb2.CompareAndSwapRequest, context: Any
    ) -> kv_pb2.CompareAndSwapResponse:
        return await self._call(context, self._cas(request), "CompareAndSwap")

    async def Range(self, request: kv_pb2.RangeRequest, context: Any) -> kv_pb2.RangeResponse:
        limit = request.limit or None

        async def run() -> kv_pb2.RangeResponse:
            kvs, rev = await self._read(
                lambda sm: (_bounded_range(sm, request.prefix, limit), sm.revision), request.consistency
            )
            return kv_pb2.RangeResponse(kvs=[_kv_of(kv) for kv in kvs], revision=rev)

        return await self._call(context, run(), "Range")

    async def _gets(
        self,
        gets: list[kv_pb2.GetRequest],
        consistency: int,
        slots: list[kv_pb2.OperationResult],
        tally: _Tally,
    ) -> None:
        """Answers many gets of one consistency with a single read: one ReadIndex round (or
        lease check) and one visit to the state machine for all of them."""
        valid: list[int] = []
        for i, r in enumerate(gets):
            try:
                _check_key(r.key)
                valid.append(i)
            except RequestError as exc:
                _set_error(slots[i], exc, tally)

        def read_all(sm: KVStateMachine) -> tuple[list[KeyValue | None], int]:
            return [sm.get(gets[i].key) for i in valid], sm.revision

        if not valid:
            return
        try:
            found, rev = await self._read(read_all, consistency, len(valid))
        except (RequestError, DengineError) as exc:
            for i in valid:
                _set_error(slots[i], exc, tally)
            return
        size = sum(len(kv.key) + len(kv.value) for kv in found if kv is not None)
        if size > MAX_ANSWER_BYTES:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the batch's gets would answer {size} bytes of keys and values, more than the "
                f"{MAX_ANSWER_BYTES} one answer may carry; ask for fewer keys at once",
            )
        for i, kv in zip(valid, found, strict=True):
            answer = slots[i].get
            answer.found = kv is not None
            answer.revision = rev
            if kv is not None:
                _fill_kv(answer.kv, kv)

    async def Batch(self, request: bytes, context: Any) -> bytes:
        """Takes and answers raw bytes (see :func:`add_kv_service`); :meth:`_answer_batch` says how."""
        return await self._call(context, self._answer_batch(request, "Batch"), "Batch")

    async def BatchStream(self, envelopes: AsyncIterator[bytes], context: Any) -> None:
        """Batches over one long-lived stream, raw bytes both ways: each ``StreamedBatch`` is
        answered by its id as soon as it completes, so a slow batch holds up no other. A refused
        batch is answered with the status a ``Batch`` call would have failed with, and the stream
        goes on; a malformed envelope ends the stream with INVALID_ARGUMENT. At most
        :data:`STREAM_WINDOW` batches of one stream are worked on at once: beyond that, the
        stream is not read, and gRPC's flow control holds the client back."""
        window = asyncio.Semaphore(STREAM_WINDOW)
        sending = asyncio.Lock()  # gRPC takes one message at a time on a call
        working: set[asyncio.Task[None]] = set()
        handler = asyncio.current_task()
        assert handler is not None
        failure: list[Exception] = []

        async def answer(streamed: kv_pb2.StreamedBatch) -> None:
            try:
                out = await self._answer_streamed(streamed)
                async with sending:
                    await context.write(out)
            except Exception as exc:  # a bug, or the call ended: so does the stream
                if not failure:
                    failure.append(exc)
                    handler.cancel()
            finally:
                window.release()

        try:
            async for envelope in envelopes:
                try:
                    streamed = kv_pb2.StreamedBatch.FromString(envelope)
                except DecodeError:
                    self.node.metrics.grpc_error("BatchStream", grpc.StatusCode.INVALID_ARGUMENT)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed StreamedBatch")
                await window.acquire()
                task = asyncio.get_running_loop().create_task(answer(streamed))
                working.add(task)
                task.add_done_callback(working.discard)
            while working:  # the client is done sending: answer what it sent, then end
                await asyncio.wait(list(working))
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            for task in list(working):
                task.cancel()

    async def _answer_streamed(self, streamed: kv_pb2.StreamedBatch) -> bytes:
        try:
            batch = await self._answer_batch(streamed.batch, "BatchStream")
        except (RequestError, DengineError) as exc:
            code, details = _status_of(exc)
            self.node.metrics.grpc_error("BatchStream", code)
            refused = kv_pb2.StreamedBatchAnswer(id=streamed.id, code=code.value[0], message=details)
            return refused.SerializeToString()
        return kv_pb2.StreamedBatchAnswer(id=streamed.id, batch=batch).SerializeToString()

    async def _answer_batch(self, request: bytes, method: str) -> bytes:
        """A batch of session writes, what a client under load sends, goes from request bytes to
        log payloads and from results to response bytes in Rust, with one waiter for the whole
        batch; any other batch goes through the protobuf messages. Both paths answer alike
        (``tests/test_kv_batch_wire.py``). Raises :class:`RequestError` for a batch refused whole.
        Operations answered with an error are counted as gRPC errors of ``method``, by code."""
        # Counted before either path parses it: a batch of millions of empty operations (a few
        # bytes each) would hold the loop for seconds and take gigabytes to be refused after.
        count = count_protobuf_field(request, 1, MAX_BATCH)
        if count is not None and count > MAX_BATCH:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"a batch holds at most {MAX_BATCH} operations"
            )
        writes = parse_kv_session_writes(request)
        if writes is None:
            try:
                message = kv_pb2.BatchRequest.FromString(request)
            except DecodeError:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "malformed BatchRequest") from None
            tally: _Tally = {}
            answered = (await self._batch(message, tally)).SerializeToString()
            self._count_errors(method, tally)
            return answered
        ops, keys, payloads = writes
        answers = await self._group_answers(keys, payloads, method)
        encoded = encode_kv_write_answers(ops, answers)
        return encoded if encoded is not None else _answers_message(ops, answers).SerializeToString()

    def _count_errors(self, method: str, tally: _Tally) -> None:
        for code, n in tally.items():
            self.node.metrics.grpc_error(method, code, n)

    async def _group_answers(
        self, keys: list[tuple[int, int]], payloads: list[bytes], method: str = "Batch"
    ) -> list[bytes | str]:
        try:
            self._check_leader()
            group = self.node.submit_group(keys, payloads)
        except (RequestError, DengineError) as exc:
            self.node.metrics.grpc_error(method, _status_of(exc)[0], len(keys))
            return [_error_text(exc)] * len(keys)
        try:
            settled = await group.future
        except BaseException:
            self.node.forget_group(keys, group)
            raise
        if not group.failed:  # the usual case: every answer is result bytes
            return settled  # type: ignore[return-value]
        answers: list[bytes | str] = []
        tally: _Tally = {}
        for a in settled:
            if isinstance(a, bytes):
                answers.append(a)
                continue
            assert a is not None, "the group completes once every write is answered"
            failure = self._write_error(a)
            if not isinstance(failure, (RequestError, DengineError)):
                raise failure
            answers.append(_error_text(failure, tally))
        self._count_errors(method, tally)
        return answers

    async def _batch(self, request: kv_pb2.BatchRequest, tally: _Tally) -> kv_pb2.BatchResponse:
        if len(request.ops) > MAX_BATCH:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"a batch holds at most {MAX_BATCH} operations"
            )
        # The answers are filled in place in the response, each operation in its own slot.
        response = kv_pb2.BatchResponse()
        add = response.results.add
        slots = [add() for _ in request.ops]
        gets: dict[int, list[int]] = {}  # consistency -> positions of its gets
        writes: list[int] = []
        for i, op in enumerate(request.ops):
            if op.WhichOneof("op") == "get":
                gets.setdefault(op.get.consistency, []).append(i)
            else:
                writes.append(i)
        ops = request.ops
        work: list[Coroutine[Any, Any, None]] = [
            self._gets([ops[i].get for i in where], c, [slots[i] for i in where], tally)
            for c, where in gets.items()
        ]
        if writes:
            work.append(self._writes([ops[i] for i in writes], [slots[i] for i in writes], tally))
        if len(work) == 1:  # the usual case: no task for it
            await work[0]
        else:
            await asyncio.gather(*work)
        return response

    def _watch_ended_out_of_range(self) -> None:
        self.node.metrics.grpc_error("Watch", grpc.StatusCode.OUT_OF_RANGE)

    async def Watch(self, request: kv_pb2.WatchRequest, context: Any) -> AsyncIterator[kv_pb2.WatchResponse]:
        """Events under the prefix from ``start_revision``, then live ones as they apply, bundled
        as they queue up, in responses of about :data:`WATCH_RESPONSE_BYTES`; every second a
        progress notice while this node knows a leader. A watcher more than
        :data:`WATCH_QUEUE_MAX_BYTES` behind is ended RESOURCE_EXHAUSTED (see :class:`WatchQueue`)."""
        queue = WatchQueue()
        queue.unsubscribe = self.sm.subscribe(queue.put)
        self.watch_queues.add(queue)
        loop = asyncio.get_running_loop()
        ticker: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal ticker
            # A node cut off from the cluster (a learner too, which never forgets its leader) or
            # one that lost its leader goes quiet, so that its watchers move to a node that
            # still hears the cluster.
            raft = self.node.raft
            if raft is not None and raft.hears_leader:
                queue.notice()
            ticker = loop.call_later(WATCH_PROGRESS_INTERVAL_S, tick)

        async def unless_restored() -> None:
            # A snapshot restore runs on a worker thread while this loop serves watches, so it
            # may finish between any two reads here: a revision read after it, claimed beside
            # events read before it, would move the client past changes it never got (it
            # resumes after the claimed revision). Each response is therefore checked, after
            # its last read and just before it goes out, to come from the state it started in;
            # if not, the stream ends so the client resumes where the history still reaches, or
            # learns that nowhere does, instead of silently missing changes.
            if self.sm.restores != restores:
                self._watch_ended_out_of_range()
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "this node installed a snapshot; resume the watch from the last revision seen",
                )

        floor = request.start_revision  # queued events below it were already sent
        restores = self.sm.restores
        try:
            if request.start_revision:
                # The revision first: the backlog read after it reaches at least that far.
                revision = self.sm.revision
                try:
                    backlog = self.sm.events_since(request.start_revision - 1)
                except KVCompactedError as exc:
                    self._watch_ended_out_of_range()
                    await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
                floor = max(floor, revision + 1)
                for events, upto in _watch_responses(backlog, request.prefix, 0):
                    await unless_restored()
                    yield kv_pb2.WatchResponse(events=events, revision=upto or revision)
                del backlog
            ticker = loop.call_later(WATCH_PROGRESS_INTERVAL_S, tick)
            while True:
                batch = await queue.take()
                if queue.overflowed:
                    await self._end_watch_behind(context)
                # Every event applied up to this revision is in the batch: applies publish on
                # this thread, and the loop has not run anything since the queue was emptied.
                # Read now, before a response of the batch goes out and lets applies run.
                revision = self.sm.revision
                # The state may have jumped to a snapshot without events for what it changed.
                await unless_restored()
                progress = None in batch
                for events, upto in _watch_responses(batch, request.prefix, floor):
                    if upto or events or progress:
                        await unless_restored()
                        yield kv_pb2.WatchResponse(events=events, revision=upto or revision)
        finally:
            queue.unsubscribe()
            self.watch_queues.discard(queue)
            if ticker is not None:
                ticker.cancel()

    async def _end_watch_behind(self, context: Any) -> None:
        self.node.metrics.grpc_error("Watch", grpc.StatusCode.RESOURCE_EXHAUSTED)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this watcher fell more than {WATCH_QUEUE_MAX_BYTES} bytes or {WATCH_QUEUE_MAX_EVENTS} "
            "events behind; resume from the last revision received",
        )


def _event(e: Any) -> kv_pb2.WatchEvent:
    kind = kv_pb2.WatchEvent.PUT if e.type == "put" else kv_pb2.WatchEvent.DELETE
    return kv_pb2.WatchEvent(type=kind, kv=_kv(e.kv), prev=_kv(e.prev), revision=e.revision)


def _event_size(e: WatchEvent) -> int:
    """About the bytes ``e`` takes in a response (and, queued, in memory)."""
    size = 48 + len(e.kv.key) + len(e.kv.value)
    if e.prev is not None:
        size += len(e.prev.key) + len(e.prev.value)
    return size


class WatchQueue:
    """The events applied for one watcher and not yet taken to be sent, bounded by
    :data:`WATCH_QUEUE_MAX_BYTES` and :data:`WATCH_QUEUE_MAX_EVENTS`. Past the bound it
    ``overflowed``: it drops what it holds, takes nothing more, and wakes its watcher to end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()  # None: a progress notice
        self.bytes = 0
        self.overflowed = False
        self.unsubscribe: Callable[[], None] = lambda: None

    def put(self, event: WatchEvent) -> None:
        """The state machine's subscriber: runs inside each apply, on the event loop's thread."""
        if self.overflowed:
            return
        size = _event_size(event)
        if self.bytes + size > WATCH_QUEUE_MAX_BYTES or self.queue.qsize() >= WATCH_QUEUE_MAX_EVENTS:
            self._overflow()
            return
        self.bytes += size
        self.queue.put_nowait(event)

    def notice(self) -> None:
        """Queues a progress notice."""
        if not self.overflowed:
            self.queue.put_nowait(None)

    async def take(self) -> list[WatchEvent | None]:
        """Everything queued, once something is; the queue is then empty."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        self.bytes = 0
        return batch

    def _overflow(self) -> None:
        self.overflowed = True
        self.unsubscribe()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.bytes = 0
        # Wakes the watcher if it waits for events; one waiting for gRPC to take a response (its
        # client does not read) holds only that response, and ends when the client reads again
        # or goes away. (Cancelling its task instead left the client's call hanging, no status.)
        self.queue.put_nowait(None)


def _watch_responses(
    events: list[WatchEvent] | list[WatchEvent | None], prefix: bytes, floor: int
) -> Iterator[tuple[list[kv_pb2.WatchEvent], int]]:
    """The events of ``events`` under ``prefix`` from revision ``floor`` on, converted as they go
    out, in responses of about :data:`WATCH_RESPONSE_BYTES`: ``(events, revision)`` where all
    events up to ``revision`` are sent (a client resumes after it), cut only between revisions;
    the last with revision 0, for the caller to claim its own."""
    out: list[kv_pb2.WatchEvent] = []
    size = 0
    last = 0
    for e in events:
        if e is None or e.revision < floor or not e.kv.key.startswith(prefix):
            continue
        n = _event_size(e)
        if out and e.revision != last and size + n > WATCH_RESPONSE_BYTES:
            yield out, last
            out, size = [], 0
        out.append(_event(e))
        size += n
        last = e.revision
    yield out, 0


def add_kv_service(server: grpc.aio.Server, service: KVService) -> None:
    """Serves ``service`` as ``dengine.v1.KV``. Unlike the generated ``add_KVServicer_to_server``,
    Batch and BatchStream take and return raw bytes, so that the fast path never builds the
    messages, and the other methods decode their requests themselves, refusing bytes that are
    not the message with INVALID_ARGUMENT (see :func:`~dengine.cluster_service.decoding`)."""
    descriptor = kv_pb2.DESCRIPTOR.services_by_name["KV"]
    handlers = {}
    for method in descriptor.methods:
        raw = method.name in ("Batch", "BatchStream")
        request = getattr(kv_pb2, method.input_type.name)
        response = getattr(kv_pb2, method.output_type.name)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[method.client_streaming, method.server_streaming]
        handler = getattr(service, method.name)
        if not raw:  # decoded here, so that bytes that are not the message get INVALID_ARGUMENT
            handler = decoding(handler, request, method.name, service.node, streaming=method.server_streaming)
        handlers[method.name] = make(
            handler,
            request_deserializer=None,
            response_serializer=None if raw else response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


def kv_services(sm: KVStateMachine) -> Callable[[grpc.aio.Server, Node], None]:
    def add(server: grpc.aio.Server, node: Node) -> None:
        add_kv_service(server, KVService(node, sm))

    return add


async def serve(config: Config, *, join: str | None = None) -> None:
    """Runs a KV node until SIGTERM or SIGINT, then stops it gracefully. ``join``: the address
    of a member of a running cluster to join as a learner."""
    sm = KVStateMachine()
    node = Node(config, sm, extra_services=kv_services(sm), join=join)
    await node.start()
    tune_gc()  # this process is the node's: collect rarely, and never walk the restored state
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Windows has no loop signal handlers; Ctrl-C still raises KeyboardInterrupt there.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    signalled = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(node.wait_stopped())
    await asyncio.wait([signalled, failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        signalled.cancel()
        raise DengineError(
            f"node {config.node.id}: {node.failure or 'stopped after a failure'}; see the log above"
        )
    failed.cancel()
    log.info("node %d: stopping on signal", config.node.id)
    await node.stop()
