"""`dengine kv` and `dengine status` against a real cluster: results, JSON output, exit codes."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dengine.client import SyncClient

from cluster_procs import ProcCluster, running_cluster, wait_for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcCluster]:
    with running_cluster(tmp_path_factory.mktemp("cli")) as c:
        yield c


def dengine(cluster: ProcCluster, *args: str) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(cluster.address(i) for i in range(1, 4))
    return subprocess.run(
        [sys.executable, "-m", "dengine", *args, "--endpoints", endpoints],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_put_get_delete_and_exit_codes(cluster: ProcCluster) -> None:
    assert dengine(cluster, "kv", "put", "greeting", "hello").returncode == 0
    got = dengine(cluster, "kv", "get", "greeting")
    assert (got.returncode, got.stdout.strip()) == (0, "hello")
    missing = dengine(cluster, "kv", "get", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr
    as_json = json.loads(dengine(cluster, "kv", "get", "greeting", "--output", "json").stdout)
    assert as_json["found"] and as_json["kv"]["value"] == "hello" and as_json["kv"]["version"] == 1
    replaced = dengine(cluster, "kv", "put", "greeting", "hi", "--prev-kv")
    assert replaced.stdout.splitlines()[1:] == ["was hello"]
    replaced = dengine(cluster, "kv", "put", "greeting", "hey", "--prev-kv", "--output", "json")
    as_json = json.loads(replaced.stdout)
    assert as_json["prev"]["value"] == "hi" and as_json["prev"]["version"] == 2
    plain = dengine(cluster, "kv", "put", "greeting", "yo", "--output", "json")
    assert "prev" not in json.loads(plain.stdout)
    assert dengine(cluster, "kv", "delete", "greeting").returncode == 0
    assert dengine(cluster, "kv", "delete", "greeting").returncode == 1
    created = dengine(cluster, "kv", "put", "greeting", "hello", "--prev-kv")
    assert created.stdout.splitlines()[1:] == ["was absent"]


def test_cas_and_range(cluster: ProcCluster) -> None:
    assert dengine(cluster, "kv", "cas", "counter", "1", "--absent").returncode == 0
    failed = dengine(cluster, "kv", "cas", "counter", "7", "8")
    assert failed.returncode == 1 and "'1'" in failed.stderr
    assert dengine(cluster, "kv", "cas", "counter", "1", "2").returncode == 0
    for i in range(3):
        dengine(cluster, "kv", "put", f"app/{i}", f"v{i}")
    listed = dengine(cluster, "kv", "range", "app/", "--limit", "2")
    assert listed.stdout.splitlines() == ["app/0\tv0", "app/1\tv1"]


def test_usage_errors_exit_2_and_unavailable_exits_3(cluster: ProcCluster) -> None:
    assert dengine(cluster, "kv", "put", "only-a-key").returncode == 2
    assert dengine(cluster, "kv", "put", "", "empty key").returncode == 2
    down = subprocess.run(
        [sys.executable, "-m", "dengine", "kv", "get", "k", "--endpoints", "127.0.0.1:9", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 3 and "unavailable" in down.stderr and "Traceback" not in down.stderr


def test_refused_membership_changes_exit_1_and_unreachable_addresses_exit_2(cluster: ProcCluster) -> None:
    """A change the cluster refuses as its state stands (a node that is not a member) is not
    the cluster being unavailable (3); an address no member could dial is refused before
    anything is proposed, as a usage error, rather than committed for the members to dial for
    ever."""
    missing = dengine(cluster, "member", "remove", "99")
    assert missing.returncode == 1 and "not a member" in missing.stderr, missing
    assert "Traceback" not in missing.stderr
    for address in ("garbage", "0.0.0.0:7009", "[::]:7009"):
        refused = dengine(cluster, "member", "add-learner", "9", address)
        assert refused.returncode == 2 and "host" in refused.stderr, (address, refused)
    listed = dengine(cluster, "member", "list", "--output", "json")
    assert 9 not in [m["id"] for m in json.loads(listed.stdout)], listed.stdout


def test_status_table_and_json(cluster: ProcCluster) -> None:
    table = dengine(cluster, "status")
    assert table.returncode == 0
    assert table.stdout.count(" ok") == 3 and "leader" in table.stdout
    rows = json.loads(dengine(cluster, "status", "--output", "json").stdout)
    assert sorted(r["role"] for r in rows) == ["follower", "follower", "leader"]
    assert all(r["health"] == "ok" and r["lag"] is not None for r in rows)


def test_watch_prints_changes(cluster: ProcCluster) -> None:
    endpoints = ",".join(cluster.address(i) for i in range(1, 4))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dengine", "kv", "watch", "w/", "--endpoints", endpoints],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        with SyncClient(endpoints) as client:
            # The watch starts from the revision current when it subscribes, and it starts a
            # process first (slow under load): put a marker until the watch prints it.
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, "the watch printed nothing"
                client.put(b"w/ready", b"0")
                try:
                    lines.get(timeout=0.5)
                    break
                except queue.Empty:
                    pass
            client.put(b"w/a", b"1")
            client.delete(b"w/a")
        changes = (line.split() for line in iter(lambda: lines.get(timeout=20), ""))
        changes = (c for c in changes if c[2] != "w/ready")  # markers still on their way
        first, second = next(changes), next(changes)
        assert first[1:] == ["put", "w/a", "=", "1"]
        assert second[1:] == ["delete", "w/a"]
        assert int(second[0]) == int(first[0]) + 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_sync_client(cluster: ProcCluster, tmp_path: Path) -> None:
    endpoints = [cluster.address(i) for i in range(1, 4)]
    with SyncClient(endpoints) as client:
        client.put(b"sync", b"yes")
        kv = client.get(b"sync")
        assert kv is not None and kv.value == b"yes"
        assert client.cas(b"sync", b"yes", b"no").succeeded
        assert [kv.key for kv in client.range(b"sync")] == [b"sync"]
        assert client.delete(b"sync").deleted


def test_leader_transfer(cluster: ProcCluster) -> None:
    leader = cluster.wait_leader()
    target = next(i for i in range(1, 4) if i != leader)
    out = dengine(cluster, "leader", "transfer", str(target))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"leadership handed to node {target}"
    assert cluster.leader() == target, "the command returns once the target leads"
    again = dengine(cluster, "leader", "transfer", str(target))  # a retried script: already done
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"leadership handed to node {target}"
    # A frozen target does not take over: the command says so and exits 3; the leader stays,
    # also once the target thaws and finds the TimeoutNow that waited for it (stale by then).
    frozen = next(i for i in range(1, 4) if i != target)
    cluster.kill(frozen, signal.SIGSTOP)
    try:
        out = dengine(cluster, "leader", "transfer", str(frozen))
        assert cluster.leader(among=[i for i in range(1, 4) if i != frozen]) == target
    finally:
        cluster.kill(frozen, signal.SIGCONT)
    assert out.returncode == 3, out.stdout
    assert f"node {frozen} did not take over within the election timeout" in out.stderr
    for _ in range(10):
        time.sleep(0.1)
        assert cluster.leader() in (target, None), "the thawed target took over"
    assert cluster.wait_leader() == target


def test_the_consistency_commands_of_the_docs(cluster: ProcCluster) -> None:
    """Every command docs/consistency.md shows, run as written (plus the endpoints)."""
    doc = (Path(__file__).parent.parent / "docs" / "consistency.md").read_text()
    commands = [line.split("#")[0].split() for line in doc.splitlines() if line.startswith("dengine kv ")]
    assert len(commands) == 3
    assert dengine(cluster, "kv", "put", "greeting", "hello").returncode == 0
    for words in commands:
        # A stale read may lag the write by a moment (the page says so): wait for it.
        wait_for(
            lambda w=words: (g := dengine(cluster, *w[1:])).returncode == 0 and g.stdout.strip() == "hello",  # type: ignore[misc]
            10,
            " ".join(words),
        )
