"""Network partitions between real processes (Raft §6 of the thesis: check-quorum and pre-vote),
made by the TCP proxies in front of each node's peer address (`net_proxy`): a node whose links
are cut hears nothing from its peers while what it sends still arrives, the one-way partition
where a Raft without pre-vote lets a lone node push everyone's term up, and one without
check-quorum leaves a deaf leader in charge.

``blackhole`` holds every byte (the connections stall), ``drop`` resets them; both heal into a
cluster that serves every acknowledged write."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from dengine.v1 import cluster_pb2, kv_pb2

from cluster_procs import ProcCluster, running_cluster, wait_for
from net_proxy import Mode

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")

CUTS: list[Mode] = ["blackhole", "drop"]


def status(c: ProcCluster, node: int) -> cluster_pb2.StatusResponse:
    s = c.status(node)
    assert s is not None, f"node {node} does not answer on its client port"
    return s


def cut(c: ProcCluster, node: int, mode: Mode) -> None:
    assert c.proxies is not None
    c.proxies.set(c.proxy_ports[node], mode)


@pytest.mark.parametrize("mode", CUTS)
def test_a_leader_that_hears_no_one_steps_down_and_the_others_elect(tmp_path: Path, mode: Mode) -> None:
    with running_cluster(tmp_path, proxied=True) as c:
        old = c.wait_ready()
        term = status(c, old).term
        c.put(b"before", b"1")
        cut(c, old, mode)
        others = [i for i in (1, 2, 3) if i != old]
        new = c.wait_leader(among=others, timeout=20)
        assert status(c, new).term > term
        # Check-quorum: heard by no majority for an election timeout, the old leader gives up.
        wait_for(lambda: status(c, old).role != "leader", 10, f"node {old} to step down")
        c.kv(new).Put(kv_pb2.PutRequest(key=b"during", value=b"2"), timeout=5)
        # It refuses what it can no longer confirm (it says who it thinks leads, or no one).
        assert c.try_get(old, b"during", kv_pb2.LINEARIZABLE) is None
        cut(c, old, "pass")
        assert c.wait_ready(timeout=30) == new
        wait_for(lambda: c.try_get(old, b"during") == b"2", 10, f"node {old} to catch up")
        assert c.get(new, b"before") == b"1"


@pytest.mark.parametrize("mode", CUTS)
def test_a_follower_that_hears_no_one_does_not_disrupt_the_leader(tmp_path: Path, mode: Mode) -> None:
    with running_cluster(tmp_path, proxied=True) as c:
        leader = c.wait_ready()
        term = status(c, leader).term
        deaf = next(i for i in (1, 2, 3) if i != leader)
        cut(c, deaf, mode)
        # Many election timeouts (400 ms) pass. Its pre-votes reach the others, who have a
        # leader and refuse them, so its term stays. Without pre-vote it would campaign for real
        # at each timeout: the others ignore those votes while they hear from the leader
        # (check-quorum's lease), but its term climbs, and on its return that term deposes the
        # leader.
        for n in range(20):
            c.kv(leader).Put(kv_pb2.PutRequest(key=b"k%d" % n, value=b"v"), timeout=5)
            time.sleep(0.1)
        # (One election more is tolerated: a loaded machine may stall the healthy follower past
        # the timeout. A deaf node without pre-vote raises the term at each of its timeouts.)
        s = status(c, leader)
        assert s.term <= term + 1, f"the cut-off follower disrupted the leader: term {term} -> {s.term}"
        assert status(c, deaf).term <= term + 1, "the cut-off follower campaigned, its term climbing"
        cut(c, deaf, "pass")
        c.wait_ready(timeout=30)
        wait_for(lambda: c.try_get(deaf, b"k19") == b"v", 10, f"node {deaf} to catch up")
        assert status(c, deaf).term <= term + 1, "the follower disrupted the leader on its return"
