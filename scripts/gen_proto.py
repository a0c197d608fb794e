"""Regenerate the Python stubs of the gRPC contracts in ``proto/arctl/v1``.

    python scripts/gen_proto.py              # writes libs/arctl/v1/*_pb2*.py{,i}
    python scripts/gen_proto.py --out DIR    # writes DIR/arctl/v1/... (used by the drift test)

Runs ``grpc_tools.protoc`` with ``proto/`` and grpc_tools' bundled well-known types on the include
path, so the generated code imports ``from arctl.v1 import common_pb2``. Emits messages
(``--python_out``), services (``--grpc_python_out``) and type stubs for both (mypy-protobuf's
``--mypy_out`` and ``--mypy_grpc_out``). The output depends only on the .proto files and the tool
versions: no timestamps, files processed in sorted order. Generated files are replaced as a set
(stale ones removed); the package's hand-written ``__init__.py`` is left alone. Never edit the
generated files; change the .proto and run this script.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE = Path("arctl") / "v1"
DEFAULT_OUT = REPO_ROOT / "libs"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


class GenerationError(RuntimeError):
    """protoc failed or a plugin is missing."""


def is_generated(path: Path) -> bool:
    """Whether ``path`` is a file this script writes (and may therefore delete)."""
    return path.is_file() and path.name.endswith(GENERATED_SUFFIXES)


def proto_files() -> list[Path]:
    """The contracts, sorted so the run is reproducible."""
    files = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not files:
        raise GenerationError(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    return files


def _plugin(name: str) -> Path:
    """The mypy-protobuf plugin executable: beside this interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found; install mypy-protobuf (pip install -e '.[dev]')")
    return Path(found)


def _run_protoc(out: Path) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        *(f"--plugin={name}={_plugin(name)}" for name in PLUGINS),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(f.relative_to(PROTO_ROOT)) for f in proto_files()),
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerationError(f"protoc exited with status {status}")


def generate(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write the stubs into ``out/arctl/v1``; returns the generated files, sorted."""
    target = out / PACKAGE
    with tempfile.TemporaryDirectory(prefix="arctl-proto-") as tmp:
        _run_protoc(Path(tmp))
        fresh = sorted(p for p in (Path(tmp) / PACKAGE).iterdir() if is_generated(p))
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.iterdir():
            if is_generated(stale):
                stale.unlink()
        for src in fresh:
            shutil.copyfile(src, target / src.name)
    return [target / p.name for p in fresh]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="root to write arctl/v1/ under (default: libs/)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.out.resolve())
    except GenerationError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
