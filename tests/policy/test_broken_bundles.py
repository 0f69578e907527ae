"""Golden broken bundles: one small bundle per kind of mistake, with the exact report expected.

Each folder under ``broken/`` is a complete bundle, small enough to read on its own (a comment at
the top of its policy file says what is wrong), and ``expected.txt`` holds the exact
``file:line:col: message`` lines that ``load_bundle`` reports for it, in order. To refresh them
after an intended change of messages, run
``SILOGATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/policy/test_broken_bundles.py`` and review the
diff: every message should tell an author what is wrong and point where it is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gateway.errors import PolicyInvalid
from gateway.policy.loader import load_bundle

BROKEN = Path(__file__).resolve().parent / "broken"
CASES = sorted(p for p in BROKEN.iterdir() if p.is_dir())
UPDATE_GOLDEN = os.environ.get("SILOGATE_UPDATE_GOLDEN") == "1"
POSITION = re.compile(r"(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): \S")


def report(bundle: Path) -> str:
    with pytest.raises(PolicyInvalid) as info:
        load_bundle(bundle)
    assert info.value.reason == "POLICY_INVALID"
    return "".join(f"{problem}\n" for problem in info.value.problems)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_broken_bundle_is_reported_exactly(case: Path) -> None:
    expected = case / "expected.txt"
    actual = report(case)
    if UPDATE_GOLDEN:
        expected.write_text(actual, encoding="utf-8")
    assert expected.is_file(), f"missing {expected}; run with SILOGATE_UPDATE_GOLDEN=1"
    assert actual == expected.read_text(encoding="utf-8")


def test_there_is_a_broken_bundle_for_each_kind_of_mistake() -> None:
    assert len(CASES) >= 25
    for case in CASES:
        lines = (case / "expected.txt").read_text(encoding="utf-8").splitlines()
        assert lines, case.name
        for line in lines:
            # Only a bundle-wide problem has no place; every other names a line of a real file.
            if case.name == "no-policy-files":
                assert not POSITION.match(line), line
                continue
            match = POSITION.match(line)
            assert match is not None, f"{case.name}: {line}"
            text = (case / match["file"]).read_bytes().decode("utf-8", errors="replace")
            written = text.splitlines()
            assert 1 <= int(match["line"]) <= len(written), f"{case.name}: {line}"
            assert 1 <= int(match["column"]) <= len(written[int(match["line"]) - 1]) + 1, line


def test_a_broken_bundle_loads_once_its_mistake_is_fixed(tmp_path: Path) -> None:
    """The cases break a valid bundle: the same rule case with its budget written out loads."""
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    text = (BROKEN / "permit-without-budget" / "policy.yaml").read_text(encoding="utf-8")
    (fixed / "policy.yaml").write_text(text + '    budget: {epsilon: "1"}\n', encoding="utf-8")
    bundle = load_bundle(fixed)
    assert sorted(bundle.rules) == ["care-planning"]
    assert bundle.key_sets == {"communities": ("east", "west")}
