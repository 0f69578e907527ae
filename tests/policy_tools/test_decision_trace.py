"""The decision engine's trace: every clause of every rule, first failures, caps, column forbids.

Queries are built as a department system builds them (``gateway.client`` helpers) and parsed with
``parse_query``, so the engine sees exactly what the gateway passes it.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from gateway.api.v1 import query_pb2
from gateway.client.client import count, count_persons, where
from gateway.policy.decision import Decision, amount_text, decide
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle
from gateway.query.form import QueryForm, parse_query

Edit = Callable[[Path, str, str], None]
PERMIT_CLAUSES = (
    "consumer",
    "dataset",
    "purpose",
    "measure",
    "group_by",
    "filters",
    "per_query_cap",
)


def query(purpose: str, *measures: query_pb2.Measure, group_by: tuple[str, ...] = ()) -> QueryForm:
    return parse_query(
        query_pb2.Query(purpose=purpose, measures=list(measures), group_by=list(group_by))
    )


def elderly_care(*measures: query_pb2.Measure, group_by: tuple[str, ...] = ()) -> QueryForm:
    return query("elderly-care-planning", *measures, group_by=group_by)


def clauses(decision: Decision, measure_id: str, rule_id: str) -> dict[str, tuple[bool, str]]:
    [check] = [c for c in decision.trace if c.measure_id == measure_id and c.rule_id == rule_id]
    return {c.clause: (c.passed, c.message) for c in check.clauses}


def test_trace_holds_every_rule_for_every_measure_in_sorted_order(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(
            count("b_members", "org.members", epsilon="0.5"),
            count("a_alone", "civil.residents", epsilon="0.5"),
        ),
    )
    assert decision.permitted
    pairs = [(c.measure_id, c.rule_id) for c in decision.trace]
    rules = sorted(demo_bundle.rules)
    assert pairs == [(m, r) for m in ("a_alone", "b_members") for r in rules]


def test_granting_permit_passes_every_clause_with_messages(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(
            count("alone", "civil.residents", where("lives_alone_elderly", "=", True), epsilon="1"),
            group_by=("community",),
        ),
    )
    assert decision.permitted
    assert clauses(decision, "alone", "civil-elderly-care") == {
        "consumer": (True, "consumer 'civil-affairs' matches [civil-affairs]"),
        "dataset": (True, "dataset 'civil.residents' matches [civil.residents, org.members]"),
        "purpose": (True, "purpose 'elderly-care-planning' is among the rule's purposes"),
        "measure": (True, "measure 'count' is granted"),
        "group_by": (True, "group-by on ['community'] is granted"),
        "filters": (True, "filtering on ['lives_alone_elderly'] is granted"),
        "per_query_cap": (True, "epsilon 1 is within the per-query cap (epsilon 1)"),
    }
    [check] = [c for c in decision.trace if c.rule_id == "civil-elderly-care"]
    assert check.applies and check.matches and check.first_failure is None


def test_rules_of_other_consumers_are_traced_as_not_applying(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle, "civil-affairs", elderly_care(count("m", "civil.residents", epsilon="1"))
    )
    grid = clauses(decision, "m", "grid-casework")
    assert grid["consumer"] == (False, "consumer 'civil-affairs' is not among [grid-centre]")
    assert grid["dataset"] == (False, "dataset 'civil.residents' is not among [events.cases]")
    [check] = [c for c in decision.trace if c.rule_id == "grid-casework"]
    assert not check.applies and check.first_failure is not None
    assert check.first_failure.clause == "consumer"


def test_every_clause_is_evaluated_not_only_up_to_the_first_failure(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "grid-centre",
        query(
            "casework-monitoring",
            count_persons("m", "events.cases", where("closed", "=", "2025-01-01"), epsilon="2"),
            group_by=("district",),
        ),
    )
    assert not decision.permitted
    failed = {k: v for k, v in clauses(decision, "m", "grid-casework").items() if not v[0]}
    assert failed == {
        "measure": (False, "measure 'count_persons' is not granted"),
        "group_by": (False, "group-by on ['district'] is not granted"),
        "filters": (False, "filtering on ['closed'] is not granted"),
        "per_query_cap": (False, "epsilon 2 is more than the rule allows per query (epsilon 1)"),
    }
    # The reason names only the first failing clause of the candidate rule.
    assert decision.reasons == (
        "measure 'm': rule 'grid-casework': measure 'count_persons' is not granted",
        "measure 'm': rule 'grid-handler-workload': measure 'count_persons' is not granted",
    )
    assert decision.reason_code == "POLICY_DENIED" and decision.deciding_rules == ()


@pytest.mark.parametrize(
    ("spend", "message"),
    [
        ({"epsilon": "1.5"}, "epsilon 1.5 is more than the rule allows per query (epsilon 1)"),
        ({"rho": "0.6"}, "rho 0.6 is more than the rule allows per query (epsilon 1)"),
        ({"rho": "0.500001"}, "rho 0.500001 is more than the rule allows per query (epsilon 1)"),
    ],
)
def test_explicit_spend_above_the_cap_is_denied_by_the_capping_rule(
    demo_bundle: Bundle, spend: dict[str, str], message: str
) -> None:
    decision = decide(
        demo_bundle, "civil-affairs", elderly_care(count("m", "civil.residents", **spend))
    )
    assert not decision.permitted
    assert decision.reason_code == "EPSILON_CAP_EXCEEDED"
    assert decision.deciding_rules == ("civil-elderly-care",)
    assert decision.reasons == (f"measure 'm': rule 'civil-elderly-care': {message}",)
    assert decision.grants == {}


@pytest.mark.parametrize("spend", [{"epsilon": "1"}, {"rho": "0.5"}])
def test_spend_exactly_at_the_cap_is_permitted(demo_bundle: Bundle, spend: dict[str, str]) -> None:
    decision = decide(
        demo_bundle, "civil-affairs", elderly_care(count("m", "civil.residents", **spend))
    )
    assert decision.permitted
    assert clauses(decision, "m", "civil-elderly-care")["per_query_cap"][0] is True


def test_target_error_spend_leaves_the_cap_to_the_planner(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(count("m", "civil.residents", target_error="1")),
    )
    assert decision.permitted  # the planner raises EPSILON_CAP_EXCEEDED (see test_cli_tools)
    assert "per_query_cap" not in clauses(decision, "m", "civil-elderly-care")


def test_cap_denial_mixed_with_another_failure_is_a_plain_denial(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(
            count("capped", "civil.residents", epsilon="2"),
            count("ungranted", "civil.subsidies", epsilon="0.5"),
        ),
    )
    assert not decision.permitted
    assert decision.reason_code == "POLICY_DENIED"
    assert decision.deciding_rules == ()
    assert decision.reasons == (
        "measure 'capped': rule 'civil-elderly-care': "
        "epsilon 2 is more than the rule allows per query (epsilon 1)",
        "measure 'ungranted': no rule grants 'civil.subsidies'",
    )


def test_a_permit_with_a_larger_cap_grants_what_a_tighter_one_refuses(
    bundle_copy: Path, edit: Edit
) -> None:
    edit(
        bundle_copy / "rules.yaml",
        "  civil-no-member-profile:\n",
        "  civil-big-counts:\n"
        "    effect: permit\n"
        "    consumers: [civil-affairs]\n"
        "    datasets: [civil.residents]\n"
        "    measures: [count]\n"
        '    max_epsilon_per_query: "3"\n'
        '    budget: {epsilon: "5"}\n'
        "\n  civil-no-member-profile:\n",
    )
    bundle = load_bundle(bundle_copy)
    small = decide(
        bundle, "civil-affairs", elderly_care(count("m", "civil.residents", epsilon="1"))
    )
    # Rules are tried in id order: civil-big-counts comes first and grants when it can.
    assert small.deciding_rules == ("civil-big-counts",)
    large = decide(
        bundle, "civil-affairs", elderly_care(count("m", "civil.residents", epsilon="2"))
    )
    assert large.permitted and large.deciding_rules == ("civil-big-counts",)
    assert (
        large.grants["m"].scopes[0].key == "consumer:civil-affairs/rule:civil-big-counts/lifetime"
    )
    too_large = decide(
        bundle, "civil-affairs", elderly_care(count("m", "civil.residents", epsilon="4"))
    )
    assert too_large.reason_code == "EPSILON_CAP_EXCEEDED"
    assert too_large.deciding_rules == ("civil-big-counts", "civil-elderly-care")


# --- forbid rules limited to columns ---------------------------------------------------------


@pytest.mark.parametrize(
    ("group_by", "filters", "message"),
    [
        (("branch",), (), "the query groups by ['branch'], which the rule forbids"),
        (
            ("community",),
            (where("education", "=", "primary"),),
            "the query filters on ['education'], which the rule forbids",
        ),
        (
            ("branch",),
            (where("education", "=", "primary"),),
            "the query groups by ['branch'] and filters on ['education'], which the rule forbids",
        ),
    ],
)
def test_a_forbid_with_columns_matches_queries_that_use_them(
    demo_bundle: Bundle,
    group_by: tuple[str, ...],
    filters: tuple[query_pb2.Filter, ...],
    message: str,
) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(count("m", "org.members", *filters, epsilon="0.5"), group_by=group_by),
    )
    assert not decision.permitted
    assert decision.deciding_rules == ("civil-no-member-profile",)
    assert decision.reasons == ("forbidden by rule 'civil-no-member-profile'",)
    assert clauses(decision, "m", "civil-no-member-profile")["columns"] == (True, message)


def test_a_forbid_with_columns_leaves_other_queries_alone(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(count("m", "org.members", epsilon="0.5"), group_by=("community",)),
    )
    assert decision.permitted
    assert clauses(decision, "m", "civil-no-member-profile")["columns"] == (
        False,
        "the query uses none of the forbidden columns ['branch', 'education']",
    )


def test_a_column_forbid_overrides_a_permit_that_grants_the_column(
    bundle_copy: Path, edit: Edit
) -> None:
    edit(
        bundle_copy / "rules.yaml",
        "group_by: [community, street, district, sex]",
        "group_by: [community, street, district, sex, branch]",
    )
    bundle = load_bundle(bundle_copy)
    by_branch = elderly_care(count("m", "org.members", epsilon="0.5"), group_by=("branch",))
    decision = decide(bundle, "civil-affairs", by_branch)
    assert clauses(decision, "m", "civil-elderly-care")["group_by"][0] is True
    assert not decision.permitted
    assert decision.deciding_rules == ("civil-no-member-profile",)


def test_a_forbid_on_a_dataset_overrides_a_pattern_permit(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "health-commission",
        query("home-care-planning", count("m", "civil.subsidies", epsilon="0.5")),
    )
    assert clauses(decision, "m", "health-home-care")["dataset"][0] is True
    assert not decision.permitted
    assert decision.deciding_rules == ("no-subsidies-to-health",)


# --- determinism and denial reasons ----------------------------------------------------------


def test_decision_and_trace_do_not_depend_on_measure_order(demo_bundle: Bundle) -> None:
    measures = [
        count("a", "civil.residents", where("low_income", "=", True), epsilon="0.5"),
        count_persons("b", "org.members", epsilon="2"),
        count("c", "civil.subsidies", epsilon="0.5"),
    ]
    forward = decide(demo_bundle, "civil-affairs", elderly_care(*measures))
    backward = decide(demo_bundle, "civil-affairs", elderly_care(*reversed(measures)))
    assert forward == backward
    assert [r.split("'")[1] for r in forward.reasons] == ["b", "c"]


def test_granted_measures_add_no_reasons_to_a_denial(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "org-department",
        query(
            "volunteer-planning",
            # org-activity-hours (tried first) does not grant count; org-volunteer-planning does.
            count("activities", "org.activities", epsilon="0.5"),
            count_persons("members", "org.members", epsilon="0.5"),
            count("subsidies", "civil.subsidies", epsilon="0.5"),
        ),
    )
    assert not decision.permitted
    assert decision.reasons == ("measure 'subsidies': no rule grants 'civil.subsidies'",)


def test_purpose_not_allowed_still_comes_with_a_trace(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle, "grid-centre", elderly_care(count("m", "events.cases", epsilon="0.5"))
    )
    assert decision.reason_code == "PURPOSE_NOT_ALLOWED"
    assert clauses(decision, "m", "grid-casework")["purpose"] == (
        False,
        "purpose 'elderly-care-planning' is not among the rule's purposes",
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Fraction(1, 2), "0.5"),
        (Fraction(3, 2), "1.5"),
        (Fraction(1), "1"),
        (Fraction(1, 8), "0.125"),
        (Fraction(1, 1_000_000), "0.000001"),
        (Fraction(1, 3), "1/3"),
        (Fraction(-5, 4), "-1.25"),
    ],
)
def test_amount_text_writes_decimals_when_exact(value: Fraction, text: str) -> None:
    assert amount_text(value) == text
    if "/" not in text:
        assert Fraction(text) == value
