"""A snapshot restore that lands while the KV Watch handler is building a response, on a real
one-node KV server reached over gRPC.

In a node the restore runs on a worker thread while the event loop keeps serving watches, so it
can finish between any two reads the handler makes of the state machine. These tests force it to
finish at exactly such a moment (inside a call the handler makes) and check that no response
claims a revision whose events it did not carry: the client would resume after that revision and
silently skip the changes in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dengine import server
from dengine.client import Client
from dengine.errors import RequestFailed
from dengine.kv import KVStateMachine, WatchEvent, encode_put
from dengine.node import Node
from dengine.v1 import kv_pb2, kv_pb2_grpc
from test_node_embedded import configs


@contextlib.asynccontextmanager
async def one_kv_node(tmp_path: Path) -> AsyncIterator[Node]:
    """A one-node cluster serving the KV service on 127.0.0.1, in this process."""
    (cfg,) = configs(tmp_path, 1)
    sm = KVStateMachine()
    node = Node(cfg, sm, extra_services=server.kv_services(sm))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def leader_image(keys: list[bytes]) -> bytes:
    """A snapshot of the state a leader further on would send: ``keys`` put in order, at log
    indexes past any this test's node reaches (so the node's own applies never collide)."""
    ahead = KVStateMachine()
    for i, key in enumerate(keys, start=1):
        ahead.apply(1000 + i, encode_put(key, b"v"))
    image = io.BytesIO()
    ahead.snapshot(image)
    return image.getvalue()


async def responses_until_ended(call: Any) -> tuple[list[tuple[list[int], int]], grpc.StatusCode]:
    """The (event revisions, claimed revision) of each response of a Watch ``call``, and the
    status it ended with (it must end, within a few progress notices)."""
    claimed: list[tuple[list[int], int]] = []
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            response = await asyncio.wait_for(call.read(), 5)
            assert response is not grpc.aio.EOF
            claimed.append(([e.revision for e in response.events], response.revision))
    return claimed, ended.value.code()


def claims_only_what_it_carried(claimed: list[tuple[list[int], int]], known: int) -> bool:
    """Whether no response claimed a revision past the events sent so far (``known``: the
    revision the client had already heard of when these responses began)."""
    carried = known
    for events, revision in claimed:
        carried = max([carried, *events])
        if revision > carried:
            return False
    return True


def test_a_restore_during_the_backlog_never_claims_a_revision_it_did_not_carry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore finishes right after the handler read the backlog (revisions 2..3) and before
    it read the revision to claim (6 once restored). The stream must end OUT_OF_RANGE without
    claiming 6: the client would resume from 7 on a node that still has the history and never
    see revisions 4..6. With this node alone, the client's watch then raises RequestFailed."""

    async def main() -> None:
        async with one_kv_node(tmp_path) as node:
            sm = node.sm
            assert isinstance(sm, KVStateMachine)
            async with Client([node.config.node.listen], timeout=10) as c:
                for key in (b"a", b"b", b"c"):
                    await c.put(key, b"v")
                assert sm.revision == 3
                image = leader_image([b"a", b"b", b"c", b"d", b"e", b"f"])
                original = sm.events_since

                def events_then_restore(revision: int) -> list[WatchEvent]:
                    monkeypatch.setattr(sm, "events_since", original)  # once
                    events = original(revision)
                    sm.restore(io.BytesIO(image))  # the worker thread's restore lands here
                    return events

                monkeypatch.setattr(sm, "events_since", events_then_restore)
                async with grpc.aio.insecure_channel(node.config.node.listen) as channel:
                    stub: Any = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                    call = stub.Watch(kv_pb2.WatchRequest(prefix=b"", start_revision=2))
                    claimed, code = await responses_until_ended(call)
                assert code is grpc.StatusCode.OUT_OF_RANGE
                assert claims_only_what_it_carried(claimed, 1), claimed

                with pytest.raises(RequestFailed) as failed:  # no node holds revisions 2.. now
                    async for _ in c.watch(b"", start_revision=2):
                        pass
                assert failed.value.code == "OUT_OF_RANGE"

    asyncio.run(main())


def test_a_restore_during_a_live_response_never_claims_a_revision_it_did_not_carry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore finishes while the handler turns a live event (revision 4) into its message,
    after it checked for restores and before it read the revision to claim (7 once restored):
    the stream must end OUT_OF_RANGE without sending a response that claims revision 7."""

    async def main() -> None:
        async with one_kv_node(tmp_path) as node:
            sm = node.sm
            assert isinstance(sm, KVStateMachine)
            image = leader_image([b"a", b"b", b"c", b"x", b"y", b"z", b"w"])
            async with Client([node.config.node.listen], timeout=10) as c:
                for key in (b"a", b"b", b"c"):
                    await c.put(key, b"v")
                async with grpc.aio.insecure_channel(node.config.node.listen) as channel:
                    stub: Any = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                    call = stub.Watch(kv_pb2.WatchRequest(prefix=b"", start_revision=4))
                    first = await asyncio.wait_for(call.read(), 5)  # the (empty) backlog: up to 3
                    assert (list(first.events), first.revision) == ([], 3)
                    original = server._event

                    def event_then_restore(e: WatchEvent) -> kv_pb2.WatchEvent:
                        monkeypatch.setattr(server, "_event", original)  # once
                        message = original(e)
                        sm.restore(io.BytesIO(image))  # the worker thread's restore lands here
                        return message

                    monkeypatch.setattr(server, "_event", event_then_restore)
                    await c.put(b"x", b"v")  # revision 4
                    claimed, code = await responses_until_ended(call)
                assert code is grpc.StatusCode.OUT_OF_RANGE
                assert claims_only_what_it_carried(claimed, 3), claimed

    asyncio.run(main())
