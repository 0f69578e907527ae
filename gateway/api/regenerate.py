"""Regenerate the Python code for ``proto/gateway/api/v1`` (``make proto``).

The generated modules (``*_pb2.py``, ``*_pb2_grpc.py``) and their mypy-protobuf stubs (``*.pyi``)
are committed under ``gateway/api/v1``; ``tests/api/test_proto_drift.py`` regenerates into a
temporary directory and fails when the committed files differ. Needs the ``test`` extra
(grpcio-tools, mypy-protobuf); never imported at run time.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path("proto")
PROTO_PACKAGE = Path("gateway/api/v1")


def _plugin(name: str) -> str:
    """The path of a protoc plugin installed next to this interpreter."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"protoc plugin {name!r} not found; install the 'test' extra")
    return found


def regenerate(repo_root: Path, out_root: Path) -> list[Path]:
    """Generate code for every ``.proto`` under the API package into ``out_root``.

    Returns the generated files relative to ``out_root``.
    """
    from grpc_tools import protoc

    proto_root = repo_root / PROTO_ROOT
    protos = sorted(
        str(p.relative_to(proto_root)) for p in (proto_root / PROTO_PACKAGE).glob("*.proto")
    )
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    return sorted(p.relative_to(out_root) for p in (out_root / PROTO_PACKAGE).glob("*_pb2*"))


def main() -> None:
    repo_root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    for path in regenerate(repo_root, repo_root):
        sys.stdout.write(f"generated {path}\n")


if __name__ == "__main__":
    main()
