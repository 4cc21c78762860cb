"""The KV service's Watch stream against a real KV state machine, driven in-process (the node is
a stand-in: the stream only asks it whether it knows a leader)."""

from __future__ import annotations

import asyncio
import io
from typing import Any, cast

import grpc
import pytest

from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node
from dengine.server import KVService
from dengine.v1 import kv_pb2


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Following:
    leader_id = 1


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
