"""``silogate policy check``: warnings for risky settings, at the setting, and exit codes.

Warnings are printed as ``file:line:col: warning: message`` before the ``ok:`` line and counted
after it; a bundle with only warnings still exits 0. Errors keep their ``file:line:col: message``
format and suppress warnings (a bundle that does not load has no settings to judge).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import PolicyInvalid
from gateway.policy.lint import lint_bundle
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

Edit = Callable[[Path, str, str], None]
Locate = Callable[[Path, str, str], str]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"


def make_risky(root: Path, edit: Edit) -> None:
    """Four risky settings in a copy of the demo bundle, none of them an error."""
    populations, rules = root / "populations.yaml", root / "rules.yaml"
    edit(populations, "period: lifetime", "period: year")
    edit(rules, '    max_epsilon_per_query: "0.5"\n', '    max_epsilon_per_query: "2"\n')
    edit(rules, "    min_group_size: 10\n", "    min_group_size: 0\n")
    edit(
        rules,
        '    max_epsilon_per_query: "1"\n    budget: {epsilon: "6", period: lifetime}\n',
        '    budget: {epsilon: "6", period: lifetime}\n',
    )


def test_demo_bundle_has_no_warnings(cli: Any, demo_bundle: Bundle) -> None:
    run = cli("policy", "check", DEMO_BUNDLE)
    assert run.code == 0
    assert run.out == (
        f"ok: 7 datasets, 4 consumers, 10 rules; policy version {demo_bundle.version}\n"
    )
    assert run.err == ""


def test_each_warning_points_at_its_setting(
    bundle_copy: Path, edit: Edit, locate: Locate, cli: Any
) -> None:
    make_risky(bundle_copy, edit)
    rules = bundle_copy / "rules.yaml"
    run = cli("policy", "check", bundle_copy)
    assert run.code == 0
    version = load_bundle(bundle_copy).version
    cap = locate(rules, 'max_epsilon_per_query: "2"', '"2"')
    month = locate(rules, 'budget: {epsilon: "2", period: month}', "month")
    year = locate(rules, 'budget: {epsilon: "4", period: year}', "year")
    assert run.out.splitlines() == [
        f"{locate(rules, '  grid-casework:', 'grid')}: warning: rule 'grid-casework' sets no "
        "max_epsilon_per_query; one query may spend the whole budget",
        f"{cap}: warning: rule 'org-activity-hours': max_epsilon_per_query 2 is above 1; "
        "one query may reveal much about a person",
        f"{month}: warning: rule 'org-activity-hours': budget period 'month' refreshes and "
        "population 'city-residents' has no lifetime budget either; "
        "repeated queries can leak without bound",
        f"{year}: warning: rule 'health-home-care': budget period 'year' refreshes and "
        "population 'city-residents' has no lifetime budget either; "
        "repeated queries can leak without bound",
        f"{locate(rules, 'min_group_size: 0', '0')}: warning: rule 'health-home-care' grants "
        "counts with min_group_size 0; small groups are released unsuppressed",
        f"ok: 7 datasets, 4 consumers, 10 rules; policy version {version}",
        "5 warning(s)",
    ]


def test_warnings_output_matches_golden_file(
    bundle_copy: Path, edit: Edit, cli: Any, golden: Callable[[str, str], None]
) -> None:
    make_risky(bundle_copy, edit)
    run = cli("policy", "check", bundle_copy)
    assert str(bundle_copy) not in run.out  # positions are relative to the bundle
    version = load_bundle(bundle_copy).version
    golden("policy_check_warnings.txt", run.out.replace(version, "<version>"))


def test_unwritten_min_group_size_is_reported_at_the_rule(
    bundle_copy: Path, edit: Edit, locate: Locate
) -> None:
    rules = bundle_copy / "rules.yaml"
    edit(
        rules,
        '    budget: {epsilon: "6", period: lifetime}\n    min_group_size: 5\n',
        '    budget: {epsilon: "6", period: lifetime}\n',
    )
    warnings = [str(w) for w in lint_bundle(bundle_copy, load_bundle(bundle_copy))]
    assert warnings == [
        f"{locate(rules, '  grid-casework:', 'grid')}: warning: rule 'grid-casework' grants "
        "counts with min_group_size 0; small groups are released unsuppressed"
    ]


def test_refreshing_rule_budget_under_a_lifetime_population_is_fine(demo_bundle: Bundle) -> None:
    periods = {r.budget.period for r in demo_bundle.rules.values() if r.budget is not None}
    assert {"month", "year"} <= periods  # the demo bundle uses refreshing rule budgets...
    assert lint_bundle(DEMO_BUNDLE, demo_bundle) == []  # ...capped by the lifetime population


def test_sum_only_rule_with_min_group_size_zero_is_not_a_count_warning(
    bundle_copy: Path, edit: Edit
) -> None:
    edit(
        bundle_copy / "rules.yaml",
        '    budget: {epsilon: "2", period: month}\n    min_group_size: 5\n',
        '    budget: {epsilon: "2", period: month}\n    min_group_size: 0\n',
    )
    assert lint_bundle(bundle_copy, load_bundle(bundle_copy)) == []


def test_forbid_rules_get_no_warnings(bundle_copy: Path, edit: Edit) -> None:
    """A forbid has no budget or cap; it must not be told to set them."""
    bundle = load_bundle(bundle_copy)
    forbids = [r for r in bundle.rules.values() if r.effect == "forbid"]
    assert len(forbids) == 4
    assert all(r.max_epsilon_per_query is None for r in forbids)
    assert lint_bundle(bundle_copy, bundle) == []


def test_errors_keep_their_format_and_suppress_warnings(
    bundle_copy: Path, edit: Edit, cli: Any
) -> None:
    make_risky(bundle_copy, edit)
    rules = bundle_copy / "rules.yaml"
    edit(rules, "consumers: [grid-centre]", "consumers: [grid-center]")
    with pytest.raises(PolicyInvalid) as info:
        load_bundle(bundle_copy)
    [problem] = info.value.problems
    assert problem.position is not None and problem.position.file == "rules.yaml"
    run = cli("policy", "check", bundle_copy)
    assert run.code == 1
    assert run.out.splitlines() == [str(problem), "1 problem(s)"]
    assert "warning" not in run.out


def test_missing_folder_fails(tmp_path: Path, cli: Any) -> None:
    run = cli("policy", "check", tmp_path / "absent")
    assert run.code == 1
    assert run.out == f"policy bundle folder not found: {tmp_path / 'absent'}\n1 problem(s)\n"
