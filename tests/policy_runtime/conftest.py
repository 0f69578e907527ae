"""Fixtures for bundle signing and hot reload: a private copy of the demo bundle and a key pair.

Every test edits its own copy, never ``policies/`` (other tests and the session system use it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import POLICY, edit_rule

from gateway.policy.signing import generate_signing_key

# The rule the tests change (civil affairs counting residents), and its per-query cap at the
# start of every test, whatever the demo bundle says today.
RULE = "civil-elderly-care"
START_CAP = "1"


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    """A copy of the demo bundle (without its policy tests) with a known per-query cap."""
    bundle = tmp_path / "policies"
    shutil.copytree(POLICY, bundle, ignore=shutil.ignore_patterns("tests"))
    edit_rule(bundle, RULE, max_epsilon_per_query=START_CAP)
    return bundle


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(private, public) PEM files of a fresh Ed25519 key pair."""
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "verify.pem"
    generate_signing_key(private, public)
    return private, public
