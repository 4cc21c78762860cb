"""WriteGroup: a batch of writes waited for as one, each answering into its own slot."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc

from dengine.errors import LeaderOverloadedError, OutcomeUnknownError, ProposalDroppedError
from dengine.kv import KVStateMachine
from dengine.proposals import Proposal, WriteGroup
from dengine.server import KVService, RequestError

from kv_leader_stand_in import LeaderStandIn


def test_the_group_completes_with_every_answer_in_order_once_the_last_arrives() -> None:
    async def main() -> None:
        group = WriteGroup(3)
        a, b, c = group.slots
        c.set_result(b"third")
        a.set_result(b"first")
        assert not group.future.done() and c.done() and not b.done()
        assert not group.failed
        failure = ProposalDroppedError("overtaken")
        b.set_exception(failure)
        assert group.future.done() and group.failed
        assert await group.future == [b"first", failure, b"third"]
        a.set_result(b"late")  # a second answer for the same write changes nothing
        assert group.answers[0] == b"first"

    asyncio.run(main())


def test_a_slot_stands_in_a_proposal_beside_plain_futures() -> None:
    async def main() -> None:
        group = WriteGroup(1)
        slot = group.slots[0]
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        proposal = Proposal(b"payload", 0.0, slot)
        proposal.futures.append(fut)  # the same write retried by a caller of propose()
        for waiter in proposal.futures:
            if not waiter.done():
                waiter.set_result(b"ok")
        assert await fut == b"ok" and await group.future == [b"ok"]
        assert slot in proposal.futures  # found by identity, as Node._forget needs

    asyncio.run(main())


def test_an_answered_group_is_freed_without_the_cyclic_collector() -> None:
    """Slots point back at their group: if the group kept them once answered, every batch would
    be a reference cycle, and the piles of them long pauses of the cyclic collector."""

    async def main() -> int:
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                group = WriteGroup(100)
                for slot in group.slots:
                    slot.set_result(b"ok")
                assert await group.future == [b"ok"] * 100
            del group, slot
            return gc.collect()  # what only the cyclic collector could free
        finally:
            gc.enable()

    assert asyncio.run(main()) < 100


def test_an_empty_group_is_complete_at_once() -> None:
    async def main() -> None:
        group = WriteGroup(0)
        assert group.future.done() and await group.future == [] and not group.failed

    asyncio.run(main())


def test_the_kv_service_answers_a_groups_failed_writes_with_their_error() -> None:
    """The service hands a group's answers on as they are when every write has result bytes; a
    failed write among them must still become its error text, not an exception object."""

    async def main() -> None:
        node = LeaderStandIn()
        service = KVService(node, KVStateMachine())  # type: ignore[arg-type]
        plain = asyncio.ensure_future(service._group_answers([(5, 1), (5, 2)], [b"p1", b"p2"]))
        mixed = asyncio.ensure_future(service._group_answers([(5, 3), (5, 4)], [b"p3", b"p4"]))
        await asyncio.sleep(0)
        for slot in node.groups[0].slots:
            slot.set_result(b"ok")
        first, second = node.groups[1].slots
        first.set_result(b"ok")
        second.set_exception(ProposalDroppedError("overtaken"))
        answers: list[Any] = [await plain, await mixed]
        assert answers == [[b"ok", b"ok"], [b"ok", "UNAVAILABLE: overtaken"]]

    asyncio.run(main())


def test_overload_and_unknown_outcomes_reach_clients_as_retryable() -> None:
    """A client retries UNAVAILABLE with backoff; an overloaded leader's refusal must be one, with
    the limit named in the details."""

    async def main() -> None:
        service = KVService(LeaderStandIn(), KVStateMachine())  # type: ignore[arg-type]
        error = service._write_error(LeaderOverloadedError(900, 200, 1000))
        assert isinstance(error, RequestError)
        assert error.code is grpc.StatusCode.UNAVAILABLE and "raft.max_unapplied_bytes" in error.details
        assert error.details.endswith("; leader=1@h:1"), "it names itself: the client comes back here"
        # A write whose node stopped waiting for it: the client's retry carries its session.
        unknown = service._write_error(OutcomeUnknownError("the node stopped before..."))
        assert isinstance(unknown, RequestError) and unknown.code is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())
