"""Embedded mode: three Node objects in one asyncio program, talking real gRPC on 127.0.0.1 with
real WAL stores. Proposals return apply's result, reads are linearizable, a failing apply is
contained, a graceful stop hands leadership over, and nothing blocks the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest

from dengine import node as node_module
from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.errors import (
    ApplyError,
    DengineError,
    LeaderOverloadedError,
    LeadershipTransferError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDroppedError,
    StorageError,
)
from dengine.node import Node
from dengine.raft.sessions import SessionTable, apply_committed

T = TypeVar("T")


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def apply(self, index: int, command: bytes) -> bytes:
        if command == b"boom":
            raise RuntimeError("boom requested")
        self.n += int(command)
        return str(self.n).encode()

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(str(self.n).encode())

    def restore(self, source: BinaryIO) -> None:
        self.n = int(source.read())


def configs(
    root: Path,
    n: int = 3,
    *,
    metrics: bool = False,
    cluster_id: str = "embedded",
    **sections: dict[str, object],
) -> list[Config]:
    """``n`` nodes on 127.0.0.1 with quick timers; ``metrics``: each with its own metrics
    endpoint; ``sections`` adds config sections (``membership={...}``)."""
    ports = free_ports(2 * n if metrics else n)
    members = {str(i): f"127.0.0.1:{ports[i - 1]}" for i in range(1, n + 1)}
    return [
        Config.from_dict(
            {
                "node": {
                    "id": i,
                    "listen": members[str(i)],
                    "data_dir": str(root / f"n{i}"),
                    "metrics_listen": f"127.0.0.1:{ports[n + i - 1]}" if metrics else "",
                },
                "cluster": {"id": cluster_id, "members": members},
                "raft": {"tick_ms": 20, "heartbeat_ms": 60, "election_timeout_ms": 400},
                **sections,
            }
        )
        for i in range(1, n + 1)
    ]


def with_section(cfgs: list[Config], section: str, **values: Any) -> list[Config]:
    """The same configurations with ``values`` set in ``[section]``."""
    out = []
    for c in cfgs:
        d = c.to_dict()
        d[section] = {**d.get(section, {}), **values}
        out.append(Config.from_dict(d))
    return out


@contextlib.asynccontextmanager
async def started(cfgs: list[Config]) -> AsyncIterator[list[Node]]:
    """Starts one Counter node per config; on exit stops every node in the list it gave (a test
    may add nodes to it)."""
    nodes = [Node(c, state_machine=Counter()) for c in cfgs]
    for n in nodes:
        await n.start()
    try:
        yield nodes
    finally:
        for n in nodes:
            await n.stop(transfer_leadership=False)


async def until(cond: Callable[[], T | None], timeout: float = 10.0) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def leader_of(nodes: list[Node]) -> Node | None:
    leaders = [n for n in nodes if n.raft is not None and n.raft.role.value == "leader"]
    return leaders[0] if len(leaders) == 1 else None


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


def test_propose_read_and_contained_apply_errors(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = [Node(c, Counter()) for c in configs(tmp_path)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            results = await asyncio.gather(*(leader.propose(b"1") for _ in range(200)))
            assert sorted(int(r) for r in results) == list(range(1, 201))
            assert await leader.read(lambda sm: sm.n) == 200
            follower = next(n for n in nodes if n is not leader)
            assert await follower.read(lambda sm: sm.n) == 200, "a linearizable read on a follower"
            with pytest.raises(ApplyError, match="boom requested"):
                await leader.propose(b"boom")
            assert await leader.propose(b"5") == b"205", "the node keeps going after a failing apply"
            await until(lambda: all(n.sm.n == 205 for n in nodes))  # type: ignore[attr-defined]
            status = leader.status()
            assert status.role == "leader" and status.commit == status.applied
            assert {p.id for p in status.peers} == {n.id for n in nodes} - {leader.id}
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


def test_move_leader_returns_once_the_target_leads_and_fails_clearly_when_it_cannot(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(configs(tmp_path)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")
            target = next(n for n in nodes if n is not leader)
            assert await leader.move_leader(target.id) == target.id
            assert target.raft is not None and target.raft.role.value == "leader"
            term = target.raft.term
            assert await target.move_leader(target.id) == target.id  # already there: nothing to do
            assert (target.raft.role.value, target.raft.term) == ("leader", term)
            with pytest.raises(NotLeaderError):
                await leader.move_leader()
            # A target that is down: the leader abandons the transfer after an election
            # timeout, says so, and goes on leading.
            down = next(n for n in nodes if n is not target)
            await down.stop(transfer_leadership=False)
            with pytest.raises(LeadershipTransferError, match=f"node {down.id} did not take over"):
                await target.move_leader(down.id)
            assert target.raft.role.value == "leader"
            assert await target.propose(b"1") == b"2"

    run(main)


def test_a_leader_that_slept_through_its_lease_serves_no_lease_read(tmp_path: Path) -> None:
    """The core counts time in ticks, and a pause of the whole process (SIGSTOP, a frozen VM, a
    long GC) stops them. On waking, the ticks it missed run before a lease is judged: a leader
    that slept past an election timeout has heard from no majority in that time, so it steps
    down (check quorum) and refuses the lease read, instead of answering from a state that a
    successor elected meanwhile may have moved past."""

    async def main() -> None:
        async with started(configs(tmp_path)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")
            assert await leader.read(lambda sm: sm.n, "lease") == 1  # awake, the lease serves
            # It wakes from a 2 s pause (five election timeouts): no tick ran meanwhile.
            awake = time.monotonic
            leader._clock = lambda: awake() + 2.0
            with pytest.raises(NotLeaderError):
                await leader.read(lambda sm: sm.n, "lease")
            assert leader.raft is not None and leader.raft.role.value != "leader"

    run(main)


def test_graceful_stop_transfers_leadership_and_a_restart_recovers(tmp_path: Path) -> None:
    cfgs = configs(tmp_path)

    async def main() -> None:
        nodes = [Node(c, Counter()) for c in cfgs]
        for n in nodes:
            await n.start()
        leader = await until(lambda: leader_of(nodes))
        for _ in range(10):
            await leader.propose(b"3")
        assert leader.raft is not None
        old, term = leader.id, leader.raft.term
        await leader.stop()
        rest = [n for n in nodes if n is not leader]
        # stop() returns once the successor leads: no election timeout passes in between.
        new = leader_of(rest)
        assert new is not None and new.raft is not None
        assert new.id != old and new.raft.term == term + 1
        assert await new.propose(b"0") == b"30"
        restarted = Node(cfgs[old - 1], Counter())
        await restarted.start()
        await until(lambda: restarted.sm.n == 30)  # type: ignore[attr-defined]
        for n in [*rest, restarted]:
            await n.stop(transfer_leadership=False)

    run(main)


def test_a_follower_without_forwarding_refuses_with_the_leader_hint(tmp_path: Path) -> None:
    async def main() -> None:
        cfgs = [
            Config.from_dict({**c.to_dict(), "raft": {**c.to_dict()["raft"], "forward_proposals": False}})
            for c in configs(tmp_path)
        ]
        nodes = [Node(c, Counter()) for c in cfgs]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            follower = next(n for n in nodes if n is not leader)
            await until(lambda: follower.raft is not None and follower.raft.lead == leader.id)
            with pytest.raises(NotLeaderError) as info:
                await follower.propose(b"1")
            assert info.value.leader == leader.id
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


_SCHEDSTAT = Path("/proc/thread-self/schedstat")
_SLOW_CALLBACK_S = 0.1


def _runqueue_wait_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 where the kernel does not
    say): the time another process's load took from a callback, which is not the callback's."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def record_blocking_callbacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """Every asyncio callback from now on that holds its loop for 0.1 s or more, as (callback,
    seconds). asyncio's own debug check times callbacks by the wall clock, so a busy machine
    (another process spinning on both cores) fails it with callbacks that only waited for a CPU;
    this one takes off that wait, which the kernel counts per thread, and keeps everything else a
    callback spent, blocking calls included."""
    held_long: list[tuple[str, float]] = []
    run_handle = asyncio.Handle._run

    def timed_run(handle: asyncio.Handle) -> None:
        t0, w0 = time.monotonic(), _runqueue_wait_s()
        run_handle(handle)
        # The wait is read before the clock, at the end as at the start the other way round: a
        # wait between two reads then counts in the time held, never only in the wait taken off.
        w1 = _runqueue_wait_s()
        held = (time.monotonic() - t0) - (w1 - w0)
        if held >= _SLOW_CALLBACK_S:
            held_long.append((repr(handle), held))

    monkeypatch.setattr(asyncio.Handle, "_run", timed_run)
    return held_long


def test_nothing_blocks_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held_long = record_blocking_callbacks(monkeypatch)

    async def main() -> None:
        # Debug mode still checks what it checks besides time: loop methods called from another
        # thread raise, and never-retrieved exceptions say where their future was made.
        asyncio.get_running_loop().set_debug(True)
        nodes = [Node(c, Counter()) for c in configs(tmp_path)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            for _ in range(100):
                # Futures rather than coroutines, 20 at a time: in debug mode every future and task
                # records where it was made, and this test's own step of making 100 at once (30-40
                # ms quiet) took over 0.1 s on a loaded machine, failing the check on the test's
                # step, not on the node's callbacks.
                await asyncio.gather(*(leader.submit(b"1") for _ in range(20)))
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)
    assert not held_long, f"callbacks blocked the loop: {held_long[:3]}"


def test_the_check_for_a_blocked_loop_catches_a_blocking_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback that sleeps in a blocking call uses no CPU, so nothing is taken off its time."""
    held_long = record_blocking_callbacks(monkeypatch)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_soon(time.sleep, 0.15)
        loop.call_soon(done.set_result, None)
        await done

    run(main)
    assert len(held_long) == 1 and "sleep" in held_long[0][0] and held_long[0][1] >= 0.15


def test_the_top_level_names_of_the_design() -> None:
    import dengine  # noqa: PLC0415

    assert dengine.Node is Node and dengine.Config is Config
    assert isinstance(Counter(), dengine.StateMachine)
    with pytest.raises(AttributeError):
        _ = dengine.NoSuchName


def test_proposals_survive_the_loss_of_the_leader_exactly_once(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = [Node(c, Counter()) for c in configs(tmp_path)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            follower = next(n for n in nodes if n is not leader)
            await until(lambda: follower.raft is not None and follower.raft.lead == leader.id)
            proposals = asyncio.gather(*(follower.propose(b"1") for _ in range(2000)))
            await asyncio.sleep(0.01)
            await leader.stop(transfer_leadership=False)  # the leader vanishes mid-stream
            results = await asyncio.wait_for(proposals, 30)
            assert sorted(int(r) for r in results) == list(range(1, 2001)), "every proposal applied once"
            rest = [n for n in nodes if n is not leader]
            await until(lambda: all(n.sm.n == 2000 for n in rest))  # type: ignore[attr-defined]
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


def test_an_overloaded_leader_refuses_writes_until_its_entries_commit(tmp_path: Path) -> None:
    """raft.max_unapplied_bytes = 1: one batch at a time may be pending. With both followers
    stopped, the leader's first write waits and the next is refused at once, with a clear,
    retryable error; once the followers are back, the first completes and writes are taken
    again."""

    async def main() -> None:
        cfgs = with_section(configs(tmp_path), "raft", max_unapplied_bytes=1, check_quorum=False)
        async with started(cfgs) as nodes:
            leader = await until(lambda: leader_of(nodes))
            assert await leader.propose(b"1") == b"1"
            followers = [n for n in nodes if n is not leader]
            for f in followers:
                await f.stop(transfer_leadership=False)
            waiting = asyncio.ensure_future(leader.propose(b"10"))
            await until(lambda: leader.raft is not None and leader.raft.unapplied_bytes > 0)
            with pytest.raises(LeaderOverloadedError, match=r"raft\.max_unapplied_bytes"):
                await leader.propose(b"100", timeout=5)
            assert not waiting.done()
            assert b'reason="overloaded"} 1.0' in leader.metrics.render()
            # After an election timeout the leader proposes its waiting write again, and refuses
            # the copy: the first copy is in its log, so the caller must keep waiting, not hear
            # that the write was dropped.
            await until(  # proposed again (marked, then flushed), at most 600 ms later when unloaded
                lambda: (
                    leader._waiters
                    and all(p.resent for p in leader._waiters.values())
                    and not leader._pending
                )
            )
            assert not waiting.done()
            assert b'reason="overloaded"} 1.0' in leader.metrics.render()  # and that is no failure
            for i, f in enumerate(followers):
                back = Node(cfgs[f.id - 1], state_machine=Counter())
                await back.start()
                nodes[nodes.index(f)] = back
                followers[i] = back
            assert await asyncio.wait_for(waiting, 10) == b"11"
            assert await leader.propose(b"1000", timeout=5) == b"1011"

    run(main)


def test_a_forwarded_proposal_the_leader_dropped_is_forwarded_again(tmp_path: Path) -> None:
    """A leader drops forwarded proposals it cannot take (overloaded, or handing over), and a
    broken peer stream loses them; the follower proposes them again after an election timeout,
    so a propose without a timeout still completes, once."""

    async def main() -> None:
        async with started(configs(tmp_path)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            follower = next(n for n in nodes if n is not leader)
            await until(lambda: follower.raft is not None and follower.raft.lead == leader.id)
            raft = leader.raft
            assert raft is not None
            step = raft.step
            dropped: list[Any] = []

            def lose_the_first_forward(m: Any) -> None:
                if m.type.name == "PROP" and not dropped:
                    dropped.append(m)
                    return
                step(m)

            raft.step = lose_the_first_forward  # type: ignore[method-assign]
            assert await asyncio.wait_for(follower.propose(b"5"), 10) == b"5"
            assert dropped, "the first forward reached the leader and was lost"
            await until(lambda: all(n.sm.n == 5 for n in nodes))  # type: ignore[attr-defined]

    run(main)


def test_a_write_pending_when_its_node_stops_has_an_unknown_outcome(tmp_path: Path) -> None:
    """The write is in the stopped node's log, and could still be committed by the others: its
    caller must hear that the outcome is unknown, not that it was dropped (retrying a dropped
    write is safe; retrying this one could apply it twice)."""

    async def main() -> None:
        cfgs = with_section(configs(tmp_path), "raft", check_quorum=False)
        nodes = [Node(c, Counter()) for c in cfgs]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            for f in nodes:
                if f is not leader:
                    await f.stop(transfer_leadership=False)
            pending = asyncio.ensure_future(leader.propose(b"7"))
            await until(lambda: leader.raft is not None and leader.raft.unapplied_bytes > 0)
            await leader.stop(transfer_leadership=False)
            with pytest.raises(OutcomeUnknownError, match="may still be applied") as info:
                await pending
            assert not isinstance(info.value, ProposalDroppedError)
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


def test_a_large_commit_is_applied_a_chunk_at_a_time_with_the_loop_free_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower waits for none of the writes it applies; still, between chunks its loop runs
    other work (messages to answer, timers), rather than only after the whole commit."""

    async def main() -> None:
        async with started(configs(tmp_path)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            follower = next(n for n in nodes if n is not leader)
            turns = 0

            async def bystander() -> None:
                nonlocal turns
                while True:
                    turns += 1
                    await asyncio.sleep(0)

            chunks: list[tuple[int, int]] = []  # (size, loop turns seen before it)
            real = apply_committed

            def spy(chunk: Any, sessions: Any, run: Any, wanted: Any) -> Any:
                if sessions is follower.sessions:
                    chunks.append((len(chunk), turns))
                return real(chunk, sessions, run, wanted)

            monkeypatch.setattr("dengine.node.apply_committed", spy)
            other = asyncio.create_task(bystander())
            try:
                writes = 3 * node_module.APPLY_CHUNK
                await asyncio.gather(*(leader.propose(b"1") for _ in range(writes)))
                await until(lambda: follower.sm.n == writes)  # type: ignore[attr-defined]
            finally:
                other.cancel()
            assert sum(size for size, _ in chunks) >= writes
            assert any(size == node_module.APPLY_CHUNK for size, _ in chunks), chunks
            seen = [t for _, t in chunks]
            assert len(set(seen)) == len(seen), f"chunks applied back to back: {chunks}"

    run(main)


def test_a_proposal_does_not_ask_asyncio_for_the_running_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio.get_running_loop() makes a getpid() system call each time on CPython 3.11: once
    # per proposal, it cost the leader's loop about 1 us of 9 per write in the embedded benchmark.
    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            asked = 0
            real = asyncio.get_running_loop

            def counting() -> asyncio.AbstractEventLoop:
                nonlocal asked
                asked += 1
                return real()

            monkeypatch.setattr(asyncio, "get_running_loop", counting)
            futures = [node.submit(b"1") for _ in range(500)]
            await asyncio.gather(*futures)
            monkeypatch.undo()
            assert asked < 50, f"{asked} calls for 500 proposals"

    run(main)


def test_a_lone_write_is_applied_where_its_commit_is_heard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Handing a commit to the apply task costs a turn of the loop, 60-100 µs of a write at one in
    # flight; a few entries that nothing else is being applied around are applied on the spot.
    async def main() -> None:
        async with started(configs(tmp_path)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            await leader.propose(b"1")
            where: list[str | None] = []
            real = apply_committed

            def spy(chunk: Any, sessions: Any, run: Any, wanted: Any) -> Any:
                if sessions is leader.sessions:
                    task = asyncio.current_task()
                    where.append(None if task is None else task.get_name())
                return real(chunk, sessions, run, wanted)

            monkeypatch.setattr("dengine.node.apply_committed", spy)
            for i in range(20):
                assert await leader.propose(b"1") == str(i + 2).encode()
            assert len(where) == 20
            assert f"apply-{leader.id}" not in where, where

    run(main)


def test_entries_are_applied_in_order_around_a_snapshot_and_the_apply_task(tmp_path: Path) -> None:
    """While a snapshot holds the apply lock, a committed write waits. When the snapshot lets go,
    the apply task is woken holding the entries it took from the queue, but has not run yet:
    the lock then looks free and the queue empty, and a later commit heard in that moment must
    still wait for them rather than be applied on the spot ahead of them."""

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Counter()) as node:
            await until(lambda: leader_of([node]))
            raft, store = node.raft, node.store
            assert raft is not None and store is not None
            assert await node.propose(b"1") == b"1"
            await node.apply_lock.acquire()
            held = node.submit(b"10")
            await until(lambda: node._apply_busy and raft.commit == store.last_index())
            await asyncio.sleep(0.1)
            assert not held.done() and node.sm.n == 1, "applied while a snapshot held the lock"  # type: ignore[attr-defined]
            node.apply_lock.release()  # the apply task is woken, and has not run yet
            applied = raft.applied
            assert not node._apply_here(store.entries(applied + 1, applied + 2)), "applied out of order"
            assert await held == b"11"
            assert await node.propose(b"100") == b"111"

    run(main)


@pytest.mark.parametrize("failing", ["apply", "bookkeeping after it"])
def test_a_node_that_fails_applying_where_a_commit_is_heard_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # A command that raises is contained (its caller gets ApplyError); a failure of the apply
    # machinery itself is a bug, after which what the node would apply next cannot be trusted.
    real = apply_committed

    def broken(chunk: Any, sessions: Any, run: Any, wanted: Any) -> Any:
        if wanted:
            raise RuntimeError("applying failed: a bug")
        return real(chunk, sessions, run, wanted)

    def broken_after(self: Node) -> None:
        raise RuntimeError("the bookkeeping after an apply failed: a bug")

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        node = Node(cfg, state_machine=Counter())
        await node.start()
        try:
            await until(lambda: leader_of([node]))
            assert await node.propose(b"1") == b"1"
            if failing == "apply":
                monkeypatch.setattr("dengine.node.apply_committed", broken)
                with pytest.raises(OutcomeUnknownError, match="an apply failure"):
                    await asyncio.wait_for(node.propose(b"1"), 10)
            else:
                monkeypatch.setattr(Node, "_after_apply", broken_after)
                assert await node.propose(b"1") == b"2", "answered before the bookkeeping"
                await until(lambda: node.failure is not None)
            assert node.failure is not None and "an apply failure" in node.failure
        finally:
            await node.stop(transfer_leadership=False)

    run(main)


class FillingDisk:
    """A node's log store whose appends fail once ``full`` (a full disk, an fsync that fails
    where a segment ends), the rest passed through."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.full = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def append(self, entries: Any) -> None:
        if self.full:
            raise StorageError("no space left on device (staged by the test)")
        self._store.append(entries)


def test_a_node_whose_log_append_fails_stops(tmp_path: Path) -> None:
    """A failed append leaves the log in an unknown state, as a failed sync does: the leader
    (its own proposal) and a follower (the leader's entries) each stop, and say why, rather
    than go on with writes that never commit."""

    async def main() -> None:
        async with started(configs(tmp_path)) as nodes:
            leader = await until(lambda: leader_of(nodes))
            follower = next(n for n in nodes if n is not leader)
            assert follower.raft is not None and leader.raft is not None
            assert await leader.propose(b"1") == b"1"
            disk = FillingDisk(follower.raft.store)
            follower.raft.store = disk
            disk.full = True
            assert await asyncio.wait_for(leader.propose(b"1"), 10) == b"2", "the others commit"
            await until(lambda: follower.failure is not None)
            assert "storage failure" in (follower.failure or "")
            ready, facts = follower.readiness()
            assert not ready and facts["reason"] == follower.failure, "/readyz says why"
            with pytest.raises(DengineError, match="storage failure"):
                await follower.propose(b"1")
            disk = FillingDisk(leader.raft.store)
            leader.raft.store = disk
            disk.full = True
            with pytest.raises(OutcomeUnknownError, match="storage failure"):
                await asyncio.wait_for(leader.propose(b"1"), 10)
            assert leader.failure is not None

    run(main)


def test_a_stopped_node_refuses_reads_and_stops_once(tmp_path: Path) -> None:
    """After stop() a read has nobody to confirm it and nothing to wait for: it is refused at
    once rather than left hanging. Two stop() calls at the same time (the leader handing over)
    release the node once."""

    async def main() -> None:
        nodes = [Node(c, state_machine=Counter()) for c in configs(tmp_path)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            assert await leader.propose(b"1") == b"1"
            released = 0
            real = leader._release_everything

            async def counting(why: str) -> None:
                nonlocal released
                released += 1
                await real(why)

            leader._release_everything = counting  # type: ignore[method-assign]
            await asyncio.gather(leader.stop(), leader.stop())
            assert released == 1
            for consistency in ("linearizable", "lease", "stale"):
                with pytest.raises(DengineError, match="not running"):
                    await asyncio.wait_for(leader.read(lambda sm: sm.n, consistency=consistency), 5)
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    run(main)


def test_a_node_given_a_port_already_in_use_refuses_to_start(tmp_path: Path) -> None:
    """grpc lets two servers share a port by default (SO_REUSEPORT): a second node started on
    a port in use (a copied config, a wrong data dir) would then answer half the requests with
    its own, empty, state. It must fail to start with one clear error instead, and let go of
    its data dir."""

    async def main() -> None:
        (cfg,) = configs(tmp_path / "a", 1)
        d = cfg.to_dict()
        d["node"] = {**d["node"], "data_dir": str(tmp_path / "b")}
        clash = Config.from_dict(d)
        async with Node(cfg, state_machine=Counter()) as first:
            await until(lambda: leader_of([first]))
            second = Node(clash, state_machine=Counter())
            with pytest.raises(DengineError, match=r"cannot listen on .*\(node\.listen\)"):
                await second.start()
            assert await first.propose(b"1") == b"1"
        # The data dir the failed start opened was let go.
        d["node"] = {**d["node"], "listen": configs(tmp_path / "c", 1)[0].node.listen}
        async with Node(Config.from_dict(d), state_machine=Counter()) as again:
            await until(lambda: leader_of([again]))

    run(main)


def test_a_write_that_waited_past_what_its_session_is_kept_for_is_not_proposed_again(tmp_path: Path) -> None:
    """A waiting write is proposed again (a new leader, an election timeout without an answer),
    which its session makes harmless: only while the session table remembers it. One that
    waited through half of what the table keeps a session for (here 8 clients, so 4 entries)
    is not proposed again, since it may have been applied and forgotten: its caller is told
    the outcome is unknown."""

    async def main() -> None:
        (cfg,) = configs(tmp_path, 1)
        node = Node(cfg, state_machine=Counter())
        node.sessions = SessionTable(max_clients=8)
        await node.start()
        try:
            await until(lambda: leader_of([node]))
            assert await node.propose(b"1") == b"1"
            # A write this node proposed whose copy went nowhere (a leader that dropped it).
            stray = node._submit(b"100")
            node._pending.clear()
            node._resubmit()  # its first copy again: how long it waits counts from here
            node._pending.clear()
            for _ in range(6):
                await node.propose(b"1")
            node._resubmit()
            with pytest.raises(OutcomeUnknownError, match="not proposed again"):
                await asyncio.wait_for(stray[0], 5)
            await asyncio.sleep(0.2)
            assert isinstance(node.sm, Counter) and node.sm.n == 7, "it was not applied"
        finally:
            await node.stop(transfer_leadership=False)

    run(main)
