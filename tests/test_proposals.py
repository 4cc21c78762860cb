"""WriteGroup: a batch of writes waited for as one, each answering into its own slot."""

from __future__ import annotations

import asyncio
import gc

from dengine.errors import ProposalDroppedError
from dengine.proposals import Proposal, WriteGroup


def test_the_group_completes_with_every_answer_in_order_once_the_last_arrives() -> None:
    async def main() -> None:
        group = WriteGroup(3)
        a, b, c = group.slots
        c.set_result(b"third")
        a.set_result(b"first")
        assert not group.future.done() and c.done() and not b.done()
        failure = ProposalDroppedError("overtaken")
        b.set_exception(failure)
        assert group.future.done()
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
