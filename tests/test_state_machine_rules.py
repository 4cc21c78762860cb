"""The rules a user's own state machine can count on in embedded mode, whatever it does: a read
never sees an entry half applied; whatever ``apply`` raises (but a KeyboardInterrupt or a
SystemExit, which may come from outside) is that command's error on every replica, and the node
goes on; ``snapshot`` and ``restore`` may return
an awaitable; what can never be answered is refused before it is proposed."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from dengine.devcluster import free_ports
from dengine.errors import ApplyError, DengineError
from dengine.node import MAX_COMMAND_BYTES, Node
from test_node_embedded import configs, leader_of, until


class Pair:
    """Keeps ``a == b`` between entries; an async apply breaks it for a moment inside one."""

    def __init__(self) -> None:
        self.a = 0
        self.b = 0

    async def apply(self, index: int, command: bytes) -> bytes:
        self.a += 1
        await asyncio.sleep(0.002)
        self.b += 1
        return b"ok"

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(b"%d" % self.a)

    def restore(self, source: BinaryIO) -> None:
        self.a = self.b = int(source.read())


def test_a_read_never_sees_an_entry_half_applied_by_an_async_apply(tmp_path: Path) -> None:
    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Pair()) as node:
            await until(lambda: leader_of([node]))
            torn: list[str] = []
            writing = True

            async def writer() -> None:
                for _ in range(15):
                    await node.propose(b"x")

            async def reader(consistency: Any) -> None:
                while writing:
                    a, b = await node.read(lambda sm: (sm.a, sm.b), consistency=consistency)
                    if a != b:
                        torn.append(f"{consistency}: a={a} b={b}")
                    await asyncio.sleep(0)

            readers = [asyncio.ensure_future(reader(c)) for c in ("linearizable", "lease", "stale")]
            await asyncio.gather(*(writer() for _ in range(4)))
            writing = False
            await asyncio.gather(*readers)
            assert not torn, torn[:5]
            assert await node.read(lambda sm: sm.a) == 60

    asyncio.run(main())


class Raising:
    """Raises what the command names; ``n`` counts the commands that went through."""

    def __init__(self) -> None:
        self.n = 0

    def apply(self, index: int, command: bytes) -> bytes:
        return raise_or_count(self, command)

    def snapshot(self, sink: BinaryIO) -> None:
        sink.write(b"%d" % self.n)

    def restore(self, source: BinaryIO) -> None:
        self.n = int(source.read())


class AsyncRaising(Raising):
    async def apply(self, index: int, command: bytes) -> bytes:  # type: ignore[override]
        await asyncio.sleep(0)
        return raise_or_count(self, command)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words for it")


class Unspeakable(Exception):
    def __str__(self) -> str:
        raise SystemExit("not even an Exception")


def raise_or_count(sm: Raising, command: bytes) -> bytes:
    if command == b"cancelled":
        raise asyncio.CancelledError("from inside apply")
    if command == b"unprintable":
        raise Unprintable
    if command == b"unspeakable":
        raise Unspeakable
    sm.n += 1
    return b"%d" % sm.n


def test_reads_are_not_starved_by_async_applies_that_never_stop_coming(tmp_path: Path) -> None:
    """A read waits for the entry being applied, not for the applies to stop: the apply task
    lets waiting reads run between two entries."""

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Pair()) as node:
            await until(lambda: leader_of([node]))
            writing = True

            async def writer() -> None:
                while writing:
                    await node.propose(b"x")

            writers = [asyncio.ensure_future(writer()) for _ in range(8)]
            await until(lambda: node.raft is not None and node.raft.applied > 20)
            try:
                for consistency in ("stale", "linearizable"):
                    a, b = await asyncio.wait_for(
                        node.read(lambda sm: (sm.a, sm.b), consistency=consistency), timeout=10
                    )
                    assert a == b
            finally:
                writing = False
                await asyncio.gather(*writers)

    asyncio.run(main())


class Slow(Pair):
    async def apply(self, index: int, command: bytes) -> bytes:
        self.a += 1
        await asyncio.sleep(30)
        self.b += 1
        return b"ok"


def test_a_read_waiting_for_an_entry_cut_short_by_a_stop_fails(tmp_path: Path) -> None:
    """The stop cancels the apply in the middle of the entry: the read must not see that state."""

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        sm = Slow()
        node = Node(cfg, state_machine=sm)
        await node.start()
        await until(lambda: leader_of([node]))
        proposing = asyncio.ensure_future(node.propose(b"x"))
        await until(lambda: sm.a == 1)
        reading = asyncio.ensure_future(node.read(lambda s: (s.a, s.b), consistency="stale"))
        await asyncio.sleep(0.05)
        await node.stop(transfer_leadership=False)
        with pytest.raises(DengineError, match="not running"):
            await reading
        with pytest.raises(DengineError):
            await proposing

    asyncio.run(main())


@pytest.mark.parametrize("kind", [Raising, AsyncRaising])
def test_whatever_apply_raises_is_the_commands_error_on_every_replica(
    tmp_path: Path, kind: type[Raising]
) -> None:
    """A CancelledError (an async apply that awaited something cancelled) and an exception whose
    str() fails are each the command's error, in the same words on every replica; before, the
    first stopped applying for good without a word, and the second stopped every replica at that
    entry, at every restart."""

    async def main() -> None:
        cfgs = configs(tmp_path, n=3)
        machines = [kind() for _ in cfgs]
        nodes = [Node(c, state_machine=sm) for c, sm in zip(cfgs, machines, strict=True)]
        for n in nodes:
            await n.start()
        try:
            leader = await until(lambda: leader_of(nodes))
            for command, words in [
                (b"cancelled", "CancelledError: from inside apply"),
                (b"unprintable", "Unprintable: <str() failed>"),
                (b"unspeakable", "Unspeakable: <str() failed>"),
            ]:
                with pytest.raises(ApplyError, match=re.escape(words)):
                    await leader.propose(command)
            assert await leader.propose(b"more") == b"1", "the node goes on applying"
            await until(lambda: all(sm.n == 1 for sm in machines))
            assert all(n.failure is None for n in nodes)
            recorded = [n.sessions.items() for n in nodes]
            assert recorded[1] == recorded[0] == recorded[2], "the same session table everywhere"
        finally:
            for n in nodes:
                await n.stop(transfer_leadership=False)

    asyncio.run(main())


class Deferred:
    """A state machine whose snapshot and restore are plain methods returning coroutines (a
    dispatcher, a decorator): the protocol allows an awaitable."""

    def __init__(self) -> None:
        self.n = 0

    def apply(self, index: int, command: bytes) -> bytes:
        self.n += 1
        return b"%d" % self.n

    def snapshot(self, sink: BinaryIO) -> Any:
        return self._write(sink)

    def restore(self, source: BinaryIO) -> Any:
        return self._read(source)

    async def _write(self, sink: BinaryIO) -> None:
        sink.write(b"%d" % self.n)

    async def _read(self, source: BinaryIO) -> None:
        self.n = int(source.read())


def test_a_snapshot_and_restore_returned_as_awaitables_are_awaited(tmp_path: Path) -> None:
    """Before, the snapshot was written empty and the log compacted behind it: the state was
    lost at the next restart."""
    (cfg,) = configs(tmp_path, n=1)

    async def write_and_snapshot() -> None:
        async with Node(cfg, state_machine=Deferred()) as node:
            await until(lambda: leader_of([node]))
            for _ in range(5):
                await node.propose(b"x")
            assert await node.snapshot() is not None

    async def restart() -> int:
        sm = Deferred()
        async with Node(cfg, state_machine=sm) as node:
            await until(lambda: leader_of([node]))
            return await node.read(lambda s: s.n)

    asyncio.run(write_and_snapshot())
    assert asyncio.run(restart()) == 5


def test_what_could_never_be_answered_is_refused_before_it_is_proposed(tmp_path: Path) -> None:
    """A command larger than one peer message never commits and never fails (every new leader
    proposes it again); a propose from another thread fails in its caller yet was applied."""

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        sm = Raising()
        async with Node(cfg, state_machine=sm) as node:
            await until(lambda: leader_of([node]))
            with pytest.raises(ValueError, match="larger than"):
                await node.propose(b"x" * (MAX_COMMAND_BYTES + 1))
            refused: list[BaseException] = []

            def elsewhere() -> None:
                try:
                    asyncio.run(node.propose(b"1"))
                except BaseException as exc:
                    refused.append(exc)

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
            assert isinstance(refused[0], DengineError) and "run_coroutine_threadsafe" in str(refused[0])
            # Everything else a program calls on the node is refused from another thread too.
            calls: list[Any] = [
                lambda: asyncio.run(node.read(lambda sm: sm.n)),
                lambda: asyncio.run(node.snapshot()),
                lambda: asyncio.run(node.add_learner(9, "127.0.0.1:9")),
                lambda: asyncio.run(node.remove_member(9)),
                node.transfer_leadership,
            ]
            for call in calls:
                refused.clear()

                def attempt(call: Any = call) -> None:
                    try:
                        call()
                    except BaseException as exc:
                        refused.append(exc)

                other = threading.Thread(target=attempt)
                other.start()
                other.join()
                assert isinstance(refused[0], DengineError) and "thread" in str(refused[0]), refused
            await asyncio.sleep(0.2)
            assert sm.n == 0, "nothing was applied"
            assert await node.propose(b"1") == b"1", "the node serves on"

    asyncio.run(main())


def test_a_read_function_that_returns_an_awaitable_is_refused(tmp_path: Path) -> None:
    """Awaited, it would read across entries applied meanwhile; returned, the caller would get a
    coroutine instead of a value."""

    async def main() -> None:
        (cfg,) = configs(tmp_path, n=1)
        async with Node(cfg, state_machine=Raising()) as node:
            await until(lambda: leader_of([node]))

            async def reads_later(sm: Raising) -> int:
                return sm.n

            for consistency in ("linearizable", "stale"):
                with pytest.raises(TypeError, match="must return a value"):
                    await node.read(reads_later, consistency=consistency)  # type: ignore[unused-coroutine]

    asyncio.run(main())


EXITING = """
import asyncio, sys
from dengine.config import Config
from dengine.node import Node

class Exiting:
    def apply(self, index, command):
        if command == b"exit":
            sys.exit(7)
        return b"ok"
    def snapshot(self, sink): pass
    def restore(self, source): pass

async def main():
    cfg = Config.from_dict({
        "node": {"id": 1, "listen": sys.argv[1], "data_dir": sys.argv[2], "metrics_listen": ""},
        "cluster": {"id": "c", "members": {"1": sys.argv[1]}},
    })
    async with Node(cfg, state_machine=Exiting()) as node:
        while node.raft is None or node.raft.role.value != "leader":
            await asyncio.sleep(0.02)
        assert await node.propose(b"fine") == b"ok"
        await node.propose(b"exit")
        print("still running")

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_system_exit_from_apply_exits_the_program_rather_than_fork_the_replicas(
    tmp_path: Path, kind: str
) -> None:
    """A SystemExit may come from a signal handler (``sys.exit`` on SIGTERM) while one replica
    applies: recorded as that command's error there only, it would fork the replicas. It leaves
    the program, with its status, like a KeyboardInterrupt."""
    (port,) = free_ports(1)
    script = EXITING if kind == "sync" else EXITING.replace("    def apply(", "    async def apply(")
    done = subprocess.run(
        [sys.executable, "-c", script, f"127.0.0.1:{port}", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 7, done.stdout + done.stderr
    assert "still running" not in done.stdout


def test_calls_before_start_are_refused_as_not_running(tmp_path: Path) -> None:
    node = Node(configs(tmp_path, n=1)[0], state_machine=Raising())
    with pytest.raises(DengineError, match="not running"):
        node.transfer_leadership()
    with pytest.raises(DengineError, match="not running"):
        asyncio.run(node.add_learner(9, "127.0.0.1:9"))
