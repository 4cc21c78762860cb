"""docs/operations.md, run as written on 127.0.0.1: three nodes with mutual TLS built from the
page's certificate command and configuration file, the page's CLI commands, its metrics table
checked against a real scrape, a snapshot, then a backup restored into emptied data directories,
and last, nodes 2 and 3 lost for good and node 1 recovered alone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

from dengine.devcluster import free_ports

from cluster_procs import wait_for

DOC = Path(__file__).parent.parent / "docs" / "operations.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


class Guide:
    """The page's machines mapped onto local ports and directories."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ports = free_ports(6)
        self.ports, self.metrics_ports = ports[:3], ports[3:]
        self.certs = root / "certs"
        self.backups = root / "backups"
        self.backups.mkdir()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def local(self, text: str, node: int = 1) -> str:
        for i in range(1, 4):
            text = text.replace(f"10.0.0.{i}:7001", f"127.0.0.1:{self.ports[i - 1]}")
            text = text.replace(f"10.0.0.{i}:9101", f"127.0.0.1:{self.metrics_ports[i - 1]}")
            text = text.replace(f"--host 10.0.0.{i}", "--host 127.0.0.1")
        text = text.replace("/etc/dengine/certs", str(self.certs))
        text = text.replace("/etc/dengine/", f"{self.root}/")
        return text.replace("/var/lib/dengine", str(self.data_dir(node)))

    def data_dir(self, node: int) -> Path:
        return self.root / f"data{node}"

    def write_configs(self, template: str) -> None:
        for i in range(1, 4):
            # What the page says nodes 2 and 3 change: id, addresses and certificate pair.
            text = template.replace("id = 1\n", f"id = {i}\n", 1)
            text = text.replace('listen = "10.0.0.1:7001"', f'listen = "10.0.0.{i}:7001"')
            text = text.replace('metrics_listen = "10.0.0.1:9101"', f'metrics_listen = "10.0.0.{i}:9101"')
            text = text.replace("node1.pem", f"node{i}.pem").replace("node1-key.pem", f"node{i}-key.pem")
            (self.root / f"node{i}.toml").write_text(self.local(text, i))

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        words = shlex.split(self.local(line))
        assert words[0] == "dengine"
        env = {**os.environ, "DENGINE_ENDPOINTS": ",".join(f"127.0.0.1:{p}" for p in self.ports)}
        return subprocess.run(
            [sys.executable, "-m", "dengine", *words[1:]],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def serve_all(self, line: str, nodes: tuple[int, ...] = (1, 2, 3)) -> None:
        for i in nodes:
            words = shlex.split(self.local(line.replace("node1.toml", f"node{i}.toml"), i))
            log = open(self.root / f"node{i}.log", "ab")  # noqa: SIM115 - owned by the process
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-m", "dengine", *words[1:]], stdout=log, stderr=subprocess.STDOUT
            )

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError:
        return False  # 503: not ready yet


def test_the_operations_guide(tmp_path: Path) -> None:
    commands = [line for block in blocks("sh") for line in block.splitlines() if line.startswith("dengine ")]
    certs_init, serve, status, put, snapshot, backup_snapshot, restore_serve, *recovery = commands
    (template,) = blocks("toml")
    export = next(line for block in blocks("sh") for line in block.splitlines() if line.startswith("export "))
    assert all(f"10.0.0.{i}:7001" in export for i in (1, 2, 3))

    g = Guide(tmp_path)
    assert g.run(certs_init).returncode == 0
    assert {"ca.pem", "node3-key.pem", "client.pem"} <= {p.name for p in g.certs.iterdir()}
    g.write_configs(template)
    g.serve_all(serve)
    try:
        wait_for(lambda: g.run(status).returncode == 0 and "leader" in g.run(status).stdout, 30, "a leader")
        assert g.run(put).returncode == 0
        insecure = g.run("dengine kv get greeting")
        assert insecure.returncode == 3, "mutual TLS: a client without certificates is refused"

        # Every metric the page tells operators to watch is served.
        text = urllib.request.urlopen(f"http://127.0.0.1:{g.metrics_ports[0]}/metrics", timeout=10).read()
        table = DOC.read_text().split("## Metrics")[1].split("## Membership")[0]
        named = set(re.findall(r"`(dengine_[a-z_]+)`", table))
        assert len(named) >= 15
        # Every family is declared, with or without samples yet (no failures so far, say).
        served = set(re.findall(r"^# TYPE (dengine_\w+) ", text.decode(), flags=re.M))
        assert named <= served, f"documented but not served: {sorted(named - served)}"

        # Every probe the page lists answers on a node of the running cluster.
        probes = DOC.read_text().split("## Health probes")[1].split("## Membership")[0]
        paths = re.findall(r"^\| `(/\w+)` \|", probes, flags=re.M)
        assert paths == ["/livez", "/readyz", "/health"]
        for path in paths:
            wait_for(partial(_answers_ok, f"http://127.0.0.1:{g.metrics_ports[1]}{path}"), 10, path)

        # A later term than the first one, so that the restored cluster must start past it.
        assert g.run(put.replace("kv put greeting hello", "leader transfer")).returncode == 0
        assert g.run(snapshot).returncode == 0
        assert g.run(backup_snapshot).returncode == 0
        newest = sorted((g.data_dir(1) / "snapshots").glob("snap-*.snap"))[-1]
        assert int(newest.name.split("-")[2].removesuffix(".snap")) >= 2, "the snapshot's term"
        shutil.copy(newest, g.backups)
    finally:
        g.stop_all()

    # Restore into emptied data directories holding only the backup.
    for i in range(1, 4):
        shutil.rmtree(g.data_dir(i))
        (g.data_dir(i) / "snapshots").mkdir(parents=True)
        shutil.copy(next(g.backups.iterdir()), g.data_dir(i) / "snapshots")
    g.serve_all(restore_serve)
    try:
        get = put.replace("kv put greeting hello", "kv get greeting")
        wait_for(lambda: g.run(get).stdout.strip() == "hello", 30, "the restored key")
        assert g.run(put.replace("greeting hello", "after restore")).returncode == 0
    finally:
        g.stop_all()

    lose_two_and_recover(g, recovery, get, put)


def lose_two_and_recover(g: Guide, recovery: list[str], get: str, put: str) -> None:
    """The page's last section: nodes 2 and 3 lost with their disks, node 1 made the only voter."""
    look, recover, serve = recovery
    for i in (2, 3):
        shutil.rmtree(g.data_dir(i))
    looked = g.run(look)
    assert looked.returncode == 0 and "voters [1, 2, 3]" in looked.stdout, looked.stderr
    done = g.run(recover)
    assert done.returncode == 0 and "node 1 is now the only voter" in done.stdout, done.stderr
    g.serve_all(serve, nodes=(1,))
    try:
        wait_for(lambda: g.run(get).stdout.strip() == "hello", 30, "the key on the recovered node")
        assert g.run(put.replace("greeting hello", "after recovery")).returncode == 0
    finally:
        g.stop_all()
