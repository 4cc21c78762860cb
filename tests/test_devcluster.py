"""``dengine cluster --data-dir DIR``: a second run reuses DIR's cluster (same ports, same size).

Real ``dengine serve`` processes on 127.0.0.1, driven only through the CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dengine.config import Config

CLI = [sys.executable, "-m", "dengine"]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # Its own process group, so that a run that hangs takes any node it started down with it.
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _start_cluster(data_dir: Path, nodes: int) -> tuple[subprocess.Popen[str], str]:
    """Starts ``dengine cluster`` and returns it with the endpoints it printed."""
    proc = subprocess.Popen(
        [*CLI, "cluster", "--nodes", str(nodes), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("endpoints: "):
            return proc, line.removeprefix("endpoints: ").strip()
    proc.wait(timeout=30)
    raise AssertionError(f"dengine cluster exited {proc.returncode} without printing its endpoints")


def _stop_cluster(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)  # only strays: a clean stop has already waited for every node
    return out


def _retry(args: list[str], deadline_s: float = 30) -> subprocess.CompletedProcess[str]:
    """Runs a CLI command until it exits 0 (the cluster may still be electing) or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        out = _cli(*args)
        if out.returncode == 0 or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


def test_second_run_on_the_same_data_dir_reads_what_the_first_wrote_after_a_snapshot(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    proc, endpoints = _start_cluster(data_dir, 3)
    try:
        put = _retry(["kv", "put", "greeting", "hello", "--endpoints", endpoints])
        assert put.returncode == 0, put.stdout + put.stderr
        snap = _retry(["snapshot", "create", "--endpoints", endpoints])
        assert snap.returncode == 0, snap.stdout + snap.stderr
    finally:
        _stop_cluster(proc)
    assert proc.returncode == 0

    proc, endpoints_again = _start_cluster(data_dir, 3)
    try:
        got = _retry(["kv", "get", "greeting", "--endpoints", endpoints_again])
        assert got.returncode == 0, (
            got.stdout + got.stderr + "".join(p.read_text() for p in sorted(data_dir.glob("node*.log")))
        )
        assert "hello" in got.stdout
        assert endpoints_again == endpoints  # the snapshot's membership holds these addresses
    finally:
        _stop_cluster(proc)


def test_second_run_with_another_size_is_refused_before_touching_anything(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    proc, _ = _start_cluster(data_dir, 3)
    _stop_cluster(proc)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in data_dir.glob("*.toml")}
    assert len(before) == 3

    out = _cli("cluster", "--nodes", "1", "--data-dir", str(data_dir), timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{data_dir} holds a 3-node cluster; use --nodes 3 or another --data-dir" in out.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in data_dir.glob("*.toml")} == before


def test_a_node_that_exits_is_reported_with_its_exit_code_and_reason(tmp_path: Path) -> None:
    # Two runs on the same data dir at once: the second's nodes find the data dirs locked.
    data_dir = tmp_path / "dev"
    first, endpoints = _start_cluster(data_dir, 1)
    try:
        # Its node serving, so that it holds its data dir (a loaded machine started the second
        # run's node first, which then held the lock and served for ever).
        assert _retry(["kv", "put", "up", "1", "--endpoints", endpoints]).returncode == 0
        second = _cli("cluster", "--nodes", "1", "--data-dir", str(data_dir))
        assert second.returncode == 1, second.stdout + second.stderr
        assert "node 1 exited with code 1: dengine serve:" in second.stderr, second.stderr
        assert first.poll() is None, "the second run must leave the running cluster alone"
    finally:
        _stop_cluster(first)
    assert os.path.exists(data_dir / "node1.toml")


def test_a_ctrl_c_as_soon_as_it_starts_stops_every_node(tmp_path: Path) -> None:
    """Interrupted the moment it prints its first line (its nodes just started): it stops them
    and exits 0. It once raised KeyboardInterrupt there and left its nodes running, and a Ctrl-C
    that landed while its wait loop held a lock hung it for ever."""
    for run in range(3):
        data_dir = tmp_path / f"dev{run}"
        proc = subprocess.Popen(
            [*CLI, "cluster", "--nodes", "3", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("started 3 nodes"), first
        out = first + _stop_cluster(proc)
        assert proc.returncode == 0, out
        assert "cluster stopped" in out and "Traceback" not in out, out
        # A clean stop waited for every node: none still listens.
        for config in data_dir.glob("node*.toml"):
            host, _, port = Config.load(config, env={}).node.listen.rpartition(":")
            with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                s.connect((host, int(port)))
