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
import heapq
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass

from dengine._core import Entry
from dengine.raft import payload
from dengine.raft.payload import Kind

SessionItems = Sequence[tuple[int, int, int, Sequence[tuple[int, bytes | None, str | None]]]]
"""Rows of :meth:`SessionTable.items`, as a snapshot stores them."""

RunCommand = Callable[[int, bytes], bytes | None]
"""Runs one user command at a log index and returns its result."""
AsyncRunCommand = Callable[[int, bytes], Awaitable[bytes | None]]


@dataclass(slots=True)
class _Session:
    # Results of applied sequences the client may still retry, by sequence number.
    results: dict[int, tuple[bytes | None, str | None]]
    # Sequences below this were acknowledged by the client: a late copy of one is refused.
    acked_below: int
    last_index: int
    # The keys of ``results`` as a min-heap (entries already dropped are skipped when popped):
    # dropping the lowest sequences costs O(log n) each, not a scan of every stored result
    # per applied command, which was quadratic in a client's requests in flight.
    order: list[int]

    def drop_lowest(self) -> None:
        seq = heapq.heappop(self.order)
        self.results.pop(seq, None)


class Outcome(enum.Enum):
    APPLIED = "applied"  # the command ran now
    DUPLICATE = "duplicate"  # a retry of an applied sequence: its stored result returned
    STALE = "stale"  # a sequence the client already acknowledged: refused
    NOOP = "noop"  # an entry with nothing to run


@dataclass(slots=True)
class Applied:
    """What applying one entry produced, for whoever waits on it."""

    # Not frozen: one is built per answered entry, on the hot path, and a frozen dataclass sets
    # each field through object.__setattr__.
    index: int
    outcome: Outcome
    result: bytes | None = None
    error: str | None = None
    client_id: int = 0
    sequence: int = 0


class SessionTable:
    """Per-client results of recently applied sequences, bounded and expired deterministically.

    A client may have many requests in flight, and retries may reach the log in any order, so a
    session keeps the result of every sequence the client may still retry. Each command carries
    the client's lowest sequence still awaiting an answer (``first_outstanding``): results below
    it are dropped, and a late copy of such a sequence is refused as stale. ``max_results`` caps
    what one client can pin (oldest dropped first).

    ``max_clients`` bounds memory; when it is exceeded, the client that has been idle for the
    most entries is forgotten. A client idle for more than ``expire_after`` log entries is
    forgotten too. A forgotten client's late retry would be applied again, so the limits should
    comfortably exceed any client's retry window.
    """

    def __init__(
        self, *, max_clients: int = 100_000, expire_after: int = 10_000_000, max_results: int = 100_000
    ) -> None:
        if max_clients < 1 or expire_after < 1 or max_results < 1:
            raise ValueError("max_clients, expire_after and max_results must be positive")
        self.max_clients = max_clients
        self.expire_after = expire_after
        self.max_results = max_results
        # Ordered by last activity: the first item is always the most idle client.
        self._sessions: OrderedDict[int, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def lookup(self, client_id: int, sequence: int) -> Outcome | None:
        s = self._sessions.get(client_id)
        if s is None:
            return None
        if sequence in s.results:
            return Outcome.DUPLICATE
        return Outcome.STALE if sequence < s.acked_below else None

    def record(
        self,
        client_id: int,
        sequence: int,
        index: int,
        result: bytes | None,
        error: str | None,
        *,
        first_outstanding: int = 0,
    ) -> None:
        s = self._sessions.get(client_id)
        if s is None:
            s = self._sessions[client_id] = _Session({}, 0, index, [])
        else:
            self._sessions.move_to_end(client_id)
        s.last_index = index
        if sequence not in s.results:
            heapq.heappush(s.order, sequence)
        s.results[sequence] = (result, error)
        if first_outstanding > s.acked_below:
            s.acked_below = first_outstanding
            while s.order and s.order[0] < first_outstanding:
                s.drop_lowest()
        while len(s.results) > self.max_results:
            s.drop_lowest()
        self._expire(index)

    def stored(self, client_id: int, sequence: int) -> tuple[bytes | None, str | None]:
        return self._sessions[client_id].results[sequence]

    def _expire(self, index: int) -> None:
        while self._sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if len(self._sessions) > self.max_clients or index - oldest.last_index > self.expire_after:
                del self._sessions[oldest_id]
            else:
                break

    def items(self) -> list[tuple[int, int, int, list[tuple[int, bytes | None, str | None]]]]:
        """``(client, acked below, last index, [(sequence, result, error)])`` in eviction order,
        for snapshots."""
        return [
            (c, s.acked_below, s.last_index, [(q, r, e) for q, (r, e) in sorted(s.results.items())])
            for c, s in self._sessions.items()
        ]

    def restore(self, items: SessionItems) -> None:
        """Replaces the whole table with rows from :meth:`items` (in the same eviction order)."""
        sessions: OrderedDict[int, _Session] = OrderedDict()
        for client, acked_below, last_index, results in items:
            stored = {q: (r, e) for q, r, e in results}
            order = sorted(stored)  # a sorted list is already a min-heap
            sessions[client] = _Session(stored, acked_below, last_index, order)
        self._sessions = sessions


def _precheck(entry: Entry, sessions: SessionTable) -> payload.Decoded | Applied:
    """Decodes an entry; answers at once for no-ops, damaged envelopes and sequences already seen."""
    try:
        decoded = payload.decode(entry.data)
    except ValueError as exc:
        # Never written by dengine; skipped the same way on every replica rather than stopping.
        return Applied(entry.index, Outcome.NOOP, error=f"undecodable entry: {exc}")
    if decoded.kind is Kind.NOOP or decoded.kind is Kind.CONF_CHANGE:
        return Applied(entry.index, Outcome.NOOP)
    if decoded.kind is Kind.SESSION_COMMAND:
        seen = sessions.lookup(decoded.client_id, decoded.sequence)
        if seen is Outcome.DUPLICATE:
            result, error = sessions.stored(decoded.client_id, decoded.sequence)
            return Applied(entry.index, seen, result, error, decoded.client_id, decoded.sequence)
        if seen is Outcome.STALE:
            stale = f"sequence {decoded.sequence} was already acknowledged by its client"
            return Applied(entry.index, seen, None, stale, decoded.client_id, decoded.sequence)
    return decoded


def _record(
    entry: Entry, decoded: payload.Decoded, sessions: SessionTable, result: bytes | None, error: str | None
) -> Applied:
    if decoded.kind is Kind.SESSION_COMMAND:
        sessions.record(
            decoded.client_id,
            decoded.sequence,
            entry.index,
            result,
            error,
            first_outstanding=decoded.first_outstanding,
        )
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


def apply_entries(
    entries: Sequence[Entry], sessions: SessionTable, run: RunCommand, wanted: Container[tuple[int, int]]
) -> list[Applied]:
    """:func:`apply_entry` for each of ``entries`` in order, with the same effects, returning only
    the outcomes of session commands whose ``(client id, sequence)`` is in ``wanted`` (those
    someone waits for).

    The common case, a session command not seen before, runs inline here: at tens of thousands
    of entries a second, per-entry calls and tuples are a large share of a replica's time.
    Everything else (duplicates, stale or damaged entries, other kinds) takes apply_entry's path.
    """
    answered: list[Applied] = []
    table = sessions._sessions
    unpack = payload.SESSION_HEADER.unpack_from
    head = payload.SESSION_HEADER.size
    session_kind = payload.SESSION_KIND
    record = sessions.record
    for entry in entries:
        data = entry.data
        if len(data) >= head and data[0] == session_kind:
            _, client, seq, first = unpack(data)
            s = table.get(client)
            if s is None or (seq not in s.results and seq >= s.acked_below):
                index = entry.index
                result: bytes | None = None
                error: str | None = None
                try:
                    result = run(index, data[head:])
                except Exception as exc:  # a failing command must not stop the node or fork replicas
                    error = _describe(exc)
                record(client, seq, index, result, error, first_outstanding=first)
                if (client, seq) in wanted:
                    answered.append(Applied(index, Outcome.APPLIED, result, error, client, seq))
                continue
        applied = apply_entry(entry, sessions, run)
        if applied.client_id and (applied.client_id, applied.sequence) in wanted:
            answered.append(applied)
    return answered
