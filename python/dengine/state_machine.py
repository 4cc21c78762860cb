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
the same way, since the failure is deterministic too), the proposer receives the error (as
``ApplyError``, ``TypeName: message``), and the node keeps running. Whatever the state machine
changed before raising stays changed, as does the state of an ``apply`` that returns something
other than bytes or None (also the command's error). This holds for every exception, a
CancelledError that ``apply`` raised or let through included (on Python 3.10 it cannot be told
from the node's own cancellation: the node stops instead). A KeyboardInterrupt or a SystemExit is
not contained: either may come from outside at any moment (Ctrl-C, a signal handler calling
``sys.exit``), and recorded as the command's error on one replica only it would fork the
replicas; it leaves the program, as it would anywhere else.

An async ``apply`` is awaited one entry at a time, in log order; while one is half applied,
reads wait (``Node.read`` runs its function between two entries, never inside one, and never
during a restore; the function must be a plain one: one that returns an awaitable is
refused). ``snapshot`` and ``restore`` may also be plain methods that return an awaitable: it
is awaited. A plain ``apply`` that returns a coroutine is not (its entry gets a TypeError):
declare it ``async def``.

Give each ``Node`` a state machine in its initial state, made for it: the node replays its log (and
restores its snapshot) into it when it starts. Propose and read from the node's event loop (from
another thread, through ``asyncio.run_coroutine_threadsafe``).
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
