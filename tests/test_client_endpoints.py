"""Which node a client call goes to (``dengine.endpoints``): the leader when known, else the members
in turn, passing over nodes whose last call failed outright until their time out ends."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from dengine.client import Client
from dengine.endpoints import Endpoints, retry_delay
from dengine.errors import RequestFailed

A, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"


def test_the_members_are_taken_in_turn_and_the_leader_always() -> None:
    e = Endpoints([A, B, C])
    assert [e.pick() for _ in range(4)] == [A, B, C, A]
    e.leader = C
    assert [e.pick() for _ in range(2)] == [C, C]


def test_a_node_that_failed_outright_is_passed_over_and_stops_being_the_leader() -> None:
    e = Endpoints([A, B, C])
    e.leader = A
    e.call_failed(A, "UNAVAILABLE")
    assert e.leader is None
    assert e.is_down(A) and e.go_elsewhere_now(A)
    assert not e.go_elsewhere_now(B), "B did not fail"
    assert [e.pick() for _ in range(4)] == [B, C, B, C]
    e.answered(A)
    assert not e.is_down(A)
    assert A in [e.pick() for _ in range(3)]


def test_a_refusal_the_node_answered_is_no_sign_it_is_down() -> None:
    e = Endpoints([A, B])
    for code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "CANCELLED", "RESOURCE_EXHAUSTED"):
        e.call_failed(A, code)
    assert not e.is_down(A)
    e.call_failed(A, "DEADLINE_EXCEEDED")  # an attempt that timed out: frozen or cut off
    assert e.is_down(A)


def test_when_every_node_is_down_the_one_back_soonest_is_tried() -> None:
    e = Endpoints([A, B, C])
    e.call_failed(B, "UNAVAILABLE")
    e.call_failed(C, "UNAVAILABLE")
    e.call_failed(C, "UNAVAILABLE")  # twice in a row: out twice as long
    e.call_failed(A, "UNAVAILABLE")
    e.call_failed(A, "UNAVAILABLE")
    assert not e.go_elsewhere_now(A), "no one else to go to"
    assert e.pick() == B


def test_the_time_out_doubles_with_each_failure_in_a_row_up_to_a_bound() -> None:
    e = Endpoints([A, B])
    outs = []
    for _ in range(6):
        e.call_failed(A, "UNAVAILABLE")
        outs.append(e.down[A][0] - time.monotonic())
    assert outs == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0], abs=0.05)
    for _ in range(5000):  # many calls failing at once during a long outage
        e.call_failed(A, "UNAVAILABLE")
    assert e.down[A][0] - time.monotonic() == pytest.approx(4.0, abs=0.05)
    e.down[A] = (time.monotonic() - 0.001, 6)  # its time out ended
    assert not e.is_down(A)
    assert A in (e.pick(), e.pick())


def test_learned_members_come_after_the_given_ones() -> None:
    e = Endpoints([B])
    e.learn([A, B, C, A, ""])
    assert e.addresses == [B, A, C]


def test_retry_delays_grow_to_a_cap_with_jitter() -> None:
    for attempts in range(1, 30):
        d = retry_delay(attempts)
        full = min(0.25, 0.01 * 2**attempts)
        assert full / 2 <= d <= full
    assert retry_delay(3, first=0.05, cap=1.0) <= 0.4


def test_a_watch_fails_out_of_range_when_no_node_it_reaches_holds_the_history() -> None:
    """The one node that answers restored a snapshot past the watch's revision; the other
    address refuses connections (a member that left, a node that is down). Waiting for it would
    keep the watch silent for ever: the watch reports the gap instead."""

    class Call:
        def __init__(self, code: grpc.StatusCode) -> None:
            self.code = code

        async def read(self) -> None:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")

        def cancel(self) -> None:
            pass

    class Stub:
        def __init__(self, code: grpc.StatusCode) -> None:
            self.code = code

        def Watch(self, request: object) -> Call:
            return Call(self.code)

    async def main() -> None:
        stubs = {A: Stub(grpc.StatusCode.OUT_OF_RANGE), B: Stub(grpc.StatusCode.UNAVAILABLE)}
        client = Client([A, B])
        client._stub = stubs.__getitem__  # type: ignore[assignment,method-assign]
        try:
            with pytest.raises(RequestFailed) as failed:
                await asyncio.wait_for(anext(client.watch(b"", start_revision=5)), 10)
            assert failed.value.code == "OUT_OF_RANGE"
        finally:
            await client.close()

    asyncio.run(main())
