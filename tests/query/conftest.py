"""Fixtures for the query tests: the demo policy bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture(scope="session")
def demo_bundle() -> Bundle:
    return load_bundle(DEMO_BUNDLE)
