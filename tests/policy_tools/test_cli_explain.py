"""``silogate policy explain``: decision, every rule's clauses, cost; nothing spent or written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Golden = Callable[[str, str], None]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"

TWO_SILOS = """\
purpose: elderly-care-planning
group_by: [community]
measures:
  - id: elderly_alone
    dataset: civil.residents
    filters: [{column: lives_alone_elderly, value: true}]
    spend: {epsilon: "0.5"}
  - {id: members, dataset: org.members, spend: {epsilon: "0.5"}}
"""


@pytest.fixture
def query_file(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "query.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def explain(cli: Any, consumer: str | None, path: Path, bundle: Path = DEMO_BUNDLE) -> Any:
    args = ["policy", "explain", bundle, "--query", path]
    return cli(*args, *(["--consumer", consumer] if consumer else []))


def test_permitted_query_matches_golden_file(
    cli: Any, query_file: Callable[[str], Path], demo_bundle: Any, golden: Golden
) -> None:
    run = explain(cli, "civil-affairs", query_file(TWO_SILOS))
    assert run.code == 0 and run.err == ""
    assert "decision: ALLOW\ndeciding rules: civil-elderly-care\n" in run.out
    assert "cost: rho 1/4 (~0.25)\n" in run.out
    assert "nothing was spent" in run.out
    golden("explain_permit.txt", run.out.replace(demo_bundle.version, "<version>"))


def test_forbidden_query_shows_the_forbid_and_the_failing_permit_clause(
    cli: Any, query_file: Callable[[str], Path], demo_bundle: Any, golden: Golden
) -> None:
    path = query_file(
        "purpose: elderly-care-planning\ngroup_by: [branch]\n"
        "measures:\n  - {id: members, dataset: org.members, spend: {epsilon: '0.5'}}\n"
    )
    run = explain(cli, "civil-affairs", path)
    assert run.code == 0
    assert "decision: DENY (POLICY_DENIED)\ndeciding rules: civil-no-member-profile\n" in run.out
    assert "    fail  group_by       group-by on ['branch'] is not granted\n" in run.out
    assert (
        "  rule 'civil-no-member-profile' (forbid, rules.yaml:" in run.out
        and "): forbids this measure\n" in run.out
    )
    assert "    pass  columns        the query groups by ['branch'], which the rule forbids\n" in (
        run.out
    )
    assert "cost:" not in run.out
    golden("explain_forbid.txt", run.out.replace(demo_bundle.version, "<version>"))


def test_cap_checked_by_the_planner_is_explained(
    cli: Any, query_file: Callable[[str], Path]
) -> None:
    path = query_file(
        "purpose: elderly-care-planning\n"
        "measures:\n  - {id: m, dataset: civil.residents, spend: {target_error: 1}}\n"
    )
    run = explain(cli, "civil-affairs", path)
    assert run.code == 0
    assert "decision: DENY (EPSILON_CAP_EXCEEDED)\ndeciding rules: civil-elderly-care\n" in run.out
    assert "  reason: measure 'm' would spend more than rule 'civil-elderly-care' allows" in run.out


def test_allowed_sum_is_priced_from_its_bounds(cli: Any, query_file: Callable[[str], Path]) -> None:
    path = query_file(
        "consumer: org-department\npurpose: volunteer-planning\ngroup_by: [branch]\n"
        "measures:\n  - {id: hours, dataset: org.activities, kind: sum, column: hours,"
        " spend: {epsilon: 0.5}}\n"
    )
    run = explain(cli, None, path)  # the consumer comes from the file
    assert run.code == 0
    assert "consumer: org-department\n" in run.out
    assert "decision: ALLOW\ndeciding rules: org-activity-hours\n" in run.out
    assert "  rule 'org-volunteer-planning' (permit, rules.yaml:" in run.out
    assert "    fail  measure        measure 'sum' is not granted\n" in run.out
    # 20 rows per person, hours clamped to [0, 8] in steps of 0.5: sensitivity 20 x 16 units.
    assert (
        "  measure 'hours' (sum): silo org, rho 1/8, by rule 'org-activity-hours'"
        " (min group size 5)\n"
        "    value: discrete_laplace, sensitivity 320, scale 640, 95% error ±958.9, rho 1/8\n"
    ) in run.out


def test_invalid_query_is_reported_without_a_trace(
    cli: Any, query_file: Callable[[str], Path]
) -> None:
    path = query_file(
        "purpose: elderly-care-planning\n"
        "measures:\n  - {dataset: civil.residents, filters: [{column: salary, value: 3}],"
        " spend: {epsilon: 1}}\n"
    )
    run = explain(cli, "civil-affairs", path)
    assert run.code == 0
    assert "decision: INVALID (INVALID_QUERY)\n" in run.out
    assert (
        "  reason: query.measures[0].filters[0].column: 'civil.residents' has no column "
        "'salary'\n" in run.out
    )
    assert "measure '" not in run.out


def test_a_test_case_can_be_explained_as_it_is(cli: Any, query_file: Callable[[str], Path]) -> None:
    path = query_file(
        "name: a case\nconsumer: grid-centre\npurpose: casework-monitoring\n"
        "measures:\n  - {dataset: events.cases, spend: {epsilon: '0.5'}}\n"
        "expect: {decision: allow}\n"
    )
    run = explain(cli, "grid-centre", path)
    assert run.code == 0
    assert "decision: ALLOW\ndeciding rules: grid-casework\n" in run.out
    assert "    consumer:grid-centre/rule:grid-casework/lifetime: rho 1/8 of 18 " in run.out


def test_consumer_mismatch_and_missing_consumer_are_usage_errors(
    cli: Any, query_file: Callable[[str], Path]
) -> None:
    path = query_file(
        "consumer: grid-centre\npurpose: casework-monitoring\n"
        "measures:\n  - {dataset: events.cases, spend: {epsilon: '0.5'}}\n"
    )
    run = explain(cli, "civil-affairs", path)
    assert run.code == 2
    assert run.err == (
        "silogate: the query file is for consumer 'grid-centre' but --consumer is 'civil-affairs'\n"
    )
    path = query_file("purpose: x\nmeasures:\n  - {dataset: events.cases, spend: {rho: 1}}\n")
    run = explain(cli, None, path)
    assert run.code == 2
    assert run.err == "silogate: name the consumer with --consumer or in the query file\n"


def test_unknown_consumer_is_invalid(cli: Any, query_file: Callable[[str], Path]) -> None:
    run = explain(cli, "stranger", query_file(TWO_SILOS))
    assert run.code == 0
    assert "decision: INVALID (UNKNOWN_CONSUMER)\n" in run.out


def test_malformed_query_file_is_positioned(cli: Any, query_file: Callable[[str], Path]) -> None:
    path = query_file(
        "purpose: x\nmeasures:\n  - {dataset: events.cases, spend: {}}\ncolour: red\n"
    )
    run = explain(cli, "grid-centre", path)
    assert run.code == 1
    assert run.out.splitlines() == [
        f"{path}:3:36: measures.0.spend: give exactly one of 'epsilon', 'rho' or 'target_error'",
        f"{path}:4:1: unknown key 'colour'",
    ]


def test_missing_query_file_is_one_line(tmp_path: Path, cli: Any) -> None:
    run = explain(cli, "grid-centre", tmp_path / "absent.yaml")
    assert run.code == 1
    assert run.out == f"cannot read {tmp_path / 'absent.yaml'}: No such file or directory\n"
