"""The node configuration: one typed, validated object built from layers.

A :class:`Config` comes from a TOML file, then ``DENGINE_<SECTION>_<KEY>`` environment variables,
then overrides (the command-line flags); a later layer wins key by key. Everything is checked
before anything starts, and every mistake raises one :class:`ConfigError` whose message names the
dotted key (``raft.heartbeat_ms``), what it accepts, and where the bad value came from (the file,
the variable or the override), because a node that starts on a wrong setting fails later and far
from the cause. ``docs/configuration.md`` documents every key; a test keeps the two in step.

Times are written in milliseconds here; :meth:`Config.raft_config` turns them into the ticks the
pure Raft core counts.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from dengine.errors import ConfigError
from dengine.event_loop import EVENT_LOOPS, resolve
from dengine.raft.config import DEFAULT_MAX_UNAPPLIED_BYTES, RaftConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

if TYPE_CHECKING:
    from dengine.storage import LogStore

__all__ = [
    "ENV_ALLOWLIST",
    "ENV_PREFIX",
    "SECTIONS",
    "ClusterSection",
    "Config",
    "ConfigError",
    "LogSection",
    "MembershipSection",
    "NodeSection",
    "RaftSection",
    "ReadSection",
    "SnapshotSection",
    "StorageSection",
    "TlsSection",
]

ENV_PREFIX = "DENGINE_"
"""Environment variables ``DENGINE_<SECTION>_<KEY>`` (upper case) set configuration keys."""

ENV_ALLOWLIST = frozenset({"DENGINE_CONFIG", "DENGINE_ENDPOINTS", "DENGINE_SIM_SEED", "DENGINE_SIM_SEEDS"})
"""``DENGINE_*`` variables that belong to other tools (the client, the simulator tests) and are
never read as configuration keys."""

_INT_MAX = (1 << 63) - 1  # ids, sizes and counts cross into Rust and protobuf as 64-bit integers


def _with_source(err: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """``err`` with the source of its key filled in, if it was missing and is known."""
    if err.source is not None or err.key is None or err.key not in sources:
        return err
    return ConfigError(err.detail, key=err.key, source=sources[err.key])


# --- what each key accepts ----------------------------------------------------------------------


class _Bad(Exception):
    """A value that a spec refuses; the message completes the sentence "<key> ..."."""


@dataclass(frozen=True, slots=True)
class _Spec:
    """What one key accepts, stored in its dataclass field's metadata."""

    kind: Literal["int", "float", "bool", "choice", "addr", "path", "name", "members", "engine"]
    lo: float | None = None
    choices: tuple[str, ...] = ()
    empty_ok: bool = False

    def expected(self) -> str:
        """The allowed values, phrased to follow "must be"."""
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            return f"{noun} >= {self.lo:g}" if self.lo is not None else noun
        if self.kind == "choice":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "addr" and self.empty_ok:
            return _EXPECTED["addr"] + ', or "" to disable'
        return _EXPECTED[self.kind]


_EXPECTED = {
    "bool": "true or false",
    "addr": 'a "host:port" address (port 1-65535, IPv6 host in brackets as in "[::1]:7001")',
    "path": "a file system path (a string)",
    "name": "1 to 64 characters among A-Z a-z 0-9 . _ -",
    "members": 'a table of node id to "host:port", as in members = { 1 = "127.0.0.1:7001" }',
    "engine": '"file", "memory", or "package.module:ClassName" naming a custom LogStore class',
}


def _int(lo: int) -> _Spec:
    return _Spec("int", lo=lo)


def _float(lo: float) -> _Spec:
    return _Spec("float", lo=lo)


def _choice(*choices: str) -> _Spec:
    return _Spec("choice", choices=choices)


_BOOL = _Spec("bool")
_PATH = _Spec("path")


def _addr(*, empty_ok: bool = False) -> _Spec:
    return _Spec("addr", empty_ok=empty_ok)


def _key(spec: _Spec) -> Any:
    """A required key (no default)."""
    return field(metadata={"spec": spec})


def _opt(default: object, spec: _Spec) -> Any:
    return field(default=default, metadata={"spec": spec})


def _spec_of(section: str, key: str) -> _Spec:
    spec: _Spec = _FIELDS[section][key].metadata["spec"]
    return spec


def _got(value: object) -> str:
    return f"got {value!r} ({type(value).__name__})"


_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_CUSTOM_ENGINE_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")


def _split_addr(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; an IPv6 host comes back without its brackets."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Bad(f"must be {_addr().expected()}, got {text!r}: no ']:port' after the IPv6 host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Bad(f"must be {_addr().expected()}, got {text!r}: {host!r} is no IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise _Bad(f"must be {_addr().expected()}, got {text!r}: the ':port' is missing")
        if ":" in host:
            raise _Bad(f"must be {_addr().expected()}, got {text!r}: write an IPv6 host in brackets")
        if not _HOST_RE.fullmatch(host):
            what = "the host is empty" if not host else f"{host!r} is not a host name or address"
            raise _Bad(f"must be {_addr().expected()}, got {text!r}: {what}")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Bad(f"must be {_addr().expected()}, got {text!r}: the port must be 1-65535")
    return host, int(port)


def _is_loopback(addr: str) -> bool:
    host = _split_addr(addr)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to anything


def _is_wildcard(addr: str) -> bool:
    """Whether ``addr`` names every interface (0.0.0.0, [::]): fine to listen on, but no other
    node or client can reach this one at it."""
    try:
        return ipaddress.ip_address(_split_addr(addr)[0]).is_unspecified
    except ValueError:
        return False


def _member_id(raw: object) -> int:
    if isinstance(raw, str) and raw.isascii() and raw.strip().isdigit():
        raw = int(raw.strip())
    if type(raw) is not int or not 1 <= raw <= _INT_MAX:
        raise _Bad(f"must be {_Spec('members').expected()}; the node id {raw!r} is not an integer >= 1")
    return raw


def _coerce_int(spec: _Spec, value: object) -> int:
    # bool is an int subclass, but `max_inflight = true` is a mistake, not 1
    if type(value) is not int or (spec.lo is not None and value < spec.lo):
        raise _Bad(f"must be {spec.expected()}, {_got(value)}")
    if value > _INT_MAX:
        raise _Bad(f"must be at most {_INT_MAX} (a signed 64-bit integer), got {value}")
    return value


def _coerce_float(spec: _Spec, value: object) -> float:
    if type(value) not in (int, float):
        raise _Bad(f"must be {spec.expected()}, {_got(value)}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or (spec.lo is not None and number < spec.lo):
        raise _Bad(f"must be {spec.expected()}, {_got(value)}")
    return number


def _coerce_bool(spec: _Spec, value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be {spec.expected()}, {_got(value)}")
    return value


def _coerce_members(spec: _Spec, value: object) -> Mapping[int, str]:
    if not isinstance(value, Mapping):
        raise _Bad(f"must be {spec.expected()}, {_got(value)}")
    members: dict[int, str] = {}
    for raw_id, addr in value.items():
        node_id = _member_id(raw_id)
        if node_id in members:
            raise _Bad(f"lists node {node_id} twice")
        if not isinstance(addr, str):
            raise _Bad(f'must map each node id to a "host:port" string; node {node_id}: {_got(addr)}')
        try:
            _split_addr(addr)
        except _Bad as bad:
            raise _Bad(f"has a bad address for node {node_id}: {bad}") from None
        members[node_id] = addr
    return MappingProxyType(dict(sorted(members.items())))


def _coerce_str(spec: _Spec, value: object) -> str:
    if spec.kind == "path" and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _Bad(f"must be {spec.expected()}, {_got(value)}")
    if spec.kind == "choice" and value not in spec.choices:
        hint = difflib.get_close_matches(value, spec.choices, n=1)
        did_you_mean = f' (did you mean "{hint[0]}"?)' if hint else ""
        raise _Bad(f"must be {spec.expected()}, got {value!r}{did_you_mean}")
    if spec.kind == "addr" and not (spec.empty_ok and value == ""):
        _split_addr(value)
    bad_name = spec.kind == "name" and not _NAME_RE.fullmatch(value)
    bad_engine = (
        spec.kind == "engine" and value not in ("file", "memory") and not _CUSTOM_ENGINE_RE.fullmatch(value)
    )
    if bad_name or bad_engine:
        raise _Bad(f"must be {spec.expected()}, got {value!r}")
    return value


_COERCE: dict[str, Callable[[_Spec, object], object]] = {
    "int": _coerce_int,
    "float": _coerce_float,
    "bool": _coerce_bool,
    "members": _coerce_members,
}


def _coerce(spec: _Spec, value: object) -> object:
    """Checks ``value`` against ``spec``; returns it in its stored form or raises :class:`_Bad`."""
    return _COERCE.get(spec.kind, _coerce_str)(spec, value)


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _parse_text(spec: _Spec, text: str) -> object:
    """The typed value of an environment variable or a string override (checked later)."""
    kind = spec.kind
    stripped = text.strip()
    if kind == "int":
        if not re.fullmatch(r"[+-]?[0-9]+", stripped):
            raise _Bad(f"must be {spec.expected()}, got {text!r}")
        return int(stripped)
    if kind == "float":
        try:
            return float(stripped)
        except ValueError:
            raise _Bad(f"must be {spec.expected()}, got {text!r}") from None
    if kind == "bool":
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise _Bad(f"must be {spec.expected()} (or 1/0, yes/no), got {text!r}")
    if kind == "members":
        members: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            node_id, sep, addr = item.partition("=")
            if not sep:
                raise _Bad(f'must be a list like "1=127.0.0.1:7001,2=127.0.0.1:7002", got {text!r}')
            if node_id.strip() in members:
                raise _Bad(f"lists node {node_id.strip()} twice")
            members[node_id.strip()] = addr.strip()
        return members
    return text


# --- the sections -------------------------------------------------------------------------------


class _Section:
    """Validates every field of a section dataclass against its spec, then runs ``_check``."""

    __slots__ = ()
    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            try:
                value = _coerce(f.metadata["spec"], getattr(self, f.name))
            except _Bad as bad:
                key = f"{self.SECTION}.{f.name}"
                raise ConfigError(f"{key} {bad}", key=key) from None
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Checks between keys of one section; resolves defaults that depend on other keys."""


@dataclass(frozen=True, slots=True)
class NodeSection(_Section):
    """``[node]``: who this node is and where it listens."""

    SECTION: ClassVar[str] = "node"
    id: int = _key(_int(1))
    listen: str = _opt("127.0.0.1:7001", _addr())
    advertise: str = _opt("", _addr(empty_ok=True))
    """The address other nodes and clients use to reach this node; "" means ``listen``."""
    data_dir: str = _opt("", _PATH)
    """"" means ``./dengine-data/node-<id>``."""
    metrics_listen: str = _opt("127.0.0.1:9101", _addr(empty_ok=True))
    insecure: bool = _opt(False, _BOOL)
    event_loop: Literal["auto", "uvloop", "asyncio"] = _opt("auto", _choice(*EVENT_LOOPS))
    """The event loop ``dengine serve`` runs on (see :mod:`dengine.event_loop`); "auto" is uvloop
    where it is installed, else asyncio's own. An embedding program chooses its own loop."""

    def _check(self) -> None:
        try:
            resolve(self.event_loop)
        except ImportError as exc:
            raise ConfigError(f"node.event_loop: {exc}", key="node.event_loop") from None
        if not self.advertise:
            object.__setattr__(self, "advertise", self.listen)
        if not self.data_dir:
            object.__setattr__(self, "data_dir", f"./dengine-data/node-{self.id}")


@dataclass(frozen=True, slots=True)
class ClusterSection(_Section):
    """``[cluster]``: the cluster's name and its initial members."""

    SECTION: ClassVar[str] = "cluster"
    id: str = _key(_Spec("name"))
    members: Mapping[int, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False, metadata={"spec": _Spec("members")}
    )
    initial_state: Literal["new", "existing"] = _opt("new", _choice("new", "existing"))

    def _check(self) -> None:
        if not self.members:
            raise ConfigError(
                f"cluster.members must list at least one member: {_Spec('members').expected()}",
                key="cluster.members",
            )
        seen: dict[tuple[str, int], int] = {}
        for node_id, addr in self.members.items():
            host, port = _split_addr(addr)
            where = (host.lower(), port)
            if where in seen:
                raise ConfigError(
                    f"cluster.members gives nodes {seen[where]} and {node_id} the same address {addr!r}; "
                    "every member needs its own address",
                    key="cluster.members",
                )
            seen[where] = node_id


@dataclass(frozen=True, slots=True)
class RaftSection(_Section):
    """``[raft]``: protocol timing and replication batching (times in milliseconds)."""

    SECTION: ClassVar[str] = "raft"
    tick_ms: int = _opt(50, _int(1))
    heartbeat_ms: int = _opt(100, _int(1))
    election_timeout_ms: int = _opt(1000, _int(1))
    pre_vote: bool = _opt(True, _BOOL)
    check_quorum: bool = _opt(True, _BOOL)
    max_inflight: int = _opt(64, _int(1))
    max_batch_entries: int = _opt(4096, _int(1))
    max_batch_bytes: int = _opt(1 << 20, _int(1))
    forward_proposals: bool = _opt(True, _BOOL)
    propose_linger_ms: float = _opt(0.0, _float(0))
    max_unapplied_bytes: int = _opt(DEFAULT_MAX_UNAPPLIED_BYTES, _int(0))

    def _check(self) -> None:
        if self.tick_ms > self.heartbeat_ms:
            raise ConfigError(
                f"raft.tick_ms must be at most raft.heartbeat_ms ({self.heartbeat_ms}), got {self.tick_ms}: "
                "timers advance one tick at a time, so a heartbeat cannot be sent more often than a tick",
                key="raft.tick_ms",
            )
        if 2 * self.heartbeat_ms >= self.election_timeout_ms:
            raise ConfigError(
                f"raft.heartbeat_ms must be less than half of raft.election_timeout_ms "
                f"({self.election_timeout_ms} / 2 = {self.election_timeout_ms / 2:g}), "
                f"got {self.heartbeat_ms}: followers must hear several heartbeats per election timeout, "
                "or one late or lost heartbeat starts a needless election",
                key="raft.heartbeat_ms",
            )


@dataclass(frozen=True, slots=True)
class StorageSection(_Section):
    """``[storage]``: the log storage engine."""

    SECTION: ClassVar[str] = "storage"
    engine: str = _opt("file", _Spec("engine"))
    """"file", "memory", or "package.module:ClassName" for a custom LogStore."""
    segment_bytes: int = _opt(64 << 20, _int(4096))
    preallocate: bool = _opt(False, _BOOL)

    def load_log_store_class(self) -> type[LogStore]:
        """The class behind ``engine``: :class:`~dengine.storage.WalLogStore` for ``"file"``,
        :class:`~dengine.storage.MemoryLogStore` for ``"memory"``, otherwise the custom class,
        imported now (never at load time, so a config can be checked where the class is absent).

        Raises :class:`ConfigError` (key ``storage.engine``, naming the engine and the cause) when
        the module cannot be imported (missing, a syntax error, an exception at import), has no
        such attribute, or the attribute is not a class that implements every
        :class:`~dengine.storage.LogStore` method with a plain (not ``async``) function: the node
        calls them on its loop and its I/O thread and never awaits them. Constructing the class
        is :func:`dengine.storage.open_custom_log_store`'s job.
        """
        from dengine import storage  # noqa: PLC0415 - the storage engines load only when needed

        if self.engine == "file":
            return storage.WalLogStore
        if self.engine == "memory":
            return storage.MemoryLogStore
        module_name, _, attr = self.engine.partition(":")

        def refuse(why: str) -> ConfigError:
            return ConfigError(f"storage.engine = {self.engine!r}: {why}", key="storage.engine")

        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise refuse(f"cannot import module {module_name!r} ({exc})") from exc
        except Exception as exc:  # a SyntaxError, or whatever the module raised while importing
            raise refuse(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
        cls = getattr(module, attr, None)
        if cls is None:
            raise refuse(f"module {module_name!r} has no attribute {attr!r}")
        if not isinstance(cls, type):
            raise refuse(f"{attr!r} is a {type(cls).__name__}, not a class")
        required = sorted(
            name for name, obj in vars(storage.LogStore).items() if not name.startswith("_") and callable(obj)
        )
        # A method inherited from the LogStore Protocol itself is a stub that returns None.
        missing = [
            name
            for name in required
            if not callable(getattr(cls, name, None)) or getattr(cls, name) is getattr(storage.LogStore, name)
        ]
        if missing:
            raise refuse(f"{attr!r} is not a LogStore: it lacks {', '.join(missing)}")
        coroutines = [name for name in required if inspect.iscoroutinefunction(getattr(cls, name))]
        if coroutines:
            raise refuse(
                f"{attr!r}.{coroutines[0]} is a coroutine function (async def): LogStore methods must be "
                "plain functions; the node runs sync() on its I/O thread and the others on its loop, "
                "and awaits none of them"
            )
        return cls


@dataclass(frozen=True, slots=True)
class SnapshotSection(_Section):
    """``[snapshot]``: when to snapshot, what to keep, how to ship snapshots to followers."""

    SECTION: ClassVar[str] = "snapshot"
    enabled: bool = _opt(True, _BOOL)
    entries: int = _opt(100_000, _int(0))
    bytes: int = _opt(0, _int(0))
    interval_s: int = _opt(0, _int(0))
    log_factor: float = _opt(2.0, _float(0))
    keep: int = _opt(2, _int(1))
    trailing_entries: int = _opt(5000, _int(0))
    chunk_bytes: int = _opt(1 << 20, _int(1))
    bandwidth_mb_s: float = _opt(0.0, _float(0))


@dataclass(frozen=True, slots=True)
class MembershipSection(_Section):
    """``[membership]``: when a learner is promoted to voter."""

    SECTION: ClassVar[str] = "membership"
    promote: Literal["auto", "manual"] = _opt("auto", _choice("auto", "manual"))
    max_lag_entries: int = _opt(1000, _int(0))
    caught_up_for_ms: int = _opt(2000, _int(0))


@dataclass(frozen=True, slots=True)
class ReadSection(_Section):
    """``[read]``: read consistency."""

    SECTION: ClassVar[str] = "read"
    default_consistency: Literal["linearizable", "lease", "stale"] = _opt(
        "linearizable", _choice("linearizable", "lease", "stale")
    )
    lease_clock_drift_ms: int = _opt(100, _int(0))


@dataclass(frozen=True, slots=True)
class TlsSection(_Section):
    """``[tls]``: TLS for peer and client traffic."""

    SECTION: ClassVar[str] = "tls"
    enabled: bool = _opt(False, _BOOL)
    ca_file: str = _opt("", _PATH)
    cert_file: str = _opt("", _PATH)
    key_file: str = _opt("", _PATH)
    client_auth: bool = _opt(True, _BOOL)

    def _check(self) -> None:
        if not self.enabled:
            given = [name for name in ("ca_file", "cert_file", "key_file") if getattr(self, name)]
            if given:
                # Files without the switch would be plaintext that looks configured for TLS.
                raise ConfigError(
                    f"tls.{given[0]} is set but tls.enabled is false: set tls.enabled = true to "
                    "use TLS, or remove the [tls] files to run without it",
                    key="tls.enabled",
                )
            return
        for name in ("ca_file", "cert_file", "key_file"):
            path: str = getattr(self, name)
            if not path:
                raise ConfigError(
                    f"tls.{name} is required when tls.enabled = true: {_PATH.expected()}", key=f"tls.{name}"
                )
            if not os.path.isfile(path):
                raise ConfigError(
                    f"tls.{name} names a file that does not exist: {path!r} "
                    f"(relative paths start at the working directory {os.getcwd()!r})",
                    key=f"tls.{name}",
                )


@dataclass(frozen=True, slots=True)
class LogSection(_Section):
    """``[log]``: the node's own log output."""

    SECTION: ClassVar[str] = "log"
    level: Literal["debug", "info", "warning", "error"] = _opt(
        "info", _choice("debug", "info", "warning", "error")
    )
    format: Literal["text", "json"] = _opt("text", _choice("text", "json"))


SECTIONS: Mapping[str, type[_Section]] = MappingProxyType(
    {
        cls.SECTION: cls
        for cls in (
            NodeSection,
            ClusterSection,
            RaftSection,
            StorageSection,
            SnapshotSection,
            MembershipSection,
            ReadSection,
            TlsSection,
            LogSection,
        )
    }
)
"""Section name -> its dataclass, in documentation order."""

_FIELDS = {name: {f.name: f for f in fields(cls)} for name, cls in SECTIONS.items()}  # type: ignore[arg-type]
_ENV_KEYS = {
    f"{ENV_PREFIX}{section.upper()}_{key.upper()}": (section, key)
    for section, keys in _FIELDS.items()
    for key in keys
}


# --- the whole configuration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """A node's complete, validated configuration. Build it with :meth:`load` or :meth:`from_dict`;
    constructing the sections directly validates them just the same, only without sources."""

    node: NodeSection
    cluster: ClusterSection
    raft: RaftSection = field(default_factory=RaftSection)
    storage: StorageSection = field(default_factory=StorageSection)
    snapshot: SnapshotSection = field(default_factory=SnapshotSection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    read: ReadSection = field(default_factory=ReadSection)
    tls: TlsSection = field(default_factory=TlsSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"[{name}] must be a {cls.__name__}, {_got(getattr(self, name))}")
        raft, read = self.raft, self.read
        if read.lease_clock_drift_ms >= raft.election_timeout_ms:
            raise ConfigError(
                f"read.lease_clock_drift_ms must be less than raft.election_timeout_ms "
                f"({raft.election_timeout_ms}), got {read.lease_clock_drift_ms}: a leader's lease lasts "
                "the election timeout minus this drift bound, so the difference must stay positive",
                key="read.lease_clock_drift_ms",
            )
        if read.default_consistency == "lease" and not raft.check_quorum:
            raise ConfigError(
                'read.default_consistency = "lease" needs raft.check_quorum = true: without it a '
                "deposed leader does not step down and could serve stale reads from its lease; use "
                '"linearizable" or turn raft.check_quorum on',
                key="read.default_consistency",
            )
        election_ticks, _, drift_ticks = self._ticks()
        if drift_ticks >= election_ticks:
            raise ConfigError(
                f"read.lease_clock_drift_ms ({read.lease_clock_drift_ms}) rounds up to {drift_ticks} ticks "
                f"of raft.tick_ms = {raft.tick_ms}, as many as raft.election_timeout_ms "
                f"({raft.election_timeout_ms}, {election_ticks} ticks), which leaves no lease: lower the "
                "drift or raft.tick_ms",
                key="read.lease_clock_drift_ms",
            )
        if self.cluster.initial_state == "new" and self.node.id not in self.cluster.members:
            raise ConfigError(
                f"node.id must be one of cluster.members ({', '.join(map(str, self.cluster.members))}) "
                f'when cluster.initial_state = "new", got {self.node.id}; a node that joins a running '
                'cluster sets cluster.initial_state = "existing"',
                key="node.id",
            )
        if not self.tls.enabled and not self.node.insecure and not _is_loopback(self.node.listen):
            raise ConfigError(
                f"node.listen = {self.node.listen!r} is not a loopback address and [tls] is not enabled, "
                "so peer and client traffic would cross the network unencrypted and unauthenticated: "
                "pass --insecure (node.insecure = true) or enable [tls]",
                key="node.listen",
            )
        if _is_wildcard(self.node.advertise):
            raise ConfigError(
                f"node.advertise = {self.node.advertise!r} names no host (it defaults to node.listen): "
                "other nodes and clients are told this address and cannot reach the node at it; "
                "set node.advertise to the host:port they should dial",
                key="node.advertise",
            )

    def _ticks(self) -> tuple[int, int, int]:
        """``(election_ticks, heartbeat_ticks, clock_drift_ticks)`` at ``raft.tick_ms`` per tick.

        Rounding is towards safety: the election timeout and the drift bound round up (a lease
        never outlives the real timeout), the heartbeat to the nearest tick (never below one).
        """
        tick = self.raft.tick_ms
        return (
            math.ceil(self.raft.election_timeout_ms / tick),
            max(1, round(self.raft.heartbeat_ms / tick)),
            math.ceil(self.read.lease_clock_drift_ms / tick),
        )

    def raft_config(self, node_id: int | None = None) -> RaftConfig:
        """The pure core's :class:`~dengine.raft.RaftConfig` for ``node_id`` (default: this node).

        The voters are ``cluster.members``. A node outside them (only possible with
        ``cluster.initial_state = "existing"``) starts as a learner: it joins a running cluster,
        which tells it the real membership. Lease reads are enabled whenever ``check_quorum`` is
        on (a lease is only safe then); each read request picks its own consistency.
        """
        node_id = self.node.id if node_id is None else node_id
        if type(node_id) is not int or node_id < 1:
            raise ConfigError(f"raft_config(node_id) must be an integer >= 1, {_got(node_id)}")
        voters = frozenset(self.cluster.members)
        learners: frozenset[int] = frozenset()
        if node_id not in voters:
            if self.cluster.initial_state == "new":
                raise ConfigError(
                    f"node {node_id} is not one of cluster.members ({', '.join(map(str, sorted(voters)))})",
                    key="cluster.members",
                )
            learners = frozenset({node_id})
        election_ticks, heartbeat_ticks, drift_ticks = self._ticks()
        raft = self.raft
        return RaftConfig(
            id=node_id,
            voters=voters,
            learners=learners,
            election_ticks=election_ticks,
            heartbeat_ticks=heartbeat_ticks,
            pre_vote=raft.pre_vote,
            check_quorum=raft.check_quorum,
            lease_reads=raft.check_quorum,
            clock_drift_ticks=drift_ticks,
            max_inflight=raft.max_inflight,
            max_batch_entries=raft.max_batch_entries,
            max_batch_bytes=raft.max_batch_bytes,
            forward_proposals=raft.forward_proposals,
            max_unapplied_bytes=raft.max_unapplied_bytes,
            fast_start=True,
        )

    # --- building and dumping ---------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> Config:
        """Reads the TOML file at ``path`` (if any), then the ``DENGINE_*`` variables of ``env``
        (default ``os.environ``), then ``overrides`` (dotted keys such as ``"node.id"``; ``None``
        values are skipped, as for an unset flag, and a string for a non-string key is parsed
        like an environment variable). A later layer wins key by key.
        """
        values: dict[str, dict[str, object]] = {}
        sources: dict[str, str] = {}
        if path is not None:
            _merge_tree(values, sources, _read_toml(path), f"file {os.fspath(path)}")
        _merge_env(values, sources, os.environ if env is None else env)
        if overrides:
            _merge_overrides(values, sources, overrides)
        return cls._build(values, sources)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Builds a config from ``{section: {key: value}}``, as read from TOML or given by
        :meth:`to_dict`; ``cluster.members`` keys may be ints or decimal strings."""
        values: dict[str, dict[str, object]] = {}
        _merge_tree(values, {}, data, None)
        return cls._build(values, {})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` in TOML types (``cluster.members`` keys as strings), so
        ``Config.from_dict(c.to_dict()) == c`` and the result can be written out as TOML."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {key: getattr(section, key) for key in _FIELDS[name]}
        out["cluster"]["members"] = {str(node_id): addr for node_id, addr in self.cluster.members.items()}
        return out

    @classmethod
    def _build(cls, values: Mapping[str, Mapping[str, object]], sources: Mapping[str, str]) -> Config:
        sections: dict[str, Any] = {}
        try:
            for name, section_cls in SECTIONS.items():
                given = values.get(name, {})
                for key, f in _FIELDS[name].items():
                    if f.default is MISSING and f.default_factory is MISSING and key not in given:
                        raise ConfigError(
                            f"{name}.{key} is required: {f.metadata['spec'].expected()}; set it under "
                            f"[{name}], with {ENV_PREFIX}{name.upper()}_{key.upper()} or with an override",
                            key=f"{name}.{key}",
                        )
                sections[name] = section_cls(**given)
            return cls(**sections)
        except ConfigError as exc:
            raise _with_source(exc, sources) from None


def _read_toml(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    shown = os.fspath(path)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {shown} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {shown}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        # the message ends with "(at line L, column C)"
        raise ConfigError(f"configuration file {shown} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {shown} is not UTF-8 text: {exc}") from None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]}? " if close else ""


def _unknown_key(section: str, key: str, source: str | None) -> ConfigError:
    valid = list(_FIELDS[section])
    return ConfigError(
        f"{section}.{key} is not a configuration key; "
        f"{_suggest(f'{section}.{key}', [f'{section}.{name}' for name in valid])}"
        f"valid keys of [{section}]: {', '.join(valid)}",
        key=f"{section}.{key}",
        source=source,
    )


def _unknown_section(section: str, source: str | None) -> ConfigError:
    close = difflib.get_close_matches(section, list(SECTIONS), n=1)
    hint = f"did you mean [{close[0]}]? " if close else ""
    return ConfigError(
        f"[{section}] is not a configuration section; {hint}valid sections: "
        + ", ".join(f"[{name}]" for name in SECTIONS),
        key=section,
        source=source,
    )


def _merge_tree(
    values: dict[str, dict[str, object]],
    sources: dict[str, str],
    data: Mapping[str, Any],
    source: str | None,
) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a configuration must be a table of sections, {_got(data)}", source=source)
    for section, table in data.items():
        if section not in SECTIONS:
            raise _unknown_section(str(section), source)
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"[{section}] must be a table of keys, {_got(table)}", key=section, source=source
            )
        for key, value in table.items():
            if key not in _FIELDS[section]:
                raise _unknown_key(section, str(key), source)
            values.setdefault(section, {})[key] = value
            if source is not None:
                sources[f"{section}.{key}"] = source


def _looks_like_config(name: str) -> bool:
    """Whether an unknown ``DENGINE_*`` variable is probably a mistyped configuration key."""
    rest = name[len(ENV_PREFIX) :].lower()
    section = rest.split("_", 1)[0]
    return (
        section in SECTIONS
        or bool(difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.75))
        or bool(difflib.get_close_matches(name.upper(), list(_ENV_KEYS), n=1, cutoff=0.85))
    )


def _merge_env(values: dict[str, dict[str, object]], sources: dict[str, str], env: Mapping[str, str]) -> None:
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in ENV_ALLOWLIST:
            continue
        source = f"environment variable {name}"
        target = _ENV_KEYS.get(name)
        if target is None:
            if not _looks_like_config(name):
                continue  # some other tool's variable
            section = name[len(ENV_PREFIX) :].split("_", 1)[0].lower()
            if section in SECTIONS:
                listed = ", ".join(var for var, (sec, _) in _ENV_KEYS.items() if sec == section)
            else:
                listed = f"{ENV_PREFIX}<SECTION>_<KEY> with <SECTION> one of " + ", ".join(
                    known.upper() for known in SECTIONS
                )
            raise ConfigError(
                f"{name} is not a configuration variable; {_suggest(name.upper(), list(_ENV_KEYS))}"
                f"valid ones: {listed}",
                source=source,
            )
        section, key = target
        try:
            value = _parse_text(_spec_of(section, key), env[name])
        except _Bad as bad:
            raise ConfigError(f"{section}.{key} {bad}", key=f"{section}.{key}", source=source) from None
        values.setdefault(section, {})[key] = value
        sources[f"{section}.{key}"] = source


def _merge_overrides(
    values: dict[str, dict[str, object]], sources: dict[str, str], overrides: Mapping[str, object]
) -> None:
    for dotted, value in overrides.items():
        if value is None:
            continue
        source = f"override {dotted}"
        section, dot, key = dotted.partition(".")
        if not dot:
            raise ConfigError(
                f"override {dotted!r} must be a dotted key such as 'raft.heartbeat_ms'", source=source
            )
        if section not in SECTIONS:
            raise _unknown_section(section, source)
        if key not in _FIELDS[section]:
            raise _unknown_key(section, key, source)
        spec = _spec_of(section, key)
        parsed = value
        if isinstance(value, str) and spec.kind in ("int", "float", "bool", "members"):
            try:
                parsed = _parse_text(spec, value)
            except _Bad as bad:
                raise ConfigError(f"{dotted} {bad}", key=dotted, source=source) from None
        values.setdefault(section, {})[key] = parsed
        sources[dotted] = source
