"""``dengine.grpc_tuning``: the I/O manager choice is made before grpc loads, and only then.

Each case runs in a fresh interpreter, since grpc reads the setting once, on import, and this test
process imported grpc long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

from dengine.grpc_tuning import LEGACY_IO_EXPERIMENTS, VERIFIED_GRPCIO


def fresh(code: str, **env: str) -> dict[str, object]:
    """Runs ``code`` in a new interpreter; it sets ``out``, which comes back as JSON."""
    clean = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    script = f"import json, os, sys\nout = {{}}\n{code}\nprint(json.dumps(out))"
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, check=False, env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def applies_here() -> bool:
    major, minor = metadata.version("grpcio").split(".")[:2]
    return sys.platform.startswith("linux") and (int(major), int(minor)) in VERIFIED_GRPCIO


def test_the_dengine_command_chooses_before_grpc_loads_and_grpc_then_serves() -> None:
    out = fresh(
        "from dengine.cli import main\n"
        "out['grpc_loaded_by_import'] = 'grpc' in sys.modules\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "out['value'] = os.environ.get('GRPC_EXPERIMENTS')\n"
        "import grpc\nfrom concurrent.futures import ThreadPoolExecutor\n"
        "server = grpc.server(ThreadPoolExecutor(1))\n"
        "out['port'] = server.add_insecure_port('127.0.0.1:0')\n"
    )
    assert out["grpc_loaded_by_import"] is False, "importing the CLI must not load grpc"
    assert out["value"] == (LEGACY_IO_EXPERIMENTS if applies_here() else None)
    assert isinstance(out["port"], int) and out["port"] > 0


def test_too_late_once_grpc_is_imported() -> None:
    out = fresh(
        "import grpc\nfrom dengine.grpc_tuning import tune_grpc\n"
        "out['applied'] = tune_grpc()\nout['value'] = os.environ.get('GRPC_EXPERIMENTS')"
    )
    assert out == {"applied": False, "value": None}


def test_an_operators_own_setting_wins() -> None:
    out = fresh(
        "from dengine.grpc_tuning import tune_grpc\n"
        "out['applied'] = tune_grpc()\nout['value'] = os.environ.get('GRPC_EXPERIMENTS')",
        GRPC_EXPERIMENTS="-some_other",
    )
    assert out == {"applied": False, "value": "-some_other"}


def test_an_unverified_grpcio_release_is_left_alone() -> None:
    out = fresh(
        "import dengine.grpc_tuning as t\n"
        "t._grpcio_release = lambda: (1, 999)\n"
        "out['applied'] = t.tune_grpc()\nout['value'] = os.environ.get('GRPC_EXPERIMENTS')"
    )
    assert out == {"applied": False, "value": None}
