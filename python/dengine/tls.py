"""TLS for dengine: a development PKI and gRPC credentials built from PEM files.

Two halves:

* **Development PKI** — :func:`init_dev_certs` (behind ``dengine certs init``) writes a private CA
  and one certificate per node plus a ``client`` certificate, all ECDSA P-256. A node certificate
  carries both ``serverAuth`` and ``clientAuth`` extended key usages because, under mutual TLS,
  a node presents the same certificate when it serves its peers and when it calls them. The
  client certificate carries ``clientAuth`` only and names no host: it goes wherever the CLI
  runs, and the peer service accepts only callers whose certificate allows ``serverAuth``
  (:func:`allows_server_auth`), so it cannot pass for a node.
  These files are for development and tests; production clusters bring their own PKI.

* **Credentials** — :func:`server_credentials` and :func:`channel_credentials` read PEM files and
  return gRPC credentials. They check the files first (present, readable, PEM, the key matches
  the certificate, the certificate is currently valid and allowed for its role) and raise
  :class:`TLSConfigError` naming the file. Without these checks a misconfigured node would start
  and then fail every handshake with an opaque ``UNAVAILABLE``; with them it refuses to start
  and says why.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dengine.errors import TLSConfigError

__all__ = [
    "DEFAULT_HOSTS",
    "CertPaths",
    "ClientTLS",
    "NodeTLS",
    "TLSConfigError",
    "allows_server_auth",
    "certs_main",
    "channel_credentials",
    "create_ca",
    "create_client_cert",
    "create_node_cert",
    "init_dev_certs",
    "server_credentials",
]

StrPath: TypeAlias = str | os.PathLike[str]

log = logging.getLogger("dengine.tls")

#: Hosts a development certificate is valid for when none are given: the loopback address and name.
DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

# Certificates start being valid a little in the past so that a peer whose clock runs slightly
# behind ours does not reject a certificate minted a second ago as "not yet valid".
_BACKDATE = datetime.timedelta(minutes=5)
_KEY_MODE = 0o600
_CERT_MODE = 0o644
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_RESERVED_NAMES = frozenset({"ca", "client"})


@dataclass(frozen=True)
class CertPaths:
    """Where one certificate and its private key were written."""

    cert: Path
    key: Path


# --------------------------------------------------------------------------- development PKI


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    """The validity window for a certificate that expires ``days`` from now.

    A negative ``days`` yields a certificate that has already expired (useful in tests); its
    window is kept non-empty by starting it a day before it ends.
    """
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    not_before = min(now - _BACKDATE, not_after - datetime.timedelta(days=1))
    return not_before, not_after


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file so a crash never leaves half a key.

    ``mkstemp`` creates the temporary file readable by its owner only, so a private key is never
    visible to others, not even for the moment before ``chmod``.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertPaths:
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(cert=directory / f"{stem}.pem", key=directory / f"{stem}-key.pem")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a certificate on disk without its key is useless, the reverse is harmless.
    _write_atomically(paths.key, key_pem, _KEY_MODE)
    _write_atomically(paths.cert, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    return paths


def _general_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host or not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
            raise ValueError(f"host {host!r} is neither an IP address nor an ASCII DNS name")
        names.append(x509.DNSName(host.lower()))
    return names


def create_ca(directory: Path, *, common_name: str = "dengine development CA", days: int = 3650) -> CertPaths:
    """Create a self-signed ECDSA P-256 certificate authority as ``ca.pem`` and ``ca-key.pem``.

    The key file is written with mode 0600. Existing files of those names are replaced (use
    :func:`init_dev_certs` for the careful, non-overwriting version).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs node certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(Path(directory), "ca", cert, key)


def _load_ca(ca: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    ca_cert = _read_certificates(ca.cert, "CA certificate")[1][0]
    ca_key = _read_private_key(ca.key, "CA private key")[1]
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise TLSConfigError(f"CA private key {ca.key} is neither an ECDSA nor an RSA key", ca.key)
    _check_key_matches(ca_cert, ca.cert, ca_key, ca.key)
    return ca_cert, ca_key


CLIENT_CERT_URI = "urn:dengine:client"
"""The one subject alternative name of a client certificate from :func:`create_client_cert`: not
a host name (the certificate must not pass for a server), but strict X.509 verifiers
(cryptography's, for one) refuse a client certificate without any subject alternative name."""


def create_node_cert(
    directory: Path,
    name: str,
    *,
    ca: CertPaths,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 825,
) -> CertPaths:
    """Create ``<name>.pem`` and ``<name>-key.pem``: an ECDSA P-256 certificate signed by ``ca``.

    The certificate names ``hosts`` as subject alternative names (IP addresses as IPAddress
    entries, anything else as DNSName; an empty ``hosts`` leaves the extension out) and allows
    both ``serverAuth`` and ``clientAuth``, so one file serves a node in both directions of
    mutual TLS. A negative ``days`` makes an already expired certificate, for tests. Existing
    files of those names are replaced.
    """
    return _create_leaf(
        directory,
        name,
        ca=ca,
        names=_general_names(hosts),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )


def create_client_cert(directory: Path, name: str, *, ca: CertPaths, days: int = 825) -> CertPaths:
    """Create ``<name>.pem`` and ``<name>-key.pem``: a client certificate signed by ``ca``, for
    the CLI and client programs under mutual TLS.

    It allows ``clientAuth`` only and names no host (its one subject alternative name is
    :data:`CLIENT_CERT_URI`), so it can neither serve as a node nor speak the peer protocol,
    which accepts only certificates allowing ``serverAuth``. Existing files are replaced.
    """
    return _create_leaf(
        directory,
        name,
        ca=ca,
        names=[x509.UniformResourceIdentifier(CLIENT_CERT_URI)],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )


def _create_leaf(
    directory: Path,
    name: str,
    *,
    ca: CertPaths,
    names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    days: int,
) -> CertPaths:
    if not _NODE_NAME.match(name):
        raise ValueError(
            f"certificate name {name!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-'"
        )
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(usages),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write_pair(Path(directory), name, cert, key)


def init_dev_certs(
    directory: Path,
    node_names: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    force: bool = False,
) -> dict[str, CertPaths]:
    """Write a development PKI into ``directory``: a CA, one certificate per node, and ``client``.

    Returns the paths keyed by ``"ca"``, each node name, and ``"client"``. The node certificates
    are valid for ``hosts``; the client certificate names no host and allows ``clientAuth`` only
    (see :func:`create_client_cert`). Refuses, before writing anything, to replace existing
    files unless ``force`` is true.
    """
    directory = Path(directory)
    names = list(node_names)
    if not names:
        raise ValueError("at least one node name is needed")
    for name in names:
        if name in _RESERVED_NAMES:
            raise ValueError(f"node name {name!r} is reserved for the {name} certificate")
        if not _NODE_NAME.match(name):
            raise ValueError(
                f"node name {name!r} must start with a letter or digit and contain only "
                "letters, digits, '.', '_' and '-'"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
    if not hosts:
        raise ValueError("at least one host is needed for the node certificates")
    _general_names(hosts)  # validate before touching the disk

    stems = ["ca", *names, "client"]
    targets = [directory / f"{stem}{suffix}" for stem in stems for suffix in (".pem", "-key.pem")]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"refusing to overwrite existing certificate files in {directory}: "
            f"{', '.join(p.name for p in existing)} (use --force, or force=True, to replace them)"
        )

    if not directory.exists():
        # The directory will hold private keys: keep it private from the start.
        directory.mkdir(parents=True, mode=0o700)
    result = {"ca": create_ca(directory)}
    for name in names:
        result[name] = create_node_cert(directory, name, ca=result["ca"], hosts=hosts)
    result["client"] = create_client_cert(directory, "client", ca=result["ca"])
    return result


def certs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dengine certs init",
        description=(
            "Write a development certificate authority, one certificate per node (node1, node2, ...) "
            "and a client certificate, for TLS and mutual TLS between dengine nodes and clients. "
            "For development and tests only: production clusters should use their own PKI."
        ),
    )
    parser.add_argument("--dir", required=True, type=Path, help="directory to write the PEM files into")
    parser.add_argument(
        "--nodes", type=int, default=3, metavar="N", help="number of node certificates (default: 3)"
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="IP address or DNS name the certificates are valid for; repeat for several "
        f"(default: {' '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def certs_main(argv: Sequence[str] | None = None) -> int:
    """``dengine certs init``: write a development CA and certificates; returns the exit status."""
    parser = certs_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    hosts: list[str] = args.hosts or list(DEFAULT_HOSTS)
    names = [f"node{i}" for i in range(1, args.nodes + 1)]
    try:
        written = init_dev_certs(args.dir, names, hosts, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"dengine certs init: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a development PKI to {args.dir} (hosts: {', '.join(hosts)})")
    for label, paths in written.items():
        print(f"  {label:<10} {paths.cert}  {paths.key}")
    print("keep the *-key.pem files private; ca-key.pem can mint certificates this cluster trusts")
    return 0


# --------------------------------------------------------------------------- credentials


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} file {path} does not exist", path) from None
    except IsADirectoryError:
        raise TLSConfigError(f"{what} file {path} is a directory, not a file", path) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}", path) from None


def _read_certificates(path: Path, what: str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read_bytes(path, what)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = ""
        if b"PRIVATE KEY-----" in data:
            hint = " (it holds a private key: are the certificate and key files swapped?)"
        elif b"-----BEGIN" not in data:
            hint = " (it is not PEM: expected a '-----BEGIN CERTIFICATE-----' block)"
        raise TLSConfigError(f"{what} file {path} contains no PEM certificate{hint}", path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(f"{what} file {path} holds a malformed PEM certificate: {exc}", path) from None
    return data, certs


def _read_private_key(path: Path, what: str) -> tuple[bytes, PrivateKeyTypes]:
    data = _read_bytes(path, what)
    if b"PRIVATE KEY-----" not in data:
        hint = ""
        if b"-----BEGIN CERTIFICATE-----" in data:
            hint = " (it holds a certificate: are the certificate and key files swapped?)"
        elif b"-----BEGIN" not in data:
            hint = " (it is not PEM: expected a '-----BEGIN PRIVATE KEY-----' block)"
        raise TLSConfigError(f"{what} file {path} contains no PEM private key{hint}", path)
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{what} file {path} is encrypted; dengine needs an unencrypted key file (mode 0600)", path
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(
            f"{what} file {path} holds a malformed or unsupported key: {exc}", path
        ) from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(cert: x509.Certificate, cert_path: Path, key: PrivateKeyTypes, key_path: Path) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise TLSConfigError(
            f"private key {key_path} does not match certificate {cert_path} "
            "(they are not a pair: was one of them regenerated?)",
            key_path,
        )


def _validity_problem(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    if now < cert.not_valid_before_utc:
        return f"{subject} is not valid until {cert.not_valid_before_utc.isoformat()} (check the clock)"
    if now > cert.not_valid_after_utc:
        return f"{subject} expired on {cert.not_valid_after_utc.isoformat()}"
    return None


def _check_validity(certs: Sequence[x509.Certificate], path: Path, what: str) -> None:
    now = _now()
    for cert in certs:
        problem = _validity_problem(cert, now)
        if problem:
            raise TLSConfigError(f"{what} in {path}: {problem}", path)


def allows_server_auth(pem: bytes) -> bool:
    """Whether the PEM certificate ``pem`` may authenticate a TLS server: no extended key usage
    (valid for every purpose), or one naming ``serverAuth`` or ``anyExtendedKeyUsage``. Under
    mutual TLS a node presents its node certificate, which must allow ``serverAuth`` (it serves
    with it), so this tells a node calling the peer service from a client, whatever the names."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


_USAGE_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


def _check_role(cert: x509.Certificate, path: Path, usage: x509.ObjectIdentifier, role: str) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no restriction: valid for every purpose
    if usage not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise TLSConfigError(
            f"certificate {path} may not be used for TLS {role} authentication "
            f"(its extended key usage lacks {_USAGE_NAMES.get(usage, usage.dotted_string)})",
            path,
        )


_NEEDS_CA = "require_client_auth needs ca_file: the CA that client certificates chain to"
_SERVER_ROLE = (ExtendedKeyUsageOID.SERVER_AUTH, "server")
_CLIENT_ROLE = (ExtendedKeyUsageOID.CLIENT_AUTH, "client")


def _load_identity(
    cert_file: StrPath, key_file: StrPath, *roles: tuple[x509.ObjectIdentifier, str]
) -> tuple[bytes, bytes, x509.Certificate]:
    """Check a certificate chain and its key, for each TLS role in ``roles``; return their PEM
    bytes (chain, key) and the leaf certificate."""
    cert_path, key_path = Path(cert_file), Path(key_file)
    chain_pem, chain = _read_certificates(cert_path, "certificate")
    key_pem, key = _read_private_key(key_path, "private key")
    _check_key_matches(chain[0], cert_path, key, key_path)
    _check_validity(chain, cert_path, "certificate")
    for usage, role in roles:
        _check_role(chain[0], cert_path, usage, role)
    return chain_pem, key_pem, chain[0]


def _load_roots(ca_file: StrPath) -> bytes:
    """Check a CA bundle; return its PEM bytes. Fails only if no certificate in it is valid now."""
    path = Path(ca_file)
    pem, roots = _read_certificates(path, "CA certificate")
    now = _now()
    problems = [_validity_problem(cert, now) for cert in roots]
    if all(problems):
        raise TLSConfigError(f"CA certificate in {path}: {problems[0]}", path)
    return pem


def server_credentials(
    cert_file: StrPath,
    key_file: StrPath,
    ca_file: StrPath | None = None,
    *,
    require_client_auth: bool,
) -> grpc.ServerCredentials:
    """gRPC server credentials from a PEM certificate (chain) and its private key.

    With ``require_client_auth`` (mutual TLS) every client must present a certificate that chains
    to ``ca_file``. Without it, a ``ca_file`` still verifies any certificate a client chooses to
    present. Raises :class:`TLSConfigError` naming the file if anything is wrong with the files.
    """
    if require_client_auth and ca_file is None:
        raise TLSConfigError(_NEEDS_CA)
    chain, key, _ = _load_identity(cert_file, key_file, _SERVER_ROLE)
    roots = _load_roots(ca_file) if ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=roots, require_client_auth=require_client_auth
    )


def _client_material(
    ca_file: StrPath | None, cert_file: StrPath | None, key_file: StrPath | None
) -> tuple[bytes | None, bytes | None, bytes | None, x509.Certificate | None]:
    """Checks a client's files; returns (roots, chain, key, leaf), each None where not given."""
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError(
            "a client certificate needs both cert_file and key_file "
            f"(got cert_file={cert_file!r}, key_file={key_file!r})"
        )
    roots = _load_roots(ca_file) if ca_file is not None else None
    chain = key = leaf = None
    if cert_file is not None and key_file is not None:
        chain, key, leaf = _load_identity(cert_file, key_file, _CLIENT_ROLE)
    return roots, chain, key, leaf


def channel_credentials(
    ca_file: StrPath | None,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
) -> grpc.ChannelCredentials:
    """gRPC channel credentials trusting ``ca_file`` (``None``: the system's default roots).

    Give ``cert_file`` and ``key_file`` together to present a client certificate, as mutual TLS
    requires. Raises :class:`TLSConfigError` naming the file if anything is wrong with the files.
    For a long-running client, :class:`ClientTLS` reads the files again when they change.
    """
    roots, chain, key, _ = _client_material(ca_file, cert_file, key_file)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


@dataclass(frozen=True)
class _Material:
    chain: bytes | None
    key: bytes | None
    roots: bytes | None
    not_after: datetime.datetime | None  # of the certificate presented, if any


class _WatchedFiles:
    """TLS files read again whenever one of them changes on disk (see :class:`NodeTLS`)."""

    def __init__(
        self,
        paths: tuple[Path | None, ...],
        on_load: Callable[[datetime.datetime], None] | None,
    ) -> None:
        self._paths = paths
        self._on_load = on_load
        # gRPC asks for a server's files on its own threads; a loop asks for a client's.
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._material = self._load()
        self._refused: tuple[bytes | None, ...] | None = None
        self.generation = 1
        """Counts the sets of files loaded: 1 at start, one more at each reload."""
        if on_load is not None and self._material.not_after is not None:
            on_load(self._material.not_after)

    def _load(self) -> _Material:
        raise NotImplementedError

    def _stamps(self) -> tuple[bytes | None, ...]:
        # The contents, not the modification times: a file rewritten within the same clock tick
        # with a same-sized replacement keeps its mtime. A few kilobytes, read at each handshake.
        stamps: list[bytes | None] = []
        for path in self._paths:
            try:
                stamps.append(path.read_bytes() if path is not None else None)
            except OSError:
                stamps.append(None)  # missing while it is replaced: _load says so if it stays
        return tuple(stamps)

    def refresh(self) -> bool:
        """Reads the files again if any changed since they were last read; returns whether a new
        set is now in use."""
        with self._lock:
            stamp = self._stamps()
            if stamp in (self._stamp, self._refused):
                return False
            try:
                material = self._load()
            except TLSConfigError as exc:
                self._refused = stamp
                log.warning("TLS files changed but cannot be used yet; the previous ones stay: %s", exc)
                return False
            self._stamp, self._material, self._refused = stamp, material, None
            self.generation += 1
        files = ", ".join(str(p) for p in self._paths if p is not None)
        valid = material.not_after.isoformat() if material.not_after is not None else "-"
        log.info("TLS files reloaded (%s): certificate valid until %s", files, valid)
        if self._on_load is not None and material.not_after is not None:
            self._on_load(material.not_after)
        return True

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a new channel, from the files as they are now (a node's: its own
        certificate as the client's, and its CA bundle as the roots)."""
        self.refresh()
        m = self._material
        return grpc.ssl_channel_credentials(
            root_certificates=m.roots, private_key=m.key, certificate_chain=m.chain
        )


class ClientTLS(_WatchedFiles):
    """A client's TLS files (the CA bundle its servers chain to, and for mutual TLS its own
    certificate and key), read again whenever one of them changes on disk.

    :class:`dengine.Client` takes it as ``credentials``: every channel it opens is built from the
    files as they are then, and a node it cannot reach while the files have changed since its
    channel was opened gets a new channel. A connection already open keeps the certificate it was
    opened with, as TLS does; a client certificate matters only at a handshake, so rotating it
    before it expires needs nothing more. Files that do not load (a certificate copied before its
    key) are logged once and the previous ones stay in use.
    """

    def __init__(
        self, ca_file: StrPath | None, cert_file: StrPath | None = None, key_file: StrPath | None = None
    ) -> None:
        """Loads the files, raising :class:`TLSConfigError` naming the file if anything is wrong
        (the arguments are those of :func:`channel_credentials`)."""
        super().__init__(tuple(None if f is None else Path(f) for f in (ca_file, cert_file, key_file)), None)

    @property
    def not_after(self) -> datetime.datetime | None:
        """When the client certificate in use expires (None without one)."""
        return self._material.not_after

    def _load(self) -> _Material:
        roots, chain, key, leaf = _client_material(*self._paths)
        return _Material(chain, key, roots, None if leaf is None else leaf.not_valid_after_utc)


class NodeTLS(_WatchedFiles):
    """A node's TLS files (its certificate chain, private key and CA bundle), read again whenever
    one of them changes on disk, so that certificates rotate without a restart.

    Each new connection uses the files as they are at its handshake: incoming ones through gRPC's
    dynamic server credentials (asked at every handshake), outgoing ones because every channel the
    node opens is built from :meth:`channel_credentials`. Connections already open keep the
    certificates they were opened with, as TLS does. A change that does not load (a certificate
    copied before its key, a key that does not match, an expired certificate) is logged once and
    the previous files stay in use; the next handshake after the files are put right picks them up.
    To change CAs without an outage, first add the new CA to every node's bundle, then replace the
    certificates, then drop the old CA.
    """

    def __init__(
        self,
        cert_file: StrPath,
        key_file: StrPath,
        ca_file: StrPath | None,
        *,
        require_client_auth: bool,
        on_load: Callable[[datetime.datetime], None] | None = None,
    ) -> None:
        """Loads the files (raising :class:`TLSConfigError` naming the file if anything is
        wrong). ``on_load`` is called with the node certificate's expiry now and at each reload."""
        if require_client_auth and ca_file is None:
            raise TLSConfigError(_NEEDS_CA)
        if not require_client_auth:
            log.warning(
                "tls.client_auth = false: callers need no certificate, so the peer (Raft) service "
                "takes messages from anyone who can reach this node's port; set it to true"
            )
        self.require_client_auth = require_client_auth
        ca = None if ca_file is None else Path(ca_file)
        super().__init__((Path(cert_file), Path(key_file), ca), on_load)
        self._served_generation = 1

    @property
    def not_after(self) -> datetime.datetime:
        """When the node certificate in use expires."""
        assert self._material.not_after is not None
        return self._material.not_after

    def _load(self) -> _Material:
        cert, key, ca = self._paths
        assert cert is not None and key is not None
        # The node's certificate serves both ends: its server, and its client to the peers.
        chain, key_pem, leaf = _load_identity(cert, key, _SERVER_ROLE, _CLIENT_ROLE)
        roots = _load_roots(ca) if ca is not None else None
        return _Material(chain, key_pem, roots, leaf.not_valid_after_utc)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that gRPC asks again at each handshake (:meth:`refresh`)."""
        with self._lock:
            self._served_generation = self.generation
            config = self._server_config()
        return grpc.dynamic_ssl_server_credentials(
            config, self._next_server_config, require_client_authentication=self.require_client_auth
        )

    def _server_config(self) -> grpc.ServerCertificateConfiguration:
        m = self._material
        assert m.key is not None and m.chain is not None
        return grpc.ssl_server_certificate_configuration([(m.key, m.chain)], root_certificates=m.roots)

    def _next_server_config(self) -> grpc.ServerCertificateConfiguration | None:
        # None tells gRPC to keep what it has. A reload another caller made counts too.
        self.refresh()
        with self._lock:
            if self._served_generation == self.generation:
                return None
            self._served_generation = self.generation
            return self._server_config()
