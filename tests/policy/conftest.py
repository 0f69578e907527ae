"""Fixtures for the policy tests: the demo bundle, editable copies of it, golden files.

Golden files live in ``tests/policy/golden/``. To refresh them after an intended change of
output, run ``SILOGATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/policy`` and review the diff.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("SILOGATE_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="session")
def demo_bundle() -> Bundle:
    return load_bundle(DEMO_BUNDLE)


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A fresh copy of the demo bundle that a test may break."""
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle"))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.fixture
def edit() -> Callable[[Path, str, str], None]:
    """Replace the one occurrence of ``old`` in a file (fails if it is missing or repeated)."""
    return _edit


@pytest.fixture
def golden() -> Callable[[str, str], None]:
    """Compare text with ``golden/<name>``; with SILOGATE_UPDATE_GOLDEN=1, rewrite it first."""

    def check(name: str, actual: str) -> None:
        path = GOLDEN_DIR / name
        if UPDATE_GOLDEN:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual, encoding="utf-8")
        assert path.is_file(), f"missing golden file {path}; run with SILOGATE_UPDATE_GOLDEN=1"
        assert actual == path.read_text(encoding="utf-8")

    return check
