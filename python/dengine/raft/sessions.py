"""Exactly-once application of proposals (Raft thesis §6.3) and the apply step itself.

A client that retries a write after a timeout cannot know whether the first attempt committed.
So writes carry ``(client id, sequence)``; every replica keeps, per client, the last sequence it
applied and that command's result. A retry of the last sequence returns the stored result without
applying again; an older sequence is refused. The table lives in the replicated state (it is
snapshotted with the state machine), and its eviction depends only on log indexes, so it is the
same on every replica.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dengine._core import Entry
from dengine.raft import payload
from dengine.raft.payload import Kind

RunCommand = Callable[[int, bytes], bytes | None]
"""Runs one user command at a log index and returns its result."""
AsyncRunCommand = Callable[[int, bytes], Awaitable[bytes | None]]


@dataclass(slots=True)
class _Session:
    sequence: int
    result: bytes | None
    error: str | None
    last_index: int


class Outcome(enum.Enum):
    APPLIED = "applied"  # the command ran now
    DUPLICATE = "duplicate"  # a retry of the last applied sequence: its stored result returned
    STALE = "stale"  # older than the last applied sequence: refused
    NOOP = "noop"  # an entry with nothing to run


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one entry produced, for whoever waits on it."""

    index: int
    outcome: Outcome
    result: bytes | None = None
    error: str | None = None
    client_id: int = 0
    sequence: int = 0


class SessionTable:
    """Per-client last sequence and result, bounded and expired deterministically.

    ``max_clients`` bounds memory; when it is exceeded, the client that has been idle for the
    most entries is forgotten (ties broken by client id). A client idle for more than
    ``expire_after`` log entries is forgotten too. A forgotten client's late retry would be
    applied again, so both limits should comfortably exceed any client's retry window.
    """

    def __init__(self, *, max_clients: int = 100_000, expire_after: int = 10_000_000) -> None:
        if max_clients < 1 or expire_after < 1:
            raise ValueError("max_clients and expire_after must be positive")
        self.max_clients = max_clients
        self.expire_after = expire_after
        # Ordered by last activity: the first item is always the most idle client.
        self._sessions: OrderedDict[int, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def lookup(self, client_id: int, sequence: int) -> Outcome | None:
        s = self._sessions.get(client_id)
        if s is None or sequence > s.sequence:
            return None
        return Outcome.DUPLICATE if sequence == s.sequence else Outcome.STALE

    def record(
        self, client_id: int, sequence: int, index: int, result: bytes | None, error: str | None
    ) -> None:
        self._sessions.pop(client_id, None)
        self._sessions[client_id] = _Session(sequence, result, error, index)
        self._expire(index)

    def stored(self, client_id: int) -> _Session:
        return self._sessions[client_id]

    def _expire(self, index: int) -> None:
        while self._sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if len(self._sessions) > self.max_clients or index - oldest.last_index > self.expire_after:
                del self._sessions[oldest_id]
            else:
                break

    def items(self) -> list[tuple[int, int, int, bytes | None, str | None]]:
        """``(client, sequence, last index, result, error)`` in eviction order, for snapshots."""
        return [(c, s.sequence, s.last_index, s.result, s.error) for c, s in self._sessions.items()]


def _precheck(entry: Entry, sessions: SessionTable) -> payload.Decoded | Applied:
    """Decodes an entry; answers at once for no-ops and for sequences already seen."""
    decoded = payload.decode(entry.data)
    if decoded.kind is Kind.NOOP:
        return Applied(entry.index, Outcome.NOOP)
    if decoded.kind is Kind.SESSION_COMMAND:
        seen = sessions.lookup(decoded.client_id, decoded.sequence)
        if seen is Outcome.DUPLICATE:
            s = sessions.stored(decoded.client_id)
            return Applied(entry.index, seen, s.result, s.error, decoded.client_id, decoded.sequence)
        if seen is Outcome.STALE:
            stale = f"sequence {decoded.sequence} is older than one already applied"
            return Applied(entry.index, seen, None, stale, decoded.client_id, decoded.sequence)
    return decoded


def _record(
    entry: Entry, decoded: payload.Decoded, sessions: SessionTable, result: bytes | None, error: str | None
) -> Applied:
    if decoded.kind is Kind.SESSION_COMMAND:
        sessions.record(decoded.client_id, decoded.sequence, entry.index, result, error)
    return Applied(entry.index, Outcome.APPLIED, result, error, decoded.client_id, decoded.sequence)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def apply_entry(entry: Entry, sessions: SessionTable, run: RunCommand) -> Applied:
    """Applies one committed entry: decodes its envelope, consults the session table, runs the
    command through ``run(index, command)`` and contains any exception it raises (the same on
    every replica, since commands are deterministic)."""
    decoded = _precheck(entry, sessions)
    if isinstance(decoded, Applied):
        return decoded
    result: bytes | None = None
    error: str | None = None
    try:
        result = run(entry.index, decoded.command)
    except Exception as exc:  # a failing command must not stop the node or fork replicas
        error = _describe(exc)
    return _record(entry, decoded, sessions, result, error)


async def apply_entry_async(entry: Entry, sessions: SessionTable, run: AsyncRunCommand) -> Applied:
    """:func:`apply_entry` for a state machine whose ``apply`` is a coroutine."""
    decoded = _precheck(entry, sessions)
    if isinstance(decoded, Applied):
        return decoded
    result: bytes | None = None
    error: str | None = None
    try:
        result = await run(entry.index, decoded.command)
    except Exception as exc:  # a failing command must not stop the node or fork replicas
        error = _describe(exc)
    return _record(entry, decoded, sessions, result, error)
