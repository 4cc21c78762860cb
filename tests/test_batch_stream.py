"""``KV.BatchStream``: batches over one long-lived stream, each answered by its id.

The server side runs on a real 3-process cluster, and its window of batches in progress against
a node stand-in whose writes complete when the test says. The client side (``dengine.batch_stream`` and
``Client``'s use of it) runs against scripted gRPC servers in this process, which answer out of
order, never, with a refusal, by ending the stream, or not at all because they only know the
unary ``Batch`` of an older version.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from dengine import client as client_module
from dengine.batch_stream import BatchStream, CallFailed
from dengine.client import Client
from dengine.errors import DeadlineExceeded, RequestFailed, Unavailable
from dengine.kv import KVStateMachine, encode_put
from dengine.server import MAX_BATCH, STREAM_WINDOW, KVService
from dengine.v1 import kv_pb2

from cluster_procs import ProcCluster
from kv_leader_stand_in import LeaderStandIn


def _put(key: bytes, value: bytes, client_id: int = 0, sequence: int = 0) -> kv_pb2.Operation:
    s = kv_pb2.Session(client_id=client_id, sequence=sequence) if client_id else None
    return kv_pb2.Operation(put=kv_pb2.PutRequest(key=key, value=value, session=s))


def _get(key: bytes) -> kv_pb2.Operation:
    return kv_pb2.Operation(get=kv_pb2.GetRequest(key=key))


def _envelope(batch_id: int, ops: list[kv_pb2.Operation] | bytes) -> bytes:
    batch = ops if isinstance(ops, bytes) else kv_pb2.BatchRequest(ops=ops).SerializeToString()
    return kv_pb2.StreamedBatch(id=batch_id, batch=batch).SerializeToString()


# --- the server, on a real cluster ------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")
def test_the_stream_answers_each_batch_by_its_id_and_survives_a_refused_one(cluster: ProcCluster) -> None:
    async def main() -> None:
        leader = cluster.wait_leader()
        async with grpc.aio.insecure_channel(cluster.address(leader)) as channel:
            call = channel.stream_stream("/dengine.v1.KV/BatchStream")()

            async def answer() -> kv_pb2.StreamedBatchAnswer:
                raw = await asyncio.wait_for(call.read(), 10)
                assert isinstance(raw, bytes)
                return kv_pb2.StreamedBatchAnswer.FromString(raw)

            await call.write(_envelope(7, [_put(b"a", b"1", client_id=9, sequence=1)]))  # fast path
            # Answered before batch 10 is sent: a get that overlaps the put might not see it.
            answers = {7: await answer()}
            await call.write(_envelope(8, b"\x0a\xff\xff\xff"))  # not a BatchRequest
            await call.write(_envelope(9, [_get(b"x")] * (MAX_BATCH + 1)))
            await call.write(_envelope(10, [_put(b"b", b"2"), _get(b"a")]))  # general path
            for _ in range(3):
                got = await answer()
                answers[got.id] = got
            assert sorted(answers) == [7, 8, 9, 10]
            first = kv_pb2.BatchResponse.FromString(answers[7].batch)
            assert first.results[0].put.revision > 0
            assert answers[7].code == 0
            assert answers[8].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert answers[8].message == "malformed BatchRequest" and not answers[8].batch
            assert answers[9].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            last = kv_pb2.BatchResponse.FromString(answers[10].batch)
            assert last.results[0].put.revision > first.results[0].put.revision
            assert last.results[1].get.found and last.results[1].get.kv.value == b"1"
            # A retried batch on the same stream is answered from the session table.
            await call.write(_envelope(11, [_put(b"a", b"1", client_id=9, sequence=1)]))
            again = await answer()
            assert again.id == 11 and kv_pb2.BatchResponse.FromString(again.batch) == first
            await call.done_writing()
            assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

            broken = channel.stream_stream("/dengine.v1.KV/BatchStream")()
            await broken.write(b"\x0a\xff\xff\xff")  # not a StreamedBatch
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(broken.read(), 10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "malformed StreamedBatch"

        async with Client([cluster.address(leader)], timeout=10) as client:
            assert (await client.get(b"b")) is not None, "the node serves on after the broken stream"

    asyncio.run(main())


class _RecordingContext:
    def __init__(self) -> None:
        self.written: list[kv_pb2.StreamedBatchAnswer] = []

    async def write(self, message: bytes) -> None:
        self.written.append(kv_pb2.StreamedBatchAnswer.FromString(message))


def test_a_stream_works_on_at_most_its_window_of_batches_at_once() -> None:
    """A client that sends faster than its batches complete is not read further: the server's
    memory for one stream stays bounded, and gRPC's flow control holds the client back."""
    result = KVStateMachine().apply(1, encode_put(b"k", b"v"))

    async def envelopes() -> AsyncIterator[bytes]:
        for i in range(1, STREAM_WINDOW + 51):
            yield _envelope(i, [_put(b"k%d" % i, b"v", client_id=7, sequence=i)])

    async def main() -> None:
        node, context = LeaderStandIn(), _RecordingContext()
        service = KVService(node, KVStateMachine())  # type: ignore[arg-type]
        handler = asyncio.ensure_future(service.BatchStream(envelopes(), context))
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(node.groups) == STREAM_WINDOW, "no more batches read than the window"
        for group in node.groups[:10]:
            group.slots[0].set_result(result)
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(context.written) == 10
        assert len(node.groups) == STREAM_WINDOW + 10, "each answered batch lets one more in"
        while not handler.done():  # answer the rest as they are read
            for group in node.groups:
                if group.slots:  # an answered group has let go of its slots
                    group.slots[0].set_result(result)
            await asyncio.sleep(0.001)
        await handler
        assert sorted(a.id for a in context.written) == list(range(1, STREAM_WINDOW + 51))

    asyncio.run(main())


# --- the client, against scripted servers ------------------------------------------------------

StreamScript = Callable[[AsyncIterator[bytes], Any], Awaitable[None]]


async def bounded(test: Awaitable[None]) -> None:
    """A test that would hang (a batch nobody ever fails) fails instead."""
    await asyncio.wait_for(test, 30)


def _answer_puts(batch: bytes) -> bytes:
    """Answers every put of ``batch`` with a revision read from its key: ``k<n>`` gets ``n``."""
    request = kv_pb2.BatchRequest.FromString(batch)
    response = kv_pb2.BatchResponse()
    for op in request.ops:
        response.results.add().put.revision = int(op.put.key[1:])
    return response.SerializeToString()


def _answered(streamed: kv_pb2.StreamedBatch) -> bytes:
    return kv_pb2.StreamedBatchAnswer(id=streamed.id, batch=_answer_puts(streamed.batch)).SerializeToString()


def _sequences(batch: bytes) -> list[int]:
    return [op.put.session.sequence for op in kv_pb2.BatchRequest.FromString(batch).ops]


class ScriptedServer:
    """A gRPC server in this process serving ``dengine.v1.KV`` by script: ``stream`` for
    BatchStream (left out: the server does not know the method), ``unary`` for Batch."""

    def __init__(self, stream: StreamScript | None, unary: Callable[[bytes], bytes] | None = None) -> None:
        self.stream, self.unary = stream, unary
        self.server = grpc.aio.server()
        self.address = ""

    async def __aenter__(self) -> ScriptedServer:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        if self.stream is not None:
            handlers["BatchStream"] = grpc.stream_stream_rpc_method_handler(self.stream)
        if self.unary is not None:
            unary = self.unary

            async def batch(request: bytes, context: Any) -> bytes:
                return unary(request)

            handlers["Batch"] = grpc.unary_unary_rpc_method_handler(batch)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dengine.v1.KV", handlers),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


def test_answers_that_come_back_out_of_order_reach_their_own_callers() -> None:
    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> None:
        it = envelopes.__aiter__()
        first = kv_pb2.StreamedBatch.FromString(await it.__anext__())
        second = kv_pb2.StreamedBatch.FromString(await it.__anext__())
        for streamed in (second, first):
            await context.write(
                kv_pb2.StreamedBatchAnswer(
                    id=streamed.id, batch=_answer_puts(streamed.batch)
                ).SerializeToString()
            )
        async for _ in it:
            pass

    async def main() -> None:
        async with (
            ScriptedServer(stream) as server,
            Client([server.address], max_batch=1, timeout=5) as client,
        ):
            one, two = await asyncio.gather(client.put(b"k1", b"v"), client.put(b"k2", b"v"))
            assert (one.revision, two.revision) == (1, 2)

    asyncio.run(bounded(main()))


def test_a_node_without_the_stream_is_sent_unary_batches() -> None:
    calls: list[bytes] = []

    def unary(batch: bytes) -> bytes:
        calls.append(batch)
        return _answer_puts(batch)

    async def main() -> None:
        async with ScriptedServer(None, unary) as server, Client([server.address], timeout=5) as client:
            assert (await client.put(b"k3", b"v")).revision == 3
            assert (await client.put(b"k4", b"v")).revision == 4
        assert len(calls) == 2

    asyncio.run(bounded(main()))


class _Upgradable:
    """Serves ``dengine.v1.KV``'s Batch always, and its BatchStream once ``upgraded``."""

    def __init__(self, unary: Callable[[bytes], bytes], stream: StreamScript) -> None:
        self.upgraded = False

        async def batch(request: bytes, context: Any) -> bytes:
            return unary(request)

        self.batch = grpc.unary_unary_rpc_method_handler(batch)
        self.stream = grpc.stream_stream_rpc_method_handler(stream)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method == "/dengine.v1.KV/Batch":
            return self.batch
        if method == "/dengine.v1.KV/BatchStream" and self.upgraded:
            return self.stream
        return None


def test_a_node_without_the_stream_is_tried_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rolling upgrade gives a node the stream while the client runs. The client asks a node
    that lacked it again once UNARY_RECHECK_S has passed: the test moves that interval rather
    than the clock, so that no pause of a loaded machine can run the two puts past it."""
    monkeypatch.setattr(client_module, "UNARY_RECHECK_S", 3600.0)
    unary_calls: list[bytes] = []
    streamed: list[bytes] = []

    def unary(batch: bytes) -> bytes:
        unary_calls.append(batch)
        return _answer_puts(batch)

    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> None:
        async for envelope in envelopes:
            streamed.append(envelope)
            await context.write(_answered(kv_pb2.StreamedBatch.FromString(envelope)))

    async def main() -> None:
        node = _Upgradable(unary, stream)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((node,))
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with Client([address], timeout=5) as client:
                assert (await client.put(b"k1", b"v")).revision == 1
                node.upgraded = True
                assert (await client.put(b"k2", b"v")).revision == 2  # still unary: seen lately
                assert (len(unary_calls), len(streamed)) == (2, 0)
                monkeypatch.setattr(client_module, "UNARY_RECHECK_S", 0.0)  # the recheck is due
                assert (await client.put(b"k3", b"v")).revision == 3
                monkeypatch.setattr(client_module, "UNARY_RECHECK_S", 3600.0)
                assert (await client.put(b"k4", b"v")).revision == 4
                assert (len(unary_calls), len(streamed)) == (2, 2), "back on the stream for good"
        finally:
            await server.stop(None)

    asyncio.run(bounded(main()))


def test_a_stream_that_never_answers_fails_the_call_within_its_deadline() -> None:
    received: list[bytes] = []

    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> None:
        async for envelope in envelopes:
            received.append(envelope)

    async def main() -> None:
        async with ScriptedServer(stream) as server:
            client = Client([server.address], timeout=0.8, attempt_timeout=0.2)
            try:
                with pytest.raises((DeadlineExceeded, Unavailable)):
                    await asyncio.wait_for(client.put(b"k1", b"v"), 10)
            finally:
                # Bounded too: close() waits for every batch in flight to be answered or failed.
                await asyncio.wait_for(client.close(), 10)
        attempts = [_sequences(kv_pb2.StreamedBatch.FromString(e).batch) for e in received]
        assert len(attempts) >= 2, "an attempt without an answer is retried"
        assert all(a == [1] for a in attempts), "every attempt is the same write of the same session"

    asyncio.run(bounded(main()))


def test_a_node_that_stops_reading_cannot_hold_a_call_past_its_deadline() -> None:
    """A frozen node stops reading its streams, and gRPC's flow control then holds the client's
    writes: the deadline must still end the call, and the stuck stream is given up."""
    first = asyncio.Event()

    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> None:
        await envelopes.__aiter__().__anext__()
        first.set()
        await asyncio.sleep(3600)  # reads nothing more, answers nothing

    async def main() -> None:
        async with ScriptedServer(stream) as server:
            client = Client([server.address], timeout=1.0, attempt_timeout=0.3, max_batch=1)
            try:
                with pytest.raises((DeadlineExceeded, Unavailable)):
                    # Far more than a stream's flow-control window, in a few batches.
                    big = b"v" * (3 << 20)
                    await asyncio.wait_for(
                        asyncio.gather(*(client.put(b"k%d" % i, big) for i in range(3))), 10
                    )
                assert first.is_set()
            finally:
                await asyncio.wait_for(client.close(), 10)

    asyncio.run(bounded(main()))


def test_a_batch_on_a_stream_that_ends_is_retried_on_a_new_one() -> None:
    streams: list[list[int]] = []

    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> None:
        streams.append([])
        async for envelope in envelopes:
            streamed = kv_pb2.StreamedBatch.FromString(envelope)
            streams[-1].extend(_sequences(streamed.batch))
            if len(streams) == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            await context.write(
                kv_pb2.StreamedBatchAnswer(
                    id=streamed.id, batch=_answer_puts(streamed.batch)
                ).SerializeToString()
            )

    async def main() -> None:
        async with ScriptedServer(stream) as server, Client([server.address], timeout=5) as client:
            assert (await client.put(b"k5", b"v")).revision == 5
        assert streams == [[1], [1]], "the same write, retried once on a second stream"

    asyncio.run(bounded(main()))


def test_a_batch_the_node_refuses_fails_without_a_retry() -> None:
    received: list[int] = []

    async def stream(envelopes: AsyncIterator[bytes], context: Any) -> None:
        async for envelope in envelopes:
            streamed = kv_pb2.StreamedBatch.FromString(envelope)
            received.append(streamed.id)
            refused = kv_pb2.StreamedBatchAnswer(
                id=streamed.id, code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="too big"
            )
            await context.write(refused.SerializeToString())

    async def main() -> None:
        async with ScriptedServer(stream) as server, Client([server.address], timeout=5) as client:
            with pytest.raises(RequestFailed) as failed:
                await client.put(b"k6", b"v")
            assert failed.value.code == "RESOURCE_EXHAUSTED"
            assert "too big" in str(failed.value)
        assert received == [1]

    asyncio.run(bounded(main()))


class _EndedCall:
    """A stream whose end grpc.aio reports with ``status``: each write and read raise it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    async def write(self, message: bytes) -> None:
        await asyncio.sleep(0)
        raise self.error

    async def read(self) -> bytes:
        await asyncio.sleep(0.01)  # the write goes first, as in the race
        raise self.error

    def cancel(self) -> bool:
        return True


class _OneCallChannel:
    def __init__(self, call: _EndedCall) -> None:
        self.call = call

    def stream_stream(self, method: str) -> Callable[[], _EndedCall]:
        return lambda: self.call


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        # grpc.aio's report of a write that raced with a lost connection (grpc/grpc#36066).
        ("Internal error from Core", "UNAVAILABLE"),
        # The node's own INTERNAL (a failing state machine, say) is not a lost stream.
        ("apply failed: boom", "INTERNAL"),
    ],
)
def test_a_stream_lost_under_a_write_is_retried_and_a_node_error_is_not(details: str, expected: str) -> None:
    async def main() -> None:
        call = _EndedCall(grpc.StatusCode.INTERNAL, details)
        stream = BatchStream(_OneCallChannel(call))
        with pytest.raises(CallFailed) as failed:
            await stream.call(b"batch", timeout=5)
        assert failed.value.code == expected
        assert stream.broken is not None and stream.broken.code == expected

    asyncio.run(main())


class _HeldCall:
    """A stream whose first write waits (flow control) until ``gate`` is set."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.gate = asyncio.Event()
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def write(self, envelope: bytes) -> None:
        self.written.append(envelope)
        if len(self.written) == 1:
            await self.gate.wait()

    async def read(self) -> bytes:
        return await self.answers.get()

    def cancel(self) -> None:
        pass

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    async def details(self) -> str:
        return ""


def held_stream() -> tuple[_HeldCall, BatchStream]:
    """A batch stream over a :class:`_HeldCall` (made on the running loop)."""
    call = _HeldCall()

    class Channel:
        def stream_stream(self, method: str) -> Callable[[], _HeldCall]:
            return lambda: call

    return call, BatchStream(Channel())


def test_a_batch_given_up_before_it_was_written_is_never_written() -> None:
    """Its callers were told it was not sent (not an unknown outcome); written afterwards, the
    node could apply it behind their backs."""

    async def main() -> None:
        call, stream = held_stream()
        first = asyncio.ensure_future(stream.call(b"one", 5.0))
        await asyncio.sleep(0.01)  # batch 1 handed to the stream, its write held
        second = asyncio.ensure_future(stream.call(b"two", 0.2, callers_time=True))
        await asyncio.sleep(0.05)
        call.answers.put_nowait(kv_pb2.StreamedBatchAnswer(id=1, batch=b"").SerializeToString())
        await first
        with pytest.raises(CallFailed) as failed:
            await second
        assert not failed.value.sent
        call.gate.set()
        await asyncio.sleep(0.05)
        assert [kv_pb2.StreamedBatch.FromString(w).id for w in call.written] == [1]

    asyncio.run(main())


def test_a_batch_given_up_as_the_held_write_completes_is_never_written() -> None:
    """The same when the held write completes in the loop turn in which the batch's callers'
    time runs out: the writer, woken first, must not find it still waiting."""

    async def main() -> None:
        call, stream = held_stream()
        first = asyncio.ensure_future(stream.call(b"one", 5.0))
        await asyncio.sleep(0.01)
        answers_when_sent = stream._answers
        second = asyncio.ensure_future(stream.call(b"two", 5.0, callers_time=True))
        await asyncio.sleep(0.05)
        call.answers.put_nowait(kv_pb2.StreamedBatchAnswer(id=1, batch=b"").SerializeToString())
        await first
        call.gate.set()  # the held write completes...
        stream._expire(2, True, answers_when_sent)  # ...in the turn the callers' time runs out
        with pytest.raises(CallFailed) as failed:
            await second
        await asyncio.sleep(0.05)
        written = [kv_pb2.StreamedBatch.FromString(w).id for w in call.written]
        assert not failed.value.sent and written == [1], f"told not sent, yet written: {written}"

    asyncio.run(main())


def test_closing_a_stream_whose_write_never_returns_does_not_hang() -> None:
    """grpc's write on a call cancelled before its headers went out waits for ever: close() must
    cancel the writer, not wait for it (a client's close hung so, under CPU load)."""

    async def main() -> None:
        _, stream = held_stream()  # its first write waits on a gate nobody opens
        waiting = asyncio.ensure_future(stream.call(b"one", 5.0))
        await asyncio.sleep(0.01)  # the write is under way
        closing = asyncio.ensure_future(stream.close())
        done, _ = await asyncio.wait([closing], timeout=2)  # not cancelled: a cancel would free it
        assert closing in done, "close() waits for a write that never returns"
        await closing
        with pytest.raises(CallFailed):
            await waiting

    asyncio.run(main())
