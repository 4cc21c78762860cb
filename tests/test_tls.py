"""TLS: the development PKI is well formed, and gRPC over 127.0.0.1 accepts exactly what it should.

The PKI tests check the certificates with cryptography's own X.509 path validator, and the gRPC
tests make real handshakes with a tiny generic service, so a wrong extension, a missing SAN or a
swapped key/certificate argument fails here rather than in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dengine.errors import DengineError
from dengine.tls import (
    CertPaths,
    ClientTLS,
    NodeTLS,
    TLSConfigError,
    certs_main,
    channel_credentials,
    create_ca,
    create_node_cert,
    init_dev_certs,
    server_credentials,
)

_SERVICE = "dengine.test.Echo"
_METHOD = f"/{_SERVICE}/WhoAmI"
_RPC_TIMEOUT = 1.5  # seconds; a failed handshake fails the call well before this


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPaths]:
    return init_dev_certs(tmp_path_factory.mktemp("pki"), ["node1", "node2", "node3"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPaths]:
    """A second, unrelated CA: nothing it signs may be accepted by the first."""
    return init_dev_certs(tmp_path_factory.mktemp("other-pki"), ["node1"])


# --------------------------------------------------------------------------- the PKI itself


def test_ca_is_a_self_signed_p256_ca_with_ca_extensions(pki: dict[str, CertPaths]) -> None:
    ca = _cert(pki["ca"].cert)
    assert pki["ca"].cert.name == "ca.pem"
    assert pki["ca"].key.name == "ca-key.pem"
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dengine development CA"
    ca.verify_directly_issued_by(ca)
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)

    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)

    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3651)


def test_node_cert_chains_to_ca_with_sans_and_both_usages(pki: dict[str, CertPaths]) -> None:
    ca = _cert(pki["ca"].cert)
    node = _cert(pki["node2"].cert)
    assert pki["node2"].cert.name == "node2.pem"
    assert pki["node2"].key.name == "node2-key.pem"
    node.verify_directly_issued_by(ca)
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node2"
    public_key = node.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)

    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    basic = node.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    aki = node.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    lifetime = node.not_valid_after_utc - node.not_valid_before_utc
    assert datetime.timedelta(days=824) < lifetime < datetime.timedelta(days=826)


def test_certificates_pass_x509_path_validation_as_server_and_client(pki: dict[str, CertPaths]) -> None:
    store = verification.Store([_cert(pki["ca"].cert)])
    builder = verification.PolicyBuilder().store(store)
    node = _cert(pki["node1"].cert)
    for subject in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        chain = builder.build_server_verifier(subject).verify(node, [])
        assert chain[0] == node
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(x509.DNSName("elsewhere.example")).verify(node, [])
    for name in ("node1", "client"):
        verified = builder.build_client_verifier().verify(_cert(pki[name].cert), [])
        assert verified.chain[0] == _cert(pki[name].cert)


def test_client_cert_is_for_clients_only(pki: dict[str, CertPaths]) -> None:
    """The client certificate goes wherever the CLI runs: it must not pass for a node, neither as
    a TLS server nor on the peer service (which accepts only certificates allowing serverAuth)."""
    client = _cert(pki["client"].cert)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == []
    store = verification.Store([_cert(pki["ca"].cert)])
    server = verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(verification.VerificationError):
        server.verify(client, [])


def test_node_hosts_become_ip_and_dns_sans(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    paths = create_node_cert(tmp_path, "n1", ca=ca, hosts=("10.0.0.7", "::1", "Raft-1.Example.COM"))
    san = _cert(paths.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["raft-1.example.com"]
    with pytest.raises(ValueError, match="neither an IP address nor"):
        create_node_cert(tmp_path, "n2", ca=ca, hosts=("bad host",))


def test_empty_hosts_leave_out_the_san_extension(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    bare = _cert(create_node_cert(tmp_path, "bare", ca=ca, hosts=()).cert)
    with pytest.raises(x509.ExtensionNotFound):
        bare.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    eku = bare.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_private_keys_are_owner_only(pki: dict[str, CertPaths]) -> None:
    for paths in pki.values():
        assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600, paths.key
        assert stat.S_IMODE(paths.cert.stat().st_mode) == 0o644, paths.cert
    # Only the PEM files, no temporary leftovers.
    names = sorted(p.name for p in pki["ca"].cert.parent.iterdir())
    expected = [
        f"{stem}{suffix}"
        for stem in ("ca", "client", "node1", "node2", "node3")
        for suffix in (".pem", "-key.pem")
    ]
    assert names == sorted(expected)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_new_certificate_directory_is_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "fresh" / "certs"
    init_dev_certs(target, ["a"])
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "node2-key.pem").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"refusing to overwrite.*node2-key\.pem.*--force"):
        init_dev_certs(tmp_path, ["node1", "node2"])
    assert [p.name for p in tmp_path.iterdir()] == ["node2-key.pem"]
    assert (tmp_path / "node2-key.pem").read_bytes() == b"precious"


def test_init_with_force_replaces_every_file(tmp_path: Path) -> None:
    first = init_dev_certs(tmp_path, ["node1"])
    old_ca = first["ca"].cert.read_bytes()
    with pytest.raises(FileExistsError, match=r"ca\.pem, ca-key\.pem, node1\.pem"):
        init_dev_certs(tmp_path, ["node1"])
    second = init_dev_certs(tmp_path, ["node1"], force=True)
    assert second["ca"].cert.read_bytes() != old_ca
    _cert(second["node1"].cert).verify_directly_issued_by(_cert(second["ca"].cert))
    _cert(second["client"].cert).verify_directly_issued_by(_cert(second["ca"].cert))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "at least one node name"),
        (["node1", "node1"], "duplicate node names: node1"),
        (["client"], "reserved"),
        (["ca"], "reserved"),
        (["../evil"], "must start with a letter or digit"),
    ],
)
def test_init_rejects_bad_node_names(tmp_path: Path, names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        init_dev_certs(tmp_path, names)
    assert list(tmp_path.iterdir()) == []


def test_certs_main_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "certs"
    argv = ["--dir", str(target), "--nodes", "2", "--host", "127.0.0.1", "--host", "db.internal"]
    assert certs_main(argv) == 0
    out = capsys.readouterr().out
    for name in ("ca", "node1", "node2", "client"):
        assert str(target / f"{name}.pem") in out
        assert str(target / f"{name}-key.pem") in out
    assert not (target / "node3.pem").exists()
    san = _cert(target / "node2.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.internal"]

    assert certs_main(argv) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert certs_main([*argv, "--force"]) == 0

    with pytest.raises(SystemExit) as exit_info:
        certs_main(["--dir", str(target), "--nodes", "0"])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- real gRPC handshakes


async def _who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Echo the request and the client's certificate name, as the server's TLS layer saw it."""
    names = context.auth_context().get("x509_common_name", [])
    return request + b" from " + (names[0] if names else b"anonymous")


@contextlib.asynccontextmanager
async def _echo_server(server_creds: grpc.ServerCredentials) -> AsyncIterator[int]:
    """A server answering :func:`_who_am_i` on a free port of 127.0.0.1; yields the port."""
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_who_am_i)  # no serializers: raw bytes
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {"WhoAmI": handler}),))
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def _ask(port: int, channel_creds: grpc.ChannelCredentials) -> bytes:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_creds) as channel:
        reply = await channel.unary_unary(_METHOD)(b"hello", timeout=_RPC_TIMEOUT)
        assert isinstance(reply, bytes)
        return reply


async def _call_once(server_creds: grpc.ServerCredentials, channel_creds: grpc.ChannelCredentials) -> bytes:
    async with _echo_server(server_creds) as port:
        return await _ask(port, channel_creds)


def _call(server_creds: grpc.ServerCredentials, channel_creds: grpc.ChannelCredentials) -> bytes:
    return asyncio.run(_call_once(server_creds, channel_creds))


def _assert_refused(server_creds: grpc.ServerCredentials, channel_creds: grpc.ChannelCredentials) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _call(server_creds, channel_creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value


def _tls_server(node: CertPaths) -> grpc.ServerCredentials:
    return server_credentials(node.cert, node.key, require_client_auth=False)


def _mtls_server(node: CertPaths, ca: CertPaths) -> grpc.ServerCredentials:
    return server_credentials(node.cert, node.key, ca.cert, require_client_auth=True)


def test_tls_call_succeeds(pki: dict[str, CertPaths]) -> None:
    assert _call(_tls_server(pki["node1"]), channel_credentials(pki["ca"].cert)) == b"hello from anonymous"


def test_mtls_call_succeeds_with_node_cert_as_client(pki: dict[str, CertPaths]) -> None:
    server = _mtls_server(pki["node1"], pki["ca"])
    as_node2 = channel_credentials(pki["ca"].cert, pki["node2"].cert, pki["node2"].key)
    assert _call(server, as_node2) == b"hello from node2"
    as_client = channel_credentials(str(pki["ca"].cert), str(pki["client"].cert), str(pki["client"].key))
    assert _call(server, as_client) == b"hello from client"


def test_mtls_rejects_client_without_certificate(pki: dict[str, CertPaths]) -> None:
    _assert_refused(_mtls_server(pki["node1"], pki["ca"]), channel_credentials(pki["ca"].cert))


def test_mtls_rejects_client_cert_from_another_ca(
    pki: dict[str, CertPaths], other_pki: dict[str, CertPaths]
) -> None:
    stranger = channel_credentials(pki["ca"].cert, other_pki["node1"].cert, other_pki["node1"].key)
    _assert_refused(_mtls_server(pki["node1"], pki["ca"]), stranger)


def test_client_that_does_not_trust_the_ca_fails(
    pki: dict[str, CertPaths], other_pki: dict[str, CertPaths]
) -> None:
    _assert_refused(_tls_server(pki["node1"]), channel_credentials(other_pki["ca"].cert))


def test_server_cert_without_the_address_fails_host_check(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    elsewhere = create_node_cert(tmp_path, "elsewhere", ca=pki["ca"], hosts=("db.example.com",))
    _assert_refused(_tls_server(elsewhere), channel_credentials(pki["ca"].cert))


# --------------------------------------------------------------------------- misconfiguration


def sign_cert(
    directory: Path,
    ca: CertPaths,
    *,
    name: str = "custom",
    common_name: str | None = None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    usages: list[x509.ObjectIdentifier],
) -> CertPaths:
    """A certificate signed by the CA ``ca`` with any subject, validity window and extended key
    usages, written to ``<name>.pem`` and ``<name>-key.pem`` in ``directory``."""
    ca_cert = _cert(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertPaths(directory / f"{name}.pem", directory / f"{name}-key.pem")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def _expect_config_error(call: Callable[[], object], path: Path | None, *fragments: str) -> TLSConfigError:
    with pytest.raises(TLSConfigError) as err:
        call()
    message = str(err.value)
    if path is not None:
        assert str(path) in message
        assert err.value.path == path
    for fragment in fragments:
        assert fragment in message, message
    return err.value


def test_tls_config_error_is_a_value_error_and_a_dengine_error() -> None:
    assert issubclass(TLSConfigError, ValueError)
    assert issubclass(TLSConfigError, DengineError)


def test_missing_files_are_named(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    node, ca = pki["node1"], pki["ca"]
    missing = tmp_path / "nope.pem"
    _expect_config_error(
        lambda: server_credentials(missing, node.key, require_client_auth=False), missing, "does not exist"
    )
    _expect_config_error(
        lambda: server_credentials(node.cert, missing, require_client_auth=False), missing, "does not exist"
    )
    _expect_config_error(
        lambda: server_credentials(node.cert, node.key, missing, require_client_auth=True), missing, "CA"
    )
    _expect_config_error(lambda: channel_credentials(missing), missing, "does not exist")
    _expect_config_error(lambda: channel_credentials(ca.cert, node.cert, missing), missing, "does not exist")
    _expect_config_error(
        lambda: server_credentials(tmp_path, node.key, require_client_auth=False), tmp_path, "directory"
    )


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX perms, non-root")
def test_unreadable_file_is_named(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki["node1"].cert.read_bytes())
    locked.chmod(0)
    _expect_config_error(
        lambda: server_credentials(locked, pki["node1"].key, require_client_auth=False), locked, "cannot read"
    )


def test_garbage_and_malformed_pem_are_named(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    node = pki["node1"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    _expect_config_error(
        lambda: server_credentials(garbage, node.key, require_client_auth=False), garbage, "not PEM"
    )
    _expect_config_error(
        lambda: server_credentials(node.cert, garbage, require_client_auth=False), garbage, "not PEM"
    )
    _expect_config_error(lambda: channel_credentials(garbage), garbage, "not PEM")

    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    _expect_config_error(
        lambda: server_credentials(broken, node.key, require_client_auth=False), broken, "malformed"
    )
    broken_key = tmp_path / "broken-key.pem"
    broken_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    _expect_config_error(
        lambda: server_credentials(node.cert, broken_key, require_client_auth=False), broken_key, "malformed"
    )


def test_swapped_cert_and_key_are_explained(pki: dict[str, CertPaths]) -> None:
    node = pki["node1"]
    _expect_config_error(
        lambda: server_credentials(node.key, node.cert, require_client_auth=False), node.key, "swapped"
    )


def test_key_that_does_not_match_its_certificate(pki: dict[str, CertPaths]) -> None:
    ca = pki["ca"]
    node1, node2 = pki["node1"], pki["node2"]
    _expect_config_error(
        lambda: server_credentials(node1.cert, node2.key, require_client_auth=False),
        node2.key,
        str(node1.cert),
        "does not match",
    )
    _expect_config_error(
        lambda: channel_credentials(ca.cert, node2.cert, node1.key),
        node1.key,
        str(node2.cert),
        "does not match",
    )


def test_encrypted_key_is_refused(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    key = serialization.load_pem_private_key(pki["node1"].key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    _expect_config_error(
        lambda: server_credentials(pki["node1"].cert, encrypted, require_client_auth=False),
        encrypted,
        "encrypted",
    )


def test_expired_certificate_is_refused(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    expired = create_node_cert(tmp_path, "expired", ca=pki["ca"], days=-1)
    assert _cert(expired.cert).not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc)
    _expect_config_error(
        lambda: server_credentials(expired.cert, expired.key, require_client_auth=False),
        expired.cert,
        "expired",
    )
    _expect_config_error(
        lambda: channel_credentials(pki["ca"].cert, expired.cert, expired.key), expired.cert, "expired"
    )


def test_expired_ca_is_refused(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    old_ca = create_ca(tmp_path, days=-1)
    node = pki["node1"]
    _expect_config_error(lambda: channel_credentials(old_ca.cert), old_ca.cert, "expired")
    _expect_config_error(
        lambda: server_credentials(node.cert, node.key, old_ca.cert, require_client_auth=True),
        old_ca.cert,
        "expired",
    )


def test_not_yet_valid_certificate_is_refused(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    future = sign_cert(
        tmp_path,
        pki["ca"],
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=30),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _expect_config_error(
        lambda: server_credentials(future.cert, future.key, require_client_auth=False),
        future.cert,
        "not valid until",
    )


def test_certificate_used_in_the_wrong_role_is_refused(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    server_only = sign_cert(
        tmp_path,
        pki["ca"],
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=1),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    server_credentials(server_only.cert, server_only.key, require_client_auth=False)
    _expect_config_error(
        lambda: channel_credentials(pki["ca"].cert, server_only.cert, server_only.key),
        server_only.cert,
        "clientAuth",
    )


def test_argument_combinations_are_checked(pki: dict[str, CertPaths]) -> None:
    node = pki["node1"]
    err = _expect_config_error(
        lambda: server_credentials(node.cert, node.key, require_client_auth=True), None, "ca_file"
    )
    assert err.path is None
    _expect_config_error(lambda: channel_credentials(pki["ca"].cert, node.cert), None, "key_file")
    _expect_config_error(lambda: channel_credentials(pki["ca"].cert, key_file=node.key), None, "cert_file")


# --------------------------------------------------------------------------- rotation (NodeTLS)


def _install(work: Path, source: CertPaths | None = None, ca: CertPaths | None = None) -> None:
    """Puts a node's certificate pair and/or CA into ``work`` the way a rotation tool does: each
    file written aside, then renamed over the one in use."""
    pairs = []
    if source is not None:
        pairs += [(source.cert, work / "node.pem"), (source.key, work / "node-key.pem")]
    if ca is not None:
        pairs.append((ca.cert, work / "ca.pem"))
    for src, dst in pairs:
        aside = dst.with_suffix(".new")
        aside.write_bytes(src.read_bytes())
        os.replace(aside, dst)


def _node_tls(work: Path, seen: list[datetime.datetime] | None = None) -> NodeTLS:
    return NodeTLS(
        work / "node.pem",
        work / "node-key.pem",
        work / "ca.pem",
        require_client_auth=True,
        on_load=None if seen is None else seen.append,
    )


def test_node_tls_serves_and_presents_rotated_files_without_a_restart(
    tmp_path: Path, pki: dict[str, CertPaths], other_pki: dict[str, CertPaths]
) -> None:
    _install(tmp_path, pki["node1"], pki["ca"])
    seen: list[datetime.datetime] = []
    files = _node_tls(tmp_path, seen)
    old_client = channel_credentials(pki["ca"].cert, pki["client"].cert, pki["client"].key)
    new_client = channel_credentials(other_pki["ca"].cert, other_pki["client"].cert, other_pki["client"].key)

    async def main() -> None:
        async with _echo_server(files.server_credentials()) as port:
            assert await _ask(port, old_client) == b"hello from client"
            with pytest.raises(grpc.aio.AioRpcError):
                await _ask(port, new_client)
            _install(tmp_path, other_pki["node1"], other_pki["ca"])
            # The node opens a channel first: its reload must still reach the server side.
            outgoing = files.channel_credentials()
            assert await _ask(port, new_client) == b"hello from client"
            with pytest.raises(grpc.aio.AioRpcError):
                await _ask(port, old_client)
        # As a client, the node now presents the new certificate and trusts the new CA.
        async with _echo_server(_mtls_server(other_pki["node1"], other_pki["ca"])) as port:
            assert await _ask(port, outgoing) == b"hello from node1"
        async with _echo_server(_mtls_server(pki["node1"], pki["ca"])) as port:
            with pytest.raises(grpc.aio.AioRpcError):
                await _ask(port, outgoing)

    asyncio.run(main())
    assert files.generation == 2
    expiries = [_cert(paths["node1"].cert).not_valid_after_utc for paths in (pki, other_pki)]
    assert seen == expiries
    assert files.not_after == seen[-1]


def test_files_that_do_not_load_leave_the_previous_ones_in_use(
    tmp_path: Path,
    pki: dict[str, CertPaths],
    other_pki: dict[str, CertPaths],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _install(tmp_path, pki["node1"], pki["ca"])
    files = _node_tls(tmp_path)
    assert not files.refresh()  # nothing changed
    # The certificate arrives before its key: not a pair yet.
    (tmp_path / "node.pem").write_bytes(other_pki["node1"].cert.read_bytes())
    with caplog.at_level("WARNING", logger="dengine.tls"):
        assert not files.refresh()
        assert not files.refresh()  # the same files: said once
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "does not match certificate" in warnings[0], warnings
    assert "previous ones stay" in warnings[0]
    assert files.generation == 1 and files.not_after == _cert(pki["node1"].cert).not_valid_after_utc
    (tmp_path / "node-key.pem").write_bytes(other_pki["node1"].key.read_bytes())
    assert files.refresh() and files.generation == 2
    assert files.not_after == _cert(other_pki["node1"].cert).not_valid_after_utc


def test_client_tls_presents_rotated_files(
    tmp_path: Path, pki: dict[str, CertPaths], other_pki: dict[str, CertPaths]
) -> None:
    def install(paths: dict[str, CertPaths]) -> None:
        for src, name in ((paths["ca"].cert, "ca.pem"), (paths["client"].cert, "client.pem")):
            (tmp_path / name).with_suffix(".new").write_bytes(src.read_bytes())
            os.replace((tmp_path / name).with_suffix(".new"), tmp_path / name)
        (tmp_path / "client-key.new").write_bytes(paths["client"].key.read_bytes())
        os.replace(tmp_path / "client-key.new", tmp_path / "client-key.pem")

    install(pki)
    files = ClientTLS(tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client-key.pem")
    before = files.channel_credentials()

    async def main() -> None:
        async with _echo_server(_mtls_server(other_pki["node1"], other_pki["ca"])) as port:
            with pytest.raises(grpc.aio.AioRpcError):
                await _ask(port, before)
            install(other_pki)
            assert await _ask(port, files.channel_credentials()) == b"hello from client"

    asyncio.run(main())
    assert files.generation == 2 and not files.refresh()
    assert files.not_after == _cert(other_pki["client"].cert).not_valid_after_utc
    assert ClientTLS(tmp_path / "ca.pem").not_after is None, "no client certificate: server TLS only"
    with pytest.raises(TLSConfigError, match="both cert_file and key_file"):
        ClientTLS(tmp_path / "ca.pem", tmp_path / "client.pem")
