"""dengine.Client against a real 3-process cluster: leader discovery, coalescing, retries across
a leader crash, exactly-once writes, typed results."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dengine.client import Client, KeyValue
from dengine.errors import CompareFailed, NotFound, RequestFailed, Unavailable

from cluster_procs import ProcCluster, running_cluster

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ProcCluster]:
    with running_cluster(tmp_path) as c:
        yield c


def endpoints(c: ProcCluster) -> list[str]:
    return [c.address(i) for i in range(1, 4)]


def test_typed_operations(cluster: ProcCluster) -> None:
    async def main() -> None:
        async with Client(endpoints(cluster)) as client:
            first = await client.put(b"a", b"1")
            assert first.prev is None and first.revision >= 1
            second = await client.put(b"a", b"2")
            assert second.prev is not None and second.prev.value == b"1"
            kv = await client.get(b"a")
            assert kv is not None and (kv.value, kv.version) == (b"2", 2)
            assert await client.get(b"missing") is None
            assert (await client.cas(b"a", b"2", b"3")).succeeded
            failed = await client.cas(b"a", b"nope", b"4")
            assert not failed.succeeded and failed.current is not None and failed.current.value == b"3"
            assert (await client.cas(b"new", None, b"x")).succeeded
            await client.put(b"p/1", b"x")
            await client.put(b"p/2", b"y")
            assert [kv.key for kv in await client.range(b"p/")] == [b"p/1", b"p/2"]
            assert [kv.key for kv in await client.range(b"p/", limit=1)] == [b"p/1"]
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


def test_an_unreachable_cluster_is_unavailable_within_the_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        async with Client(["127.0.0.1:9"], timeout=0.5) as client:
            with pytest.raises(Unavailable):
                await client.put(b"k", b"v")

    asyncio.run(main())


def test_a_watch_resumes_on_another_node_without_gaps_or_repeats(cluster: ProcCluster) -> None:
    async def main() -> None:
        leader = cluster.wait_leader()
        follower = next(i for i in range(1, 4) if i != leader)
        other = next(i for i in range(1, 4) if i not in (leader, follower))
        async with (
            Client(endpoints(cluster)) as writer,
            Client([cluster.address(follower), cluster.address(other)]) as watcher,
        ):
            seen: list[tuple[int, bytes]] = []

            async def watch() -> None:
                async for e in watcher.watch(b"r/"):
                    seen.append((e.revision, e.kv.key))
                    if len(seen) == 40:
                        return

            task = asyncio.create_task(watch())
            await asyncio.sleep(1.0)
            for i in range(20):
                await writer.put(b"r/%02d" % i, b"x")
            await asyncio.sleep(0.5)
            cluster.kill(follower)  # the node serving the watch dies
            for i in range(20, 40):
                await writer.put(b"r/%02d" % i, b"x")
            await asyncio.wait_for(task, 30)
            assert [k for _, k in seen] == [b"r/%02d" % i for i in range(40)], "no gap, no repeat"
            revisions = [r for r, _ in seen]
            assert revisions == sorted(revisions) and len(set(revisions)) == 40

    asyncio.run(main())
