"""Fixtures for the policy author tools: the demo bundle, editable copies, golden files, the CLI.

Golden files live in ``tests/policy_tools/golden/``. After an intended change of output (or of
the demo bundle's line numbers), refresh them with
``SILOGATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/policy_tools`` and review the diff.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("SILOGATE_UPDATE_GOLDEN") == "1"


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str


Cli = Callable[..., CliRun]
Edit = Callable[[Path, str, str], None]
Golden = Callable[[str, str], None]
Locate = Callable[[Path, str, str], str]


@pytest.fixture(scope="session")
def demo_bundle() -> Bundle:
    return load_bundle(DEMO_BUNDLE)


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A fresh copy of the demo bundle (with its tests) that a test may change."""
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle"))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.fixture
def edit() -> Edit:
    """Replace the one occurrence of ``old`` in a file (fails if it is missing or repeated)."""
    return _edit


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``silogate`` in-process with string arguments; return exit code, stdout, stderr."""

    def run(*args: object) -> CliRun:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture
def golden() -> Golden:
    """Compare text with ``golden/<name>``; with SILOGATE_UPDATE_GOLDEN=1, rewrite it first."""

    def check(name: str, actual: str) -> None:
        path = GOLDEN_DIR / name
        if UPDATE_GOLDEN:
            path.write_text(actual, encoding="utf-8")
        assert path.is_file(), f"missing golden file {path}; run with SILOGATE_UPDATE_GOLDEN=1"
        assert actual == path.read_text(encoding="utf-8")

    return check


def _locate(path: Path, line_part: str, token: str) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    matches = [i for i, line in enumerate(lines) if line_part in line]
    assert len(matches) == 1, f"{line_part!r} is on lines {matches} of {path.name}"
    return f"{path.name}:{matches[0] + 1}:{lines[matches[0]].index(token) + 1}"


@pytest.fixture
def locate() -> Locate:
    """``file:line:col`` of ``token`` on the one line of ``path`` that contains ``line_part``.

    Positions are computed from the text, so tests pin the exact place without depending on
    the demo bundle's line numbers.
    """
    return _locate
