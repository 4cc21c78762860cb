"""The KV service's Watch stream against a real KV state machine, driven in-process (the node is
a stand-in: the stream only asks it whether it knows a leader)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from dengine import server
from dengine.client import CHANNEL_OPTIONS, Client
from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node
from dengine.server import KVService
from dengine.v1 import kv_pb2, kv_pb2_grpc
from test_client_sessions import one_kv_node


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Following:
    leader_id = 1
    metrics = SimpleNamespace(grpc_error=lambda method, code, n=1: None)


def service(sm: KVStateMachine) -> KVService:
    return KVService(cast(Node, Following()), sm)


def test_a_watch_ends_out_of_range_when_its_node_installs_a_snapshot() -> None:
    """A restore changes the state without events: a watch that went on would silently miss
    those changes, so it ends and the client resumes where the history still reaches."""

    async def main() -> None:
        sm = KVStateMachine()
        sm.apply(1, encode_put(b"a", b"1"))
        stream: Any = service(sm).Watch(kv_pb2.WatchRequest(prefix=b"", start_revision=1), Context())
        first = await stream.__anext__()
        assert [e.kv.key for e in first.events] == [b"a"]
        sm.apply(2, encode_put(b"b", b"2"))
        second = await asyncio.wait_for(stream.__anext__(), 5)
        assert [e.kv.key for e in second.events] == [b"b"]

        ahead = KVStateMachine()  # the leader's state, further on
        for i in range(1, 8):
            ahead.apply(i, encode_put(b"k%d" % i, b"x"))
        image = io.BytesIO()
        ahead.snapshot(image)
        image.seek(0)
        sm.restore(image)
        sm.apply(8, encode_put(b"c", b"3"))
        with pytest.raises(Aborted) as ended:
            await asyncio.wait_for(stream.__anext__(), 5)
        assert ended.value.code is grpc.StatusCode.OUT_OF_RANGE
        # Resuming from the last revision seen on this node is refused too: its history starts
        # after the snapshot. (Another node may still hold it; the client tries them all.)
        resumed: Any = service(sm).Watch(kv_pb2.WatchRequest(prefix=b"", start_revision=3), Context())
        with pytest.raises(Aborted) as refused:
            await resumed.__anext__()
        assert refused.value.code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in str(refused.value)

    asyncio.run(main())


def test_a_watcher_that_does_not_read_is_ended_once_its_queue_passes_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that never reads left every event queued for it (the node grew by twice the
    write volume); past the bound its queue is dropped and the watch ends RESOURCE_EXHAUSTED,
    which the client resumes from the last revision it received."""
    monkeypatch.setattr(server, "WATCH_QUEUE_MAX_BYTES", 1 << 20)

    async def main() -> None:
        sm = KVStateMachine()
        svc = service(sm)
        stream: Any = svc.Watch(kv_pb2.WatchRequest(prefix=b"w/"), Context())
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)  # subscribed, waiting for events
        sm.apply(1, encode_put(b"w/first", b"x"))
        assert [e.kv.key for e in (await asyncio.wait_for(first, 5)).events] == [b"w/first"]
        value = b"v" * (64 << 10)
        for i in range(2, 66):  # 4 MiB the watcher does not read
            sm.apply(i, encode_put(b"w/%d" % (i % 4), value))
            queued = [q.bytes for q in getattr(svc, "watch_queues", ())]
            assert all(b <= server.WATCH_QUEUE_MAX_BYTES for b in queued), queued
        with pytest.raises(Aborted) as ended:
            await asyncio.wait_for(stream.__anext__(), 5)
        assert ended.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not svc.watch_queues, "the ended watcher's queue is gone"
        assert not sm._subscribers, "and it no longer takes events"

    asyncio.run(main())


def test_a_watcher_past_the_bound_holds_nothing_while_its_answer_waits_to_be_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch is stuck sending (the client does not read): once over the bound, its queue
    is emptied and later writes are not kept for it."""
    monkeypatch.setattr(server, "WATCH_QUEUE_MAX_BYTES", 1 << 20)

    async def main() -> None:
        sm = KVStateMachine()
        svc = service(sm)
        stream: Any = svc.Watch(kv_pb2.WatchRequest(prefix=b""), Context())
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        sm.apply(1, encode_put(b"a", b"x"))
        await asyncio.wait_for(first, 5)
        (queue,) = svc.watch_queues
        value = b"v" * (256 << 10)
        for i in range(2, 40):
            sm.apply(i, encode_put(b"k", value))
            assert queue.bytes <= server.WATCH_QUEUE_MAX_BYTES
        assert queue.overflowed and queue.bytes == 0 and queue.queue.qsize() <= 1

    asyncio.run(main())


def test_a_backlog_larger_than_a_response_arrives_in_several_and_the_client_sees_each_event_once(
    tmp_path: Path,
) -> None:
    """The backlog from an old start revision went out as one message (617 MB, refused at every
    retry); it now goes in responses of whole revisions of about WATCH_RESPONSE_BYTES each."""

    async def main() -> None:
        async with one_kv_node(tmp_path) as node:
            address = node.config.node.listen
            async with Client([address], timeout=20) as c:
                value = b"x" * (512 << 10)
                last = 0
                for i in range(20):  # 10 MiB of events, half of them with a previous value
                    last = (await c.put(b"w/%d" % (i % 10), value)).revision
                await c.put(b"other", b"not watched")
                async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                    kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                    call = kv.Watch(kv_pb2.WatchRequest(prefix=b"w/", start_revision=1))
                    responses: list[kv_pb2.WatchResponse] = []
                    while not responses or responses[-1].revision < last:
                        responses.append(await asyncio.wait_for(call.read(), 10))
                    call.cancel()
                assert len(responses) >= 3, [len(r.events) for r in responses]
                below = 0
                for r in responses:
                    assert r.ByteSize() <= server.WATCH_RESPONSE_BYTES + len(value) * 2 + 4096
                    revisions = [e.revision for e in r.events]
                    assert revisions == sorted(revisions) and all(below < v <= r.revision for v in revisions)
                    below = r.revision
                sent = [(e.revision, e.kv.key) for r in responses for e in r.events]
                assert len(sent) == 20 and len(set(sent)) == 20

                seen = []
                async for event in c.watch(b"w/", start_revision=1):
                    seen.append((event.revision, event.kv.key))
                    if event.revision == last:
                        break
                assert seen == sent

    asyncio.run(main())
