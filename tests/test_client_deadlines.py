"""What a call that runs out of time raises, and how one call's deadline bears on others: a
write that may have been applied is never reported as failed, a deadline is reported as a
deadline, and each attempt on one node is bounded by ``attempt_timeout``."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from dengine.batch_stream import CallFailed
from dengine.client import Client, OutcomeUnknownAtDeadline, SyncClient
from dengine.devcluster import free_ports
from dengine.errors import DeadlineExceeded, DengineError, OutcomeUnknownError, Unavailable
from dengine.kv import KVStateMachine
from dengine.node import Node
from dengine.server import kv_services
from test_client_sessions import Reply, ScriptedClient, _refuse, _refuse_each, run
from test_node_embedded import configs


def _first_then(first: Reply, then: Reply) -> Reply:
    calls = iter(range(1))

    def reply(request: bytes) -> bytes:
        return first(request) if next(calls, None) is not None else then(request)

    return reply


def _unanswered(request: bytes) -> bytes:
    raise CallFailed("DEADLINE_EXCEEDED", "no answer to the batch in time")  # sent: it may have applied


UNKNOWN_OUTCOME = "UNAVAILABLE: node stopped; the write's outcome is unknown: it may still be applied"


@pytest.mark.parametrize("first", ["no answer", "the node's unknown outcome"])
def test_a_write_that_may_have_been_applied_is_not_reported_unavailable_at_its_deadline(first: str) -> None:
    """The first attempt may have been applied (no answer in time; or the node's own "outcome
    unknown", sent as a per-operation UNAVAILABLE), then the nodes cannot be reached until the
    deadline: the caller must hear that the outcome is unknown, and that the deadline passed."""

    async def test(s: ScriptedClient) -> None:
        opening = _unanswered if first == "no answer" else _refuse_each(UNKNOWN_OUTCOME)
        s.reply = _first_then(opening, _refuse(grpc.StatusCode.UNAVAILABLE))
        with pytest.raises(OutcomeUnknownAtDeadline) as caught:
            await s.client.put(b"k", b"v", timeout=0.3)
        assert isinstance(caught.value, OutcomeUnknownError)
        assert isinstance(caught.value, DeadlineExceeded)

    run(test, ("127.0.0.1:1", "127.0.0.1:2"))


def test_a_write_no_node_could_have_taken_is_unavailable_and_a_read_that_timed_out_a_deadline() -> None:
    async def test(s: ScriptedClient) -> None:
        s.reply = _refuse(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await s.client.put(b"k", b"v", timeout=0.2)

        async def unanswered(address: str, request: bytes, timeout: float, **_: object) -> bytes:
            return _unanswered(request)

        s.client._call_batch = unanswered  # type: ignore[method-assign]
        with pytest.raises(DeadlineExceeded) as caught:
            await s.client.get(b"k", timeout=0.2)
        assert not isinstance(caught.value, OutcomeUnknownError), "a read applies nothing"

    run(test)


async def _frozen_server() -> tuple[grpc.aio.Server, str]:
    """A server that takes every KV and Cluster call and never answers: a frozen node."""

    async def never(*_: object) -> None:
        await asyncio.sleep(3600)

    server = grpc.aio.server()
    kv = {m: grpc.unary_unary_rpc_method_handler(never) for m in ("Range", "Batch")}
    kv["BatchStream"] = grpc.stream_stream_rpc_method_handler(never)
    cluster = {"Status": grpc.unary_unary_rpc_method_handler(never)}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("dengine.v1.KV", kv),
            grpc.method_handlers_generic_handler("dengine.v1.Cluster", cluster),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_frozen_node_costs_a_range_one_attempt_not_its_deadline(tmp_path: Path) -> None:
    """The frozen node is tried first; after ``attempt_timeout`` the range goes to the live one.
    With only the frozen node, the range and an admin call end in DeadlineExceeded."""

    async def main() -> None:
        frozen_server, frozen = await _frozen_server()
        (cfg,) = configs(tmp_path, 1)
        sm = KVStateMachine()
        node = Node(cfg, sm, extra_services=kv_services(sm))
        await node.start()
        try:
            async with Client([cfg.node.listen], timeout=10) as c:
                await c.put(b"k", b"v")  # a leader serves
            async with Client([frozen, cfg.node.listen], attempt_timeout=0.3, timeout=5) as c:
                assert [kv.key for kv in await c.range(b"k")] == [b"k"]
            async with Client([frozen], attempt_timeout=0.3, discover_members=False) as c:
                with pytest.raises(DeadlineExceeded):
                    await c.range(b"k", timeout=1)
                with pytest.raises(DeadlineExceeded):
                    await c.members(timeout=1)
        finally:
            await node.stop()
            await frozen_server.stop(None)

    asyncio.run(main())


def test_one_short_deadline_neither_shortens_its_batch_nor_sets_the_node_aside() -> None:
    """A call with a short deadline shares a batch with calls that have long ones: the batch
    still gets ``attempt_timeout``, the short call fails alone at its own deadline, and a batch
    that ran out of its callers' time on a node still answering others is no node failure."""

    async def test(s: ScriptedClient) -> None:
        s.client.attempt_timeout = 5.0
        timeouts: list[float] = []
        scripted = s._call

        async def slow(address: str, request: bytes, timeout: float, **_: object) -> bytes:
            timeouts.append(timeout)
            await asyncio.sleep(0.1)
            return await scripted(address, request, timeout)

        s.client._call_batch = slow  # type: ignore[method-assign]
        puts = [s.client.put(b"k%d" % i, b"v", timeout=10) for i in range(20)]
        short = asyncio.ensure_future(s.client.delete(b"x", timeout=0.01))
        await asyncio.gather(*puts)
        with pytest.raises(DeadlineExceeded):
            await short
        assert timeouts[0] > 4, timeouts

        async def expired(address: str, request: bytes, timeout: float, **_: object) -> bytes:
            # What a batch stream says when its callers' deadlines passed while it answered others.
            raise CallFailed("DEADLINE_EXCEEDED", "the callers' deadlines passed", silent=False)

        s.client._call_batch = expired  # type: ignore[method-assign]
        with pytest.raises(DeadlineExceeded):
            await s.client.put(b"late", b"v", timeout=0.2)
        assert not s.client._endpoints.is_down("127.0.0.1:1")

    run(test)


def test_closing_a_sync_client_ends_the_calls_of_other_threads_and_a_failed_one_leaks_no_thread() -> None:
    port = free_ports(1)[0]  # nothing listens: the put waits for retries
    client = SyncClient([f"127.0.0.1:{port}"], timeout=30)
    outcome: list[BaseException | object] = []

    def worker() -> None:
        try:
            outcome.append(client.put(b"k", b"v"))
        except BaseException as exc:  # what it ended with is the point
            outcome.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    time.sleep(0.5)
    client.close()
    thread.join(5)
    assert not thread.is_alive(), "a call of another thread still blocked after close()"
    assert isinstance(outcome[0], DengineError) and "closed" in str(outcome[0])
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(ValueError):
            SyncClient([f"127.0.0.1:{port}"], max_batch=0)
    assert threading.active_count() <= before  # (a thread of the closed client may end meanwhile)


@pytest.mark.parametrize("then", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_write_refused_after_an_attempt_that_may_have_been_applied_has_an_unknown_outcome(
    then: grpc.StatusCode,
) -> None:
    """The first attempt got no answer in time (it may have been applied), the retry is refused
    outright: the refusal says nothing of the first attempt, so the caller must not hear
    "failed"."""

    async def test(s: ScriptedClient) -> None:
        s.reply = _first_then(_unanswered, _refuse(then, reached=True))
        with pytest.raises(OutcomeUnknownError, match="may be applied"):
            await s.client.put(b"k", b"v", timeout=0.3)

    run(test, ("127.0.0.1:1", "127.0.0.1:2"))
