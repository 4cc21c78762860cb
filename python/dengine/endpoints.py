"""Which node a :class:`dengine.Client` call goes to, and how long a retry waits.

The leader, while one is known. Otherwise the members in turn, passing over any node whose last
call failed outright (refused or reset the connection, or let an attempt time out): after a
leader dies, the survivors elect a new one within an election timeout, but a client that kept
taking its turn at the dead node would lose a backoff to it on a third of its attempts, and its
calls would trail in for seconds after the cluster was serving again. A node passed over is
tried again once its time out ends (half a second, doubled at each failure in a row, up to
:data:`DOWN_MAX_S`), or at once when every node is out; any answer from it ends its time out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DOWN_FIRST_S", "DOWN_MAX_S", "Endpoints", "retry_delay"]

DOWN_FIRST_S = 0.5
"""How long a node is passed over after its first outright failure."""
DOWN_MAX_S = 4.0
"""The longest a node that keeps failing is passed over between two tries."""
# Failures of a call as a whole that say the node itself is gone, frozen or unreachable (a
# refusal it answered, even UNAVAILABLE from an overloaded leader, carries its own reason).
_NODE_FAILURES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def retry_delay(attempts: int, *, first: float = 0.01, cap: float = 0.25) -> float:
    """The wait before retry number ``attempts`` (1, 2, ...): ``first`` doubled at each attempt up
    to ``cap``, less up to half of it at random so that many callers' retries spread out. The cap
    is short because the usual wait is an election, a second or so: a retry should find the new
    leader soon after it is serving."""
    return min(cap, first * 2.0 ** min(attempts, 16)) * random.uniform(0.5, 1.0)


@dataclass(slots=True)
class Endpoints:
    """The addresses a client knows, the leader among them if known, and the nodes on time out."""

    given: list[str]  # by the user: always tried
    addresses: list[str] = field(default_factory=list)  # given, then the members learned
    leader: str | None = None
    next_try: int = 0
    # address -> (passed over until this time.monotonic(), failures in a row)
    down: dict[str, tuple[float, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.addresses = list(self.given)

    def learn(self, members: Sequence[str]) -> None:
        """Adopts the cluster's member addresses (replacing those learned before: a removed
        member drops out), after the ones the user gave."""
        self.addresses = [*self.given, *(m for m in dict.fromkeys(members) if m and m not in self.given)]

    def pick(self) -> str:
        """The address for the next call: the leader's, else the next member not on time out
        (or, when all are, the one whose time out ends first)."""
        if self.leader is not None:
            return self.leader
        addresses, down = self.addresses, self.down
        start, n = self.next_try, len(addresses)
        if down:
            now = time.monotonic()
            for k in range(n):
                address = addresses[(start + k) % n]
                until = down.get(address)
                if until is None or until[0] <= now:
                    self.next_try = start + k + 1
                    return address
            self.next_try = start + 1
            return min(addresses, key=lambda a: down.get(a, (0.0, 0))[0])
        self.next_try = start + 1
        return addresses[start % n]

    def call_failed(self, address: str, code: str) -> None:
        """A call to ``address`` failed as a whole with gRPC status ``code``: a node that is gone,
        frozen or cut off goes on time out, and stops being taken for the leader."""
        if code not in _NODE_FAILURES:
            return
        _, failures = self.down.get(address, (0.0, 0))
        out = min(DOWN_MAX_S, DOWN_FIRST_S * 2.0 ** min(failures, 16))  # every failed call counts
        self.down[address] = (time.monotonic() + out, failures + 1)
        if self.leader == address:
            self.leader = None

    def answered(self, address: str) -> None:
        """``address`` answered a call: it is up."""
        if self.down:
            self.down.pop(address, None)

    def is_down(self, address: str) -> bool:
        """Whether ``address`` is on time out now."""
        until = self.down.get(address)
        return until is not None and until[0] > time.monotonic()

    def go_elsewhere_now(self, address: str) -> bool:
        """Whether a call that just failed at ``address`` should be retried at once: that node is
        on time out, and some other member is not."""
        return self.is_down(address) and any(a != address and not self.is_down(a) for a in self.addresses)
