"""The examples in ``docs/policy-authors.md`` work as written.

The annotated bundle must pass ``policy check`` without warnings, the example test case must load
and pass against the demo bundle, and every command the guide documents must exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import build_parser
from gateway.policy.lint import lint_bundle
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle
from gateway.policy.policytests import run_policy_tests

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "policy-authors.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)


def test_annotated_bundle_is_valid_and_raises_no_warnings(tmp_path: Path, cli: Any) -> None:
    [bundle_text] = [b for b in yaml_blocks() if b.startswith("# One file may hold")]
    (tmp_path / "policy.yaml").write_text(bundle_text, encoding="utf-8")
    bundle = load_bundle(tmp_path)
    assert sorted(bundle.rules) == ["civil-elderly-care", "no-sex-breakdown-of-residents"]
    assert lint_bundle(tmp_path, bundle) == []
    run = cli("policy", "check", tmp_path)
    assert run.code == 0 and run.out.startswith("ok: 1 datasets, 1 consumers, 2 rules;")


def test_example_test_case_passes_against_the_demo_bundle(
    tmp_path: Path, demo_bundle: Bundle
) -> None:
    [cases_text] = [b for b in yaml_blocks() if b.startswith("cases:")]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "example.yaml").write_text(cases_text, encoding="utf-8")
    run = run_policy_tests(tmp_path, demo_bundle)
    assert run.problems == []
    assert (run.passed, run.failed) == (1, 0)


@pytest.mark.parametrize(
    "command", ["check", "test", "explain", "diff", "schema", "keygen", "sign"]
)
def test_every_documented_command_exists(command: str) -> None:
    assert f"silogate policy {command}" in GUIDE.read_text(encoding="utf-8")
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["policy", command, "--help"])
    assert info.value.code == 0


# Each mistake of the guide's "Common mistakes": (file, text in the demo bundle, mistaken text).
MISTAKES = [
    ("rules.yaml", "    filterable: [category, opened]", "    filterabel: [category, opened]"),
    ("rules.yaml", "consumers: [grid-centre]", "consumers: [grid-center]"),
    ("rules.yaml", "purposes: [casework-monitoring]", "purposes: [casework-planning]"),
    ("rules.yaml", "filterable: [category, opened]", "filterable: [category, opened, closed_by]"),
    (
        "rules.yaml",
        "group_by: [street, community, category]",
        "group_by: [street, community, category, days_to_close]",
    ),
    (
        "rules.yaml",
        'budget: {epsilon: "6", period: lifetime}',
        'budget: {epsilon: "6", rho: "1", period: lifetime}',
    ),
    ("rules.yaml", '    budget: {epsilon: "6", period: lifetime}\n', ""),
    ("rules.yaml", "period: month", "period: monthly"),
    ("rules.yaml", 'max_epsilon_per_query: "0.5"', "max_epsilon_per_query: half"),
    (
        "rules.yaml",
        "    effect: forbid\n    consumers: [org-department]",
        "    effect: forbid\n\tconsumers: [org-department]",
    ),
    ("datasets.yaml", "  events.cases:", "  grid.cases:"),
]


@pytest.mark.parametrize(("file", "old", "new"), MISTAKES)
def test_common_mistakes_show_the_exact_output(
    bundle_copy: Path, edit: Any, cli: Any, file: str, old: str, new: str
) -> None:
    """If this fails after a loader message changed, update the guide's "Common mistakes"."""
    edit(bundle_copy / file, old, new)
    run = cli("policy", "check", bundle_copy)
    assert run.code == 1
    assert f"```\n{run.out}```\n" in GUIDE.read_text(encoding="utf-8"), run.out
