"""Tests for dengine.metrics: recorded values, label sets, exposition, and the /metrics endpoint
scraped over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dengine import metrics as metrics_module
from dengine.config import Config
from dengine.kv import KVStateMachine
from dengine.metrics import (
    APPEND_BATCH_BUCKETS,
    CONTENT_TYPE,
    FSYNC_BUCKETS,
    MetricsServer,
    NodeMetrics,
    serve_metrics,
)
from dengine.node import Node
from dengine.server import kv_services
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc, raft_pb2, raft_pb2_grpc
from test_node_embedded import Counter, configs, leader_of, started, until
from test_node_snapshots import left_behind_a_snapshot

T = TypeVar("T")

CONST = {"node_id": "1", "cluster_id": "c1"}


def value(m: NodeMetrics, name: str, **labels: str) -> float | None:
    node_labels = {"node_id": str(m.node_id), "cluster_id": m.cluster_id}
    return m.registry.get_sample_value(name, {**node_labels, **labels})


def series(m: NodeMetrics, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called ``name``."""
    return [s.labels for family in m.registry.collect() for s in family.samples if s.name == name]


def run_with_server(m: NodeMetrics, body: Callable[[MetricsServer], Awaitable[T]]) -> T:
    async def main() -> T:
        server = await serve_metrics(m, "127.0.0.1", 0)
        try:
            return await body(server)
        finally:
            await server.close()

    return asyncio.run(main())


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends raw bytes and reads until the server closes the connection (which it must)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, val = line.partition(":")
        headers[key.strip().lower()] = val.strip()
    assert status_line.startswith("HTTP/1.1 ")
    return int(status_line.split()[1]), headers, body


# -- recorded values --------------------------------------------------------------------------


def test_gauges_reflect_the_last_call() -> None:
    m = NodeMetrics(1, "c1")
    m.set_role("candidate", 4, None)
    m.set_indexes(commit=42, applied=40)
    assert value(m, "dengine_term") == 4
    assert value(m, "dengine_leader_id") == 0
    assert value(m, "dengine_commit_index") == 42
    assert value(m, "dengine_applied_index") == 40
    assert value(m, "dengine_role", role="candidate") == 1
    m.set_role("follower", 5, 3)
    m.set_indexes(commit=50, applied=50)
    assert value(m, "dengine_term") == 5
    assert value(m, "dengine_leader_id") == 3
    assert value(m, "dengine_commit_index") == 50
    assert value(m, "dengine_role", role="candidate") == 0
    assert value(m, "dengine_role", role="follower") == 1


def test_role_gauge_has_one_series_per_role_and_exactly_one_set() -> None:
    m = NodeMetrics(1, "c1")
    for role in ("follower", "pre-candidate", "candidate", "leader"):
        m.set_role(role, 1, None)
        roles = series(m, "dengine_role")
        assert sorted(r["role"] for r in roles) == ["candidate", "follower", "leader", "pre-candidate"]
        ones = [r["role"] for r in roles if value(m, "dengine_role", role=r["role"]) == 1]
        assert ones == [role]


def test_role_accepts_an_enum_and_rejects_unknown_names() -> None:
    class Role(enum.Enum):
        LEADER = "leader"

    m = NodeMetrics(1, "c1")
    m.set_role(Role.LEADER, 2, 1)
    assert value(m, "dengine_role", role="leader") == 1
    with pytest.raises(ValueError, match="role must be one of"):
        m.set_role("boss", 2, 1)


def test_leader_changes_count_new_leaders_only() -> None:
    m = NodeMetrics(1, "c1")
    m.set_role("follower", 1, None)
    assert value(m, "dengine_leader_changes_total") == 0
    m.set_role("follower", 1, 2)  # first leader seen
    m.set_role("follower", 1, 2)  # same leader, same term: not a change
    assert value(m, "dengine_leader_changes_total") == 1
    m.set_role("pre-candidate", 1, None)  # leader lost: not a change by itself
    assert value(m, "dengine_leader_changes_total") == 1
    m.set_role("follower", 2, 3)
    assert value(m, "dengine_leader_changes_total") == 2
    m.set_role("follower", 3, 3)  # same node, elected again in a later term
    assert value(m, "dengine_leader_changes_total") == 3


def test_proposals_total_and_failures_by_reason() -> None:
    m = NodeMetrics(1, "c1")
    m.proposals(10)
    m.proposals(3, failed_reason="not_leader")
    m.proposals(1, failed_reason="dropped")
    m.proposals(2, failed_reason="not_leader")
    assert value(m, "dengine_proposals_total") == 10
    assert value(m, "dengine_proposals_failed_total", reason="not_leader") == 5
    assert value(m, "dengine_proposals_failed_total", reason="dropped") == 1


def test_reads_grpc_errors_snapshots_membership() -> None:
    class StatusCode(enum.Enum):  # stands in for grpc.StatusCode, whose name is the label
        UNAVAILABLE = (14, "unavailable")

    m = NodeMetrics(1, "c1")
    m.read("linearizable", n=7)
    m.read("lease")
    m.grpc_error("/dengine.v1.Raft/AppendEntries", StatusCode.UNAVAILABLE)
    m.grpc_error("/dengine.v1.Raft/AppendEntries", "UNAVAILABLE")
    m.grpc_error("/dengine.v1.KV/Put", "DEADLINE_EXCEEDED")
    m.snapshot_done(1000, 0.2)
    m.snapshot_done(500, 3.0)
    m.membership_change("add_learner")
    assert value(m, "dengine_reads_total", consistency="linearizable") == 7
    assert value(m, "dengine_reads_total", consistency="lease") == 1
    append = "/dengine.v1.Raft/AppendEntries"
    assert value(m, "dengine_grpc_errors_total", method=append, code="UNAVAILABLE") == 2
    assert value(m, "dengine_grpc_errors_total", method="/dengine.v1.KV/Put", code="DEADLINE_EXCEEDED") == 1
    assert value(m, "dengine_snapshots_total") == 2
    assert value(m, "dengine_snapshot_bytes_total") == 1500
    assert value(m, "dengine_snapshot_duration_seconds_count") == 2
    assert value(m, "dengine_snapshot_duration_seconds_bucket", le="0.5") == 1
    assert value(m, "dengine_membership_changes_total", kind="add_learner") == 1


def test_weighted_latency_histogram_counts_every_proposal() -> None:
    m = NodeMetrics(1, "c1")
    m.observe_commit_latency(0.0003, n=128)
    m.observe_commit_latency(0.001, n=2)  # on a bound: belongs to that bucket (le is inclusive)
    m.observe_commit_latency(30.0)  # beyond the last bound: +Inf only
    m.observe_commit_latency(-1.0)  # a clock bug: ignored, not a corrupted sum
    m.observe_commit_latency(0.5, n=0)
    name = "dengine_propose_to_commit_seconds"
    assert value(m, f"{name}_count") == 131
    assert value(m, f"{name}_sum") == pytest.approx(0.0003 * 128 + 0.002 + 30.0)
    assert value(m, f"{name}_bucket", le="0.00025") == 0
    assert value(m, f"{name}_bucket", le="0.0005") == 128
    assert value(m, f"{name}_bucket", le="0.001") == 130
    assert value(m, f"{name}_bucket", le="10.0") == 130
    assert value(m, f"{name}_bucket", le="+Inf") == 131
    m.observe_apply_latency(0.002, n=5)
    assert value(m, "dengine_propose_to_apply_seconds_count") == 5


def test_latencies_recorded_together_count_as_if_one_by_one() -> None:
    one, many = NodeMetrics(1, "c1"), NodeMetrics(1, "c1")
    now, starts = 10.0, [9.9995, 9.999, 9.5, 10.0, 10.5]  # the last is in the future: dropped
    for t in starts:
        one.observe_apply_latency(now - t)
    many.observe_apply_latencies(now, starts)
    name = "dengine_propose_to_apply_seconds"
    buckets = [value(many, f"{name}_bucket", le=le) for le in ("0.0005", "0.001", "0.5", "+Inf")]
    assert buckets == [1, 3, 4, 4]  # 0.0, then 0.0005 and 0.001 plus float noise, then 0.5
    for le in ("0.0005", "0.001", "0.5", "+Inf"):
        assert value(many, f"{name}_bucket", le=le) == value(one, f"{name}_bucket", le=le), le
    assert value(many, f"{name}_count") == 4
    assert value(many, f"{name}_sum") == pytest.approx(value(one, f"{name}_sum"))


def test_fsync_and_append_batch_buckets() -> None:
    assert FSYNC_BUCKETS[0] == 0.00005
    assert FSYNC_BUCKETS[-1] == 1.0
    assert APPEND_BATCH_BUCKETS[0] == 1
    assert APPEND_BATCH_BUCKETS[-1] == 16384
    m = NodeMetrics(1, "c1")
    m.observe_fsync(0.00018)
    m.observe_append_batch(1)
    m.observe_append_batch(100)
    m.observe_append_batch(20000)
    assert value(m, "dengine_fsync_seconds_bucket", le="0.0001") == 0
    assert value(m, "dengine_fsync_seconds_bucket", le="0.00025") == 1
    assert value(m, "dengine_append_batch_entries_bucket", le="1.0") == 1
    assert value(m, "dengine_append_batch_entries_bucket", le="128.0") == 2
    assert value(m, "dengine_append_batch_entries_bucket", le="16384.0") == 2
    assert value(m, "dengine_append_batch_entries_count") == 3
    assert value(m, "dengine_append_batch_entries_sum") == 20101


# -- label sets -------------------------------------------------------------------------------


def test_peer_series_appear_and_are_removed() -> None:
    m = NodeMetrics(1, "c1")
    m.set_peer(2, match=90, lag=10, inflight=3)
    m.set_peer(3, match=100, lag=0, inflight=0)
    m.set_learner_lag(4, 5000)
    assert value(m, "dengine_peer_match_index", peer="2") == 90
    assert value(m, "dengine_peer_lag_entries", peer="2") == 10
    assert value(m, "dengine_peer_inflight_appends", peer="2") == 3
    assert value(m, "dengine_learner_lag_entries", peer="4") == 5000
    m.set_peer(2, match=100, lag=0, inflight=1)
    assert value(m, "dengine_peer_lag_entries", peer="2") == 0
    assert sorted(s["peer"] for s in series(m, "dengine_peer_lag_entries")) == ["2", "3"]
    m.remove_peer(2)
    m.remove_peer(99)  # unknown peer: nothing to do
    for name in ("dengine_peer_match_index", "dengine_peer_lag_entries", "dengine_peer_inflight_appends"):
        assert [s["peer"] for s in series(m, name)] == ["3"]
    m.clear_peers()
    assert series(m, "dengine_peer_match_index") == []
    assert series(m, "dengine_learner_lag_entries") == []


def test_every_series_carries_node_and_cluster_labels() -> None:
    m = NodeMetrics(7, "prod-eu")
    m.set_peer(2, 1, 1, 1)
    m.proposals(1, failed_reason="x")
    m.read("lease")
    m.grpc_error("m", "c")
    m.membership_change("remove")
    samples = [s for family in m.registry.collect() for s in family.samples]
    assert len(samples) > 50
    for sample in samples:
        assert sample.labels["node_id"] == "7", sample
        assert sample.labels["cluster_id"] == "prod-eu", sample


def test_caller_supplied_label_values_are_bounded() -> None:
    m = NodeMetrics(1, "c1")
    for i in range(1000):
        m.proposals(1, failed_reason=f"error message number {i}")
        m.read(f"level-{i}")
        m.grpc_error(f"/svc/M{i}", "UNKNOWN")
    failed = series(m, "dengine_proposals_failed_total")
    assert 1 < len(failed) <= 65
    total = sum(value(m, "dengine_proposals_failed_total", reason=s["reason"]) or 0 for s in failed)
    assert total == 1000  # folded into "other", not lost
    assert value(m, "dengine_proposals_failed_total", reason="other") == 1000 - 64
    assert len(series(m, "dengine_reads_total")) <= 65
    assert len(series(m, "dengine_grpc_errors_total")) <= 257


def test_two_nodes_in_one_process_do_not_collide() -> None:
    a = NodeMetrics(1, "c1")
    b = NodeMetrics(2, "c1")
    a.set_role("leader", 3, 1)
    b.set_role("follower", 3, 1)
    a.proposals(5)
    assert value(a, "dengine_role", role="leader") == 1
    assert value(b, "dengine_role", role="follower") == 1
    assert value(a, "dengine_proposals_total") == 5
    assert value(b, "dengine_proposals_total") == 0
    assert b'node_id="1"' not in b.render()
    # Nothing leaks into prometheus_client's process-wide default registry.
    assert REGISTRY.get_sample_value("dengine_term", {"node_id": "1", "cluster_id": "c1"}) is None


def test_one_registry_cannot_hold_two_nodes() -> None:
    shared = CollectorRegistry()
    m = NodeMetrics(1, "c1", registry=shared)
    assert m.registry is shared
    with pytest.raises(ValueError, match="Duplicated"):
        NodeMetrics(2, "c1", registry=shared)


def test_render_is_valid_text_exposition() -> None:
    m = NodeMetrics(1, "c1")
    m.set_role("leader", 2, 1)
    m.observe_fsync(0.001)
    m.proposals(3)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert families["dengine_role"].type == "gauge"
    assert families["dengine_proposals"].type == "counter"
    assert families["dengine_fsync_seconds"].type == "histogram"
    expected = {
        "dengine_term",
        "dengine_leader_id",
        "dengine_commit_index",
        "dengine_applied_index",
        "dengine_peer_match_index",
        "dengine_peer_lag_entries",
        "dengine_peer_inflight_appends",
        "dengine_learner_lag_entries",
        "dengine_leader_changes",
        "dengine_proposals_failed",
        "dengine_reads",
        "dengine_grpc_errors",
        "dengine_snapshots",
        "dengine_snapshot_bytes",
        "dengine_membership_changes",
        "dengine_propose_to_commit_seconds",
        "dengine_propose_to_apply_seconds",
        "dengine_append_batch_entries",
        "dengine_snapshot_duration_seconds",
    }
    assert expected <= set(families)
    assert all(name.startswith("dengine_") for name in families)


# -- the HTTP endpoint ------------------------------------------------------------------------


def test_scrape_over_a_socket_shows_recorded_values() -> None:
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        assert server.port != 0
        m.set_role("leader", 9, 1)
        m.proposals(12)
        status, headers, payload = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE
        assert "version=0.0.4" in headers["content-type"]
        assert int(headers["content-length"]) == len(payload)
        assert headers["connection"] == "close"
        text = payload.decode()
        assert 'dengine_term{cluster_id="c1",node_id="1"} 9.0' in text
        assert 'dengine_proposals_total{cluster_id="c1",node_id="1"} 12.0' in text
        # A later scrape sees later values.
        m.proposals(1)
        _, _, payload = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert 'dengine_proposals_total{cluster_id="c1",node_id="1"} 13.0' in payload.decode()

    run_with_server(m, body)


def test_scrape_with_urllib_from_a_thread() -> None:
    m = NodeMetrics(3, "c9")
    m.set_indexes(commit=77, applied=70)

    async def body(server: MetricsServer) -> None:
        def fetch() -> tuple[int, str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()

        status, content_type, text = await asyncio.to_thread(fetch)
        assert status == 200
        assert content_type == CONTENT_TYPE
        assert 'dengine_commit_index{cluster_id="c9",node_id="3"} 77.0' in text

        def fetch_missing() -> int:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
            except urllib.error.HTTPError as err:
                return err.code
            return 200

        assert await asyncio.to_thread(fetch_missing) == 404

    run_with_server(m, body)


def test_request_variants_that_are_served() -> None:
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        status, _, payload = await http(server.port, b"GET /metrics?x=1 HTTP/1.0\n\n")
        assert status == 200
        assert b"dengine_term" in payload
        status, _, _ = await http(server.port, b"GET http://localhost/metrics HTTP/1.1\r\n\r\n")
        assert status == 200
        status, headers, payload = await http(server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert payload == b""
        assert int(headers["content-length"]) > 1000

    run_with_server(m, body)


def test_other_paths_are_404_and_other_methods_405() -> None:
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        for path in (b"/", b"/metricsx", b"/metrics/", b"/favicon.ico"):
            status, _, payload = await http(server.port, b"GET " + path + b" HTTP/1.1\r\n\r\n")
            assert status == 404, path
            assert b"dengine_" not in payload
        status, headers, _ = await http(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"

    run_with_server(m, body)


def test_health_probes_answer_from_the_readiness_function() -> None:
    m = NodeMetrics(1, "c1")
    state: dict[str, Any] = {"ready": True, "facts": {"id": 1, "leader": 2, "reason": ""}}

    def readiness() -> tuple[bool, dict[str, object]]:
        if state.get("broken"):
            raise RuntimeError("status unavailable")
        return state["ready"], state["facts"]

    async def main() -> None:
        server = await serve_metrics(m, "127.0.0.1", 0, readiness=readiness)
        try:
            status, headers, payload = await http(server.port, b"GET /livez HTTP/1.1\r\n\r\n")
            assert (status, payload) == (200, b"ok\n")
            status, headers, payload = await http(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(payload) == {"ready": True, "id": 1, "leader": 2, "reason": ""}
            status, _, payload = await http(server.port, b"GET /health HTTP/1.1\r\n\r\n")
            assert status == 200 and json.loads(payload)["health"] == "true"
            state.update(ready=False, facts={"id": 1, "leader": None, "reason": "no leader known"})
            status, _, payload = await http(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
            assert status == 503 and json.loads(payload)["reason"] == "no leader known"
            status, _, payload = await http(server.port, b"GET /health HTTP/1.1\r\n\r\n")
            assert status == 503 and json.loads(payload)["health"] == "false"
            status, headers, payload = await http(server.port, b"HEAD /readyz HTTP/1.1\r\n\r\n")
            assert status == 503 and payload == b"" and int(headers["content-length"]) > 0
            status, _, _ = await http(server.port, b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert status == 405
            state["broken"] = True
            status, _, _ = await http(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
            assert status == 500
            status, _, _ = await http(server.port, b"GET /livez HTTP/1.1\r\n\r\n")
            assert status == 200
        finally:
            await server.close()

    asyncio.run(main())


def test_without_a_readiness_function_only_metrics_are_served() -> None:
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        for path in (b"/livez", b"/readyz", b"/health"):
            status, _, _ = await http(server.port, b"GET " + path + b" HTTP/1.1\r\n\r\n")
            assert status == 404, path

    run_with_server(m, body)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        b"hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"get /metrics HTTP/1.1\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # head cut short by the client's half-close
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX: " + b"b" * 20_000 + b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    ],
)
def test_malformed_requests_get_400_and_the_server_keeps_serving(raw: bytes) -> None:
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 5)  # returns: the server closed the connection
        writer.close()
        await writer.wait_closed()
        assert data.startswith(b"HTTP/1.1 400 "), data[:100]
        status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200

    run_with_server(m, body)


def test_a_client_that_sends_nothing_gets_nothing() -> None:
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200

    run_with_server(m, body)


def test_a_slow_client_times_out_with_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_READ_TIMEOUT", 0.2)
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        assert data.startswith(b"HTTP/1.1 408 ")

    run_with_server(m, body)


def test_connections_beyond_the_cap_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_MAX_CONNECTIONS", 1)
    m = NodeMetrics(1, "c1")

    async def body(server: MetricsServer) -> None:
        _, idle = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.05)  # let the server accept the idle connection
        status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 503
        idle.close()
        await idle.wait_closed()
        await asyncio.sleep(0.05)
        status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200

    run_with_server(m, body)


def test_close_drops_idle_connections_and_stops_listening() -> None:
    m = NodeMetrics(1, "c1")

    async def main() -> None:
        server = await serve_metrics(m, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.close(), 5)  # does not wait for the idle client
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)
        await server.close()  # a second close is harmless

    asyncio.run(main())


def test_server_as_async_context_manager() -> None:
    m = NodeMetrics(1, "c1")

    async def main() -> None:
        async with await serve_metrics(m, "127.0.0.1", 0) as server:
            status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status == 200
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)

    asyncio.run(main())


# -- live nodes: what a running cluster records, scraped from its endpoint ---------------------


def kv_configs(root: Path, n: int = 3, **sections: dict[str, object]) -> list[Config]:
    """``n`` KV nodes on 127.0.0.1, each with its own metrics endpoint; ``sections`` adds config
    sections (``membership={...}``)."""
    return configs(root, n, metrics=True, cluster_id="live", **sections)


@contextlib.asynccontextmanager
async def kv_cluster(
    root: Path, n: int = 3, **sections: dict[str, object]
) -> AsyncIterator[tuple[Node, list[Node]]]:
    """A started KV cluster: (its leader, every node); a test may add nodes to the list."""
    nodes = []
    for cfg in kv_configs(root, n, **sections):
        sm = KVStateMachine()
        nodes.append(Node(cfg, sm, extra_services=kv_services(sm)))
    try:
        for node in nodes:
            await node.start()
        leader = await until(lambda: leader_of(nodes))
        yield leader, nodes
    finally:
        for node in nodes:
            await node.stop(transfer_leadership=False)


async def scrape(node: Node) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The node's samples as served at its ``/metrics``: (name, labels without node/cluster) -> value."""

    def get() -> str:
        url = f"http://{node.config.node.metrics_listen}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for s in family.samples:
            assert s.labels["node_id"] == str(node.id)
            labels = frozenset((k, v) for k, v in s.labels.items() if k not in CONST)
            out[(s.name, labels)] = s.value
    return out


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grpc_errors(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[tuple[str, str], float]:
    """(method, code) -> count of dengine_grpc_errors_total."""
    found = {}
    for (name, labels), count in samples.items():
        if name == "dengine_grpc_errors_total":
            d = dict(labels)
            found[(d["method"], d["code"])] = count
    return found


def test_batched_gets_are_counted_one_read_each(tmp_path: Path) -> None:
    async def main() -> None:
        async with kv_cluster(tmp_path) as (leader, _):
            before = await scrape(leader)
            request = kv_pb2.BatchRequest()
            levels = {kv_pb2.LINEARIZABLE: "linearizable", kv_pb2.LEASE: "lease", kv_pb2.STALE: "stale"}
            for level in levels:
                for i in range(50):
                    request.ops.add().get.CopyFrom(kv_pb2.GetRequest(key=b"k%d" % i, consistency=level))
            async with grpc.aio.insecure_channel(leader.config.node.listen) as channel:
                response = await kv_pb2_grpc.KVStub(channel).Batch(request)  # type: ignore[no-untyped-call]
            assert len(response.results) == 150
            assert not any(r.HasField("error") for r in response.results)
            after = await scrape(leader)
            for name in levels.values():
                counted = sample(after, "dengine_reads_total", consistency=name)
                counted -= sample(before, "dengine_reads_total", consistency=name)
                assert counted == 50, name

    asyncio.run(main())


def test_an_automatic_promotion_is_one_membership_change_and_drops_the_learner_lag(tmp_path: Path) -> None:
    membership: dict[str, object] = {"promote": "auto", "caught_up_for_ms": 200, "max_lag_entries": 10}

    async def main() -> None:
        async with kv_cluster(tmp_path, membership=membership) as (leader, nodes):
            before = await scrape(leader)
            d = kv_configs(tmp_path / "joiner", 1, membership=membership)[0].to_dict()
            d["node"]["id"] = 4
            d["cluster"] = {**leader.config.to_dict()["cluster"], "initial_state": "existing"}
            sm = KVStateMachine()
            joiner = Node(
                Config.from_dict(d), sm, extra_services=kv_services(sm), join=leader.config.node.listen
            )
            nodes.append(joiner)
            await joiner.start()
            await until(lambda: 4 in leader.raft.conf.voters, timeout=20)  # type: ignore[union-attr]
            # The leader's next membership check (every ten ticks, later under load) drops the lag.
            await until(lambda: not series(leader.metrics, "dengine_learner_lag_entries"))
            await asyncio.sleep(0.3)  # a few membership checks after the promotion
            after = await scrape(leader)
            changes = {
                dict(labels)["kind"]: value - before.get((name, labels), 0.0)
                for (name, labels), value in after.items()
                if name == "dengine_membership_changes_total"
            }
            assert changes == {"add_learner": 1, "promote": 1}
            assert not [k for k in after if k[0] == "dengine_learner_lag_entries"], "4 is no learner"

    asyncio.run(main())


def test_a_snapshot_sent_to_a_follower_is_counted_on_the_leader(tmp_path: Path) -> None:
    cfgs = configs(
        tmp_path, metrics=True, snapshot={"entries": 100, "trailing_entries": 10, "chunk_bytes": 4096}
    )

    async def main() -> None:
        async with started(cfgs) as nodes:
            index = await left_behind_a_snapshot(nodes, 300)  # 200 could leave the log uncompacted past 100
            leader = await until(lambda: leader_of(nodes))
            before = await scrape(leader)
            nodes[index] = back = Node(cfgs[index], state_machine=Counter())
            await back.start()
            await until(lambda: back.snapshots.installed == 1)
            after = await scrape(leader)
            assert (
                sample(after, "dengine_snapshots_sent_total") - sample(before, "dengine_snapshots_sent_total")
                == 1
            )
            size = leader.snapshots.latest.size  # type: ignore[union-attr]
            sent = sample(after, "dengine_snapshot_sent_bytes_total")
            assert sent - sample(before, "dengine_snapshot_sent_bytes_total") == size
            installed = await scrape(back)
            assert sample(installed, "dengine_snapshots_total") == 1
            assert sample(installed, "dengine_snapshots_sent_total") == 0

    asyncio.run(main())


def test_refused_calls_and_failed_operations_are_counted_as_grpc_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with kv_cluster(tmp_path) as (leader, nodes):
            for node in nodes:  # what node.py does once it wires the transport to its metrics
                assert node.transport is not None
                node.transport.on_grpc_error = node.metrics.grpc_error
            follower = next(n for n in nodes if n is not leader)
            async with grpc.aio.insecure_channel(follower.config.node.listen) as channel:
                # Three writes in one batch sent to a follower: each answered FAILED_PRECONDITION.
                batch = kv_pb2.BatchRequest()
                for i in range(3):
                    batch.ops.add().put.CopyFrom(kv_pb2.PutRequest(key=b"k%d" % i, value=b"v"))
                kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
                answer = await kv.Batch(batch)
                assert all(r.error.startswith("FAILED_PRECONDITION") for r in answer.results)
                # A membership change asked of a follower.
                cluster = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await cluster.Promote(cluster_pb2.PromoteRequest(id=9))
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                # A peer message from another cluster.
                raft = raft_pb2_grpc.RaftStub(channel)  # type: ignore[no-untyped-call]
                stranger = raft_pb2.RaftBatch(
                    messages=[raft_pb2.RaftMessage(cluster_id="other", to=follower.id)]
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await raft.Messages(iter([stranger]))
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            errors = grpc_errors(await scrape(follower))
            assert errors[("Batch", "FAILED_PRECONDITION")] == 3
            assert errors[("Promote", "FAILED_PRECONDITION")] == 1
            assert errors[("Messages", "FAILED_PRECONDITION")] == 1
            # A peer that went away: the leader's stream to it fails, and is counted.
            await follower.stop(transfer_leadership=False)
            out = {"method": "Messages/out", "code": "UNAVAILABLE"}
            await until(lambda: value(leader.metrics, "dengine_grpc_errors_total", **out))
            assert grpc_errors(await scrape(leader))[("Messages/out", "UNAVAILABLE")] >= 1

    asyncio.run(main())
