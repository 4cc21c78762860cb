"""One long-lived ``KV.BatchStream`` call from a client to one node.

grpc.aio spends several times more per unary call than per message on an open stream (about
1.0 ms against 0.3 ms for a round trip here, ``benchmarks/bench_peer_transport.py``), so the
client sends its batches over one stream per node. Each batch goes out tagged with an id, and
each answer finds its waiting batch by that id: answers come back in any order.

A batch that gets no answer fails with :class:`CallFailed`, the gRPC status a unary ``Batch``
call would have failed with, and the client retries it as it would have retried that call.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
from google.protobuf.message import DecodeError

from dengine.v1 import kv_pb2

_METHOD = "/dengine.v1.KV/BatchStream"
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# What grpc.aio reports for a call whose write raced with the end of the stream (the connection
# lost, the node killed), in place of the stream's real status (grpc/grpc#36066): no answer from
# the node, but a lost stream, as retryable as UNAVAILABLE. A node's own INTERNAL says otherwise.
_LOST_UNDER_A_WRITE = ("INTERNAL", "Internal error from Core")


class CallFailed(Exception):
    """A batch got no answer. ``code`` is the name of a gRPC status code (``"UNAVAILABLE"``...).
    ``sent`` is False when the batch is known not to have left this process (the stream was
    already broken, or ended before the batch was written to it); see also :func:`reached`.
    ``silent`` is False for a batch that ran out of its callers' time while the node went on
    answering other batches: no sign that the node failed."""

    def __init__(self, code: str, details: str, *, sent: bool = True, silent: bool = True) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.sent = sent
        self.silent = silent


def reached(failure: CallFailed) -> bool:
    """Whether the batch of a call that failed with ``failure`` may have reached the node: it
    was written, and the call did not fail for want of a connection."""
    return failure.sent and not failure.details.startswith(NOT_CONNECTED)


# How gRPC's details begin for a call that never got a connection to the node.
NOT_CONNECTED = ("failed to connect to all addresses", "DNS resolution failed")


def _stream_failure(code: str, details: str) -> CallFailed:
    if (code, details) == _LOST_UNDER_A_WRITE:
        return CallFailed("UNAVAILABLE", f"the batch stream was lost under a write ({details})")
    return CallFailed(code, details)


class BatchStream:
    """Batches in flight on one stream to one node. Once the stream ends, ``broken`` says why
    and every batch still waiting fails with it: open a new stream for the next one.

    A batch that gets no answer in time ends the stream too. The node may have stopped reading
    it (a frozen process): gRPC's flow control then holds every later write on it, and only a
    new stream, or another node, can go on."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        # No serializers: the stream carries the envelopes' bytes as they are.
        self._call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(_METHOD)()
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._last_id = 0
        # Envelopes not yet written. gRPC takes one message at a time on a call, and a write
        # may wait on flow control for as long as the node does not read: one writer task
        # writes them in order, and a caller waits only for its answer.
        self._outbox: collections.deque[tuple[int, bytes]] = collections.deque()
        self._handed = 0  # the last batch id handed to gRPC to write: it may have reached the node
        self._answers = 0  # answers read so far
        self._writer: asyncio.Task[None] | None = None
        self.broken: CallFailed | None = None
        self._closed = False
        self._reader = loop.create_task(self._read())

    async def call(self, batch: bytes, timeout: float, *, callers_time: bool = False) -> bytes:
        """Sends ``batch`` (a serialized ``BatchRequest``) and returns the serialized
        ``BatchResponse``. Raises :class:`CallFailed` when the node refused the batch, the stream
        ended, or ``timeout`` seconds passed without an answer. ``callers_time``: ``timeout`` is
        what is left of the callers' deadlines, not the node's time to answer, so its passing
        ends the stream only if the node answered nothing meanwhile."""
        if self.broken is not None:
            raise CallFailed(self.broken.code, self.broken.details, sent=False)
        self._last_id = batch_id = self._last_id + 1
        answer: asyncio.Future[bytes] = self._loop.create_future()
        self._waiting[batch_id] = answer
        expiry = self._loop.call_later(timeout, self._expire, batch_id, callers_time, self._answers)
        self._outbox.append((batch_id, kv_pb2.StreamedBatch(id=batch_id, batch=batch).SerializeToString()))
        if self._writer is None:
            self._writer = self._loop.create_task(self._write())
        try:
            return await answer
        finally:
            expiry.cancel()
            self._waiting.pop(batch_id, None)

    async def _write(self) -> None:
        try:
            while self._outbox and self.broken is None:
                batch_id, envelope = self._outbox.popleft()
                if batch_id not in self._waiting:
                    # Given up before it was written (its callers were told it was not sent):
                    # written now, it could be applied behind their backs.
                    continue
                self._handed = batch_id
                await self._call.write(envelope)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream ended under the write: the reader learns why and fails the batches
        finally:
            self._writer = None

    def _expire(self, batch_id: int, callers_time: bool, answers: int) -> None:
        answer = self._waiting.get(batch_id)
        if answer is not None and not answer.done():
            sent = batch_id <= self._handed
            if callers_time and self._answers != answers:  # the node is answering: keep the stream
                details = "the callers' deadlines passed before the answer"
                if not sent:
                    # Told it was not sent, it must never be: the writer, woken in this same loop
                    # turn by a write that completed, would otherwise find it still waiting.
                    del self._waiting[batch_id]
                answer.set_exception(CallFailed("DEADLINE_EXCEEDED", details, sent=sent, silent=False))
                return
            answer.set_exception(CallFailed("DEADLINE_EXCEEDED", "no answer to the batch in time", sent=sent))
            self._end(
                CallFailed(
                    "UNAVAILABLE", "the batch stream was given up: a batch on it got no answer in time"
                )
            )

    def _end(self, failure: CallFailed) -> None:
        """Marks the stream broken by ``failure`` (the first reason stands) and fails every
        batch still waiting, each with an exception of its own (raising one instance again and
        again would grow its traceback)."""
        if self.broken is None:
            self.broken = failure
            self._call.cancel()
            if self._writer is not None:
                self._writer.cancel()  # its write may never return (see close)
        failure = self.broken
        self._outbox.clear()
        for batch_id, answer in self._waiting.items():
            if not answer.done():
                answer.set_exception(CallFailed(failure.code, failure.details, sent=batch_id <= self._handed))

    async def _read(self) -> None:
        failure = CallFailed("UNAVAILABLE", "the batch stream ended")
        try:
            while (raw := await self._call.read()) is not grpc.aio.EOF:
                assert isinstance(raw, bytes)
                streamed = kv_pb2.StreamedBatchAnswer.FromString(raw)
                self._answers += 1
                answer = self._waiting.get(streamed.id)
                if answer is None or answer.done():
                    continue  # its caller gave up on it
                if streamed.code:
                    code = _CODE_NAMES.get(streamed.code, "UNKNOWN")
                    answer.set_exception(CallFailed(code, streamed.message))
                else:
                    answer.set_result(streamed.batch)
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                failure = _stream_failure(code.name, await self._call.details() or "")
        except grpc.aio.AioRpcError as exc:
            failure = _stream_failure(exc.code().name, exc.details() or "")
        except DecodeError:
            failure = CallFailed("INTERNAL", "malformed StreamedBatchAnswer")
        except asyncio.CancelledError:
            # Our own close, or a cancelled call (given up, or a node that went away while
            # stopping, which cancels its calls): as retryable as a lost connection.
            failure = CallFailed("UNAVAILABLE", "the batch stream was cancelled")
            if self._closed:
                failure = CallFailed("CANCELLED", "the client closed the batch stream")
                raise
        finally:
            self._end(failure)

    async def close(self) -> None:
        """Ends the stream; batches still waiting fail with ``CANCELLED``."""
        self._closed = True
        self._reader.cancel()
        self._call.cancel()
        if self._writer is not None:
            # A write on a call cancelled before its headers went out waits for ever (grpc's
            # write awaits the initial metadata being sent): it must be cancelled, not awaited.
            self._writer.cancel()
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        # Waited for without taking their cancellation as this call's own: a cancel of close()
        # itself still ends it.
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: how they ended is the stream's business, not the caller's
