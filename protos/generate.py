"""Regenerate the committed Python stubs of every .proto under protos/.

    python -m protos.generate            # rewrite protos/**/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py in place
    python -m protos.generate --out DIR  # write them under DIR instead (tests compare the two)

protoc (from grpcio-tools, pinned in pyproject.toml so the output is byte-for-byte reproducible) runs
from the repository root with ``-I .``, so a file's import path is its repository path: the stubs of
``protos/moeserve/v1/moeserve.proto`` are the module ``protos.moeserve.v1.moeserve_pb2`` and the gRPC
module imports it as ``from protos.moeserve.v1 import moeserve_pb2``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = Path(__file__).resolve().parent


def proto_files() -> list[str]:
    """Repository-relative paths of every .proto under protos/, sorted."""
    return sorted(p.relative_to(ROOT).as_posix() for p in PROTOS.rglob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Run protoc on every .proto; return the files written under ``out_dir``."""
    import grpc_tools

    out_dir = Path(out_dir).resolve()
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    protos = proto_files()
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "-I", str(well_known),
           f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")
    stems = [out_dir / p.removesuffix(".proto") for p in protos]
    return [stem.with_name(stem.name + suffix) for stem in stems
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
