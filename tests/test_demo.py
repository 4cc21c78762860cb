"""The README's main-job command: `dengine demo` must pass, and report what it verified."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dengine.demo as demo_module
from dengine.errors import Unavailable


def test_cluster_demo_passes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dengine", "demo"], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for step in ("was elected leader", "killed the leader", "after the kill", "read back all", "caught up"):
        assert step in out.stdout, f"missing step {step!r} in:\n{out.stdout}"
    assert "demo passed: no acknowledged write was lost" in out.stdout


def test_log_store_demo_passes_and_verifies_every_acknowledged_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dengine.cli", "demo", "--log-store", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "killed the writer with SIGKILL" in out.stdout
    assert "nothing acknowledged was lost" in out.stdout


def test_cli_usage_errors_exit_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dengine.cli", "no-such-command"], capture_output=True, check=False
    )
    assert out.returncode == 2


def _serve_pids_under(root: str) -> list[int]:
    """Pids of live ``dengine serve`` processes whose command line names a path under ``root``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"serve" in args and any(root.encode() in a for a in args):
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the demo's nodes through /proc")
def test_sigterm_stops_the_demo_its_nodes_and_removes_its_temp_dir(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-m", "dengine", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        assert demo.stdout is not None
        first = demo.stdout.readline()
        assert "starting a 3-node cluster in" in first, first
        root = first.rsplit(" in ", 1)[1].strip()
        deadline = time.monotonic() + 30
        while len(_serve_pids_under(root)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_serve_pids_under(root)) == 3, "the demo did not start its three nodes"
        demo.send_signal(signal.SIGTERM)
        out = first + demo.communicate(timeout=60)[0]
        assert demo.returncode != 0, out
        assert _serve_pids_under(root) == [], f"nodes left running after SIGTERM:\n{out}"
        assert not Path(root).exists(), f"temp dir left behind after SIGTERM:\n{out}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in _serve_pids_under(str(tmp)):  # a failed run must not leave its nodes behind
            os.kill(pid, signal.SIGKILL)


def test_a_failed_client_call_is_one_failed_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def unavailable(self: demo_module._Demo) -> None:
        raise Unavailable("no node could serve the request")

    monkeypatch.setattr(demo_module._Demo, "run", unavailable)
    before = signal.getsignal(signal.SIGTERM)
    assert demo_module.main() == 1
    assert "FAILED: Unavailable: no node could serve the request" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == before  # the demo's handler does not outlive it
