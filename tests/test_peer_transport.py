"""The peer transport's sending side: messages queued for a peer while a write is in flight
travel together, in order and unchanged, as one RaftBatch of bounded size; and a peer that comes
back after an outage gets every message sent to it from then on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dengine._core import EntryBatch
from dengine.devcluster import free_ports
from dengine.raft import Message, MsgType
from dengine.transport import peers
from dengine.transport.codec import to_wire
from dengine.v1 import raft_pb2, raft_pb2_grpc


def test_queued_messages_leave_together_in_order_and_unchanged() -> None:
    async def main() -> None:
        transport = peers.PeerTransport(1, "c", {1: "127.0.0.1:1", 2: "127.0.0.1:2"}, lambda m: None)
        q = peers._Outbox()
        entries = EntryBatch.from_payloads(8, 3, [bytes([i % 256]) * 300 for i in range(600)])  # ~180 KB
        sent = [
            to_wire(Message(MsgType.APP, 1, 2, 3, index=7, log_term=3, entries=entries, commit=5), "c"),
            to_wire(Message(MsgType.HEARTBEAT, 1, 2, 3, commit=5, context=9), "c"),
            *(to_wire(Message(MsgType.APP, 1, 2, 3, index=i), "c") for i in range(peers._MAX_BATCH_MESSAGES)),
        ]
        for w in sent:
            q.push(w, w.ByteSize())
        outgoing = transport._outgoing(q)
        first = await anext(outgoing)
        second = await anext(outgoing)
        assert len(first.messages) == peers._MAX_BATCH_MESSAGES and len(second.messages) == 2
        got = [*first.messages, *second.messages]
        assert [m.SerializeToString() for m in got] == [w.SerializeToString() for w in sent]
        assert EntryBatch.from_bytes(got[0].entries).to_bytes() == entries.to_bytes()

    asyncio.run(main())


def test_a_batch_of_large_appends_stays_under_the_message_limit() -> None:
    """A follower catching up is sent a window of full appends at once: they ride in several
    writes of bounded size, in order, rather than in one over gRPC's 64 MiB limit, which would
    fail the stream and lose them all."""

    async def main() -> None:
        transport = peers.PeerTransport(1, "c", {1: "127.0.0.1:1", 2: "127.0.0.1:2"}, lambda m: None)
        q = peers._Outbox()
        entries = EntryBatch.from_payloads(8, 3, [b"x" * 4096] * 256)  # about 1 MiB each
        sent = [to_wire(Message(MsgType.APP, 1, 2, 3, index=i, entries=entries), "c") for i in range(80)]
        for w in sent:
            q.push(w, w.ByteSize())
        outgoing = transport._outgoing(q)
        got: list[raft_pb2.RaftMessage] = []
        while len(got) < len(sent):
            batch = await anext(outgoing)
            assert batch.ByteSize() <= peers._MAX_BATCH_BYTES + (64 << 10)
            got.extend(batch.messages)
        assert [m.index for m in got] == list(range(80)), "in order, none lost"

    asyncio.run(main())


def test_a_peer_back_after_an_outage_gets_every_message_sent_after_it_returns() -> None:
    """Each failed attempt to reach a peer that is down leaves grpc's request iterator of that
    attempt waiting for a message. Were the attempts to share one queue, each of those would take
    one of the messages sent once the peer is back, and lose it: after a restart, a peer missed
    one message per second it had been down, votes included, and elections took 4-9 s instead
    of 1-2 (benchmarks/bench_failover.py)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        address = f"127.0.0.1:{free_ports(1)[0]}"
        got: list[int] = []
        sender = peers.PeerTransport(2, "c", {1: address}, lambda m: None)
        sender.start()
        await asyncio.sleep(1.6)  # node 1 is down: five attempts fail (the backoff from 50 ms)
        receiver = peers.PeerTransport(1, "c", {2: "127.0.0.1:1"}, lambda m: got.append(m.term))
        server = await serve(receiver, address)
        try:
            await asyncio.sleep(1.5)  # the next attempt, within a second, finds it
            for term in range(1, 11):
                sender.send(Message(MsgType.HEARTBEAT, 2, 1, term))
                await asyncio.sleep(0.02)
            deadline = loop.time() + 10
            while len(got) < 10 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert got == list(range(1, 11))
        finally:
            await sender.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_stream_waiting_out_its_backoff_tries_again_when_the_peer_opens_one_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an outage of a second or more, a node's stream to a peer waits up to the longest
    backoff between attempts, and a restarted follower waited that long for its leader's appends.
    The peer opening its own stream (it is back, and says who it is) ends the wait."""
    monkeypatch.setattr(peers, "_FIRST_BACKOFF_S", 30.0)  # far beyond the wait below

    async def main() -> None:
        loop = asyncio.get_running_loop()
        address1, address2 = (f"127.0.0.1:{p}" for p in free_ports(2))
        got: list[int] = []
        node2 = peers.PeerTransport(2, "c", {1: address1}, lambda m: None)
        servers = [await serve(node2, address2)]
        node2.start()
        try:
            while 1 not in node2._back:  # node 1 is down: the attempt failed, and a wait began
                await asyncio.sleep(0.02)
            node2.send(Message(MsgType.HEARTBEAT, 2, 1, 7))  # for the next stream to node 1
            node1 = peers.PeerTransport(1, "c", {2: address2}, lambda m: got.append(m.term))
            servers.append(await serve(node1, address1))
            node1.start()  # its stream to node 2 says it comes from node 1
            deadline = loop.time() + 10
            while not got and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert got == [7], "node 2 still waited out its backoff"
            await node1.close()
        finally:
            await node2.close()
            for server in servers:
                await server.stop(None)

    asyncio.run(main())


async def serve(transport: peers.PeerTransport, address: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    raft_pb2_grpc.add_RaftServicer_to_server(transport, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(address)
    await server.start()
    return server


def test_messages_for_a_peer_that_does_not_read_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that takes no message (down, or acknowledging no append while a batch goes out at
    each heartbeat) keeps at most so many bytes of messages waiting: the oldest go first, and
    Raft sends again what counts."""
    monkeypatch.setattr(peers, "_QUEUE_BYTES", 8 << 20)

    async def main() -> None:
        (port,) = free_ports(1)  # nobody listens there
        transport = peers.PeerTransport(1, "c", {1: "127.0.0.1:1", 2: f"127.0.0.1:{port}"}, lambda m: None)
        transport.start()
        try:
            entries = EntryBatch.from_payloads(8, 3, [b"x" * 4096] * 256)  # about 1 MiB each
            for i in range(40):
                transport.send(Message(MsgType.APP, 1, 2, 3, index=i, entries=entries))
            q = transport._queues[2]
            assert q.bytes <= 8 << 20 and q.qsize() >= 6, (q.bytes, q.qsize())
            indexes = []
            while not q.empty():
                m = q.get_nowait()
                assert m is not None
                indexes.append(m.index)
            assert indexes == list(range(40 - len(indexes), 40)), "the newest are kept, in order"
            assert q.bytes == 0
        finally:
            await transport.close()

    asyncio.run(main())


def test_outsiders_answered_are_capped_kept_across_changes_and_dropped_once_silent() -> None:
    """Nodes outside the configuration that the core takes (``dengine.transport.codec``) get
    streams back: at most MAX_GUESTS of them, kept when a membership change does not name them
    (the answer just queued for one would be lost), and dropped once silent."""
    transport = peers.PeerTransport(1, "c", {2: "h:2", 3: "h:3"}, lambda m: None)
    guests = range(10, 10 + peers.MAX_GUESTS)
    for g in guests:
        assert transport._welcome(g, f"h:{g}")
    assert not transport._welcome(99, "h:99"), "one more is refused"
    assert transport._welcome(10, "h:10"), "one already answered still is"
    transport.set_peers({2: "h:2", 3: "h:3", 10: "h:10"})  # a change that adds node 10
    assert 10 in transport.members and 11 not in transport.members
    assert {g: transport.peers[g] for g in guests} == {g: f"h:{g}" for g in guests}
    assert transport._welcome(99, "h:99"), "node 10 is a member now: room for another"
    transport.expire_guests(-1.0)  # everyone silent since before now
    assert set(transport.peers) == {2, 3, 10}


def test_a_batch_of_more_messages_than_a_node_sends_is_refused(tmp_path: Path) -> None:
    """Millions of small messages in one 64 MiB batch would hold the receiver's loop for seconds
    (long enough for an election); a node sends at most 512 together."""
    from dengine.node import Node  # noqa: PLC0415
    from test_node_embedded import Counter, configs  # noqa: PLC0415

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Counter()) as node:
            heartbeat = to_wire(Message(MsgType.HEARTBEAT_RESP, 1, 1, 1), cfg.cluster.id)
            too_many = raft_pb2.RaftBatch(messages=[heartbeat] * (peers._MAX_BATCH_MESSAGES + 1))

            async def one() -> AsyncIterator[raft_pb2.RaftBatch]:
                yield too_many

            async with grpc.aio.insecure_channel(cfg.node.listen) as channel:
                stub = raft_pb2_grpc.RaftStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Messages(one())
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "at most" in (refused.value.details() or "")
            assert node.failure is None and node.raft is not None

    asyncio.run(main())
