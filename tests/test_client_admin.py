"""dengine.Client's cluster operations (membership, leadership, the members list) against a real
3-process cluster, and the retry rule for membership changes whose outcome was unknown."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from dengine.client import Client, Membership, SyncClient
from dengine.errors import RequestFailed
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

from cluster_procs import ProcCluster, running_cluster, wait_for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")

MANUAL = '\n[membership]\npromote = "manual"\n'


def test_a_learner_added_promoted_and_removed_through_the_client(tmp_path: Path) -> None:
    with running_cluster(tmp_path, extra_toml=MANUAL) as cluster:
        leader = cluster.wait_ready()
        follower = next(i for i in (1, 2, 3) if i != leader)
        address = cluster.add_joiner(4)

        async def main() -> None:
            # Given one follower only: the leader is found through its refusals.
            async with Client([cluster.address(follower)], timeout=30) as client:
                members = await client.members()
                assert members == Membership((1, 2, 3), (), {i: cluster.address(i) for i in (1, 2, 3)})
                m = await client.add_learner(4, address)
                assert (m.voters, m.learners, m.addresses[4]) == ((1, 2, 3), (4,), address)
                cluster.start(4, join=cluster.address(leader))
                await asyncio.to_thread(
                    wait_for,
                    lambda: (s := cluster.status(4)) is not None and s.applied_index >= commit_index(cluster),
                    30,
                    "node 4 to catch up",
                )
                m = await client.promote(4)
                assert (m.voters, m.learners) == ((1, 2, 3, 4), ())
                m = await client.remove_member(4)
                assert (m.voters, m.learners) == ((1, 2, 3), ())
                # Refusals come at once, as they are (not retried until the deadline).
                with pytest.raises(RequestFailed, match="node 99 is not a member") as refused:
                    await client.remove_member(99)
                assert refused.value.code == "FAILED_PRECONDITION"
                with pytest.raises(RequestFailed, match="is already a member"):
                    await client.add_learner(2, "127.0.0.1:1")
                # A missing id is a bad argument, not a state of the cluster.
                for change in (client.promote, client.remove_member):
                    with pytest.raises(RequestFailed, match="needs the id of a member") as refused:
                        await change(0)
                    assert refused.value.code == "INVALID_ARGUMENT"

        asyncio.run(main())


def commit_index(cluster: ProcCluster) -> int:
    leader = cluster.wait_leader()
    status = cluster.status(leader)
    assert status is not None
    return status.commit_index


def test_leadership_moves_to_the_node_asked_for_and_to_the_best_one_by_default(cluster: ProcCluster) -> None:
    leader = cluster.wait_ready()
    target = next(i for i in (1, 2, 3) if i != leader)

    async def main() -> None:
        async with Client([cluster.address(i) for i in (1, 2, 3)], timeout=30) as client:
            assert await client.transfer_leader(target) == target
            assert cluster.leader() == target
            assert await client.transfer_leader(target) == target  # already there
            moved = await client.transfer_leader()
            assert moved != target and cluster.wait_leader() == moved
            await client.put(b"after", b"the moves")  # and the client follows the new leader
            with pytest.raises(RequestFailed) as refused:
                await client.transfer_leader(99)
            assert refused.value.code == "INVALID_ARGUMENT"

    asyncio.run(main())
    # The blocking wrapper, for scripts, has them too.
    with SyncClient([cluster.address(1)], timeout=30) as sync:
        assert sync.members().voters == (1, 2, 3)
        back = sync.transfer_leader(leader)
        assert back == leader == cluster.wait_leader()


class _Refusals:
    """A Cluster stub whose AddLearner fails as scripted, then as told; Status says it leads."""

    def __init__(self, script: list[tuple[grpc.StatusCode, str]]) -> None:
        self.script = script
        self.calls = 0

    async def AddLearner(self, request: Any, timeout: float) -> Any:
        self.calls += 1
        code, details = self.script.pop(0)
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    async def Status(self, request: Any, timeout: float) -> cluster_pb2.StatusResponse:
        return cluster_pb2.StatusResponse(id=1, address="h:1", role="leader", voters=[1], learners=[4])


@pytest.mark.parametrize("first_outcome_known", [False, True], ids=["unknown-then-done", "refused"])
def test_a_change_found_already_made_after_an_unknown_outcome_succeeds(
    monkeypatch: pytest.MonkeyPatch, first_outcome_known: bool
) -> None:
    """The first attempt may have committed when its answer was lost: a retry refused because
    the change is in force means it worked. Without that first doubt, the refusal stands."""
    already = (grpc.StatusCode.FAILED_PRECONDITION, "node 4 is already a member")
    script = [already] if first_outcome_known else [(grpc.StatusCode.UNAVAILABLE, "reset"), already]
    stub = _Refusals(script)
    monkeypatch.setattr(cluster_pb2_grpc, "ClusterStub", lambda channel: stub)

    async def main() -> None:
        async with Client(["h:1"], timeout=5) as client:
            if first_outcome_known:
                with pytest.raises(RequestFailed, match="already a member"):
                    await client.add_learner(4, "h:4")
            else:
                m = await client.add_learner(4, "h:4")
                assert (m.voters, m.learners) == ((1,), (4,))

    asyncio.run(main())
    assert stub.calls == (1 if first_outcome_known else 2)
