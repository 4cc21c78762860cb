"""The Raft peer service under TLS: only node certificates may speak it, bad bytes get
INVALID_ARGUMENT, and a peer that cannot be reached over TLS is reported, not only at DEBUG.

Real nodes on 127.0.0.1 with mutual TLS and the development PKI of ``dengine certs init``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from dengine._core import Entry, encode_entries
from dengine.kv import encode_put
from dengine.raft.payload import command
from dengine.tls import CertPaths, init_dev_certs
from dengine.transport.peers import PeerTransport
from dengine.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, raft_pb2
from test_tls import sign_cert

from cluster_procs import ProcCluster, running_cluster, tls_cli, wait_for

_RAFT = "/dengine.v1.Raft/"
_GARBAGE = b"\xff\xff\xff\xff\x0f\x0a\x80"  # not a protobuf message of any type


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    init_dev_certs(d, ["node1", "node2", "node3"])
    return d


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[ProcCluster]:
    with running_cluster(tmp_path_factory.mktemp("mtls"), tls_dir=certs) as c:
        yield c


def _client_only_cert(certs: Path) -> CertPaths:
    """A client certificate of the kind an operator's own PKI issues: clientAuth only, no host
    names, and a subject that follows no dengine naming convention."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return sign_cert(
        certs,
        CertPaths(certs / "ca.pem", certs / "ca-key.pem"),
        name="operator",
        common_name="node1",
        not_before=now - datetime.timedelta(minutes=5),
        not_after=now + datetime.timedelta(days=1),
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )


def _creds(certs: Path, stem: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / f"{stem}-key.pem").read_bytes(),
        (certs / f"{stem}.pem").read_bytes(),
    )


async def _call_raft(
    address: str, creds: grpc.ChannelCredentials, method: str, payload: bytes
) -> grpc.StatusCode:
    """Calls a Raft method with raw bytes; returns the status it ended with."""

    async def one() -> AsyncIterator[bytes]:
        yield payload
        await asyncio.sleep(0.3)

    async with grpc.aio.secure_channel(address, creds) as channel:
        try:
            if method == "OfferSnapshot":
                await channel.unary_unary(_RAFT + method)(payload, timeout=5)
            else:
                await channel.stream_unary(_RAFT + method)(one(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _forged_append(c: ProcCluster, follower: int, leader: int) -> bytes:
    """An append of a put of ``forged``, as ``leader`` would send it to ``follower``."""
    s = c.status(follower)
    assert s is not None
    entry = Entry(s.last_index + 1, s.term, command(encode_put(b"forged", b"by a client certificate")))
    m = raft_pb2.RaftMessage(
        cluster_id=s.cluster_id,
        type=raft_pb2.APPEND,
        to=follower,
        term=s.term,
        index=s.last_index,
        log_term=s.term,
        commit=s.last_index + 1,
        entries=encode_entries([entry]),
    )
    setattr(m, "from", leader)  # "from" is a Python keyword
    return raft_pb2.RaftBatch(messages=[m]).SerializeToString()


def test_a_client_certificate_cannot_speak_the_peer_protocol(cluster: ProcCluster, certs: Path) -> None:
    leader = cluster.wait_ready()
    follower = next(i for i in range(1, 4) if i != leader)
    address = cluster.address(follower)
    forged = _forged_append(cluster, follower, leader)
    header = raft_pb2.SnapshotHeader(cluster_id=cluster.cluster_id, to=follower, term=1, index=1)
    setattr(header, "from", leader)  # "from" is a Python keyword
    for creds in (_creds(certs, "client"), _creds(certs, _client_only_cert(certs).cert.stem)):
        for method, payload in (
            ("Messages", forged),
            ("OfferSnapshot", header.SerializeToString()),
            ("InstallSnapshot", header.SerializeToString()),
        ):
            code = asyncio.run(_call_raft(address, creds, method, payload))
            assert code is grpc.StatusCode.PERMISSION_DENIED, (method, code)
    time.sleep(0.5)
    assert all(cluster.try_get(i, b"forged") is None for i in range(1, 4))

    # The nodes, which present their node certificates, still replicate.
    cluster.put(b"after", b"refusal")
    for i in range(1, 4):

        def applied(i: int = i) -> bytes | None:
            return cluster.try_get(i, b"after")

        wait_for(applied, 10, f"node {i} to apply the put")
    stub = cluster_pb2_grpc.ClusterStub(cluster.channels[follower])  # type: ignore[no-untyped-call]
    assert stub.Status(cluster_pb2.StatusRequest(), timeout=3).role == "follower"

    # And the CLI with the client certificate works as before.
    endpoints = ",".join(cluster.address(i) for i in range(1, 4))
    cli = tls_cli(endpoints, certs)

    assert cli("kv", "put", "cli-key", "cli-value").returncode == 0
    assert cli("kv", "get", "cli-key").stdout.strip() == "cli-value"


def test_a_node_certificate_still_speaks_it_and_bytes_that_are_not_protobuf_are_invalid(
    cluster: ProcCluster, certs: Path
) -> None:
    leader = cluster.wait_ready()
    follower = next(i for i in range(1, 4) if i != leader)
    as_node = _creds(certs, f"node{leader}")
    for method in ("Messages", "OfferSnapshot", "InstallSnapshot"):
        code = asyncio.run(_call_raft(cluster.address(follower), as_node, method, _GARBAGE))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code)
    cluster.put(b"after-garbage", b"ok")
    assert cluster.get(follower, b"after-garbage", kv_pb2.LINEARIZABLE) == b"ok"


# --------------------------------------------------------------------------- failing handshakes


@contextlib.asynccontextmanager
async def _tls_server(cert: CertPaths) -> AsyncIterator[int]:
    """A TLS server with no services on a free port of 127.0.0.1; yields the port."""
    server = grpc.aio.server()
    creds = grpc.ssl_server_credentials([(cert.key.read_bytes(), cert.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def test_a_peer_whose_handshake_keeps_failing_is_warned_about_once_a_while(
    tmp_path: Path, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer's certificate is signed by a CA this node does not trust: every attempt fails
    with UNAVAILABLE. After a few seconds of that, one warning says so (not one per attempt)."""
    other = init_dev_certs(tmp_path / "other", ["node2"])
    mine = init_dev_certs(tmp_path / "mine", ["node1"])
    creds = grpc.ssl_channel_credentials(
        mine["ca"].cert.read_bytes(), mine["node1"].key.read_bytes(), mine["node1"].cert.read_bytes()
    )

    async def main() -> list[logging.LogRecord]:
        async with _tls_server(other["node2"]) as port:
            t = PeerTransport(
                1, "c", {2: f"127.0.0.1:{port}"}, lambda m: None, channel_credentials=lambda: creds
            )
            t.start()
            try:
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and not _warnings(caplog):
                    await asyncio.sleep(0.1)
                await asyncio.sleep(2)  # more failed attempts: no more warnings for a while
            finally:
                await t.close()
        return _warnings(caplog)

    with caplog.at_level(logging.DEBUG, logger="dengine.transport"):
        warned = asyncio.run(main())
    assert len(warned) == 1, [r.getMessage() for r in warned]
    message = warned[0].getMessage()
    assert "peer 2" in message and "UNAVAILABLE" in message, message
    assert "127.0.0.1" in message, message


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "dengine.transport"]
