"""The README's main-job command: `dengine demo` must pass, and report what it verified."""

from __future__ import annotations

import subprocess
import sys


def test_demo_passes_and_verifies_every_acknowledged_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dengine.cli", "demo", "--seconds", "0.5"],
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
