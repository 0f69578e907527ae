"""``silogate policy test``: the demo bundle's cases pass; wrong expectations fail with a diff."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.policy.cases import load_case_file

Edit = Callable[[Path, str, str], None]
Locate = Callable[[Path, str, str], str]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"


def demo_cases() -> list[Any]:
    cases = []
    for path in sorted((DEMO_BUNDLE / "tests").glob("*.yaml")):
        loaded, problems = load_case_file(path, path.name)
        assert problems == []
        cases += [c.case for c in loaded]
    return cases


def test_demo_bundle_policy_tests_pass(cli: Any) -> None:
    run = cli("policy", "test", DEMO_BUNDLE)
    assert run.code == 0, run.out
    lines = run.out.splitlines()
    results = [line for line in lines if line.startswith("  ")]
    assert results and all(line.startswith("  PASS  ") for line in results)
    assert lines[-1] == f"{len(results)} passed, 0 failed"
    assert len(results) == len(demo_cases())


def test_demo_cases_cover_what_the_issue_asks_for() -> None:
    cases = demo_cases()
    assert len(cases) >= 20
    expected = [c.expect for c in cases]
    forbids = {"civil-no-member-profile", "no-subsidies-to-health", "no-org-data-to-health"}
    assert sum(e.decision == "allow" for e in expected) >= 5
    assert sum(e.decision == "deny" for e in expected) >= 10
    assert {r for e in expected for r in (e.rules or [])} >= forbids | {"no-health-data-to-org"}
    assert sum(e.reason_code == "EPSILON_CAP_EXCEEDED" for e in expected) >= 3
    assert any(e.reason_code == "PURPOSE_NOT_ALLOWED" for e in expected)
    assert any("not among the rule's purposes" in (e.reason_contains or "") for e in expected)
    scope_periods = {s.rsplit("/", 1)[1] for e in expected for s in (e.scopes or [])}
    assert scope_periods == {"lifetime", "month", "year"}
    assert {c.consumer for c in cases} == {
        "civil-affairs",
        "org-department",
        "grid-centre",
        "health-commission",
    }


def test_a_wrong_expectation_fails_with_a_diff(
    bundle_copy: Path, edit: Edit, locate: Locate, cli: Any, golden: Callable[[str, str], None]
) -> None:
    cases = bundle_copy / "tests" / "civil_affairs.yaml"
    edit(
        cases,
        '    expect: {decision: allow, rules: [civil-elderly-care], cost_rho: "1/10"}\n',
        '    expect: {decision: allow, rules: [civil-elderly-care], cost_rho: "1/8"}\n',
    )
    edit(
        cases,
        "    expect: {decision: deny, rules: [civil-no-member-profile]}\n",
        "    expect: {decision: allow, rules: [civil-elderly-care], scopes: [x]}\n",
    )
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    rho_case = locate(cases, "- name: distinct members per district", "name")
    forbid_case = locate(cases, "- name: filtering members on education", "name")
    assert (
        f"  FAIL  distinct members per district, spent as rho (zCDP)  (tests/{rho_case})\n"
        "        - cost_rho: 1/8\n"
        "        + cost_rho: 1/10\n" in run.out
    )
    assert (
        f"  FAIL  filtering members on education is forbidden  (tests/{forbid_case})\n"
        "        - decision: allow\n"
        "        + decision: deny (POLICY_DENIED)\n"
        "        - rules: [civil-elderly-care]\n"
        "        + rules: [civil-no-member-profile]\n"
        "        - scopes: [x]\n"
        "        + scopes: []\n"
        "          reason: forbidden by rule 'civil-no-member-profile'\n" in run.out
    )
    total = len(demo_cases())
    assert run.out.endswith(f"{total - 2} passed, 2 failed\n")
    golden(
        "policy_test_failures.txt",
        "".join(line + "\n" for line in run.out.splitlines() if not line.startswith("  PASS")),
    )


def test_cost_of_a_measure_that_cannot_be_planned_is_reported_not_crashed(
    bundle_copy: Path, cli: Any
) -> None:
    (bundle_copy / "tests" / "zz_mean.yaml").write_text(
        "cases:\n"
        "  - name: a mean with a target error\n"
        "    consumer: org-department\n"
        "    purpose: volunteer-planning\n"
        "    measures:\n"
        "      - {dataset: org.activities, kind: mean, column: hours,"
        ' spend: {target_error: "2"}}\n'
        '    expect: {decision: allow, cost_rho: "1/8"}\n',
        encoding="utf-8",
    )
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    assert (
        "        - cost_rho: 1/8\n"
        "        + cost_rho: INVALID_QUERY: a target error cannot be split over the 2 noisy values"
    ) in run.out


def test_case_file_problems_are_positioned_and_fail_the_run(
    bundle_copy: Path, locate: Locate, cli: Any
) -> None:
    broken = bundle_copy / "tests" / "zz_broken.yaml"
    broken.write_text(
        "cases:\n"
        "  - name: misspelt key\n"
        "    consumer: civil-affairs\n"
        "    purpose: elderly-care-planning\n"
        "    measures:\n"
        "      - {dataset: civil.residents, spend: {epsilon: 1}, filter: []}\n"
        "    expect: {decision: allow}\n"
        "  - name: two spends\n"
        "    consumer: civil-affairs\n"
        "    purpose: elderly-care-planning\n"
        "    measures:\n"
        "      - {dataset: civil.residents, spend: {epsilon: 1, rho: 1}}\n"
        "    expect: {decision: maybe}\n",
        encoding="utf-8",
    )
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    problems = [line for line in run.out.splitlines() if line.startswith("tests/zz_broken")]
    assert problems == [
        f"tests/{locate(broken, 'filter: []', 'filter')}: unknown key 'filter'",
        f"tests/{locate(broken, 'rho: 1}}', '{epsilon')}: cases.1.measures.0.spend: "
        "give exactly one of 'epsilon', 'rho' or 'target_error'",
        f"tests/{locate(broken, 'decision: maybe', 'maybe')}: cases.1.expect.decision: "
        "Input should be 'allow', 'deny' or 'invalid'",
    ]
    assert re.search(r"^\d+ passed, 0 failed, 3 problem\(s\) in test files$", run.out, re.M)


def test_yaml_syntax_error_in_a_case_file(bundle_copy: Path, cli: Any) -> None:
    (bundle_copy / "tests" / "bad.yaml").write_text("cases: [\n", encoding="utf-8")
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    assert re.search(r"^tests/bad\.yaml:\d+:\d+: YAML: ", run.out, re.M)


def test_unknown_consumer_fails_the_case(bundle_copy: Path, edit: Edit, cli: Any) -> None:
    cases = bundle_copy / "tests" / "grid_centre.yaml"
    edit(
        cases,
        "  - name: cases per street and category\n    consumer: grid-centre\n",
        "  - name: cases per street and category\n    consumer: grid-center\n",
    )
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    assert "        + decision: invalid (UNKNOWN_CONSUMER)\n" in run.out
    assert "          reason: consumer 'grid-center' is not declared in the bundle\n" in run.out


def test_bundle_without_tests_fails(bundle_copy: Path, cli: Any) -> None:
    for path in (bundle_copy / "tests").iterdir():
        path.unlink()
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    assert run.out == f"no policy tests found: {bundle_copy / 'tests'}/*.yaml\n"


def test_invalid_bundle_is_reported_like_check(bundle_copy: Path, edit: Edit, cli: Any) -> None:
    edit(bundle_copy / "rules.yaml", "consumers: [grid-centre]", "consumers: [grid-center]")
    check = cli("policy", "check", bundle_copy)
    run = cli("policy", "test", bundle_copy)
    assert run.code == check.code == 1
    assert run.out == check.out


def test_case_files_refuse_yaml_aliases(bundle_copy: Path, cli: Any) -> None:
    """Case files are parsed as strictly as policy files: an alias could expand without bound."""
    (bundle_copy / "tests" / "alias.yaml").write_text(
        "cases:\n  - &case\n    name: x\n  - *case\n", encoding="utf-8"
    )
    run = cli("policy", "test", bundle_copy)
    assert run.code == 1
    assert re.search(r"^tests/alias\.yaml:2:5: YAML: .*anchor", run.out, re.M), run.out
