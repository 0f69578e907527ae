"""The files of a policy bundle: which files belong to it, their size limits, the manifest.

A bundle is every file under its folder except policy tests (``tests/``), signatures
(``bundle.sig``, ``manifest.txt``) and hidden files or folders (``.git/``, editor litter). The
manifest lists the SHA-256 of each; its own SHA-256 is the policy version, so a file outside the
bundle can never change what the loader reads.

Limits, checked on the file sizes before anything is read, so that a huge or hostile bundle is
refused without spending memory on it:

- :data:`MAX_FILE_BYTES` (1 MiB) for any one file of the bundle;
- :data:`MAX_POLICY_BYTES` (1 MiB) for all policy (YAML) files together: ruamel's round-trip
  parser, which keeps positions, needs about 10 s and 150 MB per MiB;
- :data:`MAX_BUNDLE_BYTES` (16 MiB) for all files together (key set CSVs included).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gateway.errors import PolicyInvalid, PolicyProblem, SourcePosition

MAX_FILE_BYTES = 1 << 20
MAX_POLICY_BYTES = 1 << 20
MAX_BUNDLE_BYTES = 16 << 20
POLICY_SUFFIXES = (".yaml", ".yml")
# Files that are part of the bundle's folder but not of its identity.
_NOT_HASHED_DIRS = {"tests"}
_SIGNATURE_FILES = {"bundle.sig", "manifest.txt"}


def bundle_files(root: Path) -> list[Path]:
    """Every file that makes up the bundle, sorted.

    Policy tests (``tests/``), signatures and hidden files or folders (``.git/``, editor litter)
    are not part of it.
    """
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.relative_to(root).parts[0] not in _NOT_HASHED_DIRS
        and p.name not in _SIGNATURE_FILES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def manifest_of(digests: dict[str, str]) -> str:
    """The manifest text for ``{relative path: SHA-256}`` in bundle order."""
    return "".join(f"{digest}  {rel}\n" for rel, digest in digests.items()) or "\n"


def manifest_text(root: Path) -> str:
    """``sha256  relative/path`` per file; its SHA-256 is the policy version."""
    digests = {}
    for path in bundle_files(root):
        with path.open("rb") as handle:
            digests[path.relative_to(root).as_posix()] = hashlib.file_digest(
                handle, "sha256"
            ).hexdigest()
    return manifest_of(digests)


def bundle_version(root: Path) -> str:
    return hashlib.sha256(manifest_text(root).encode()).hexdigest()


def version_of(files: dict[str, bytes]) -> str:
    """The policy version of files already read (see :func:`read_bundle_files`)."""
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    return hashlib.sha256(manifest_of(digests).encode()).hexdigest()


def is_policy_file(rel: str) -> bool:
    """A YAML file at the top of the bundle folder (the only ones the loader reads)."""
    return "/" not in rel and rel.endswith(POLICY_SUFFIXES)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def read_bundle_files(root: Path) -> dict[str, bytes]:
    """The bytes of every bundle file by relative path, in bundle order.

    Raises PolicyInvalid listing every limit exceeded; sizes are checked before anything is read.
    """
    problems: list[PolicyProblem] = []

    def add(position: SourcePosition | None, message: str) -> None:
        problems.append(PolicyProblem(position, message))

    paths = {p.relative_to(root).as_posix(): p for p in bundle_files(root)}
    try:
        sizes = {rel: path.stat().st_size for rel, path in paths.items()}
    except OSError as err:
        raise PolicyInvalid(
            [PolicyProblem(None, f"cannot read the bundle: {err.strerror}")]
        ) from err
    for rel, size in sizes.items():
        if size > MAX_FILE_BYTES:
            add(
                SourcePosition(rel, 1, 1),
                f"the file is {_mib(size)}, over the limit of {_mib(MAX_FILE_BYTES)} per file",
            )
    policy_bytes = sum(size for rel, size in sizes.items() if is_policy_file(rel))
    if policy_bytes > MAX_POLICY_BYTES:
        add(
            None,
            f"the policy files total {_mib(policy_bytes)}, over the limit of "
            f"{_mib(MAX_POLICY_BYTES)} for all policy files together",
        )
    if sum(sizes.values()) > MAX_BUNDLE_BYTES:
        add(
            None,
            f"the bundle's files total {_mib(sum(sizes.values()))}, over the limit of "
            f"{_mib(MAX_BUNDLE_BYTES)}",
        )
    if problems:
        raise PolicyInvalid(problems)
    files: dict[str, bytes] = {}
    for rel, path in paths.items():
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat()
        except OSError as err:
            add(SourcePosition(rel, 1, 1), f"cannot read the file: {err.strerror}")
            continue
        if len(data) > MAX_FILE_BYTES:
            add(SourcePosition(rel, 1, 1), f"the file is over {_mib(MAX_FILE_BYTES)}")
        files[rel] = data
    if problems:
        raise PolicyInvalid(problems)
    return files
