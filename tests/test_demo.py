"""The README's main-job command: `dengine demo` must pass, and report what it verified."""

from __future__ import annotations

import subprocess
import sys


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
