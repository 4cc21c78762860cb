"""The committed gRPC modules must match proto/: regenerate and compare byte for byte."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos  # noqa: PLC0415 - a script, importable only from here
    finally:
        sys.path.pop(0)
    gen_protos.generate(tmp_path)

    def files(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}

    fresh = files(tmp_path / "dengine" / "v1")
    committed = files(ROOT / "python" / "dengine" / "v1")
    assert sorted(fresh) == sorted(committed), "python/dengine/v1 has missing or extra files"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated modules {stale}: run python scripts/gen_protos.py"
