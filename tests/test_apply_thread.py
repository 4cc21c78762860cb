"""The built-in store's apply thread (``dengine.apply_thread``): batches applied off the event
loop's thread must leave the same store, session table and answers as the loop's own apply, and
nothing on the loop may ever see half a batch."""

from __future__ import annotations

import asyncio
import io
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dengine import _core, apply_thread, kv
from dengine._core import Entry, EntryBatch
from dengine.errors import DengineError, OutcomeUnknownError
from dengine.node import Node
from dengine.raft import payload
from dengine.raft.sessions import ANSWERED_OUTCOMES, Answer, Applied, Outcome, SessionTable, apply_entries
from test_node_embedded import configs, leader_of, until
from test_sessions import random_kv_command

pytestmark = pytest.mark.skipif(not hasattr(_core, "NativeApplier"), reason="the apply thread is POSIX only")


def random_log(rng: random.Random, count: int) -> list[Entry]:
    """Session commands of every kind and outcome, with the entries the thread leaves to Python
    (membership changes, damaged or unknown envelopes) and plain commands and no-ops among them."""
    log: list[Entry] = []
    for index in range(1, count + 1):
        roll = rng.random()
        if roll < 0.02:
            data = bytes([payload.CONF_CHANGE_KIND]) + b"not decodable"
        elif roll < 0.03:
            data = bytes([payload.SESSION_KIND, 1, 2])  # a damaged session envelope
        elif roll < 0.04:
            data = b"\x09 an unknown kind"
        elif roll < 0.06:
            data = payload.NOOP_PAYLOAD
        elif roll < 0.08:
            data = payload.command(kv.encode_put(b"plain", b"%d" % index))
        else:
            command = random_kv_command(rng, b"k%d" % rng.randint(1, 40))
            seq = rng.randint(1, 30)
            data = payload.session_command(rng.randint(1, 5), seq, command, rng.randint(0, seq))
        log.append(Entry(index, 1, data))
    return log


async def apply_all(
    thread: apply_thread.ApplyThread,
    batch: EntryBatch,
    wanted: set[tuple[int, int]],
    early: Callable[[list[Answer]], None] | None = None,
) -> list[Answer]:
    """The whole of ``batch`` through ``thread``, which stops after each entry it leaves aside."""
    answered: list[Answer] = []
    done = 0
    while done < len(batch):
        part, count = await thread.apply(batch[done:], wanted, early)
        answered += part
        done += count
    return answered


def state_of(sm: kv.KVStateMachine, table: SessionTable) -> tuple[bytes, object]:
    sink = io.BytesIO()
    sm.snapshot(sink)
    return sink.getvalue(), table.items()


@pytest.mark.parametrize("early", [False, True], ids=["answers-at-the-end", "plain-puts-answered-early"])
def test_the_thread_leaves_the_same_state_and_answers_as_applying_on_the_loop(early: bool) -> None:
    rng = random.Random(11)
    log = random_log(rng, 3000)
    wanted = {(c, q) for c in range(1, 6) for q in range(1, 31) if (c + q) % 3}

    reference_sm, reference_table = kv.KVStateMachine(), SessionTable(max_results=6)
    expected: list[Applied] = []
    for e in log:
        expected += apply_entries([e], reference_table, reference_sm.apply, wanted)

    async def on_the_thread() -> tuple[tuple[bytes, object], list[Applied]]:
        sm, table = kv.KVStateMachine(), SessionTable(max_results=6)
        store = sm.native_target()
        assert store is not None
        thread = apply_thread.ApplyThread.start(store, table)
        assert thread is not None
        answers: list[Applied] = []

        def keep(answered: list[Answer]) -> None:
            for key, code, result, error, index in answered:
                answers.append(Applied(index, ANSWERED_OUTCOMES[code], result, error, *key))

        try:
            at = 0
            while at < len(log):
                size = rng.randint(1, 400)
                part = log[at : at + size]
                batch = EntryBatch.from_payloads(part[0].index, 1, [e.data for e in part])
                keep(await apply_all(thread, batch, wanted, keep if early else None))
                at += size
        finally:
            thread.close()
        # Early answers come before the rest of their batch's: each answer once, in any order.
        return state_of(sm, table), sorted(answers, key=lambda a: a.index)

    state, answers = asyncio.run(on_the_thread())
    assert state == state_of(reference_sm, reference_table)
    assert answers == expected
    assert {a.outcome for a in answers} >= {Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE}
    assert any(a.error for a in answers) and any(a.result for a in answers)


def test_the_loop_sees_the_store_between_batches_never_inside_one() -> None:
    """Reads made while a batch is under way wait for it: a revision read meanwhile is the one
    before the batch or the one after, nothing in between."""

    async def main() -> set[int]:
        sm, table = kv.KVStateMachine(), SessionTable()
        store = sm.native_target()
        assert store is not None
        thread = apply_thread.ApplyThread.start(store, table)
        assert thread is not None
        seen: set[int] = set()
        try:
            size, first = 20_000, 1
            for _ in range(3):
                payloads = [
                    payload.session_command(1, first + i, kv.encode_put(b"k%d" % i, b"v"), first)
                    for i in range(size)
                ]
                batch = EntryBatch.from_payloads(first, 1, payloads)
                applying = asyncio.ensure_future(thread.apply(batch, ()))
                while not applying.done():
                    seen.add(sm.revision)
                    await asyncio.sleep(0)
                await applying
                first += size
        finally:
            thread.close()
        return seen

    seen = asyncio.run(main())
    assert seen <= {0, 20_000, 40_000, 60_000}, sorted(seen)


def test_a_write_answered_early_is_in_the_store_for_whoever_heard_the_answer() -> None:
    """The plain puts of a batch are answered before the thread has walked the map with them; a
    read of the store made on hearing the first answer waits until the map has them all, and the
    rest of the batch too: nothing sees the store inside a batch (a watch subscribing then would
    miss the events of its rest, which the thread publishes to nobody)."""

    async def main() -> tuple[list[Answer], list[Answer], list[int]]:
        sm, table = kv.KVStateMachine(), SessionTable()
        store = sm.native_target()
        assert store is not None
        thread = apply_thread.ApplyThread.start(store, table)
        assert thread is not None
        size = 200_000

        def put(i: int, **kwargs: bool) -> bytes:
            return payload.session_command(1, 1 + i, kv.encode_put(b"k%d" % i, b"v", **kwargs), 1)

        # A put that returns the key it replaces needs the map: it ends the run answered early,
        # and it and the puts after it are applied, and answered, at the end.
        payloads = [put(i) for i in range(size)] + [put(size, prev_kv=True)]
        payloads += [put(i) for i in range(size + 1, size + 100_001)]
        # Only the first and the last answers are wanted: the first arrives as soon as the run's
        # outcomes are known, long before the map has the run's last put.
        wanted = {(1, 1), (1, len(payloads))}
        early: list[Answer] = []
        seen: list[int] = []

        def heard(answered: list[Answer]) -> None:
            early.extend(answered)
            seen.append(sm.revision)
            seen.append(1 if sm.get(b"k%d" % (size - 1)) is not None else 0)

        try:
            rest, count = await thread.apply(EntryBatch.from_payloads(1, 1, payloads), wanted, heard)
            assert count == len(payloads)
        finally:
            thread.close()
        return early, rest, seen

    early, rest, seen = asyncio.run(main())
    assert [a[4] for a in early] == [1], "the first put is answered early"
    assert [a[4] for a in rest] == [300_001], "the puts after the one that needs the map, at the end"
    assert seen == [300_001, 1], "a read on hearing an early answer waits for the whole batch"


def test_a_read_right_after_the_hand_over_waits_for_the_writes_it_answered() -> None:
    """With someone waiting, ``submit`` answers a run of plain puts before the thread has run
    them; a read of the store made the moment it returns must find them all."""

    async def main() -> tuple[list[int], bool, int, int | None]:
        sm, table = kv.KVStateMachine(), SessionTable()
        store = sm.native_target()
        assert store is not None
        applier = _core.NativeApplier(store, table.native_table())
        size = 200_000
        payloads = [
            payload.session_command(1, 1 + i, kv.encode_put(b"k%d" % i, b"v"), 1) for i in range(size)
        ]
        answered: list[Answer] = []
        try:
            # One caller waits, for the first put: few answers to hand over, so the read below
            # comes long before the thread could have run the 200,000 puts.
            applier.submit(EntryBatch.from_payloads(1, 1, payloads), {(1, 1)}, answered)
            found, revision = sm.get(b"k%d" % (size - 1)) is not None, sm.revision
            position = None
            while position is None:
                await asyncio.sleep(0.01)
                position = applier.take((), [])
        finally:
            applier.close()
        return [a[4] for a in answered], found, revision, position

    assert asyncio.run(main()) == ([1], True, 200_000, 200_000)


def store_and_applier() -> tuple[kv.KVStateMachine, _core.NativeApplier]:
    """A fresh built-in store and an apply thread for it, as a node makes them."""
    sm, table = kv.KVStateMachine(), SessionTable()
    store = sm.native_target()
    assert store is not None
    return sm, _core.NativeApplier(store, table.native_table())


def puts(n: int) -> EntryBatch:
    """``n`` session puts of keys k0, k1, ... at log indexes 1 to ``n``, sequences 1 to ``n``."""
    return EntryBatch.from_payloads(
        1, 1, [payload.session_command(1, 1 + i, kv.encode_put(b"k%d" % i, b"v"), 1) for i in range(n)]
    )


def test_a_watch_made_right_after_a_follower_hands_over_a_batch_misses_none_of_it() -> None:
    """A follower hands its whole batch to the thread (nobody waits there). A watch made the
    moment after reads its backlog, then the revision it takes as its floor: both must come
    from one side of the batch. Read before the thread took the store, the backlog would end
    before the batch and the floor after it, and the batch's events (which the thread gives to
    no subscriber) would be lost to the watch. Repeated: the thread often starts first."""
    for _ in range(20):
        sm, applier = store_and_applier()
        batch = puts(3000)
        try:
            applier.submit(batch, (), [])  # nobody waits
            backlog, floor = sm.events_since(0), sm.revision
            assert len(backlog) == floor == 3000, (len(backlog), floor)
        finally:
            applier.close()


def test_a_reader_waiting_for_the_thread_lets_other_python_threads_run() -> None:
    """A read of the store made while the thread applies a batch waits for the batch, with
    the GIL released: waiting with it held, it could keep the GIL from a thread the batch is
    waiting for (a hand-over interrupted by a garbage collection), and it would stop every
    other Python thread of the process meanwhile."""
    sm, applier = store_and_applier()
    batch = puts(300_000)
    window: list[float] = []

    def read() -> None:
        window.append(time.monotonic())
        assert sm.revision == 300_000
        window.append(time.monotonic())

    try:
        applier.submit(batch, (), [])
        reader = threading.Thread(target=read)
        ticks: list[float] = []
        reader.start()
        while reader.is_alive():
            ticks.append(time.monotonic())
        reader.join()
    finally:
        applier.close()
    started, ended = window
    assert ended - started > 0.05, "the batch was over before the read: nothing measured"
    inside = [t for t in ticks if started + 0.02 < t < ended - 0.01]
    assert inside, "no other Python thread ran while the reader waited"


def test_closing_right_after_the_hand_over_still_puts_the_answered_writes_in_the_store() -> None:
    sm, applier = store_and_applier()
    batch = puts(50_000)
    answered: list[Answer] = []
    applier.submit(batch, {(1, 50_000)}, answered)
    applier.close()
    assert [a[4] for a in answered] == [50_000]
    assert (sm.revision, sm.get(b"k49999") is not None) == (50_000, True)


def test_a_second_batch_cannot_be_handed_over_before_the_first_is_taken() -> None:
    async def main() -> None:
        sm, table = kv.KVStateMachine(), SessionTable()
        store = sm.native_target()
        assert store is not None
        applier = _core.NativeApplier(store, table.native_table())
        batch = EntryBatch.from_payloads(1, 1, [payload.NOOP_PAYLOAD] * 10)
        applier.submit(batch, (), [])
        with pytest.raises(RuntimeError, match="already being applied"):
            applier.submit(batch, (), [])
        applier.close()
        with pytest.raises(RuntimeError, match="closed"):
            applier.submit(batch, (), [])

    asyncio.run(main())


def _threads_named(name: str) -> int:
    return sum(1 for t in Path("/proc/self/task").iterdir() if (t / "comm").read_text().strip() == name)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_cluster_applies_on_its_threads_agrees_and_stops_them_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply_thread, "MIN_ENTRIES", 1)  # every batch goes to a thread

    async def main() -> None:
        before = _threads_named("dengine-apply")
        machines = [kv.KVStateMachine() for _ in range(3)]
        nodes = [Node(c, sm) for c, sm in zip(configs(tmp_path), machines, strict=True)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            results = await asyncio.gather(
                *(leader.propose(kv.encode_put(b"k%03d" % i, b"v%d" % i)) for i in range(600))
            )
            assert sorted(kv.decode_result(r).revision for r in results) == list(range(1, 601))
            found = await leader.read(lambda sm: sm.get(b"k599"))
            assert found is not None and found.value == b"v599"
            assert leader.raft is not None
            applied = leader.raft.applied
            await until(lambda: all(n.raft is not None and n.raft.applied >= applied for n in nodes))
            contents = [sm.range() for sm in machines]
            assert len(contents[0]) == 600
            assert all(rows == contents[0] for rows in contents)
            assert _threads_named("dengine-apply") == before + 3
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)
        assert _threads_named("dengine-apply") == before

    asyncio.run(main())


def test_a_node_whose_apply_thread_fails_stops_instead_of_leaving_callers_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply_thread, "MIN_ENTRIES", 1)

    real_apply = apply_thread.ApplyThread.apply

    async def broken(
        self: apply_thread.ApplyThread, batch: EntryBatch, wanted: Any, early: Any = None
    ) -> tuple[list[Any], int]:
        if batch[0].index > 1:  # the leader's first entry goes through; the first write does not
            raise RuntimeError("the apply thread failed: a bug")
        return await real_apply(self, batch, wanted, early)

    monkeypatch.setattr(apply_thread.ApplyThread, "apply", broken)

    async def main() -> None:
        node = Node(configs(tmp_path, 1)[0], kv.KVStateMachine())
        await node.start()
        try:
            await until(lambda: leader_of([node]))
            await until(lambda: node.raft is not None and node.raft.applied == 1)
            with pytest.raises(OutcomeUnknownError, match="an apply failure"):
                await asyncio.wait_for(node.propose(kv.encode_put(b"k", b"v")), 10)
            with pytest.raises(DengineError, match="stopped after an apply failure"):
                await node.propose(kv.encode_put(b"k", b"v"))  # refused, saying why
        finally:
            await node.stop(transfer_leadership=False)

    asyncio.run(main())


def test_answers_that_cannot_be_handed_over_fail_the_batch_rather_than_leave_it_waiting() -> None:
    """Handing a batch's answers over can fail for another reason than the thread's death (no
    memory left for them): the batch must fail (and the node stop), not wait for ever for a
    wake-up that already came."""

    class Failing:
        def __init__(self) -> None:
            self.reader, self.writer = socket.socketpair()

        def take(self, wanted: Any, answered: Any) -> int | None:
            raise MemoryError("no memory for the answers (staged by the test)")

        def fileno(self) -> int:
            return int(self.reader.fileno())

    async def main() -> BaseException | None:
        failing = Failing()
        try:
            sm, table = kv.KVStateMachine(), SessionTable()
            store = sm.native_target()
            assert store is not None
            thread = apply_thread.ApplyThread(failing, store, table)  # type: ignore[arg-type]
            done = thread._done = asyncio.get_running_loop().create_future()
            thread._on_ready()
            assert done.done()
            return done.exception()
        finally:
            failing.reader.close()
            failing.writer.close()

    assert isinstance(asyncio.run(main()), MemoryError)


def test_a_watch_that_subscribes_during_a_batch_gets_the_events_after_an_entry_left_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread publishes no events, so once a watch subscribes the rest of a batch must go
    through the state machine: after an entry the thread left aside, the node asks again where
    the rest goes, instead of handing it back to the thread."""
    monkeypatch.setattr(apply_thread, "MIN_ENTRIES", 1)

    async def main() -> list[int]:
        sm = kv.KVStateMachine()
        node = Node(configs(tmp_path, 1)[0], sm)
        node.raft = SimpleNamespace(applied_to=lambda index: None)  # type: ignore[assignment]
        puts = [payload.session_command(1, 1 + i, kv.encode_put(b"k%d" % i, b"v"), 1) for i in range(200)]
        aside = bytes([payload.CONF_CHANGE_KIND]) + b"not decodable"
        batch = EntryBatch.from_payloads(1, 1, [*puts[:100], aside, *puts[100:]])
        seen: list[int] = []

        async def watch() -> None:  # runs while the thread applies the first hundred puts
            sm.subscribe(lambda event: seen.append(event.revision))

        watcher = asyncio.ensure_future(watch())
        try:
            await node._apply_chunks(batch)
            await watcher
        finally:
            await node._close_apply_thread()
        assert sm.revision == 200
        return seen

    assert asyncio.run(main()) == list(range(101, 201))


def _nice_values(name: str) -> list[int]:
    """The nice values of this process's threads called ``name`` (field 19 of their stat)."""
    values = []
    for t in Path("/proc/self/task").iterdir():
        if (t / "comm").read_text().strip() == name:
            # The thread's name, in parentheses, may hold spaces: count fields after it.
            values.append(int((t / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return values


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are Linux only")
@pytest.mark.parametrize("nicer", [0, 7], ids=["loop-at-the-process-priority", "loop-already-nicer"])
def test_the_apply_thread_yields_the_cpu_to_the_loop_and_the_log_sync_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nicer: int
) -> None:
    """Applying writes already answered waits for nobody, so on a busy machine it must not take
    a core from the event loop or from the log sync that every write waits for: below the loop's
    priority whatever the loop's is (a program may run nicer than 0 already)."""
    monkeypatch.setattr(apply_thread, "MIN_ENTRIES", 1)
    seen: dict[str, Any] = {}

    async def main() -> None:
        node = Node(configs(tmp_path, 1)[0], kv.KVStateMachine())
        await node.start()
        try:
            await until(lambda: leader_of([node]))
            await node.propose(kv.encode_put(b"k", b"v"))
            seen["apply"], seen["sync"] = _nice_values("dengine-apply"), _nice_values("dengine-sync")
        finally:
            await node.stop(transfer_leadership=False)

    def loop_thread() -> None:  # a thread of its own: on Linux the nice value is a thread's
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + nicer, 19))
            seen["loop"] = os.getpriority(os.PRIO_PROCESS, 0)
            asyncio.run(main())
        except BaseException as exc:  # re-raised on the test's thread
            seen["error"] = exc

    runner = threading.Thread(target=loop_thread)
    runner.start()
    runner.join()
    if "error" in seen:
        raise seen["error"]
    if seen["loop"] >= 19:
        pytest.skip("the loop already runs at the lowest priority")
    assert seen["apply"] and all(nice > seen["loop"] for nice in seen["apply"]), seen
    assert seen["sync"] and all(nice == seen["loop"] for nice in seen["sync"]), seen
