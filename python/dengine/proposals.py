"""What the node keeps for writes someone waits for, and the two kinds of waiter.

A caller of ``Node.propose`` waits on an asyncio future. The KV service's batch of writes waits
as one :class:`WriteGroup`: each write answers into its slot, and one future completes when the
last does, so a batch of a hundred writes costs one future and one wake-up, not a hundred.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["GroupSlot", "Proposal", "Waiter", "WriteGroup"]


class Waiter(Protocol):
    """The part of an asyncio future the node uses to answer a write."""

    def done(self) -> bool: ...

    def set_result(self, result: bytes, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Proposal:
    """A write someone on this node waits for. Its payload is proposed again when a new leader
    appears, since the old one may have lost it (the session makes a second copy harmless)."""

    __slots__ = ("futures", "payload", "resent", "started", "waiting_since")

    def __init__(self, payload: bytes, started: float, waiter: Waiter) -> None:
        self.payload = payload
        self.started = started  # time.monotonic() of the first proposal, for the latency metric
        self.futures = [waiter]
        # Whether the payload was proposed again (a new leader, a client's retry): an earlier
        # copy may be in the log, so a refusal of a later copy must not tell its waiters that
        # the write was not appended.
        self.resent = False
        # The applied index when it was first proposed again (-1: not yet): how long it has
        # waited, in what the session table counts.
        self.waiting_since = -1


class WriteGroup:
    """Writes proposed together whose answers are wanted together: ``future`` completes with one
    answer per write, in order, each the result bytes or the exception the write failed with."""

    __slots__ = ("answers", "failed", "future", "remaining", "slots")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the running loop, if the caller knows it (default: asked for)."""
        self.answers: list[bytes | BaseException | None] = [None] * size
        self.remaining = size
        self.failed = False  # whether some write's answer is an exception
        self.future: asyncio.Future[list[bytes | BaseException | None]] = (
            loop or asyncio.get_running_loop()
        ).create_future()
        self.slots = [GroupSlot(self, i) for i in range(size)]
        if not size:
            self.future.set_result(self.answers)

    def settle(self, position: int, answer: bytes | BaseException) -> None:
        if self.answers[position] is not None:
            return
        self.answers[position] = answer
        if type(answer) is not bytes:
            self.failed = True
        self.remaining -= 1
        if not self.remaining:
            self.release()
            if not self.future.done():
                self.future.set_result(self.answers)

    def release(self) -> None:
        """Drops the slots, once nobody can answer through them any more. They point back at the
        group, so until then the batch is a reference cycle: left to the cyclic collector, a
        few hundred objects per batch pile up into collections of tens of milliseconds."""
        self.slots = []


class GroupSlot:
    """One write's place in a :class:`WriteGroup`, standing where a future stands for a caller
    of ``propose``."""

    __slots__ = ("group", "position")

    def __init__(self, group: WriteGroup, position: int) -> None:
        self.group = group
        self.position = position

    def done(self) -> bool:
        return self.group.answers[self.position] is not None

    def set_result(self, result: bytes, /) -> None:
        self.group.settle(self.position, result)

    def set_exception(self, exception: BaseException, /) -> None:
        self.group.settle(self.position, exception)
