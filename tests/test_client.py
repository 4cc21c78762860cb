"""dengine.Client against a real 3-process cluster: leader discovery, coalescing, retries across
a leader crash, exactly-once writes, typed results."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dengine.client import Client, KeyValue
from dengine.errors import CompareFailed, DeadlineExceeded, NotFound, RequestFailed, Unavailable
from dengine.kv import DEFAULT_HISTORY

from cluster_procs import ProcCluster

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


def endpoints(c: ProcCluster) -> list[str]:
    return [c.address(i) for i in range(1, 4)]


async def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        await asyncio.sleep(0.02)


def test_typed_operations(cluster: ProcCluster) -> None:
    async def main() -> None:
        async with Client(endpoints(cluster)) as client:
            first = await client.put(b"a", b"1", prev_kv=True)
            assert first.prev is None and first.revision >= 1
            second = await client.put(b"a", b"2", prev_kv=True)
            assert second.prev is not None and second.prev.value == b"1"
            assert second.prev.mod_revision == first.revision
            plain = await client.put(b"a", b"2")
            assert plain.prev is None and plain.revision == second.revision + 1, "asked for no prev"
            kv = await client.get(b"a")
            assert kv is not None and (kv.value, kv.version) == (b"2", 3)
            assert await client.get(b"missing") is None
            assert (await client.cas(b"a", b"2", b"3")).succeeded
            failed = await client.cas(b"a", b"nope", b"4")
            assert not failed.succeeded and failed.current is not None and failed.current.value == b"3"
            assert (await client.cas(b"new", None, b"x")).succeeded
            await client.put(b"p/1", b"x")
            await client.put(b"p/2", b"y")
            assert [kv.key for kv in await client.range(b"p/")] == [b"p/1", b"p/2"]
            assert [kv.key for kv in await client.range(b"p/", limit=1)] == [b"p/1"]
            assert len(await client.range(b"p/", limit=0)) == 2, "0: no limit, as etcd's Range"
            with pytest.raises(ValueError, match="limit"):
                await client.range(b"p/", limit=-1)
            deleted = await client.delete(b"a")
            assert deleted.deleted and deleted.prev is not None
            assert not (await client.delete(b"a")).deleted
            # Strict calls raise instead of returning "absent" or "not swapped".
            with pytest.raises(NotFound) as missing:
                await client.get(b"missing", strict=True)
            assert missing.value.key == b"missing" and isinstance(missing.value, KeyError)
            with pytest.raises(NotFound):
                await client.delete(b"a", strict=True)
            with pytest.raises(CompareFailed) as mismatch:
                await client.cas(b"new", b"nope", b"y", strict=True)
            assert isinstance(mismatch.value.current, KeyValue) and mismatch.value.current.value == b"x"
            assert (await client.cas(b"new", b"x", b"y", strict=True)).succeeded
            p1 = await client.get(b"p/1", strict=True)
            assert p1 is not None and p1.value == b"x"
            with pytest.raises(RequestFailed) as info:
                await client.put(b"", b"empty key")
            assert info.value.code == "INVALID_ARGUMENT"
            # A stale read may lag (it may be served by a follower): it converges.
            for _ in range(100):
                if await client.get(b"p/1", consistency="stale") is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("a stale read never saw the write")

    asyncio.run(main())


def test_concurrent_calls_are_coalesced_and_follow_the_leader(cluster: ProcCluster) -> None:
    async def main() -> None:
        # Start from a follower's address only: the client must find the leader by itself.
        leader = cluster.wait_leader()
        follower = next(i for i in range(1, 4) if i != leader)
        async with Client([cluster.address(follower), *endpoints(cluster)], linger_ms=1) as client:
            await asyncio.gather(*(client.put(b"k%d" % i, b"v%d" % i) for i in range(500)))
            assert client.leader == cluster.address(leader)
            values = await asyncio.gather(*(client.get(b"k%d" % i) for i in range(500)))
            assert [v.value for v in values if v] == [b"v%d" % i for i in range(500)]

    asyncio.run(main())


def test_writes_survive_a_leader_crash_exactly_once(cluster: ProcCluster) -> None:
    async def main() -> None:
        async with Client(endpoints(cluster), timeout=20) as client:
            await client.put(b"warmup", b"1")

            async def writer(w: int) -> None:
                for i in range(40):
                    await client.put(b"w%d-%d" % (w, i), b"x")

            writers = asyncio.gather(*(writer(w) for w in range(10)))
            await asyncio.sleep(0.3)
            cluster.kill(cluster.wait_leader())
            await writers
            # Every acknowledged write is there, and none was applied twice (version 1).
            for w in range(10):
                for i in range(40):
                    kv = await client.get(b"w%d-%d" % (w, i))
                    assert kv is not None and kv.version == 1, (w, i, kv)

    asyncio.run(main())


def test_a_client_given_one_node_learns_the_members_and_outlives_that_node(cluster: ProcCluster) -> None:
    async def main() -> None:
        first = cluster.wait_ready()
        async with (
            Client([cluster.address(first)], timeout=30) as client,
            Client([cluster.address(first)], timeout=30, discover_members=False) as fixed,
        ):
            await client.put(b"a", b"1")
            await fixed.put(b"a", b"1")
            # The leader it found told it the members' addresses.
            await wait_until(lambda: set(client.endpoints) == set(endpoints(cluster)), 5)
            assert client.endpoints[0] == cluster.address(first)
            assert fixed.endpoints == [cluster.address(first)]
            cluster.kill(first)  # the only node it was given
            await client.put(b"b", b"2")
            kv = await client.get(b"a")
            assert kv is not None and kv.value == b"1"
            assert client.leader != cluster.address(first)

    asyncio.run(main())


def test_a_client_that_only_watches_learns_the_members_too(cluster: ProcCluster) -> None:
    """It never follows a leader (a watch goes to any node): it asks the node its watch reached
    who leads, and the leader for the members, so that it too outlives the nodes it was given."""

    async def main() -> None:
        leader = cluster.wait_ready()
        follower = next(i for i in range(1, 4) if i != leader)
        async with Client([cluster.address(follower)]) as watcher, Client(endpoints(cluster)) as writer:
            start = (await writer.put(b"w", b"0")).revision + 1
            seen: list[bytes] = []

            async def watch() -> None:
                async for e in watcher.watch(b"w", start_revision=start):
                    seen.append(e.kv.value)
                    return

            task = asyncio.create_task(watch())
            await wait_until(lambda: set(watcher.endpoints) == set(endpoints(cluster)), 10)
            assert watcher.endpoints[0] == cluster.address(follower)
            await writer.put(b"w", b"1")
            await asyncio.wait_for(task, 10)
            assert seen == [b"1"]

    asyncio.run(main())


def test_an_unreachable_cluster_is_unavailable_within_the_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        async with Client(["127.0.0.1:9"], timeout=0.5) as client:
            started = time.monotonic()
            # Unavailable, or, when the deadline passes while an attempt is out (a loaded
            # machine makes even a refused connection slow), an unknown outcome at the deadline:
            # the client cannot tell an attempt that never reached a node from one whose answer
            # was lost (seen under load).
            with pytest.raises((Unavailable, DeadlineExceeded)):
                await client.put(b"k", b"v")
            # Ends at its deadline, not at the default timeout (10 s) or after endless retries (the
            # margin is for a loaded machine).
            assert time.monotonic() - started < 5

    asyncio.run(main())


def followers_first(cluster: ProcCluster) -> tuple[int, list[str]]:
    """A follower, and the addresses of both followers with it first: a watcher given them
    watches on that follower (which the test then fails) and resumes on the other."""
    leader = cluster.wait_leader()
    follower = next(i for i in range(1, 4) if i != leader)
    other = next(i for i in range(1, 4) if i not in (leader, follower))
    return follower, [cluster.address(follower), cluster.address(other)]


@pytest.mark.parametrize("failure", ["killed", "frozen", "removed"])
def test_a_watch_resumes_on_another_node_without_gaps_or_repeats(cluster: ProcCluster, failure: str) -> None:
    """The node serving a watch dies (its connection closes), freezes (only the client's
    keepalive pings can tell), or is removed from the cluster (it goes on running, but no longer
    hears a leader, so it stops its progress notices): the watch resumes on another node from the
    last revision seen."""

    async def main() -> None:
        follower, followers = followers_first(cluster)
        async with (
            Client(endpoints(cluster)) as writer,
            Client(followers, watch_idle_timeout=2) as watcher,
        ):
            seen: list[tuple[int, bytes]] = []
            # An explicit start revision sends the watch straight to the first endpoint, the
            # follower that is about to fail.
            start = (await writer.put(b"start", b"")).revision + 1

            async def watch() -> None:
                async for e in watcher.watch(b"r/", start_revision=start):
                    seen.append((e.revision, e.kv.key))
                    if len(seen) == 40:
                        return

            task = asyncio.create_task(watch())
            for i in range(20):
                await writer.put(b"r/%02d" % i, b"x")
            await wait_until(lambda: len(seen) == 20, 10)
            if failure == "removed":  # the node serving the watch
                await writer.remove_member(follower)
            else:
                cluster.kill(follower, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
            for i in range(20, 40):
                await writer.put(b"r/%02d" % i, b"x")
            try:
                await asyncio.wait_for(task, 30)
            except asyncio.TimeoutError:  # not TimeoutError: the two differ before Python 3.11
                views = {i: cluster.status(i) for i in range(1, 4) if i != follower}
                lag = {i: (v.commit_index, v.applied_index) if v else None for i, v in views.items()}
                raise AssertionError(f"the watch stalled after {seen}; (commit, applied) {lag}") from None
            assert [k for _, k in seen] == [b"r/%02d" % i for i in range(40)], "no gap, no repeat"
            revisions = [r for r, _ in seen]
            assert revisions == sorted(revisions) and len(set(revisions)) == 40

    asyncio.run(main())


def test_a_watch_on_a_quiet_prefix_resumes_after_the_history_moved_past_its_start(
    cluster: ProcCluster,
) -> None:
    """A watch whose prefix saw no change while the cluster wrote more than the history holds
    elsewhere: the progress notices told it that nothing was missed, so when its node dies it
    resumes from the revision they reached, not from its start, which no node holds any more."""

    async def main() -> None:
        follower, followers = followers_first(cluster)
        async with (
            Client(endpoints(cluster)) as writer,
            Client(followers, watch_idle_timeout=2) as watcher,
        ):
            start = (await writer.put(b"start", b"")).revision + 1
            seen: list[bytes] = []

            async def watch() -> None:
                async for e in watcher.watch(b"q/", start_revision=start):
                    seen.append(e.kv.key)
                    return

            task = asyncio.create_task(watch())
            await asyncio.gather(
                *(writer.put(b"h/%d" % (i % 100), b"x") for i in range(DEFAULT_HISTORY + 50))
            )
            await asyncio.sleep(2.5)  # progress notices carry the revision past the writes
            cluster.kill(follower, signal.SIGKILL)
            await writer.put(b"q/after", b"x")
            await asyncio.wait_for(task, 30)
            assert seen == [b"q/after"]

    asyncio.run(main())


def test_a_watch_from_a_revision_no_node_still_holds_fails_clearly(cluster: ProcCluster) -> None:
    """Every node keeps the last 10,000 events; a watch from before them cannot be served without
    a gap, so it fails (OUT_OF_RANGE) rather than silently skipping events."""

    async def main() -> None:
        async with Client(endpoints(cluster)) as client:
            writes = (client.put(b"h/%d" % (i % 100), b"x") for i in range(DEFAULT_HISTORY + 50))
            await asyncio.gather(*writes)
            with pytest.raises(RequestFailed) as failed:
                async for _ in client.watch(b"h/", start_revision=1):
                    pass
            assert failed.value.code == "OUT_OF_RANGE" and "compacted" in str(failed.value)
            # From a revision still held, the same watch works.
            latest = (await client.put(b"h/last", b"x")).revision
            async for e in client.watch(b"h/", start_revision=latest - 10):
                if e.revision == latest:
                    break

    asyncio.run(main())
