"""Prometheus metrics of one node, and a small asyncio HTTP endpoint that serves them.

:class:`NodeMetrics` is a prometheus_client *collector* with its own
:class:`~prometheus_client.CollectorRegistry`, never the process-wide default registry: tests run
several nodes in one process and each must expose only its own series.

Why a custom collector rather than ``Gauge``/``Counter``/``Histogram`` objects: the runtime calls
the recording methods on its hot path (once per batch), so recording is a plain attribute store or
dict update with no lock, and the Prometheus families are built only when someone scrapes. It also
allows weighted histogram observations (``observe_commit_latency(seconds, n=128)`` records 128
proposals in O(1)), which prometheus_client's ``Histogram`` cannot do. Recording is meant to happen
on the node's event loop; a scrape from another thread sees a consistent-enough snapshot (each
histogram's counts are copied at once) but no cross-metric atomicity.

Constant labels: every series carries ``node_id`` and ``cluster_id`` as ordinary labels (the
first two label names of every family), so series of several nodes can be merged by a scraper
without relabelling. Labels whose values come from callers (failure reason, read consistency,
gRPC method/code, membership change kind) are bounded: past a fixed number of distinct values, new
ones are counted under ``"other"`` so a bug that passes, say, an error message as a reason cannot
blow up the series count.

Metric names (counters are exposed with the ``_total`` suffix, histograms as ``_bucket``,
``_sum`` and ``_count``)::

    dengine_role{role}                      1 for the current role, 0 for the three others
    dengine_term                            current term
    dengine_leader_id                       known leader's id, 0 when none is known
    dengine_commit_index / dengine_applied_index
    dengine_peer_match_index{peer}          leader only: highest index known replicated on peer
    dengine_peer_lag_entries{peer}          leader only: leader's last index minus peer's match
    dengine_peer_inflight_appends{peer}     leader only: AppendEntries sent and not yet answered
    dengine_learner_lag_entries{peer}       leader only: lag of a learner being caught up
    dengine_leader_changes_total
    dengine_proposals_total                 proposals submitted to this node, whatever their fate
    dengine_proposals_failed_total{reason}
    dengine_reads_total{consistency}
    dengine_grpc_errors_total{method,code}
    dengine_snapshots_total / dengine_snapshot_bytes_total           created or installed
    dengine_snapshots_sent_total / dengine_snapshot_sent_bytes_total leader: sent to followers
    dengine_membership_changes_total{kind}
    dengine_propose_to_commit_seconds / dengine_propose_to_apply_seconds   histograms
    dengine_fsync_seconds / dengine_append_batch_entries / dengine_snapshot_duration_seconds
    dengine_snapshot_send_seconds                                     histogram

:func:`serve_metrics` exposes ``GET /metrics`` with a deliberately tiny HTTP/1.1 server on the
node's own event loop (no threads): one request per connection, bounded request size, read and
write timeouts, and a cap on concurrent connections, so a misbehaving scraper cannot stall the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Final, TypeVar
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = [
    "APPEND_BATCH_BUCKETS",
    "CONTENT_TYPE",
    "FSYNC_BUCKETS",
    "LATENCY_BUCKETS",
    "ROLES",
    "SNAPSHOT_DURATION_BUCKETS",
    "MetricsServer",
    "NodeMetrics",
    "serve_metrics",
]

_log = logging.getLogger(__name__)

ROLES: Final = ("follower", "pre-candidate", "candidate", "leader")
"""Values of the ``role`` label of ``dengine_role`` (those of :class:`dengine.raft.messages.Role`)."""

FSYNC_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
"""Seconds, 50 µs to 1 s: a synced 4 KiB write costs about 180 µs on an SSD, a slow disk 10+ ms."""

LATENCY_BUCKETS: Final = (*FSYNC_BUCKETS, 2.5, 5.0, 10.0)
"""Seconds, for propose-to-commit/apply: like fsync, plus the tail of a leader change."""

APPEND_BATCH_BUCKETS: Final = tuple(float(1 << i) for i in range(15))
"""Entries per appended batch: powers of two from 1 to 16384."""

SNAPSHOT_DURATION_BUCKETS: Final = (
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Seconds to create or install a snapshot."""

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""The Prometheus text exposition format 0.0.4, which is what :meth:`NodeMetrics.render` emits."""

_CONST_LABELS: Final = ("node_id", "cluster_id")

_OTHER: Final = "other"
"""Label value that absorbs caller-supplied label values beyond the cardinality bound."""

_MAX_LABEL_VALUES: Final = 64
"""Distinct caller-supplied values kept per labelled counter (gRPC errors: per (method, code))."""

_MAX_GRPC_LABEL_PAIRS: Final = 256

_K = TypeVar("_K")


def _bump(table: dict[_K, int], key: _K, n: int, limit: int, overflow: _K) -> None:
    """Adds ``n`` to ``table[key]``, folding new keys into ``overflow`` once ``limit`` keys exist."""
    if key in table:
        table[key] += n
    elif len(table) < limit:
        table[key] = n
    else:
        table[overflow] = table.get(overflow, 0) + n


class _Histogram:
    """A cumulative-bucket histogram that accepts weighted observations in O(log buckets)."""

    __slots__ = ("_bounds", "_counts", "_les", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._les = [repr(float(b)) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        # Negative or NaN values (a clock bug) are dropped: they would corrupt _sum for good.
        if n <= 0 or not value >= 0.0:
            return
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        self._counts[bisect_left(self._bounds, value)] += n
        self._sum += value * n

    def observe_since(self, now: float, starts: Sequence[float]) -> None:
        """``observe(now - t)`` for each ``t`` in ``starts``, in one call: the apply loop records
        every answered proposal's latency."""
        bounds, counts, total = self._bounds, self._counts, 0.0
        for t in starts:
            value = now - t
            if value >= 0.0:
                counts[bisect_left(bounds, value)] += 1
                total += value
        self._sum += total

    def family(self, name: str, documentation: str, labelvalues: Sequence[str]) -> HistogramMetricFamily:
        counts = list(self._counts)  # one snapshot, so the buckets agree with each other
        total_sum = self._sum
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(self._les, counts, strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        family = HistogramMetricFamily(name, documentation, labels=_CONST_LABELS)
        family.add_metric(labelvalues, buckets, total_sum)
        return family


def _label_value(value: str | enum.Enum) -> str:
    return value.name if isinstance(value, enum.Enum) else str(value)


class NodeMetrics:
    """The Prometheus metrics of one node, registered in their own registry.

    ``registry`` defaults to a new :class:`~prometheus_client.CollectorRegistry`; pass one to add
    other collectors (e.g. ``ProcessCollector(registry=...)``) next to the node's. Registering two
    ``NodeMetrics`` in the same registry raises ``ValueError`` (duplicated timeseries).

    Every recording method is O(1) and lock-free; call them per batch, not per entry.
    """

    def __init__(self, node_id: int, cluster_id: str, registry: CollectorRegistry | None = None) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._labels = (str(node_id), cluster_id)
        self._role = "follower"
        self._term = 0
        self._leader: int | None = None
        self._commit = 0
        self._applied = 0
        # peer id -> (match index, lag in entries, in-flight appends)
        self._peers: dict[int, tuple[int, int, int]] = {}
        self._learner_lag: dict[int, int] = {}
        self._tls_expiry: float | None = None
        self._leader_changes = 0
        self._proposals = 0
        self._proposals_failed: dict[str, int] = {}
        self._reads: dict[str, int] = {}
        self._grpc_errors: dict[tuple[str, str], int] = {}
        self._snapshots = 0
        self._snapshot_bytes = 0
        self._snapshots_sent = 0
        self._snapshot_sent_bytes = 0
        self._snapshot_send_duration = _Histogram(SNAPSHOT_DURATION_BUCKETS)
        self._membership_changes: dict[str, int] = {}
        self._commit_latency = _Histogram(LATENCY_BUCKETS)
        self._apply_latency = _Histogram(LATENCY_BUCKETS)
        self._fsync = _Histogram(FSYNC_BUCKETS)
        self._append_batch = _Histogram(APPEND_BATCH_BUCKETS)
        self._snapshot_duration = _Histogram(SNAPSHOT_DURATION_BUCKETS)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self)

    # -- recording ---------------------------------------------------------------------------

    def set_role(self, role: str | enum.Enum, term: int, leader: int | None) -> None:
        """Records the node's role (a :data:`ROLES` value or a ``Role`` enum member), term and known
        leader (``None`` when unknown). A leader change is counted whenever a non-``None`` leader
        differs from the previously recorded (leader, term): a new node, or the same node elected
        again in a later term."""
        name = role.value if isinstance(role, enum.Enum) else role
        if name not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {name!r}")
        if leader is not None and (leader != self._leader or term != self._term):
            self._leader_changes += 1
        self._role = name
        self._term = term
        self._leader = leader

    def set_indexes(self, commit: int, applied: int) -> None:
        """Records the commit index and the index last applied to the state machine."""
        self._commit = commit
        self._applied = applied

    def proposals(self, n: int, failed_reason: str | None = None) -> None:
        """Counts proposals. Without ``failed_reason``: ``n`` proposals were submitted (count each
        proposal once, when it arrives, whatever its fate). With ``failed_reason``: ``n`` of the
        submitted proposals failed for that reason (e.g. ``"not_leader"``, ``"dropped"``); this does
        not add to ``dengine_proposals_total``."""
        if failed_reason is None:
            self._proposals += n
        else:
            _bump(self._proposals_failed, failed_reason, n, _MAX_LABEL_VALUES, _OTHER)

    def observe_commit_latency(self, seconds: float, n: int = 1) -> None:
        """Records ``n`` proposals that took ``seconds`` from propose to commit."""
        self._commit_latency.observe(seconds, n)

    def observe_apply_latency(self, seconds: float, n: int = 1) -> None:
        """Records ``n`` proposals that took ``seconds`` from propose to applied."""
        self._apply_latency.observe(seconds, n)

    def observe_apply_latencies(self, now: float, started: Sequence[float]) -> None:
        """Records proposals made at the ``started`` times and applied at ``now``."""
        self._apply_latency.observe_since(now, started)

    def observe_fsync(self, seconds: float) -> None:
        """Records the duration of one log sync (one group commit)."""
        self._fsync.observe(seconds)

    def observe_append_batch(self, entries: int) -> None:
        """Records the size, in entries, of one batch appended to the log."""
        self._append_batch.observe(entries)

    def set_peer(self, peer: int, match: int, lag: int, inflight: int) -> None:
        """Records a peer's replication progress as seen by the leader."""
        self._peers[peer] = (match, lag, inflight)

    def set_tls_expiry(self, timestamp: float) -> None:
        """Records when the node's TLS certificate in use expires (Unix time)."""
        self._tls_expiry = timestamp

    def set_learner_lag(self, peer: int, lag: int) -> None:
        """Records how many entries a learner being caught up is behind the leader's last index."""
        self._learner_lag[peer] = lag

    def keep_learners(self, learners: Collection[int]) -> None:
        """Drops the learner lag of every peer not in ``learners`` (promoted, or removed)."""
        for peer in [p for p in self._learner_lag if p not in learners]:
            del self._learner_lag[peer]

    def remove_peer(self, peer: int) -> None:
        """Drops every per-peer series of ``peer`` (it left the cluster)."""
        self._peers.pop(peer, None)
        self._learner_lag.pop(peer, None)

    def clear_peers(self) -> None:
        """Drops every per-peer series: call it when the node stops being leader, since progress
        of the peers is only known, and only meaningful, on the leader."""
        self._peers.clear()
        self._learner_lag.clear()

    def read(self, consistency: str, n: int = 1) -> None:
        """Counts ``n`` reads served with ``consistency`` (e.g. ``"linearizable"``, ``"lease"``,
        ``"stale"``)."""
        _bump(self._reads, consistency, n, _MAX_LABEL_VALUES, _OTHER)

    def grpc_error(self, method: str, code: str | enum.Enum, n: int = 1) -> None:
        """Counts ``n`` failed gRPC calls (or failed operations of one batch call). ``code`` is a
        ``grpc.StatusCode`` (its name is used) or a string such as ``"UNAVAILABLE"``."""
        key = (method, _label_value(code))
        _bump(self._grpc_errors, key, n, _MAX_GRPC_LABEL_PAIRS, (_OTHER, _OTHER))

    def snapshot_done(self, nbytes: int, seconds: float) -> None:
        """Counts one snapshot created or installed, its size and its duration."""
        self._snapshots += 1
        self._snapshot_bytes += nbytes
        self._snapshot_duration.observe(seconds)

    def snapshot_sent(self, nbytes: int, seconds: float) -> None:
        """Counts one snapshot sent to a follower that installed it, the bytes sent (from the
        offset the follower resumed at) and the transfer's duration."""
        self._snapshots_sent += 1
        self._snapshot_sent_bytes += nbytes
        self._snapshot_send_duration.observe(seconds)

    def membership_change(self, kind: str) -> None:
        """Counts one applied membership change (e.g. ``"add_learner"``, ``"promote"``,
        ``"remove"``)."""
        _bump(self._membership_changes, kind, 1, _MAX_LABEL_VALUES, _OTHER)

    # -- exposition ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry's series in the Prometheus text format 0.0.4 (see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def describe(self) -> Iterable[Metric]:
        """Lets the registry reserve the names (prometheus_client collector protocol)."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """Builds the families from the recorded state (prometheus_client collector protocol)."""
        return list(self._families())

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=_CONST_LABELS)
        family.add_metric(self._labels, value)
        return family

    def _counter(self, name: str, documentation: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, documentation, labels=_CONST_LABELS)
        family.add_metric(self._labels, value)
        return family

    def _labelled_counter(
        self, name: str, documentation: str, label: str, table: dict[str, int]
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(name, documentation, labels=(*_CONST_LABELS, label))
        for value, count in list(table.items()):
            family.add_metric((*self._labels, value), count)
        return family

    def _families(self) -> Iterator[Metric]:
        labels = self._labels
        role = GaugeMetricFamily(
            "dengine_role",
            "1 for the node's current Raft role, 0 for the others.",
            labels=(*_CONST_LABELS, "role"),
        )
        for name in ROLES:
            role.add_metric((*labels, name), 1.0 if name == self._role else 0.0)
        yield role
        yield self._gauge("dengine_term", "Current Raft term.", self._term)
        yield self._gauge(
            "dengine_leader_id", "Id of the known leader, 0 when none is known.", self._leader or 0
        )
        yield self._gauge("dengine_commit_index", "Highest log index known to be committed.", self._commit)
        yield self._gauge(
            "dengine_applied_index", "Highest log index applied to the state machine.", self._applied
        )
        expiry = GaugeMetricFamily(
            "dengine_tls_certificate_expiry_timestamp_seconds",
            "With TLS: when the node certificate in use expires (Unix time); follows reloads.",
            labels=_CONST_LABELS,
        )
        if self._tls_expiry is not None:
            expiry.add_metric(labels, self._tls_expiry)
        yield expiry

        peer_labels = (*_CONST_LABELS, "peer")
        match = GaugeMetricFamily(
            "dengine_peer_match_index",
            "Leader only: highest log index known to be replicated on the peer.",
            labels=peer_labels,
        )
        lag = GaugeMetricFamily(
            "dengine_peer_lag_entries",
            "Leader only: entries the peer is behind the leader's last log index.",
            labels=peer_labels,
        )
        inflight = GaugeMetricFamily(
            "dengine_peer_inflight_appends",
            "Leader only: AppendEntries sent to the peer and not yet answered.",
            labels=peer_labels,
        )
        for peer, (peer_match, peer_lag, peer_inflight) in sorted(self._peers.items()):
            values = (*labels, str(peer))
            match.add_metric(values, peer_match)
            lag.add_metric(values, peer_lag)
            inflight.add_metric(values, peer_inflight)
        learner = GaugeMetricFamily(
            "dengine_learner_lag_entries",
            "Leader only: entries a learner being caught up is behind the leader's last log index.",
            labels=peer_labels,
        )
        for peer, learner_lag in sorted(self._learner_lag.items()):
            learner.add_metric((*labels, str(peer)), learner_lag)
        yield from (match, lag, inflight, learner)

        yield self._counter(
            "dengine_leader_changes", "Times a new leader was observed by this node.", self._leader_changes
        )
        yield self._counter(
            "dengine_proposals", "Proposals submitted to this node, whatever their outcome.", self._proposals
        )
        yield self._labelled_counter(
            "dengine_proposals_failed", "Proposals that failed, by reason.", "reason", self._proposals_failed
        )
        yield self._labelled_counter(
            "dengine_reads", "Reads served, by consistency level.", "consistency", self._reads
        )
        grpc_errors = CounterMetricFamily(
            "dengine_grpc_errors",
            "Failed gRPC calls, by method and status code.",
            labels=(*_CONST_LABELS, "method", "code"),
        )
        for (method, code), count in list(self._grpc_errors.items()):
            grpc_errors.add_metric((*labels, method, code), count)
        yield grpc_errors
        yield self._counter("dengine_snapshots", "Snapshots created or installed.", self._snapshots)
        yield self._counter(
            "dengine_snapshot_bytes", "Bytes of snapshots created or installed.", self._snapshot_bytes
        )
        yield self._counter(
            "dengine_snapshots_sent", "Snapshots sent to followers that installed them.", self._snapshots_sent
        )
        yield self._counter(
            "dengine_snapshot_sent_bytes", "Bytes of snapshots sent to followers.", self._snapshot_sent_bytes
        )
        yield self._labelled_counter(
            "dengine_membership_changes",
            "Membership changes applied, by kind.",
            "kind",
            self._membership_changes,
        )

        yield self._commit_latency.family(
            "dengine_propose_to_commit_seconds", "Time from proposal to commit, per proposal.", labels
        )
        yield self._apply_latency.family(
            "dengine_propose_to_apply_seconds", "Time from proposal to applied, per proposal.", labels
        )
        yield self._fsync.family("dengine_fsync_seconds", "Duration of one log sync (group commit).", labels)
        yield self._append_batch.family(
            "dengine_append_batch_entries", "Entries per batch appended to the log.", labels
        )
        yield self._snapshot_duration.family(
            "dengine_snapshot_duration_seconds", "Time to create or install a snapshot.", labels
        )
        yield self._snapshot_send_duration.family(
            "dengine_snapshot_send_seconds", "Time to send a snapshot to a follower.", labels
        )


# -- HTTP endpoint -------------------------------------------------------------------------------

_MAX_LINE: Final = 8 * 1024
"""Longest request or header line accepted; longer is a 400."""

_MAX_HEADER_BYTES: Final = 32 * 1024
_MAX_HEADERS: Final = 100
_READ_TIMEOUT: Final = 10.0
"""Seconds a client has to send its whole request head (protects against slow-loris clients)."""

_WRITE_TIMEOUT: Final = 10.0
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 256 * 1024
_MAX_CONNECTIONS: Final = 32
_HTTP_VERSIONS: Final = ("HTTP/1.0", "HTTP/1.1")

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """Reads one request head; returns (method, path), or None if the client sent nothing."""
    line = await _read_line(reader)
    if not line:
        return None
    request = _parse_request_line(line)
    header_bytes = 0
    for _ in range(_MAX_HEADERS + 1):
        header = await _read_line(reader)
        if header in (b"\r\n", b"\n"):
            return request
        header_bytes += len(header)
        if header_bytes > _MAX_HEADER_BYTES or b":" not in header:
            raise _BadRequest("malformed headers")
    raise _BadRequest("too many headers")


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """One line, complete with its newline, or b"" at a clean end of stream."""
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError) as err:  # longer than the reader's limit
        raise _BadRequest("line too long") from err
    if line and not line.endswith(b"\n"):
        raise _BadRequest("truncated request")
    return line


def _parse_request_line(line: bytes) -> tuple[str, str]:
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise _BadRequest("request line is not ASCII") from err
    parts = text.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper() or parts[2] not in _HTTP_VERSIONS:
        raise _BadRequest("malformed request line")
    method, target, _ = parts
    if target.startswith("/"):
        return method, target.split("?", 1)[0]
    if target.startswith(("http://", "https://")):  # absolute form, as sent to proxies
        return method, urlsplit(target).path or "/"
    raise _BadRequest("malformed request target")


def _response(
    status: int, body: bytes, content_type: str, *, head_only: bool = False, extra: str = ""
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def _text(status: int, message: str, extra: str = "") -> bytes:
    return _response(status, message.encode() + b"\n", "text/plain; charset=utf-8", extra=extra)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-closes, then discards what the client still sends, briefly: closing a socket with
    unread input makes the kernel send a reset, which can destroy the 400 before the client reads it."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LINGER_SECONDS
        discarded = 0
        while discarded < _LINGER_BYTES:
            chunk = await asyncio.wait_for(reader.read(64 * 1024), max(deadline - loop.time(), 0.0))
            if not chunk:
                break
            discarded += len(chunk)


Readiness = Callable[[], tuple[bool, dict[str, object]]]
"""Whether a node is ready to serve, and what it knows (id, role, term, leader...), for the
``/readyz`` and ``/health`` probes; ``reason`` says why not when it is not."""


class MetricsServer:
    """A running ``/metrics`` endpoint, with health probes; see :func:`serve_metrics`."""

    def __init__(self, metrics: NodeMetrics, readiness: Readiness | None = None) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=_MAX_LINE)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stops listening and drops connections still being served."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if len(self._handlers) > _MAX_CONNECTIONS:
                await self._send(writer, _text(503, "too many connections"))
                return
            try:
                request = await asyncio.wait_for(_read_request(reader), _READ_TIMEOUT)
            except _BadRequest as err:
                await self._send(writer, _text(400, f"bad request: {err}"))
                await _linger(reader, writer)
                return
            except asyncio.TimeoutError:
                await self._send(writer, _text(408, "request timeout"))
                return
            except ConnectionError:
                return
            if request is None:
                return
            await self._send(writer, self._answer(*request))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._handlers.discard(task)

    def _answer(self, method: str, path: str) -> bytes:
        probes = ("/livez", "/readyz", "/health") if self._readiness is not None else ()
        if path != "/metrics" and path not in probes:
            return _text(404, f"not found; served here: {', '.join(('/metrics', *probes))}")
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed", extra="Allow: GET, HEAD\r\n")
        head_only = method == "HEAD"
        if path == "/livez":
            # Answered on the node's event loop: an answer shows that the loop runs.
            return _response(200, b"ok\n", "text/plain; charset=utf-8", head_only=head_only)
        try:
            if path != "/metrics":
                assert self._readiness is not None
                ready, facts = self._readiness()
                # etcd's /health shape, so that tools written for etcd's probe read ours.
                doc = (
                    {"health": "true" if ready else "false", **facts}
                    if path == "/health"
                    else {"ready": ready, **facts}
                )
                body = json.dumps(doc).encode() + b"\n"
                return _response(200 if ready else 503, body, "application/json", head_only=head_only)
            body = self._metrics.render()
        except Exception:
            _log.exception("answering %s failed", path)
            return _text(500, f"answering {path} failed")
        return _response(200, body, CONTENT_TYPE, head_only=head_only)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            writer.write(data)
            await asyncio.wait_for(writer.drain(), _WRITE_TIMEOUT)


async def serve_metrics(
    metrics: NodeMetrics, host: str, port: int, *, readiness: Readiness | None = None
) -> MetricsServer:
    """Serves ``metrics`` at ``http://host:port/metrics`` on the running event loop.

    With ``readiness``, also the probes an orchestrator polls: ``/livez`` answers 200 while the
    loop runs; ``/readyz`` answers 200 when ``readiness()`` says ready and 503 when not, with a
    JSON body of what it returned (``ready``, ``reason`` and the node's facts); ``/health``
    answers the same in etcd's shape (``{"health": "true", ...}``).

    ``port=0`` binds a free port; read the actual one from :attr:`MetricsServer.port`. Only
    ``GET`` and ``HEAD`` of those paths succeed (other paths get 404, other methods 405,
    malformed requests 400); every connection is closed after one response. Stop it with
    ``await server.close()`` or use it as ``async with``.
    """
    server = MetricsServer(metrics, readiness)
    await server._start(host, port)
    return server
