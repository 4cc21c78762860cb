"""The client's session bookkeeping (Raft thesis §6.3), with the batch call replaced by a script;
and, with the same script, which node its retries go to.

Every write carries the lowest sequence of this client still outstanding, and replicas forget
the results below it. A sequence is released once its call is over, however it ended: answered,
refused, failed at its deadline, or given up by its caller. That is safe: a replica's
``acked_below`` only rises, and a sequence below it whose result was not kept is refused as
stale, so a late copy of a released write was either applied once already (before the release
reached the log) or is never applied. Keeping it outstanding instead would pin ``acked_below``
for the client's life, and every replica would keep every later result of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from dengine import endpoints
from dengine._core import encode_kv_write_answers, parse_kv_session_writes
from dengine.batch_stream import CallFailed
from dengine.client import Client
from dengine.errors import DengineError, OutcomeUnknownError, RequestFailed, Unavailable
from dengine.kv import MAX_BATCH_OPERATIONS, KVStateMachine, encode_put
from dengine.node import Node
from dengine.raft.payload import SESSION_HEADER
from dengine.server import kv_services
from test_node_embedded import Counter, configs

Reply = Callable[[bytes], bytes]  # request bytes -> response bytes, or raises CallFailed


def _answer_all(request: bytes) -> bytes:
    writes = parse_kv_session_writes(request)
    assert writes is not None
    ops, _, payloads = writes
    result = KVStateMachine().apply(1, encode_put(b"k", b"v"))
    return encode_kv_write_answers(ops, [result] * len(payloads)) or b""


def _refuse(code: grpc.StatusCode, *, reached: bool = False) -> Reply:
    """Fails every batch call with ``code``: by default one that never reached the node (a
    refused connection), so that nothing in it may have been applied."""

    def reply(request: bytes) -> bytes:
        raise CallFailed(code.name, "scripted", sent=reached)

    return reply


class ScriptedClient:
    """A client whose batches are answered by ``self.reply``; records (sequence, first
    outstanding) of every write it sends."""

    def __init__(self, endpoints: tuple[str, ...] = ("127.0.0.1:1",)) -> None:
        self.client = Client(list(endpoints), timeout=0.3, attempt_timeout=0.1)
        self.reply: Reply = _answer_all
        self.replies: dict[str, Reply] = {}  # per address, in place of ``reply``
        self.sent: list[tuple[int, int]] = []
        self.addresses: list[str] = []  # where each batch went
        self.sizes: list[int] = []  # each batch's bytes
        self.client._call_batch = self._call  # type: ignore[method-assign]

    async def _call(self, address: str, request: bytes, timeout: float, **_: object) -> bytes:
        self.addresses.append(address)
        self.sizes.append(len(request))
        writes = parse_kv_session_writes(request)
        assert writes is not None
        for payload in writes[2]:
            _, _, sequence, first = SESSION_HEADER.unpack_from(payload)
            self.sent.append((sequence, first))
        await asyncio.sleep(0)
        return self.replies.get(address, self.reply)(request)

    def last_first_outstanding(self) -> int:
        return self.sent[-1][1]


def run(test: Callable[[ScriptedClient], Any], endpoints: tuple[str, ...] = ("127.0.0.1:1",)) -> None:
    async def main() -> None:
        scripted = ScriptedClient(endpoints)
        try:
            await test(scripted)
        finally:
            await scripted.client.close()

    asyncio.run(main())


def test_answered_writes_are_released() -> None:
    async def test(s: ScriptedClient) -> None:
        await asyncio.gather(*(s.client.put(b"k%d" % i, b"v") for i in range(5)))
        await s.client.put(b"next", b"v")
        assert s.sent[-1] == (6, 6), "every earlier write was answered"

    run(test)


def test_a_write_whose_deadline_passed_is_released() -> None:
    """Released at its deadline (safe: see the module's docstring): a late copy of sequence 2
    is a duplicate or stale at every replica, never applied twice."""

    async def test(s: ScriptedClient) -> None:
        await s.client.put(b"a", b"v")
        s.reply = _refuse(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await s.client.put(b"lost", b"v")  # sequence 2
        s.reply = _answer_all
        await s.client.put(b"b", b"v")
        assert s.sent[-1] == (3, 3)

    run(test)


def test_a_write_whose_caller_gave_up_is_released_and_not_sent_again() -> None:
    async def test(s: ScriptedClient) -> None:
        s.reply = _refuse(grpc.StatusCode.UNAVAILABLE)  # retried with backoff until cancelled
        abandoned = asyncio.ensure_future(s.client.put(b"slow", b"v", timeout=30))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        tries = len([1 for sequence, _ in s.sent if sequence == 1])
        s.reply = _answer_all
        await s.client.put(b"b", b"v")
        assert s.sent[-1] == (2, 2), "the abandoned write no longer holds the session back"
        await asyncio.sleep(0.3)  # past any retry it was waiting for
        assert len([1 for sequence, _ in s.sent if sequence == 1]) == tries, "sent after it was given up"

    run(test)


@contextlib.asynccontextmanager
async def one_kv_node(tmp_path: Path) -> AsyncIterator[Node]:
    """A one-node cluster serving the KV service on 127.0.0.1, in this process."""
    (cfg,) = configs(tmp_path, 1)
    sm = KVStateMachine()
    node = Node(cfg, sm, extra_services=kv_services(sm))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def test_a_cancelled_write_leaves_no_results_pinned_on_the_server(tmp_path: Path) -> None:
    """A real node: a write cancelled while queued is not sent, and the writes after it let the
    node forget their results (before, the node kept every later result, up to 100,000 per
    client, and the client's own bookkeeping grew with every write)."""

    async def main() -> None:
        async with (
            one_kv_node(tmp_path) as node,
            Client([node.config.node.listen], linger_ms=20, timeout=10) as c,
        ):
            await c.put(b"a", b"1")
            cancelled = asyncio.ensure_future(c.put(b"cancelled", b"x"))
            await asyncio.sleep(0.001)  # queued, lingering
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            for i in range(300):
                await c.put(b"k%d" % i, b"v")
            assert await c.get(b"cancelled") is None, "a cancelled write that was never sent"
            assert len(c._in_order) <= 2
            (kept,) = [len(results) for cid, _, _, results in node.sessions.items() if cid == c.client_id]
            assert kept <= 2, kept

    asyncio.run(main())


def test_a_write_refused_outright_is_released() -> None:
    async def test(s: ScriptedClient) -> None:
        s.reply = _refuse(grpc.StatusCode.INVALID_ARGUMENT)
        with pytest.raises(RequestFailed):
            await s.client.put(b"refused", b"v")
        s.reply = _answer_all
        await s.client.put(b"b", b"v")
        assert s.sent[-1] == (2, 2)

    run(test)


@pytest.mark.parametrize("failure", ["the call", "the answer"])
def test_a_write_whose_whole_call_failed_is_released_and_its_outcome_unknown(failure: str) -> None:
    """A batch call that fails as a whole (a node's handler that raised: UNKNOWN), or an answer
    that does not match the batch, says nothing of the writes in it: the node may have applied
    them. Their callers hear that the outcome is unknown, not that the write failed. The
    sequence is released all the same (see the module's docstring): a late copy is a duplicate
    or stale, never applied twice."""

    def garbled(request: bytes) -> bytes:
        return _answer_all(request) + _answer_all(request)

    async def test(s: ScriptedClient) -> None:
        s.reply = _refuse(grpc.StatusCode.UNKNOWN, reached=True) if failure == "the call" else garbled
        with pytest.raises(OutcomeUnknownError, match="may be applied"):
            await s.client.put(b"maybe", b"v")
        s.reply = _answer_all
        await s.client.put(b"b", b"v")
        assert s.sent[-1] == (2, 2)

    run(test)


def test_an_overloaded_leader_is_retried_and_a_silent_one_is_left() -> None:
    """An overloaded leader names itself in its UNAVAILABLE refusal: the retries come back to it
    after a backoff, not by way of another node. A node that fails without naming a leader is
    left, and the next attempt goes to another."""
    leader, other = "127.0.0.1:1", "127.0.0.1:2"

    async def test(s: ScriptedClient) -> None:
        s.client._endpoints.leader = leader
        refusals = iter(range(2))

        def overloaded(request: bytes) -> bytes:
            if next(refusals, None) is None:
                return _answer_all(request)
            writes = parse_kv_session_writes(request)
            assert writes is not None
            text = f"UNAVAILABLE: the leader holds 900 bytes of writes not applied yet; leader=1@{leader}"
            return encode_kv_write_answers(writes[0], [text] * len(writes[2])) or b""

        s.reply = overloaded
        await s.client.put(b"k", b"v", timeout=5)
        assert s.addresses == [leader, leader, leader]
        s.addresses.clear()
        s.reply = _refuse(grpc.StatusCode.UNAVAILABLE)  # no leader named: a node gone quiet
        with pytest.raises(Unavailable):
            await s.client.put(b"k2", b"v", timeout=0.3)
        assert s.addresses[0] == leader and other in s.addresses[1:]

    run(test, (leader, other))


def _refuse_each(text: str) -> Reply:
    """Answers every write of a batch with the refusal ``text`` ("CODE: message")."""

    def reply(request: bytes) -> bytes:
        writes = parse_kv_session_writes(request)
        assert writes is not None
        return encode_kv_write_answers(writes[0], [text] * len(writes[2])) or b""

    return reply


def _answer_after(refusals: int, text: str) -> Reply:
    """Refuses the first ``refusals`` batches with ``text``, then answers."""
    left = iter(range(refusals))

    def reply(request: bytes) -> bytes:
        return _refuse_each(text)(request) if next(left, None) is not None else _answer_all(request)

    return reply


ELECTING = "FAILED_PRECONDITION: not leader; leader=0@"  # a follower that knows no leader yet


def test_a_node_that_fails_outright_is_passed_over_while_the_others_elect() -> None:
    """The leader died: its address refuses connections while the survivors elect. The client
    tries it once, then only the others (they refuse until one leads), rather than losing a
    backoff to the dead node on every third attempt."""
    dead, a, b = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"

    async def test(s: ScriptedClient) -> None:
        s.replies = {dead: _refuse(grpc.StatusCode.UNAVAILABLE), a: _answer_after(3, ELECTING)}
        s.replies[b] = _answer_after(3, ELECTING)
        await s.client.put(b"k", b"v", timeout=10)
        assert s.addresses.count(dead) == 1, s.addresses
        assert s.addresses[:2] == [dead, a], "the retry went to the next node at once"
        assert s.client.leader in (a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(endpoints, "DOWN_FIRST_S", 30.0)  # no time out ends within the test
        run(test, (dead, a, b))


def test_a_hint_is_followed_even_to_a_node_on_time_out() -> None:
    """After an outage every node is on time out; the first that answers names the leader, and
    the client goes there rather than wait out the leader's time out. A stale hint (a follower
    that has not noticed its leader die) costs one refused call, retried elsewhere at once."""
    leader, follower, other = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"

    async def test(s: ScriptedClient) -> None:
        for address in (leader, follower, other):
            s.client._endpoints.call_failed(address, "UNAVAILABLE")
        s.client._endpoints.answered(follower)  # it answers first
        s.replies = {follower: _refuse_each(f"FAILED_PRECONDITION: not leader; leader=1@{leader}")}
        await s.client.put(b"k", b"v", timeout=10)
        assert s.addresses == [follower, leader]
        assert s.client.leader == leader
        s.addresses.clear()
        s.client._endpoints.leader = None
        s.replies = {
            leader: _refuse(grpc.StatusCode.UNAVAILABLE),  # it died
            follower: _refuse_each(f"FAILED_PRECONDITION: not leader; leader=1@{leader}"),
            other: _answer_all,
        }
        s.client._endpoints.answered(other)
        await s.client.put(b"k2", b"v", timeout=10)
        assert s.addresses.count(leader) <= 2, s.addresses
        assert s.client.leader == other

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(endpoints, "DOWN_FIRST_S", 30.0)  # no time out ends within the test
        run(test, (leader, follower, other))


def test_with_every_node_failing_the_client_backs_off_until_its_deadline() -> None:
    async def test(s: ScriptedClient) -> None:
        s.reply = _refuse(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await s.client.put(b"k", b"v", timeout=0.3)
        # Each node once at once, then retries spaced by the backoff: no busy loop.
        assert set(s.addresses[:3]) == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
        assert len(s.addresses) < 25, len(s.addresses)

    run(test, ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))


def test_closing_the_client_fails_the_calls_waiting_for_a_retry() -> None:
    async def test(s: ScriptedClient) -> None:
        s.reply = _refuse(grpc.StatusCode.UNAVAILABLE)
        put = asyncio.ensure_future(s.client.put(b"k", b"v", timeout=30))
        await asyncio.sleep(0.05)  # refused, and waiting for its retry
        await s.client.close()
        with pytest.raises(DengineError, match="closed"):
            await asyncio.wait_for(put, 1)
        calls = len(s.addresses)
        await asyncio.sleep(0.3)
        assert len(s.addresses) == calls, "a retry went out after close()"

    run(test)


def test_clients_made_after_the_same_seed_get_different_ids(tmp_path: Path) -> None:
    """Session ids come from the OS: a program that seeds ``random`` alike in two processes (a
    test, a simulation, identical workers) must not give two clients, or two runs of an
    embedded node, one id, where each would get the other's results for its sequences."""
    ids = []
    for _ in range(2):
        random.seed(1234)
        ids.append(Client(["127.0.0.1:1"]).client_id)
    assert ids[0] != ids[1]
    (cfg,) = configs(tmp_path, 1)
    node_ids = []
    for _ in range(2):
        random.seed(1234)
        node_ids.append(Node(cfg, state_machine=Counter())._client_id)
    assert node_ids[0] != node_ids[1]


def test_batches_stay_well_under_the_message_limit_whatever_the_values() -> None:
    """Many concurrent puts of large values go out in several batches: one batch of them all
    would pass gRPC's 64 MiB message limit and fail its stream at every retry."""

    async def test(s: ScriptedClient) -> None:
        big = b"v" * (12 << 20)
        await asyncio.gather(*(s.client.put(b"k%d" % i, big, timeout=30) for i in range(6)))
        assert len(s.sizes) == 6 and max(s.sizes) < 2 * len(big), s.sizes
        await asyncio.gather(*(s.client.put(b"small%d" % i, b"v") for i in range(300)))
        assert len(s.sizes) == 7, "small writes still share one batch"

    run(test)


def test_a_watch_open_when_its_client_closes_raises_rather_than_ends(tmp_path: Path) -> None:
    """Ending quietly would read as the end of the events to the loop consuming the watch."""

    async def main() -> None:
        async with one_kv_node(tmp_path) as node:
            c = Client([node.config.node.listen], timeout=10)
            seen: list[bytes] = []

            async def consume() -> None:
                # From revision 1, not "from now": the put below may otherwise commit before
                # the watch pins "now" (it did under load), and the watch would never see it.
                async for event in c.watch(b"w/", start_revision=1):
                    seen.append(event.kv.key)

            watching = asyncio.ensure_future(consume())
            await c.put(b"w/1", b"x")
            while not seen:
                await asyncio.sleep(0.01)
            await c.close()
            with pytest.raises(DengineError, match="closed"):
                await asyncio.wait_for(watching, 10)

    asyncio.run(main())


def test_a_put_on_the_wire_when_a_close_is_cancelled_still_hears_an_outcome() -> None:
    """close() waits for the batches on the wire; cancelled meanwhile (a timeout around it), it
    cancelled them, and their callers waited for ever, not told their write may have been applied."""

    async def main() -> None:
        s = ScriptedClient()

        async def unanswered(address: str, request: bytes, timeout: float, **_: object) -> bytes:
            await asyncio.sleep(timeout)
            raise CallFailed("DEADLINE_EXCEEDED", "no answer to the batch in time")

        s.client._call_batch = unanswered  # type: ignore[method-assign]
        put = asyncio.ensure_future(s.client.put(b"k", b"v"))
        await asyncio.sleep(0.01)  # its batch is on the wire
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.client.close(), 0.02)
        with pytest.raises(OutcomeUnknownError, match="closed"):
            await asyncio.wait_for(put, 2)

    asyncio.run(main())


BIG = 15 << 20


def test_operations_whose_answers_are_too_large_together_are_sent_again_alone(tmp_path: Path) -> None:
    """Five gets of 15 MiB values each succeed alone; coalesced into one batch, its answer passed
    the 64 MiB message limit and every caller was refused, however often it tried. The same for
    puts asking for previous values that large: applied, and reported refused. The batch is now
    sent again an operation at a time; a put already applied is answered from its session."""

    async def main() -> None:
        async with one_kv_node(tmp_path) as node:
            c = Client([node.config.node.listen], timeout=60, attempt_timeout=30)
            async with c:
                for i in range(5):
                    await c.put(b"k%d" % i, bytes([65 + i]) * BIG)
                gets = await asyncio.gather(*(c.get(b"k%d" % i) for i in range(5)))
                assert [len(g.value) if g is not None else 0 for g in gets] == [BIG] * 5
                puts = await asyncio.gather(*(c.put(b"k%d" % i, b"small", prev_kv=True) for i in range(5)))
                replaced = [p.prev for p in puts]
                assert [kv.value[:1] for kv in replaced if kv is not None] == [b"A", b"B", b"C", b"D", b"E"]
                assert sorted(p.revision for p in puts) == [6, 7, 8, 9, 10]
                assert (await c.put(b"last", b"x")).revision == 11, "a put was applied twice"

    asyncio.run(main())


def test_a_client_may_not_coalesce_more_than_a_node_takes_in_one_batch() -> None:
    """A node refuses a batch of more than MAX_BATCH_OPERATIONS whole: a client set to make
    larger ones would have every burst refused."""
    Client(["127.0.0.1:1"], max_batch=MAX_BATCH_OPERATIONS)
    with pytest.raises(ValueError, match=f"max_batch must be 1 to {MAX_BATCH_OPERATIONS}"):
        Client(["127.0.0.1:1"], max_batch=MAX_BATCH_OPERATIONS + 1)
