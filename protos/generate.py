"""Regenerate the Python code for ``protos/ferry/v1/*.proto``: ``python -m protos.generate``.

protoc runs from the repository root with ``-I .`` and the sources import each other as
``protos/ferry/v1/...``, so the generated modules import ``protos.ferry.v1.x_pb2`` and work
from the installed package without any ``sys.path`` tricks. The output depends only on the
sources and the pinned tool versions, so ``tests/test_protos.py`` can regenerate into a
temporary directory and compare byte for byte to catch stale committed code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos") / "ferry" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
MYPY_EXEMPTION = "# mypy: ignore-errors\n"


class GenerateError(Exception):
    """protoc or a plugin failed; the message says which and how to fix it."""


def proto_sources() -> list[Path]:
    """The ``.proto`` files, relative to the repository root, in a stable order."""
    return sorted((REPO_ROOT / PROTO_DIR).glob("*.proto"))


def _plugin(name: str) -> str:
    # The venv's bin directory first: protoc must use the mypy-protobuf the project pins,
    # not whatever else is on PATH.
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise GenerateError(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every source under ``out_dir`` (mirroring
    ``protos/ferry/v1``); returns the files written, sorted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        "-I.",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    # protoc resolves -I and the source paths against the working directory.
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)
        status = protoc.main(args)
    finally:
        os.chdir(cwd)
    if status != 0:
        raise GenerateError(f"protoc failed with status {status} (see its messages above)")
    target = out_dir / PROTO_DIR
    written = sorted(p for p in target.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    for path in written:
        if path.suffix == ".pyi":
            _exempt_from_strict_mypy(path)
    return written


def _exempt_from_strict_mypy(stub: Path) -> None:
    # mypy-protobuf's grpc stubs declare overloads that only differ once grpc itself is
    # typed, and carry ``type: ignore``s that our warn_unused_ignores flags: the checks are
    # for our code, not for generated code, while the stubs still type our calls.
    text = stub.read_text()
    if not text.startswith(MYPY_EXEMPTION):
        stub.write_text(MYPY_EXEMPTION + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="root to write under (default: the repository, i.e. beside the sources)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.out.resolve())
    except GenerateError as e:
        print(f"protos.generate: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
