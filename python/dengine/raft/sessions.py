"""Exactly-once application of proposals (Raft thesis §6.3) and the apply step itself.

A client that retries a write after a timeout cannot know whether the first attempt committed.
So writes carry ``(client id, sequence)``; every replica keeps, per client, the last sequence it
applied and that command's result. A retry of the last sequence returns the stored result without
applying again; an older sequence is refused. The table lives in the replicated state (it is
snapshotted with the state machine), and its eviction depends only on log indexes, so it is the
same on every replica.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from dengine import _core
from dengine._core import Entry
from dengine.event_loop import cancelling_itself
from dengine.raft import payload
from dengine.raft.payload import Kind

SessionItems = Sequence[tuple[int, int, int, Sequence[tuple[int, bytes | None, str | None]]]]
"""Rows of :meth:`SessionTable.items`, as a snapshot stores them."""

RunCommand = Callable[[int, bytes], bytes | None]
"""Runs one user command at a log index and returns its result."""
AsyncRunCommand = Callable[[int, bytes], Awaitable[bytes | None]]


class Outcome(enum.Enum):
    APPLIED = "applied"  # the command ran now
    DUPLICATE = "duplicate"  # a retry of an applied sequence: its stored result returned
    STALE = "stale"  # a sequence the client already acknowledged: refused
    NOOP = "noop"  # an entry with nothing to run


# Codes of dengine._core.SessionTable: lookup gives 0 (neither), 1 or 2; apply_batch's answers 0 to 2.
_LOOKUP: Final = (None, Outcome.DUPLICATE, Outcome.STALE)
_ANSWERED: Final = (Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE)


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
    what one client can pin: the lowest sequences go first, and are refused as stale from then on
    too (a late copy of one would otherwise run a second time).

    ``max_clients`` bounds memory; when it is exceeded, the client that has been idle for the
    most entries is forgotten. A client idle for more than ``expire_after`` log entries is
    forgotten too. A forgotten client's late retry would be applied again, so the limits should
    comfortably exceed any client's retry window.

    The table itself is ``dengine._core.SessionTable`` (Rust), which :func:`apply_entries` drives
    a whole batch at a time.
    """

    def __init__(
        self, *, max_clients: int = 100_000, expire_after: int = 10_000_000, max_results: int = 100_000
    ) -> None:
        self._table = _core.SessionTable(max_clients, expire_after, max_results)  # checks the limits

    def native_table(self) -> _core.SessionTable:
        """The Rust table itself, for the node's apply thread (``dengine.apply_thread``)."""
        return self._table

    @property
    def max_clients(self) -> int:
        return self._table.max_clients

    @property
    def expire_after(self) -> int:
        return self._table.expire_after

    @property
    def max_results(self) -> int:
        return self._table.max_results

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, client_id: int, sequence: int) -> Outcome | None:
        """DUPLICATE for a sequence applied before, STALE for one the client acknowledged, else None."""
        return _LOOKUP[self._table.lookup(client_id, sequence)]

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
        """Remembers what ``sequence`` produced when applied at log ``index``."""
        self._table.record(client_id, sequence, index, result, error, first_outstanding)

    def stored(self, client_id: int, sequence: int) -> tuple[bytes | None, str | None]:
        """The ``(result, error)`` of an applied sequence (``lookup`` gave DUPLICATE)."""
        return self._table.stored(client_id, sequence)

    def items(self) -> list[tuple[int, int, int, list[tuple[int, bytes | None, str | None]]]]:
        """``(client, acked below, last index, [(sequence, result, error)])`` in eviction order,
        for snapshots."""
        return self._table.items()

    def restore(self, items: SessionItems) -> None:
        """Replaces the whole table with rows from :meth:`items` (in the same eviction order)."""
        self._table.restore([(c, a, i, list(r)) for c, a, i, r in items])


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


def _describe(exc: BaseException) -> str:
    # The same words as the Rust apply loop's (rust/bindings/src/sessions.rs), so that every path
    # records the same error on every replica, even for an exception whose str() fails.
    try:
        text = str(exc)
    except BaseException:  # whatever str() raises, as the Rust path does
        text = "<str() failed>"
    return f"{type(exc).__name__}: {text}"


# What may interrupt an apply from outside at any moment (a signal: Ctrl-C, a handler calling
# sys.exit): recorded as a command's error on one replica only, it would fork the replicas. The
# node stops instead. The Rust apply loop (rust/bindings/src/sessions.rs) lets the same through.
_FROM_OUTSIDE = (KeyboardInterrupt, SystemExit)


def _checked(result: object) -> tuple[bytes | None, str | None]:
    """A state machine's return value as ``(result, error)``: anything but bytes or None is the
    command's error (the words match the Rust apply loop's, so every path answers alike)."""
    if result is None or isinstance(result, bytes):
        return result, None
    return None, f"TypeError: apply must return bytes or None, not {type(result).__name__}"


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
        result, error = _checked(run(entry.index, decoded.command))
    except _FROM_OUTSIDE:
        raise
    except BaseException as exc:  # a failing command must not stop the node or fork replicas
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
        result, error = _checked(await run(entry.index, decoded.command))
    except _FROM_OUTSIDE:
        raise
    except asyncio.CancelledError as exc:
        if cancelling_itself():
            raise
        error = _describe(exc)  # the command's own (it awaited something that was cancelled)
    except BaseException as exc:
        error = _describe(exc)
    return _record(entry, decoded, sessions, result, error)


Answer = tuple[tuple[int, int], int, bytes | None, str | None, int]
"""``((client id, sequence), outcome code, result, error, index)`` of a proposal someone waits
for; the code indexes :data:`ANSWERED_OUTCOMES` (0 applied, 1 duplicate, 2 stale)."""

ANSWERED_OUTCOMES: Final = _ANSWERED


def apply_entries(
    entries: Sequence[Entry],
    sessions: SessionTable,
    run: RunCommand | _core.KvStore,
    wanted: Collection[tuple[int, int]],
) -> list[Applied]:
    """:func:`apply_entry` for each of ``entries`` in order, with the same effects, returning only
    the outcomes of session commands whose ``(client id, sequence)`` is in ``wanted`` (those
    someone waits for). See :func:`apply_committed`."""
    return [
        Applied(index, _ANSWERED[outcome], result, error, *key)
        for key, outcome, result, error, index in apply_committed(entries, sessions, run, wanted)
    ]


def apply_committed(
    entries: Sequence[Entry],
    sessions: SessionTable,
    run: RunCommand | _core.KvStore,
    wanted: Collection[tuple[int, int]],
) -> list[Answer]:
    """:func:`apply_entries` answering in the plain tuples the Rust table builds (see
    :data:`Answer`): what the node's apply loop uses, at tens of thousands a second.

    The batch runs through the Rust session table (at that rate, Python work per entry is a
    large share of a replica's time); only entries it leaves aside, membership changes and
    damaged envelopes, take apply_entry's path here. ``run`` may be the built-in store's
    ``KvStore`` itself, which the loop then applies to without a Python call."""
    batch = entries if isinstance(entries, (list, _core.EntryBatch)) else list(entries)
    raw: list[Answer] = []
    table = sessions._table
    at = 0
    while at < len(batch):
        at = table.apply_batch(batch, at, run, wanted, raw)
        if at < len(batch):
            # Left aside: a membership change or a damaged envelope, no session command, so
            # nobody waits for its outcome.
            apply_entry(batch[at], sessions, run.apply if isinstance(run, _core.KvStore) else run)
            at += 1
    return raw
