"""Exactly-once writes (Raft thesis §6.3): the session table and the apply step."""

from __future__ import annotations

import io
import random

import pytest

from dengine import kv
from dengine._core import Entry, EntryBatch, encode_entries
from dengine.raft import payload
from dengine.raft.sessions import Applied, Outcome, SessionTable, apply_entries, apply_entry


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def run(self, index: int, command: bytes) -> bytes:
        if command == b"boom":
            raise RuntimeError("bad command")
        self.n += 1
        if command == b"int":  # not bytes: the command's error, the same on every path
            return self.n  # type: ignore[return-value]
        return b"%d" % self.n


def entry(index: int, client: int, seq: int, cmd: bytes = b"inc", first_outstanding: int = 0) -> Entry:
    return Entry(index, 1, payload.session_command(client, seq, cmd, first_outstanding))


def test_a_retried_sequence_returns_the_first_result_without_applying_again() -> None:
    sm, table = Counter(), SessionTable()
    first = apply_entry(entry(1, 7, 1), table, sm.run)
    retry = apply_entry(entry(2, 7, 1), table, sm.run)
    assert (first.outcome, first.result) == (Outcome.APPLIED, b"1")
    assert (retry.outcome, retry.result) == (Outcome.DUPLICATE, b"1")
    assert sm.n == 1
    assert apply_entry(entry(3, 7, 2), table, sm.run).result == b"2"


def test_a_sequence_the_client_acknowledged_is_refused() -> None:
    sm, table = Counter(), SessionTable()
    apply_entry(entry(1, 7, 4), table, sm.run)
    apply_entry(entry(2, 7, 5, first_outstanding=5), table, sm.run)  # the client got 4's answer
    stale = apply_entry(entry(3, 7, 4), table, sm.run)
    assert stale.outcome is Outcome.STALE and stale.error and sm.n == 2


def test_concurrent_sequences_may_arrive_out_of_order() -> None:
    sm, table = Counter(), SessionTable()
    # A client with requests 1..3 in flight; retries reach the log as 3, 1, 3, 2, 1.
    outcomes = [
        apply_entry(entry(i, 5, seq, first_outstanding=1), table, sm.run)
        for i, seq in enumerate([3, 1, 3, 2, 1], start=1)
    ]
    assert [o.outcome for o in outcomes] == [
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
    ]
    assert [o.result for o in outcomes] == [b"1", b"2", b"1", b"3", b"2"], (
        "each retry gets its own first result"
    )
    assert sm.n == 3


def test_plain_commands_and_noops() -> None:
    sm, table = Counter(), SessionTable()
    assert apply_entry(Entry(1, 1, payload.NOOP_PAYLOAD), table, sm.run).outcome is Outcome.NOOP
    assert apply_entry(Entry(2, 1, payload.command(b"x")), table, sm.run).result == b"1"
    assert apply_entry(Entry(3, 1, payload.command(b"x")), table, sm.run).result == b"2"
    assert len(table) == 0


def test_a_failing_command_is_contained_and_its_error_is_remembered() -> None:
    sm, table = Counter(), SessionTable()
    failed = apply_entry(entry(1, 3, 1, b"boom"), table, sm.run)
    assert failed.outcome is Outcome.APPLIED and failed.error == "RuntimeError: bad command"
    again = apply_entry(entry(2, 3, 1, b"boom"), table, sm.run)
    assert (again.outcome, again.error) == (Outcome.DUPLICATE, "RuntimeError: bad command")


def test_the_table_is_bounded_and_evicts_the_most_idle_client_deterministically() -> None:
    table_a, table_b = SessionTable(max_clients=3), SessionTable(max_clients=3)
    for t in (table_a, table_b):
        sm = Counter()
        for index, client in enumerate([1, 2, 3, 1, 4], start=1):
            apply_entry(entry(index, client, 1 if client != 1 or index == 1 else 2), t, sm.run)
    assert [c for c, *_ in table_a.items()] == [3, 1, 4]
    assert table_a.items()[1][3] == [(1, b"1", None), (2, b"4", None)]
    assert table_a.items() == table_b.items()


def test_idle_clients_expire_by_log_index() -> None:
    table, sm = SessionTable(expire_after=10), Counter()
    apply_entry(entry(1, 1, 1), table, sm.run)
    apply_entry(entry(20, 2, 1), table, sm.run)
    assert [c for c, *_ in table.items()] == [2]


def test_envelopes_reject_garbage() -> None:
    with pytest.raises(ValueError):
        payload.decode(b"")
    with pytest.raises(ValueError):
        payload.decode(b"\x09abc")
    with pytest.raises(ValueError):
        payload.decode(b"\x02\x01")
    with pytest.raises(ValueError):
        payload.session_command(0, 1, b"")


def test_an_undecodable_entry_is_skipped_alike_everywhere() -> None:
    sm, table = Counter(), SessionTable()
    skipped = apply_entry(Entry(1, 1, b"\x09garbage"), table, sm.run)
    assert skipped.outcome is Outcome.NOOP and skipped.error and "undecodable" in skipped.error
    assert sm.n == 0


def test_results_below_the_first_outstanding_sequence_are_dropped_in_any_arrival_order() -> None:
    sm, table = Counter(), SessionTable()
    for index, seq in enumerate([5, 2, 9, 1, 7], start=1):
        apply_entry(entry(index, 4, seq, first_outstanding=1), table, sm.run)
    apply_entry(entry(6, 4, 10, first_outstanding=6), table, sm.run)  # answers up to 5 were read
    assert [q for q, *_ in table.items()[0][3]] == [7, 9, 10]
    assert table.lookup(4, 5) is Outcome.STALE and table.lookup(4, 9) is Outcome.DUPLICATE
    restored = SessionTable()
    restored.restore(table.items())
    apply_entry(entry(7, 4, 11, first_outstanding=9), restored, sm.run)
    assert [q for q, *_ in restored.items()[0][3]] == [9, 10, 11]


def test_one_client_pins_at_most_max_results_results_lowest_dropped_first() -> None:
    sm, table = Counter(), SessionTable(max_results=3)
    for index, seq in enumerate([4, 8, 2, 6, 5], start=1):
        apply_entry(entry(index, 9, seq, first_outstanding=1), table, sm.run)
    assert [q for q, *_ in table.items()[0][3]] == [5, 6, 8]
    # A late copy of a dropped sequence that the client never acknowledged (a retry, or a copy
    # re-proposed after a leader change) is refused as stale, not run a second time: its
    # outcome is gone, and the command already ran.
    before = sm.n
    assert apply_entry(entry(6, 9, 2, first_outstanding=1), table, sm.run).outcome is Outcome.STALE
    assert apply_entry(entry(7, 9, 4, first_outstanding=1), table, sm.run).outcome is Outcome.STALE
    assert sm.n == before
    assert [q for q, *_ in table.items()[0][3]] == [5, 6, 8]


def framed_as_read(entries: list[Entry]) -> EntryBatch:
    """``entries`` as a node's apply loop gets them from its log: framed records, applied
    without an object per entry."""
    return EntryBatch.from_bytes(encode_entries(entries))


def test_applying_a_batch_matches_applying_entry_by_entry() -> None:
    """apply_entries' inline path must leave the same table and state and give the same answers
    as apply_entry, whatever the batch boundaries, for every kind of entry."""
    rng = random.Random(11)
    log: list[Entry] = []
    for index in range(1, 3001):
        roll = rng.random()
        client, seq = rng.randint(1, 6), rng.randint(1, 40)
        if roll < 0.03:
            log.append(Entry(index, 1, payload.NOOP_PAYLOAD))
        elif roll < 0.05:
            log.append(Entry(index, 1, payload.command(b"inc")))
        elif roll < 0.06:
            log.append(Entry(index, 1, b"\xff garbage"))
        else:  # retries, out-of-order and stale sequences, failing commands, moving acks
            cmd = b"boom" if roll < 0.08 else b"int" if roll < 0.09 else b"inc"
            log.append(entry(index, client, seq, cmd, first_outstanding=rng.randint(0, seq)))
    small = dict(max_clients=4, expire_after=500, max_results=8)  # evictions happen too
    one_sm, one_table = Counter(), SessionTable(**small)
    expected = [apply_entry(e, one_table, one_sm.run) for e in log]
    wanted = {(a.client_id, a.sequence) for a in expected if a.client_id and a.index % 3 == 0}

    for framed in (False, True):  # entries as objects, or as the log's framed records
        batch_sm, batch_table = Counter(), SessionTable(**small)
        answered: list[Applied] = []
        i = 0
        while i < len(log):
            size = rng.randint(1, 200)
            part = log[i : i + size]
            answered += apply_entries(
                framed_as_read(part) if framed else part, batch_table, batch_sm.run, wanted
            )
            i += size
        assert batch_table.items() == one_table.items() and batch_sm.n == one_sm.n
        assert answered == [a for a in expected if a.client_id and (a.client_id, a.sequence) in wanted]
        assert {a.outcome for a in answered} >= {Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE}


def random_kv_command(rng: random.Random, key: bytes) -> bytes:
    """A put, delete, CAS or delete-range on ``key`` (or its prefix), or bytes that are not a
    command at all."""
    return rng.choice(
        [
            kv.encode_put(key, rng.randbytes(rng.randint(0, 20))),
            kv.encode_delete(key),
            kv.encode_cas(key, None, b"fresh"),
            kv.encode_delete_range(b"k1"),
            b"\x01\x09 not a command",
        ]
    )


def test_the_builtin_store_answers_alike_through_every_path() -> None:
    """The batch loop applies to the Rust KV store directly (no Python call per entry); it must
    leave the same store, table and answers as KVStateMachine.apply, batched or one by one."""
    rng = random.Random(5)
    log: list[Entry] = []
    for index in range(1, 2001):
        command = random_kv_command(rng, b"k%d" % rng.randint(1, 30))
        client, seq = rng.randint(1, 5), rng.randint(1, 30)
        log.append(entry(index, client, seq, command, first_outstanding=rng.randint(0, seq)))
    wanted = {(c, q) for c in range(1, 6) for q in range(1, 31) if (c + q) % 2}

    def run(native: bool, batched: bool, framed: bool = False) -> tuple[bytes, object, list[Applied]]:
        sm, table = kv.KVStateMachine(), SessionTable(max_results=6)
        answers: list[Applied] = []
        size = rng.randint(1, 300) if batched else 1
        for i in range(0, len(log), size):
            target = sm.native_target() if native else None
            part = framed_as_read(log[i : i + size]) if framed else log[i : i + size]
            answers += apply_entries(part, table, target or sm.apply, wanted)
        sink = io.BytesIO()
        sm.snapshot(sink)
        return sink.getvalue(), table.items(), answers

    reference = run(native=False, batched=False)
    assert run(native=True, batched=True) == reference
    assert run(native=True, batched=True, framed=True) == reference
    assert run(native=False, batched=True) == reference
    assert {a.outcome for a in reference[2]} >= {Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE}
    assert any(a.error for a in reference[2]) and any(a.result for a in reference[2])


def test_a_subscribed_store_is_applied_through_its_python_method() -> None:
    sm = kv.KVStateMachine()
    assert sm.native_target() is not None
    seen: list[kv.WatchEvent] = []
    unsubscribe = sm.subscribe(seen.append)
    assert sm.native_target() is None  # watchers need apply() to publish their events
    apply_entries([entry(1, 1, 1, kv.encode_put(b"a", b"1"))], SessionTable(), sm.apply, set())
    assert [e.kv.key for e in seen] == [b"a"]
    unsubscribe()
    assert sm.native_target() is not None
