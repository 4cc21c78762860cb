"""dengine.config: defaults, layering (file < environment < overrides), validation messages,
the conversion to the Raft core's ticks, and the configuration reference staying complete."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import dengine.config as config_module
import dengine.event_loop
from dengine.config import SECTIONS, Config, ConfigError, RaftSection, TlsSection
from dengine.errors import DengineError
from dengine.raft import RaftConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

MEMBERS = {"1": "127.0.0.1:7001", "2": "127.0.0.1:7002", "3": "127.0.0.1:7003"}
BASE_TOML = """\
[node]
id = 1

[cluster]
id = "test"
members = { 1 = "127.0.0.1:7001", 2 = "127.0.0.1:7002", 3 = "127.0.0.1:7003" }
"""


def config(**sections: dict[str, Any]) -> Config:
    """A config from the minimal valid one, with ``sections`` merged in key by key."""
    data: dict[str, dict[str, Any]] = {"node": {"id": 1}, "cluster": {"id": "test", "members": dict(MEMBERS)}}
    for name, keys in sections.items():
        data.setdefault(name, {}).update(keys)
    return Config.from_dict(data)


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error(**sections: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config(**sections)
    return str(info.value)


# --- defaults and layering ----------------------------------------------------------------------


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    c = Config.load(write(tmp_path, BASE_TOML), env={})
    assert c.to_dict() == {
        "node": {
            "id": 1,
            "listen": "127.0.0.1:7001",
            "advertise": "127.0.0.1:7001",
            "data_dir": "./dengine-data/node-1",
            "metrics_listen": "127.0.0.1:9101",
            "insecure": False,
            "event_loop": "auto",
        },
        "cluster": {"id": "test", "members": MEMBERS, "initial_state": "new"},
        "raft": {
            "tick_ms": 50,
            "heartbeat_ms": 100,
            "election_timeout_ms": 1000,
            "pre_vote": True,
            "check_quorum": True,
            "max_inflight": 64,
            "max_batch_entries": 4096,
            "max_batch_bytes": 1048576,
            "forward_proposals": True,
            "propose_linger_ms": 0.0,
            "max_unapplied_bytes": 64 << 20,
        },
        "storage": {"engine": "file", "segment_bytes": 64 * 1024 * 1024, "preallocate": False},
        "snapshot": {
            "enabled": True,
            "entries": 100000,
            "bytes": 0,
            "interval_s": 0,
            "log_factor": 2.0,
            "keep": 2,
            "trailing_entries": 5000,
            "chunk_bytes": 1048576,
            "bandwidth_mb_s": 0.0,
        },
        "membership": {"promote": "auto", "max_lag_entries": 1000, "caught_up_for_ms": 2000},
        "read": {"default_consistency": "linearizable", "lease_clock_drift_ms": 100},
        "tls": {"enabled": False, "ca_file": "", "cert_file": "", "key_file": "", "client_auth": True},
        "log": {"level": "info", "format": "text"},
    }
    assert c.cluster.members == {1: "127.0.0.1:7001", 2: "127.0.0.1:7002", 3: "127.0.0.1:7003"}


def test_advertise_and_data_dir_follow_listen_and_id() -> None:
    c = config(node={"id": 2, "listen": "127.0.0.1:7002"})
    assert c.node.advertise == "127.0.0.1:7002"
    assert c.node.data_dir == "./dengine-data/node-2"
    c = config(node={"advertise": "10.0.0.1:7001", "data_dir": "/var/lib/dengine"})
    assert (c.node.advertise, c.node.data_dir) == ("10.0.0.1:7001", "/var/lib/dengine")


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_TOML + "\n[raft]\nheartbeat_ms = 90\ntick_ms = 10\n")
    env = {"DENGINE_RAFT_HEARTBEAT_MS": "80", "DENGINE_NODE_ID": "2"}
    assert Config.load(path, env={}).raft.heartbeat_ms == 90
    c = Config.load(path, env=env)
    assert (c.raft.heartbeat_ms, c.node.id, c.raft.tick_ms) == (80, 2, 10)
    c = Config.load(path, env=env, overrides={"raft.heartbeat_ms": 60, "node.id": None})
    assert (c.raft.heartbeat_ms, c.node.id, c.raft.tick_ms) == (60, 2, 10)


def test_environment_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENGINE_LOG_LEVEL", "debug")
    assert Config.load(write(tmp_path, BASE_TOML)).log.level == "debug"


def test_environment_values_are_parsed_by_type() -> None:
    env = {
        "DENGINE_NODE_ID": "3",
        "DENGINE_CLUSTER_ID": "prod.eu-1",
        "DENGINE_CLUSTER_MEMBERS": " 3=10.0.0.3:7001 , 1=10.0.0.1:7001,",
        "DENGINE_NODE_INSECURE": "YES",
        "DENGINE_NODE_LISTEN": "0.0.0.0:7001",
        "DENGINE_NODE_ADVERTISE": "10.0.0.3:7001",
        "DENGINE_RAFT_PRE_VOTE": "false",
        "DENGINE_RAFT_CHECK_QUORUM": "0",
        "DENGINE_RAFT_PROPOSE_LINGER_MS": "2.5",
        "DENGINE_SNAPSHOT_BANDWIDTH_MB_S": "10",
        "DENGINE_NODE_METRICS_LISTEN": "",
    }
    c = Config.load(env=env)
    assert c.node.id == 3 and c.cluster.id == "prod.eu-1"
    assert dict(c.cluster.members) == {1: "10.0.0.1:7001", 3: "10.0.0.3:7001"}
    assert c.node.insecure is True and c.raft.pre_vote is False and c.raft.check_quorum is False
    assert c.raft.propose_linger_ms == 2.5 and c.snapshot.bandwidth_mb_s == 10.0
    assert c.node.metrics_listen == ""


def test_string_overrides_are_parsed_like_environment_variables() -> None:
    c = Config.load(
        env={},
        overrides={
            "node.id": "2",
            "cluster.id": "c",
            "cluster.members": "1=127.0.0.1:7001,2=127.0.0.1:7002",
            "raft.pre_vote": "no",
            "raft.propose_linger_ms": "0",
        },
    )
    assert (c.node.id, c.raft.pre_vote, c.raft.propose_linger_ms) == (2, False, 0.0)
    assert list(c.cluster.members) == [1, 2]


def test_other_tools_variables_are_ignored() -> None:
    env = {
        "DENGINE_ENDPOINTS": "127.0.0.1:7001",
        "DENGINE_SIM_SEED": "7",
        "DENGINE_SIM_SEEDS": "200",
        "DENGINE_CONFIG": "node.toml",
        "DENGINE_BENCHMARK_OUTPUT": "x",
        "HOME": "/root",
    }
    c = Config.load(env=env, overrides={"node.id": 1, "cluster.id": "c", "cluster.members": {1: "h:1"}})
    assert c.node.id == 1


def test_allowlisted_variables_are_never_read_as_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"DENGINE_LOG_DIR": "/var/log"}  # looks like a [log] key, so it is refused...
    overrides = {"node.id": 1, "cluster.id": "c", "cluster.members": "1=h:1"}
    with pytest.raises(ConfigError, match="DENGINE_LOG_DIR is not a configuration variable"):
        Config.load(env=env, overrides=overrides)
    # ...unless it belongs to another tool
    monkeypatch.setattr(config_module, "ENV_ALLOWLIST", frozenset({"DENGINE_LOG_DIR"}))
    assert Config.load(env=env, overrides=overrides).log.level == "info"


# --- validation: one mistake per test -----------------------------------------------------------


def test_unknown_section_in_file_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_TOML + "\n[snapshots]\nentries = 5\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    message = str(info.value)
    assert "[snapshots]" in message and "did you mean [snapshot]?" in message
    assert "[membership]" in message  # lists the valid sections
    assert str(path) in message


def test_unknown_key_in_file_suggests_the_closest_and_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_TOML + "\n[raft]\nheartbeat = 50\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    message = str(info.value)
    assert "raft.heartbeat is not a configuration key" in message
    assert "did you mean raft.heartbeat_ms?" in message
    assert "election_timeout_ms" in message and "propose_linger_ms" in message
    assert str(path) in message
    assert info.value.key == "raft.heartbeat"


def test_unknown_environment_variable_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={"DENGINE_RAFT_HEARTBEAT": "50"}, overrides={"node.id": 1})
    message = str(info.value)
    assert "DENGINE_RAFT_HEARTBEAT is not a configuration variable" in message
    assert "did you mean DENGINE_RAFT_HEARTBEAT_MS?" in message
    assert "DENGINE_RAFT_TICK_MS" in message  # the valid ones of that section


def test_environment_variable_with_a_mistyped_section_is_refused() -> None:
    with pytest.raises(ConfigError, match="DENGINE_RAF_TICK_MS is not a configuration variable"):
        Config.load(env={"DENGINE_RAF_TICK_MS": "50"})


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        config().load(env={}, overrides={"node.idd": 2})
    assert "node.idd is not a configuration key; did you mean node.id?" in str(info.value)
    assert "override node.idd" in str(info.value)


def test_string_for_int_names_key_expected_type_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_TOML + '\n[raft]\ntick_ms = "50"\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    message = str(info.value)
    assert "raft.tick_ms must be an integer >= 1" in message and "'50' (str)" in message
    assert f"from file {path}" in message


def test_bool_for_int_is_refused() -> None:
    message = error(raft={"max_inflight": True})
    assert "raft.max_inflight must be an integer >= 1" in message and "True (bool)" in message


def test_float_for_int_is_refused_but_int_for_float_is_accepted() -> None:
    assert "raft.heartbeat_ms must be an integer" in error(raft={"heartbeat_ms": 100.0})
    assert config(raft={"propose_linger_ms": 1}).raft.propose_linger_ms == 1.0
    assert "raft.propose_linger_ms must be a number >= 0" in error(raft={"propose_linger_ms": "1"})


def test_bad_environment_value_names_the_variable_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={"DENGINE_RAFT_PRE_VOTE": "maybe"})
    message = str(info.value)
    assert "raft.pre_vote must be true or false" in message and "'maybe'" in message
    assert "environment variable DENGINE_RAFT_PRE_VOTE" in message
    with pytest.raises(ConfigError, match=r"node\.id must be an integer >= 1, got 'one'"):
        Config.load(env={"DENGINE_NODE_ID": "one"})


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("raft", "tick_ms", 0, "an integer >= 1"),
        ("node", "id", 0, "an integer >= 1"),
        ("node", "id", 1 << 64, "at most 9223372036854775807"),
        ("snapshot", "keep", 0, "an integer >= 1"),
        ("snapshot", "entries", -1, "an integer >= 0"),
        ("snapshot", "log_factor", -0.5, "a number >= 0"),
        ("storage", "segment_bytes", 1024, "an integer >= 4096"),
        ("raft", "propose_linger_ms", -0.5, "a number >= 0"),
        ("raft", "propose_linger_ms", float("nan"), "a number >= 0"),
        ("raft", "max_unapplied_bytes", -1, "an integer >= 0"),
    ],
)
def test_out_of_range_names_key_and_range(section: str, key: str, value: object, expected: str) -> None:
    message = error(**{section: {key: value}})
    assert f"{section}.{key} must be" in message and expected in message


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("log", "level", "verbose", '"debug", "info", "warning", "error"'),
        ("log", "format", "yaml", '"text", "json"'),
        ("read", "default_consistency", "strong", '"linearizable", "lease", "stale"'),
        ("membership", "promote", "sometimes", '"auto", "manual"'),
        ("cluster", "initial_state", "old", '"new", "existing"'),
        ("node", "event_loop", "trio", '"auto", "uvloop", "asyncio"'),
    ],
)
def test_bad_enum_value_lists_the_allowed_values(section: str, key: str, value: str, allowed: str) -> None:
    message = error(**{section: {key: value}})
    assert f"{section}.{key} must be one of {allowed}, got {value!r}" in message


def test_bad_enum_value_suggests_the_closest() -> None:
    assert 'did you mean "warning"?' in error(log={"level": "warn"})


@pytest.mark.parametrize(
    "address",
    [
        "localhost",
        "host:0",
        "host:65536",
        "host:http",
        ":7001",
        "::1:7001",
        "[::1]7001",
        "[db]:7001",
        "a b:1",
    ],
)
def test_malformed_address_is_refused(address: str) -> None:
    message = error(node={"metrics_listen": address})
    assert 'node.metrics_listen must be a "host:port" address (port 1-65535' in message
    assert repr(address) in message


@pytest.mark.parametrize("address", ["[::1]:7001", "localhost:1", "node-1.example.com:65535", "10.1.2.3:80"])
def test_wellformed_addresses_are_accepted(address: str) -> None:
    assert config(node={"metrics_listen": address}).node.metrics_listen == address


def test_bad_member_address_names_the_member() -> None:
    message = error(cluster={"members": {"1": "127.0.0.1:7001", "2": "127.0.0.1"}})
    assert "cluster.members has a bad address for node 2" in message and "port" in message


def test_bad_member_id_is_refused() -> None:
    assert "the node id 'one' is not an integer >= 1" in error(cluster={"members": {"one": "h:1"}})
    assert "the node id 0 is not an integer >= 1" in error(cluster={"members": {0: "h:1"}})


def test_bad_cluster_id_lists_the_allowed_characters() -> None:
    for bad in ("", "has space", "x" * 65, "émoji"):
        message = error(cluster={"id": bad})
        assert "cluster.id must be 1 to 64 characters among A-Z a-z 0-9 . _ -" in message


def test_missing_required_key_names_it_and_its_variable() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"cluster": {"id": "c", "members": MEMBERS}})
    assert "node.id is required: an integer >= 1" in str(info.value)
    assert "DENGINE_NODE_ID" in str(info.value)


def test_uvloop_where_it_is_not_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dengine.event_loop, "_uvloop_installed", lambda: False)
    message = error(node={"event_loop": "uvloop"})
    assert "node.event_loop" in message and "uvloop is not installed here" in message
    assert "choose 'auto' or 'asyncio'" in message
    assert config(node={"event_loop": "auto"}).node.event_loop == "auto"  # falls back, no error


def test_heartbeat_must_be_under_half_the_election_timeout() -> None:
    message = error(raft={"heartbeat_ms": 500, "election_timeout_ms": 1000})
    assert "raft.heartbeat_ms must be less than half of raft.election_timeout_ms" in message
    assert "got 500" in message and "needless election" in message  # says why
    assert config(raft={"heartbeat_ms": 499, "election_timeout_ms": 1000}).raft.heartbeat_ms == 499


def test_tick_must_not_exceed_heartbeat() -> None:
    message = error(raft={"tick_ms": 150, "heartbeat_ms": 100})
    assert "raft.tick_ms must be at most raft.heartbeat_ms (100), got 150" in message
    assert config(raft={"tick_ms": 100, "heartbeat_ms": 100}).raft.tick_ms == 100


def test_lease_clock_drift_must_be_under_the_election_timeout() -> None:
    message = error(read={"lease_clock_drift_ms": 1000})
    assert "read.lease_clock_drift_ms must be less than raft.election_timeout_ms (1000), got 1000" in message
    assert config(read={"lease_clock_drift_ms": 950}).read.lease_clock_drift_ms == 950


def test_lease_clock_drift_must_leave_a_lease_once_rounded_to_ticks() -> None:
    # 950 ms and 1000 ms both round up to 4 ticks of 300 ms: no lease would be left.
    message = error(raft={"tick_ms": 300, "heartbeat_ms": 300}, read={"lease_clock_drift_ms": 950})
    assert "read.lease_clock_drift_ms (950) rounds up to 4 ticks" in message


def test_lease_reads_by_default_need_check_quorum() -> None:
    message = error(read={"default_consistency": "lease"}, raft={"check_quorum": False})
    assert 'read.default_consistency = "lease" needs raft.check_quorum = true' in message
    assert config(read={"default_consistency": "stale"}, raft={"check_quorum": False}).raft_config()


def test_node_must_be_a_member_of_a_new_cluster() -> None:
    message = error(node={"id": 4})
    assert "node.id must be one of cluster.members (1, 2, 3)" in message
    assert 'cluster.initial_state = "new"' in message and "got 4" in message
    assert config(node={"id": 4}, cluster={"initial_state": "existing"}).node.id == 4


def test_member_addresses_must_be_unique() -> None:
    message = error(cluster={"members": {"1": "127.0.0.1:7001", "2": "127.0.0.1:7001"}})
    assert "cluster.members gives nodes 1 and 2 the same address '127.0.0.1:7001'" in message
    assert "same address" in error(cluster={"members": {"1": "[::1]:7001", "2": "[::1]:7001"}})


def test_at_least_one_member() -> None:
    assert "cluster.members must list at least one member" in error(cluster={"members": {}})


def test_non_loopback_listen_without_tls_needs_insecure() -> None:
    message = error(node={"listen": "0.0.0.0:7001"})
    assert "node.listen = '0.0.0.0:7001' is not a loopback address" in message
    assert "pass --insecure (node.insecure = true) or enable [tls]" in message
    assert "is not a loopback" in error(node={"listen": "db1.example.com:7001"})
    public = {"listen": "0.0.0.0:7001", "advertise": "10.0.0.1:7001", "insecure": True}
    assert config(node=public).node.insecure


def test_a_node_listening_on_every_interface_says_where_it_can_be_reached() -> None:
    """Other nodes and clients are told the advertised address (in a join, in Status): a
    wildcard one (the default, node.listen) would send them to their own host."""
    for node in ({"listen": "0.0.0.0:7001"}, {"listen": "[::]:7001"}, {"advertise": "0.0.0.0:7001"}):
        message = error(node={**node, "insecure": True})
        assert "node.advertise" in message and "names no host" in message, message
    assert (
        config(node={"listen": "0.0.0.0:7001", "advertise": "db1:7001", "insecure": True}).node.advertise
        == "db1:7001"
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:7001", "127.8.9.10:7001", "[::1]:7001", "localhost:7001"])
def test_loopback_listen_needs_no_tls(listen: str) -> None:
    assert config(node={"listen": listen}).node.listen == listen


def test_insecure_flag_comes_from_an_override() -> None:
    base = {
        "node.id": 1,
        "cluster.id": "c",
        "cluster.members": "1=10.0.0.1:7001",
        "node.listen": "0.0.0.0:1",
        "node.advertise": "10.0.0.1:1",
    }
    with pytest.raises(ConfigError, match="pass --insecure"):
        Config.load(env={}, overrides=base)
    assert Config.load(env={}, overrides={**base, "node.insecure": True}).node.insecure


def pem_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca_file", "cert_file", "key_file"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
        files[name] = str(path)
    return files


def test_tls_files_are_required_when_enabled(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    del files["cert_file"]
    message = error(tls={"enabled": True, **files})
    assert "tls.cert_file is required when tls.enabled = true" in message


def test_tls_files_must_exist(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    files["key_file"] = str(tmp_path / "missing.pem")
    message = error(tls={"enabled": True, **files})
    assert "tls.key_file names a file that does not exist" in message and "missing.pem" in message


def test_tls_enabled_allows_a_public_listen_address(tmp_path: Path) -> None:
    c = config(
        node={"listen": "0.0.0.0:7001", "advertise": "10.0.0.1:7001"},
        tls={"enabled": True, **pem_files(tmp_path)},
    )
    assert c.tls.enabled and c.tls.client_auth and not c.node.insecure


def test_tls_files_without_enabled_are_refused_not_ignored(tmp_path: Path) -> None:
    """Files given with TLS left off would run in plaintext while looking configured."""
    message = error(tls={"cert_file": "/does/not/matter"})
    assert "tls.cert_file is set but tls.enabled is false" in message


@pytest.mark.parametrize("engine", ["rocks", "pkg.mod", "pkg.mod:", ":Class", "pkg..mod:Class", "pkg:mod:C"])
def test_storage_engine_must_be_builtin_or_module_colon_class(engine: str) -> None:
    message = error(storage={"engine": engine})
    assert 'storage.engine must be "file", "memory", or "package.module:ClassName"' in message


def test_custom_storage_engine_is_not_imported_at_load() -> None:
    c = config(storage={"engine": "no_such_package.stores:RocksLogStore"})
    assert c.storage.engine == "no_such_package.stores:RocksLogStore"
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_package\.stores'"):
        c.storage.load_log_store_class()


def test_load_log_store_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dengine.storage import MemoryLogStore, WalLogStore  # noqa: PLC0415

    assert config().storage.load_log_store_class() is WalLogStore
    assert config(storage={"engine": "memory"}).storage.load_log_store_class() is MemoryLogStore
    (tmp_path / "my_stores.py").write_text(
        textwrap.dedent(
            """\
            from dengine.storage import LogStore

            class Good:  # a stand-in with every LogStore method
                pass

            for name in dir(LogStore):
                if not name.startswith("_"):
                    setattr(Good, name, lambda self, *args: None)

            class Partial:
                def first_index(self): return 1

            not_a_class = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = config(storage={"engine": "my_stores:Good"}).storage.load_log_store_class()
    assert cls.__name__ == "Good"
    with pytest.raises(ConfigError, match=r"'Partial' is not a LogStore: it lacks .*append"):
        config(storage={"engine": "my_stores:Partial"}).storage.load_log_store_class()
    with pytest.raises(ConfigError, match=r"'not_a_class' is a int, not a class"):
        config(storage={"engine": "my_stores:not_a_class"}).storage.load_log_store_class()
    with pytest.raises(ConfigError, match=r"module 'my_stores' has no attribute 'Missing'"):
        config(storage={"engine": "my_stores:Missing"}).storage.load_log_store_class()


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nid = 1\n[cluster\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configuration file .*nope\.toml does not exist"):
        Config.load(tmp_path / "nope.toml", env={})


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_TOML.replace("[node]\nid = 1\n", "node = 1\n"))
    with pytest.raises(ConfigError, match=r"\[node\] must be a table of keys"):
        Config.load(path, env={})


def test_sections_validate_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"raft\.tick_ms must be an integer >= 1"):
        RaftSection(tick_ms=0)
    with pytest.raises(ConfigError, match=r"tls\.ca_file is required"):
        TlsSection(enabled=True)


def test_config_error_is_a_dengine_error_and_a_value_error() -> None:
    with pytest.raises(ConfigError) as info:
        config(raft={"tick_ms": 0})
    assert isinstance(info.value, DengineError) and isinstance(info.value, ValueError)
    assert info.value.key == "raft.tick_ms"


def test_config_is_frozen() -> None:
    c = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.raft.tick_ms = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.cluster.members[9] = "h:9"  # type: ignore[index]
    assert hash(c) == hash(config())


# --- conversion to the Raft core ----------------------------------------------------------------


def test_raft_config_with_defaults() -> None:
    rc = config(node={"id": 2}).raft_config()
    assert rc == RaftConfig(
        id=2,
        voters=frozenset({1, 2, 3}),
        election_ticks=20,
        heartbeat_ticks=2,
        pre_vote=True,
        check_quorum=True,
        lease_reads=True,
        clock_drift_ticks=2,
        max_inflight=64,
        max_batch_entries=4096,
        max_batch_bytes=1 << 20,
        forward_proposals=True,
        max_unapplied_bytes=64 << 20,
        restart_lease=True,
        fast_start=True,
    )
    assert config(raft={"max_unapplied_bytes": 0}).raft_config().max_unapplied_bytes == 0


def test_raft_config_rounds_towards_safety() -> None:
    c = config(
        raft={"tick_ms": 30, "heartbeat_ms": 100, "election_timeout_ms": 1000, "check_quorum": False},
        read={"lease_clock_drift_ms": 100},
    )
    rc = c.raft_config()
    assert rc.election_ticks == 34  # ceil(1000 / 30): never shorter than asked
    assert rc.heartbeat_ticks == 3  # round(100 / 30)
    assert rc.clock_drift_ticks == 4  # ceil(100 / 30): the lease never outlives the bound
    assert rc.lease_reads is False and rc.check_quorum is False
    fast = config(
        raft={"tick_ms": 10, "heartbeat_ms": 14, "election_timeout_ms": 100}, read={"lease_clock_drift_ms": 0}
    ).raft_config()
    assert (fast.election_ticks, fast.heartbeat_ticks) == (10, 1)


def test_raft_config_for_another_member_and_for_a_joining_node() -> None:
    c = config()
    assert c.raft_config(3).id == 3
    with pytest.raises(ConfigError, match=r"node 7 is not one of cluster\.members"):
        c.raft_config(7)
    joining = config(node={"id": 7}, cluster={"initial_state": "existing"}).raft_config()
    assert joining.learners == frozenset({7}) and joining.voters == frozenset({1, 2, 3})


# --- round trip and documentation ---------------------------------------------------------------


def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    c = config(
        node={"id": 2, "listen": "0.0.0.0:7002", "advertise": "10.0.0.2:7002", "insecure": True},
        cluster={"initial_state": "existing"},
        raft={"tick_ms": 20, "heartbeat_ms": 60, "election_timeout_ms": 500, "propose_linger_ms": 1.5},
        storage={"engine": "memory", "preallocate": True},
        snapshot={"entries": 0, "bytes": 1 << 30, "bandwidth_mb_s": 12.5},
        membership={"promote": "manual"},
        read={"default_consistency": "lease", "lease_clock_drift_ms": 0},
        tls={"enabled": True, "client_auth": False, **pem_files(tmp_path)},
        log={"level": "debug", "format": "json"},
    )
    data = c.to_dict()
    assert data["cluster"]["members"] == MEMBERS  # string keys, as TOML writes them
    assert Config.from_dict(data) == c
    assert Config.from_dict(data).to_dict() == data
    assert c != config()


def doc_tables() -> dict[str, dict[str, str]]:
    """``{section: {key: default cell}}`` from the tables of docs/configuration.md."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        heading = re.fullmatch(r"## `\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
            assert section not in tables, f"[{section}] is documented twice"
            tables[section] = {}
        elif line.startswith("## "):
            section = None
        row = re.match(r"\| `(\w+)` \|([^|]*)\|([^|]*)\|", line)
        if row and section is not None:
            assert row.group(1) not in tables[section], f"{section}.{row.group(1)} is documented twice"
            tables[section][row.group(1)] = row.group(3).strip()
    return tables


def test_docs_document_every_key_and_nothing_else() -> None:
    tables = doc_tables()
    assert list(tables) == list(SECTIONS)
    for name, cls in SECTIONS.items():
        keys = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        assert list(tables[name]) == keys, f"docs/configuration.md [{name}] is out of date"


def test_docs_defaults_match_the_code() -> None:
    defaults = config().to_dict()
    checked = 0
    for section, rows in doc_tables().items():
        for key, cell in rows.items():
            literal = re.fullmatch(r"`([^`]*)`", cell)
            if literal:  # a TOML value; other cells describe derived or required values
                documented = tomllib.loads(f"v = {literal.group(1)}")["v"]
                assert documented == defaults[section][key], f"{section}.{key}: docs say {cell}"
                checked += 1
    assert checked >= 35


def test_docs_example_file_is_valid(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert example is not None
    c = Config.load(write(tmp_path, example.group(1)), env={})
    assert c.cluster.id == "demo" and len(c.cluster.members) == 3 and c.log.format == "json"
