"""Regenerates the gRPC/protobuf modules in python/dengine/v1 from proto/dengine/v1.

Run:  python scripts/gen_protos.py [--out DIR]
tests/test_protos.py fails when the committed modules are stale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto" / "dengine" / "v1").glob("*.proto"))


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out / "dengine" / "v1" / "__init__.py"
    init.write_text('"""Generated gRPC and protobuf modules (scripts/gen_protos.py)."""\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "python")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
