"""The peer transport's sending side: messages queued for a peer while a write is in flight
travel together, in order and unchanged, as one RaftBatch of bounded size."""

from __future__ import annotations

import asyncio

from dengine._core import EntryBatch
from dengine.raft import Message, MsgType
from dengine.transport import peers
from dengine.transport.codec import to_wire
from dengine.v1 import raft_pb2


def test_queued_messages_leave_together_in_order_and_unchanged() -> None:
    async def main() -> None:
        transport = peers.PeerTransport(1, "c", {1: "127.0.0.1:1", 2: "127.0.0.1:2"}, lambda m: None)
        q: asyncio.Queue[raft_pb2.RaftMessage] = asyncio.Queue()
        entries = EntryBatch.from_payloads(8, 3, [bytes([i % 256]) * 300 for i in range(600)])  # ~180 KB
        sent = [
            to_wire(Message(MsgType.APP, 1, 2, 3, index=7, log_term=3, entries=entries, commit=5), "c"),
            to_wire(Message(MsgType.HEARTBEAT, 1, 2, 3, commit=5, context=9), "c"),
            *(to_wire(Message(MsgType.APP, 1, 2, 3, index=i), "c") for i in range(peers._MAX_BATCH_MESSAGES)),
        ]
        for w in sent:
            q.put_nowait(w)
        outgoing = transport._outgoing(q)
        first = await anext(outgoing)
        second = await anext(outgoing)
        assert len(first.messages) == peers._MAX_BATCH_MESSAGES and len(second.messages) == 2
        got = [*first.messages, *second.messages]
        assert [m.SerializeToString() for m in got] == [w.SerializeToString() for w in sent]
        assert EntryBatch.from_bytes(got[0].entries).to_bytes() == entries.to_bytes()

    asyncio.run(main())
