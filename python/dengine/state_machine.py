"""The protocol a user's replicated state machine implements.

dengine feeds every committed command, in log order, to ``apply`` on every replica. Replicas stay
identical only if ``apply`` is deterministic: its effect and result may depend on nothing but the
state, the index and the command (no clocks, randomness, environment or I/O that differs between
machines). Any method may be ``async``.

``snapshot`` writes the whole state to a binary sink; ``restore`` replaces the state with one
read back from such a snapshot. Together they let dengine compact the log and bring a lagging or
new replica up to date.

How a snapshot is taken: between two applied batches, so it sees a consistent state. A
synchronous ``snapshot`` runs on a worker thread while applies wait (the node keeps serving Raft
meanwhile); an async one is awaited. A state machine that can freeze its state cheaply may also
define ``begin_snapshot() -> Callable[[BinaryIO], None]``: it is called on the event loop, must
return quickly, and returns a writer that the node runs on a worker thread while applies go on;
the writer must write the state as it was when ``begin_snapshot`` returned (the built-in KV store
does this with copy-on-write). ``restore`` runs on a worker thread too (or is awaited), while
nothing is applied.

An exception raised by ``apply`` is contained: the entry still counts as applied (on every replica
the same way, since the failure is deterministic too), the proposer receives the error, and the
node keeps running.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = ["StateMachine"]


@runtime_checkable
class StateMachine(Protocol):
    """A deterministic state machine replicated by dengine. Each method may also be async."""

    def apply(self, index: int, command: bytes) -> bytes | Awaitable[bytes | None] | None:
        """Applies the committed ``command`` at log ``index``; returns the result for the proposer."""
        ...

    def snapshot(self, sink: BinaryIO) -> Awaitable[None] | None:
        """Writes the complete state to ``sink``."""
        ...

    def restore(self, source: BinaryIO) -> Awaitable[None] | None:
        """Replaces the state with the one written by ``snapshot``."""
        ...
