"""Real clusters: three `dengine serve` processes on 127.0.0.1 over real gRPC with real fsync,
killed with SIGKILL, frozen with SIGSTOP, restarted. Every acknowledged write must survive."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from dengine._core import Entry, encode_entries
from dengine.client import Client
from dengine.errors import DeadlineExceeded, Unavailable
from dengine.tls import ClientTLS, init_dev_certs
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc, raft_pb2, raft_pb2_grpc

from cluster_procs import ProcCluster, running_cluster, tls_cli, wait_for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


def write_many(c: ProcCluster, n: int, prefix: str) -> dict[bytes, bytes]:
    acked: dict[bytes, bytes] = {}
    for i in range(n):
        key, value = f"{prefix}{i}".encode(), f"v{i}".encode()
        c.put(key, value)
        acked[key] = value
    return acked


def assert_all_readable(c: ProcCluster, acked: dict[bytes, bytes]) -> None:
    leader = c.wait_leader()
    for key, value in acked.items():
        assert c.get(leader, key) == value, f"acknowledged write {key!r} was lost"


def test_election_replication_and_reads(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    acked = write_many(cluster, 50, "k")
    assert_all_readable(cluster, acked)
    # Every node converges; a stale read on a follower eventually sees the writes.
    for i in range(1, 4):

        def caught_up(node: int = i) -> bool:
            return cluster.try_get(node, b"k49") == b"v49"

        wait_for(caught_up, 5, f"node {i} to catch up")
    # A put answers with the key-value it replaced only when asked to (etcd's prev_kv).
    plain = cluster.kv(leader).Put(kv_pb2.PutRequest(key=b"k0", value=b"w0"), timeout=3)
    assert not plain.HasField("prev")
    asked = cluster.kv(leader).Put(kv_pb2.PutRequest(key=b"k0", value=b"x0", prev_kv=True), timeout=3)
    assert asked.prev.value == b"w0" and asked.prev.mod_revision == plain.revision
    follower = next(i for i in range(1, 4) if i != leader)
    with pytest.raises(grpc.RpcError) as info:
        cluster.kv(follower).Put(kv_pb2.PutRequest(key=b"x", value=b"y"), timeout=3)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert f"leader={leader}@{cluster.address(leader)}" in (info.value.details() or "")


def test_kill_9_of_a_follower_and_of_the_leader(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    acked = write_many(cluster, 20, "a")
    follower = next(i for i in range(1, 4) if i != leader)
    cluster.kill(follower)
    acked |= write_many(cluster, 20, "b")
    cluster.kill(leader)
    cluster.start(follower)
    new_leader = cluster.wait_leader()
    assert new_leader != leader
    acked |= write_many(cluster, 20, "c")
    cluster.start(leader)
    assert_all_readable(cluster, acked)
    wait_for(lambda: cluster.try_get(leader, b"c19") == b"v19", 10, "the old leader to catch up")


def test_kill_9_of_every_node_loses_no_acknowledged_write(cluster: ProcCluster) -> None:
    cluster.wait_leader()
    acked = write_many(cluster, 40, "d")
    for i in range(1, 4):
        cluster.kill(i)
    cluster.start_all()
    assert_all_readable(cluster, acked)


def test_sigstop_of_the_leader_then_sigcont(cluster: ProcCluster) -> None:
    old = cluster.wait_leader()
    acked = write_many(cluster, 10, "e")
    cluster.kill(old, signal.SIGSTOP)
    others = [i for i in range(1, 4) if i != old]
    new = cluster.wait_leader(among=others)
    acked |= write_many(cluster, 10, "f")
    cluster.kill(old, signal.SIGCONT)
    status = wait_for(
        lambda: (s := cluster.status(old)) is not None and s.role != "leader" and s.leader_id == new and s,
        10,
        "the resumed old leader to step down",
    )
    assert status
    assert_all_readable(cluster, acked)


def _proposals(cluster: ProcCluster, i: int) -> float:
    """Node ``i``'s ``dengine_proposals_total``: proposals it has taken so far."""
    line = next(x for x in cluster.scrape(i).splitlines() if x.startswith("dengine_proposals_total{"))
    return float(line.split()[-1])


def test_an_overloaded_leader_refuses_writes_and_clients_retry_until_it_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """raft.max_unapplied_bytes = 1 (one write pending at a time), followers frozen: the leader
    takes one write, refuses the next at once with UNAVAILABLE naming the limit, and a client
    retries that refusal until its deadline; once the followers resume, everything completes."""
    monkeypatch.setenv("DENGINE_RAFT_MAX_UNAPPLIED_BYTES", "1")
    monkeypatch.setenv("DENGINE_RAFT_CHECK_QUORUM", "false")  # the leader stays while they are frozen
    with running_cluster(tmp_path) as cluster:
        leader = cluster.wait_leader()
        followers = [i for i in range(1, 4) if i != leader]

        async def main() -> None:
            async with Client([cluster.address(leader)]) as client:
                await client.put(b"before", b"0")
                for f in followers:
                    cluster.kill(f, signal.SIGSTOP)
                proposed = _proposals(cluster, leader)
                pending = asyncio.ensure_future(client.put(b"pending", b"1", timeout=60))
                while _proposals(cluster, leader) == proposed:  # until the leader has it
                    await asyncio.sleep(0.05)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async with grpc.aio.insecure_channel(cluster.address(leader)) as channel:
                        stub = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                        await stub.Put(kv_pb2.PutRequest(key=b"refused", value=b"2"), timeout=5)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "raft.max_unapplied_bytes" in (refused.value.details() or "")
                with pytest.raises((Unavailable, DeadlineExceeded)):
                    await client.put(b"retried", b"3", timeout=1.0)
                assert not pending.done()
                for f in followers:
                    cluster.kill(f, signal.SIGCONT)
                assert (await asyncio.wait_for(pending, 30)).revision > 0
                await client.put(b"after", b"4", timeout=30)
                assert await client.get(b"pending") is not None

        asyncio.run(main())
        assert 'reason="overloaded"' in cluster.scrape(leader)


def test_a_message_from_another_cluster_is_refused(cluster: ProcCluster) -> None:
    cluster.wait_leader()
    # The channel may still be backing off from before node 1 listened: wait until it answers.
    wait_for(lambda: cluster.status(1), 10, "node 1 to serve")
    stub = raft_pb2_grpc.RaftStub(cluster.channels[1])  # type: ignore[no-untyped-call]
    foreign = raft_pb2.RaftMessage(cluster_id="someone-else", type=raft_pb2.HEARTBEAT, to=1, term=99)
    setattr(foreign, "from", 2)
    with pytest.raises(grpc.RpcError) as info:
        stub.Messages(iter([raft_pb2.RaftBatch(messages=[foreign])]), timeout=3)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "someone-else" in (info.value.details() or "")
    status = cluster.status(1)
    assert status is not None and status.term < 99, "the foreign term must not have been adopted"


def test_a_malformed_message_is_refused_and_the_node_keeps_serving(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    target = next(i for i in range(1, 4) if i != leader)
    wait_for(lambda: cluster.status(target), 10, f"node {target} to serve")
    stub = raft_pb2_grpc.RaftStub(cluster.channels[target])  # type: ignore[no-untyped-call]
    damaged = bytearray(encode_entries([Entry(1, 1, b"x")]))
    damaged[-1] ^= 0xFF
    bad = raft_pb2.RaftMessage(
        cluster_id=cluster.cluster_id, type=raft_pb2.APPEND, to=target, term=1, entries=bytes(damaged)
    )
    setattr(bad, "from", leader)
    with pytest.raises(grpc.RpcError) as info:
        stub.Messages(iter([raft_pb2.RaftBatch(messages=[bad])]), timeout=3)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    cluster.put(b"still", b"serving")
    assert cluster.get(cluster.wait_leader(), b"still") == b"serving"


def test_a_malformed_snapshot_chunk_is_refused_and_the_node_keeps_serving(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    target = next(i for i in range(1, 4) if i != leader)
    wait_for(lambda: cluster.status(target), 10, f"node {target} to serve")
    # InstallSnapshot reads each message in place; send bytes no protobuf encoder would write.
    install = cluster.channels[target].stream_unary(
        "/dengine.v1.Raft/InstallSnapshot",
        request_serializer=None,
        response_deserializer=raft_pb2.InstallSnapshotResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        install(iter([b"\x1a\xff\xff\x03"]), timeout=3)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed snapshot chunk" in (info.value.details() or "")
    cluster.put(b"after", b"chunk")
    assert cluster.get(cluster.wait_leader(), b"after") == b"chunk"


def test_a_config_error_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[node]\nid = 1\nlisten = "127.0.0.1:7001"\n'
        '[cluster]\nid = "c"\nmembers = { 1 = "127.0.0.1:7001" }\n'
        '[raft]\nheartbeat_ms = "fast"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "dengine", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "raft.heartbeat_ms" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
def test_nodes_on_uvloop_and_on_asyncio_serve_one_cluster(tmp_path: Path) -> None:
    c = ProcCluster(tmp_path)
    c.start(1)
    c.start(2)
    c.start(3, env={"DENGINE_NODE_EVENT_LOOP": "asyncio"})
    try:
        c.wait_ready()

        def loop_of(i: int) -> str:
            found = re.search(r"event loop (\w+)\)", (tmp_path / f"node{i}.log").read_text())
            assert found, f"node {i} did not log its event loop"
            return found.group(1)

        assert [loop_of(i) for i in (1, 2, 3)] == ["uvloop", "uvloop", "asyncio"]
        acked: dict[bytes, bytes] = {}
        for target in (3, 1):  # a leader on each kind of loop, with followers on both

            def moved(t: int = target) -> bool:
                # A transfer is best effort (the target may not hear its TimeoutNow in time, say
                # while a peer stream is still connecting): ask again until it leads.
                leader = c.wait_leader()
                if leader == t:
                    return True
                stub = cluster_pb2_grpc.ClusterStub(c.channels[leader])  # type: ignore[no-untyped-call]
                with contextlib.suppress(grpc.RpcError):
                    stub.TransferLeader(cluster_pb2.TransferLeaderRequest(id=t), timeout=5)
                return c.leader() == t

            wait_for(moved, 20, f"node {target} to lead")
            acked |= write_many(c, 20, f"on{target}-")
        c.kill(1)  # kill -9 of the uvloop leader: the others elect one and lose nothing
        acked |= write_many(c, 20, "after-")
        c.start(1)
        assert_all_readable(c, acked)
        for i in (1, 2, 3):
            wait_for(lambda i=i: c.try_get(i, b"after-19") == b"v19", 10, f"node {i} to catch up")  # type: ignore[misc]
    finally:
        c.stop_all()


def test_prometheus_metrics_are_served(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    write_many(cluster, 5, "m")
    text = cluster.scrape(leader)
    labels = f'cluster_id="test-cluster",node_id="{leader}"'
    assert f"dengine_leader_id{{{labels}}} {leader}.0" in text
    assert f'dengine_role{{{labels},role="leader"}} 1.0' in text
    proposals = [line for line in text.splitlines() if line.startswith("dengine_proposals_total{")]
    assert proposals and float(proposals[0].split()[-1]) >= 5
    assert "dengine_fsync_seconds_bucket" in text
    assert "dengine_peer_match_index" in text
    commits = [
        line for line in text.splitlines() if line.startswith("dengine_propose_to_commit_seconds_count")
    ]
    assert commits and float(commits[0].split()[-1]) >= 5
    follower = next(i for i in range(1, 4) if i != leader)
    # A node slow to start would refuse the connection instead (UNAVAILABLE, counted nowhere).
    wait_for(lambda: cluster.status(follower), 10, f"node {follower} to serve")
    with pytest.raises(grpc.RpcError) as refused:
        cluster.kv(follower).Put(kv_pb2.PutRequest(key=b"x", value=b"y"), timeout=3)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert 'code="FAILED_PRECONDITION"' in cluster.scrape(follower)


def _probe_until(cluster: ProcCluster, i: int, path: str, status: int, timeout: float) -> dict[str, Any]:
    def answered() -> dict[str, Any] | None:
        got, body = cluster.probe(i, path)
        return body if got == status else None

    return wait_for(answered, timeout, f"node {i}'s {path} to answer {status}")


def test_health_probes_say_whether_a_node_follows_a_leader(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    for i in range(1, 4):
        body = _probe_until(cluster, i, "/readyz", 200, 10)
        assert body["ready"] is True and body["leader"] == leader and body["id"] == i
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_ports[i - 1]}/livez", timeout=3) as r:
            assert r.status == 200
    survivor = next(i for i in range(1, 4) if i != leader)
    for i in range(1, 4):
        if i != survivor:
            cluster.kill(i)
    # Alone, the survivor loses its leader within an election timeout and campaigns in vain.
    body = _probe_until(cluster, survivor, "/readyz", 503, 10)
    assert body["ready"] is False and body["leader"] is None and "no leader" in body["reason"]
    status, body = cluster.probe(survivor, "/health")
    assert status == 503 and body["health"] == "false"
    for i in range(1, 4):
        if i != survivor:
            cluster.start(i)
    assert _probe_until(cluster, survivor, "/health", 200, 20)["health"] == "true"


def test_a_batch_of_gets_on_a_follower_answers_each_in_place(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    follower = next(i for i in range(1, 4) if i != leader)
    cluster.kv(leader).Batch(
        kv_pb2.BatchRequest(
            ops=[kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"g/%d" % i, value=b"%d" % i)) for i in range(3)]
        ),
        timeout=5,
    )

    def get(key: bytes, consistency: kv_pb2.Consistency = kv_pb2.LINEARIZABLE) -> kv_pb2.Operation:
        return kv_pb2.Operation(get=kv_pb2.GetRequest(key=key, consistency=consistency))

    ops = [get(b"g/2"), get(b""), get(b"g/missing"), get(b"g/0", kv_pb2.STALE), get(b"g/1")]
    results = cluster.kv(follower).Batch(kv_pb2.BatchRequest(ops=ops), timeout=5).results
    assert [r.WhichOneof("result") for r in results] == ["get", "error", "get", "get", "get"]
    assert results[1].error.startswith("INVALID_ARGUMENT")
    assert (results[0].get.kv.value, results[2].get.found, results[4].get.kv.value) == (b"2", False, b"1")
    # The linearizable gets were confirmed with the leader, so they saw the batch written above.
    assert results[0].get.revision == results[4].get.revision >= 3


def test_kv_service_batch_cas_range_watch_and_sessions(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    kv = cluster.kv(leader)
    watch = kv.Watch(kv_pb2.WatchRequest(prefix=b"w/", start_revision=1), timeout=20)
    ops = [kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"w/%d" % i, value=b"%d" % i)) for i in range(5)]
    ops.append(kv_pb2.Operation(get=kv_pb2.GetRequest(key=b"w/0")))
    ops.append(
        kv_pb2.Operation(
            cas=kv_pb2.CompareAndSwapRequest(key=b"w/1", has_expected=True, expected=b"1", value=b"x")
        )
    )
    ops.append(
        kv_pb2.Operation(
            cas=kv_pb2.CompareAndSwapRequest(key=b"w/2", has_expected=True, expected=b"?", value=b"y")
        )
    )
    ops.append(kv_pb2.Operation(delete=kv_pb2.DeleteRequest(key=b"w/4")))
    ops.append(kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"", value=b"bad")))
    results = kv.Batch(kv_pb2.BatchRequest(ops=ops), timeout=5).results
    assert [r.WhichOneof("result") for r in results] == ["put"] * 5 + ["get", "cas", "cas", "delete", "error"]
    assert results[6].cas.succeeded and not results[7].cas.succeeded
    assert results[7].cas.current.value == b"2"
    assert results[8].delete.deleted
    assert results[9].error.startswith("INVALID_ARGUMENT")
    listed = kv.Range(kv_pb2.RangeRequest(prefix=b"w/", limit=3), timeout=5)
    assert [x.key for x in listed.kvs] == [b"w/0", b"w/1", b"w/2"]
    assert [x.value for x in listed.kvs] == [b"0", b"x", b"2"]

    # A retried write with the same session is applied once and answered with the first result.
    session = kv_pb2.Session(client_id=77, sequence=1)
    first = kv.Put(kv_pb2.PutRequest(key=b"once", value=b"1", session=session), timeout=5)
    again = kv.Put(kv_pb2.PutRequest(key=b"once", value=b"1", session=session), timeout=5)
    assert first.revision == again.revision
    got = kv.Get(kv_pb2.GetRequest(key=b"once"), timeout=5)
    assert got.kv.version == 1

    seen: list[tuple[int, bytes]] = []
    for response in watch:
        seen.extend((e.type, e.kv.key) for e in response.events)
        if len(seen) >= 7:  # 5 puts, the successful CAS, the delete
            break
    watch.cancel()
    puts = [k for t, k in seen if t == kv_pb2.WatchEvent.PUT]
    deletes = [k for t, k in seen if t == kv_pb2.WatchEvent.DELETE]
    assert puts[:5] == [b"w/%d" % i for i in range(5)] and b"w/1" in puts[5:]
    assert deletes == [b"w/4"]


def test_dengine_cluster_starts_a_dev_cluster_and_stops_it_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dengine", "cluster", "--nodes", "3", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    endpoints = lines[1].removeprefix("endpoints: ").strip().split(",")
    assert len(endpoints) == 3
    channels = [grpc.insecure_channel(e) for e in endpoints]

    def leader() -> int | None:
        for ch in channels:
            try:
                s = cluster_pb2_grpc.ClusterStub(ch).Status(cluster_pb2.StatusRequest(), timeout=1)  # type: ignore[no-untyped-call]
            except grpc.RpcError:
                continue
            if s.role == "leader":
                return int(s.id)
        return None

    try:
        wait_for(leader, 20, "the dev cluster to elect a leader")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        for ch in channels:
            ch.close()
    assert proc.returncode == 0
    assert "cluster stopped" in out


def test_a_cluster_with_mutual_tls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_dev_certs(certs, ["node1", "node2", "node3"])
    with running_cluster(tmp_path, tls_dir=certs) as c:
        c.put(b"secure", b"yes")
        assert c.get(c.wait_leader(), b"secure") == b"yes"
        # Without a client certificate the server refuses the connection.
        anonymous = grpc.secure_channel(
            c.address(1), grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
        )
        with pytest.raises(grpc.RpcError):
            cluster_pb2_grpc.ClusterStub(anonymous).Status(cluster_pb2.StatusRequest(), timeout=3)  # type: ignore[no-untyped-call]
        anonymous.close()


def _install(path: Path, data: bytes) -> None:
    """Replaces a file the way a rotation tool does: written aside, then renamed over it."""
    aside = path.with_suffix(".new")
    aside.write_bytes(data)
    os.replace(aside, path)


def test_certificates_and_the_ca_rotate_under_a_running_cluster(tmp_path: Path) -> None:
    names = ["node1", "node2", "node3"]
    certs, new = tmp_path / "certs", tmp_path / "new"
    init_dev_certs(certs, names)
    init_dev_certs(new, names)  # another CA, and certificates it signed
    with running_cluster(tmp_path, tls_dir=certs) as c:
        c.put(b"before", b"1")
        # The order that needs no outage: trust both CAs, swap the certificates, drop the old CA.
        _install(certs / "ca.pem", (certs / "ca.pem").read_bytes() + (new / "ca.pem").read_bytes())
        for name in names:
            _install(certs / f"{name}.pem", (new / f"{name}.pem").read_bytes())
            _install(certs / f"{name}-key.pem", (new / f"{name}-key.pem").read_bytes())
        _install(certs / "ca.pem", (new / "ca.pem").read_bytes())

        # A client that knows only the new CA, with a certificate it signed, reaches every node:
        # each serves its new certificate and takes the new client certificate.
        creds = grpc.ssl_channel_credentials(
            *((new / name).read_bytes() for name in ("ca.pem", "client-key.pem", "client.pem"))
        )
        c.channels = {i: grpc.secure_channel(c.address(i), creds) for i in (1, 2, 3)}
        for i in (1, 2, 3):
            assert c.status(i, timeout=5) is not None, f"node {i} does not serve its new certificate"
            metric = r"^dengine_tls_certificate_expiry_timestamp_seconds\{.*\} (\S+)$"
            found = re.search(metric, c.scrape(i), re.M)
            assert found, "the expiry metric is missing"
            expiry = x509.load_pem_x509_certificate((new / f"node{i}.pem").read_bytes()).not_valid_after_utc
            assert float(found.group(1)) == expiry.timestamp()

        # New connections between the nodes use the new certificates: a restarted follower
        # trusts only the new CA, and its peers reconnect to it.
        leader = c.wait_leader()
        follower = next(i for i in (1, 2, 3) if i != leader)
        c.kill(follower)
        c.put(b"after", b"2")
        c.start(follower)
        wait_for(lambda: c.try_get(follower, b"after") == b"2", 20, f"node {follower} to catch up")
        assert c.get(c.wait_leader(), b"before") == b"1"


def test_a_tls_misconfiguration_stops_the_node_with_a_clear_error(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_dev_certs(certs, ["node1", "node2", "node3"])
    (certs / "node1-key.pem").write_bytes((certs / "node2-key.pem").read_bytes())  # wrong key
    c = ProcCluster(tmp_path, 3, tls_dir=certs)
    c.start(1)
    code = c.procs[1].wait(timeout=60)
    log = (tmp_path / "node1.log").read_text()
    assert code != 0
    assert "node1-key.pem" in log and "Traceback" not in log


def test_a_client_presents_a_rotated_certificate_without_a_restart(tmp_path: Path) -> None:
    certs, other, mine = tmp_path / "certs", tmp_path / "other", tmp_path / "client"
    init_dev_certs(certs, ["node1", "node2", "node3"])
    init_dev_certs(other, ["node1"])  # another CA: the cluster trusts nothing it signed
    mine.mkdir()
    _install(mine / "ca.pem", (certs / "ca.pem").read_bytes())
    for name in ("client.pem", "client-key.pem"):
        _install(mine / name, (other / name).read_bytes())
    with running_cluster(tmp_path, tls_dir=certs) as c:
        endpoints = [c.address(i) for i in (1, 2, 3)]

        async def main() -> None:
            files = ClientTLS(mine / "ca.pem", mine / "client.pem", mine / "client-key.pem")
            async with Client(endpoints, credentials=files, timeout=3) as client:
                # Every node refuses the handshake: Unavailable, or, when the deadline passes
                # while an attempt is out (a loaded machine makes handshakes slow), an unknown
                # outcome at the deadline: the client cannot tell an attempt that never reached
                # a node from one whose answer was lost.
                with pytest.raises((Unavailable, DeadlineExceeded)):
                    await client.put(b"rotated", b"no")
                # The right certificate arrives: the same client presents it at its next attempt.
                for name in ("client.pem", "client-key.pem"):
                    _install(mine / name, (certs / name).read_bytes())
                await client.put(b"rotated", b"yes", timeout=15)
                got = await client.get(b"rotated")
                assert got is not None and got.value == b"yes"
                assert files.generation == 2
                assert (
                    files.not_after
                    == x509.load_pem_x509_certificate((certs / "client.pem").read_bytes()).not_valid_after_utc
                )

        asyncio.run(main())


def test_the_cli_talks_to_a_mutual_tls_cluster(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_dev_certs(certs, ["node1", "node2", "node3"])
    with running_cluster(tmp_path, tls_dir=certs) as c:
        endpoints = ",".join(c.address(i) for i in range(1, 4))
        cli = tls_cli(endpoints, certs)

        assert cli("kv", "put", "tls-key", "tls-value").returncode == 0
        assert cli("kv", "get", "tls-key").stdout.strip() == "tls-value"
        assert cli("status").stdout.count(" ok") == 3


def test_a_watch_hears_progress_while_its_node_follows_a_leader_and_silence_after(
    cluster: ProcCluster,
) -> None:
    """Progress notices (responses without events) let a client tell an idle watch from a dead
    or cut-off node; a node that lost its leader stops sending them."""
    leader = cluster.wait_ready()
    follower = next(i for i in range(1, 4) if i != leader)
    revision = cluster.kv(leader).Put(kv_pb2.PutRequest(key=b"p", value=b"1"), timeout=5).revision

    async def main() -> None:
        async with grpc.aio.insecure_channel(cluster.address(follower)) as ch:
            call = kv_pb2_grpc.KVStub(ch).Watch(kv_pb2.WatchRequest(prefix=b"q/", start_revision=1))  # type: ignore[no-untyped-call]
            first = await asyncio.wait_for(call.read(), 5)  # the (empty) backlog
            assert not first.events
            # Notices carry the node's revision, which reaches the put's once the follower applies it.
            for _ in range(5):
                notice = await asyncio.wait_for(call.read(), 5)
                assert not notice.events
                if notice.revision >= revision:
                    break
            else:
                raise AssertionError(f"no notice reached revision {revision}")
            for i in range(1, 4):
                if i != follower:
                    cluster.kill(i)
            # Once the follower's election timeout passes it has no leader, and falls silent (a
            # notice or two may still come before that, or sit in the stream's buffer).
            deadline = time.monotonic() + 15
            while True:
                try:
                    await asyncio.wait_for(call.read(), 3)
                except asyncio.TimeoutError:  # not TimeoutError: the two differ before Python 3.11
                    break
                assert time.monotonic() < deadline, "notices kept coming after the node lost its leader"
            status = cluster.status(follower)
            assert status is not None and status.leader_id == 0
            call.cancel()

    asyncio.run(main())
