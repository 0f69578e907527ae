"""The decision engine on the demo bundle: default deny, forbid over permit, reasons, grants.

Queries are built as an API client builds them (``gateway.client`` helpers) and parsed with
``parse_query``, so the engine sees exactly what the gateway would pass it.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from gateway.api.v1 import query_pb2
from gateway.client.client import count, count_persons, where
from gateway.policy.decision import BudgetScope, decide
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle
from gateway.query.form import QueryForm, parse_query

Edit = Callable[[Path, str, str], None]

CIVIL_SCOPE = BudgetScope(
    key="consumer:civil-affairs/rule:civil-elderly-care/lifetime",
    total_rho=Fraction(50),  # epsilon 10
    period="lifetime",
    delta=Fraction(0),
)
POPULATION_SCOPE = BudgetScope(
    key="population:city-residents/lifetime",
    total_rho=Fraction(800),  # epsilon 40
    period="lifetime",
    delta=Fraction(0),
    key_delta=Fraction(1, 10**6),
)


def query(purpose: str, *measures: query_pb2.Measure, group_by: tuple[str, ...] = ()) -> QueryForm:
    return parse_query(
        query_pb2.Query(purpose=purpose, measures=list(measures), group_by=list(group_by))
    )


def elderly_care(*measures: query_pb2.Measure, group_by: tuple[str, ...] = ()) -> QueryForm:
    return query("elderly-care-planning", *measures, group_by=group_by)


def test_default_deny_when_no_rule_covers_the_dataset(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "grid-centre",
        query("casework-monitoring", count("m", "civil.residents", epsilon="1")),
    )
    assert not decision.permitted
    assert decision.reason_code == "POLICY_DENIED"
    assert decision.deciding_rules == ()
    assert decision.reasons == ("measure 'm': no rule grants 'civil.residents'",)
    assert decision.grants == {}
    assert decision.scopes == ()


def test_forbid_rule_denies_and_is_named(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "org-department",
        query("volunteer-planning", count("m", "health.chronic", epsilon="1")),
    )
    assert not decision.permitted
    assert decision.reason_code == "POLICY_DENIED"
    assert decision.deciding_rules == ("no-health-data-to-org",)
    assert decision.reasons == ("forbidden by rule 'no-health-data-to-org'",)


def test_forbid_on_one_measure_denies_the_whole_query(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "org-department",
        query(
            "volunteer-planning",
            count("members", "org.members", epsilon="0.5"),
            count("patients", "health.chronic", epsilon="0.5"),
        ),
    )
    assert not decision.permitted
    assert decision.deciding_rules == ("no-health-data-to-org",)
    assert decision.grants == {}


def test_forbid_overrides_a_matching_permit(bundle_copy: Path, edit: Edit) -> None:
    """Add a permit that covers org-department on health data: the forbid still wins."""
    rules = bundle_copy / "rules.yaml"
    permit = (
        "  org-health-permit:\n"
        "    effect: permit\n"
        "    consumers: [org-department]\n"
        "    datasets: [health.chronic]\n"
        "    measures: [count]\n"
        '    budget: {epsilon: "1"}\n'
    )
    edit(rules, "  no-health-data-to-org:\n", permit + "  no-health-data-to-org:\n")
    patients = query("volunteer-planning", count("m", "health.chronic", epsilon="1"))

    with_forbid = decide(load_bundle(bundle_copy), "org-department", patients)
    assert not with_forbid.permitted
    assert with_forbid.deciding_rules == ("no-health-data-to-org",)
    assert with_forbid.grants == {}

    # Control: without the forbid rule the same permit does grant the query.
    edit(rules, 'datasets: ["health.*"]', 'datasets: ["health.*"]\n    purposes: [other]')
    edit(
        bundle_copy / "consumers.yaml",
        "purposes: [volunteer-planning]",
        "purposes: [volunteer-planning, other]",
    )
    without_forbid = decide(load_bundle(bundle_copy), "org-department", patients)
    assert without_forbid.permitted
    assert without_forbid.deciding_rules == ("org-health-permit",)


def test_purpose_not_allowed_for_the_consumer(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle, "org-department", elderly_care(count("m", "org.members", epsilon="1"))
    )
    assert not decision.permitted
    assert decision.reason_code == "PURPOSE_NOT_ALLOWED"
    assert decision.deciding_rules == ()
    assert decision.reasons == (
        "purpose 'elderly-care-planning' is not allowed for consumer 'org-department'",
    )


def test_purpose_allowed_for_the_consumer_but_not_by_the_rule(
    bundle_copy: Path, edit: Edit
) -> None:
    edit(
        bundle_copy / "consumers.yaml",
        "purposes: [elderly-care-planning]",
        "purposes: [elderly-care-planning, statistics]",
    )
    decision = decide(
        load_bundle(bundle_copy),
        "civil-affairs",
        query("statistics", count("m", "civil.residents", epsilon="1")),
    )
    assert not decision.permitted
    assert decision.reason_code == "POLICY_DENIED"
    assert decision.reasons == (
        "measure 'm': rule 'civil-elderly-care': "
        "purpose 'statistics' is not among the rule's purposes",
    )


def test_group_by_column_not_granted(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(count("m", "civil.residents", epsilon="1"), group_by=("household_size",)),
    )
    assert not decision.permitted
    assert decision.reason_code == "POLICY_DENIED"
    assert decision.reasons == (
        "measure 'm': rule 'civil-elderly-care': group-by on ['household_size'] is not granted",
    )


def test_filter_column_not_granted(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(
            count(
                "m",
                "civil.residents",
                where("household_size", "=", 1),
                where("low_income", "=", True),
                epsilon="1",
            )
        ),
    )
    assert not decision.permitted
    assert decision.reasons == (
        "measure 'm': rule 'civil-elderly-care': filtering on ['household_size'] is not granted",
    )


def test_measure_kind_not_granted(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "grid-centre",
        query("casework-monitoring", count_persons("m", "events.cases", epsilon="1")),
    )
    assert not decision.permitted
    assert decision.reasons == (
        "measure 'm': rule 'grid-casework': measure 'count_persons' is not granted",
        "measure 'm': rule 'grid-handler-workload': measure 'count_persons' is not granted",
    )


def test_one_denied_measure_denies_the_query_and_names_it(demo_bundle: Bundle) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(
            count("ok", "civil.residents", epsilon="0.5"),
            count("bad", "civil.subsidies", epsilon="0.5"),
        ),
    )
    assert not decision.permitted
    assert decision.reasons == ("measure 'bad': no rule grants 'civil.subsidies'",)
    assert decision.grants == {}


def test_permitted_multi_measure_query_grants_each_measure_with_two_scopes(
    demo_bundle: Bundle,
) -> None:
    decision = decide(
        demo_bundle,
        "civil-affairs",
        elderly_care(
            count(
                "alone", "civil.residents", where("lives_alone_elderly", "=", True), epsilon="0.5"
            ),
            count_persons("members", "org.members", rho="0.1"),
            group_by=("community",),
        ),
    )
    assert decision.permitted
    assert decision.reasons == ()
    assert decision.deciding_rules == ("civil-elderly-care",)
    assert sorted(decision.grants) == ["alone", "members"]
    for measure_id, grant in decision.grants.items():
        assert grant.measure_id == measure_id
        assert grant.rule_id == "civil-elderly-care"
        assert grant.rule is demo_bundle.rules["civil-elderly-care"]
        assert grant.scopes == (CIVIL_SCOPE, POPULATION_SCOPE)
    assert decision.scopes == (CIVIL_SCOPE, POPULATION_SCOPE)


def test_decision_is_deterministic(demo_bundle: Bundle) -> None:
    measures = [
        count("a", "civil.residents", where("low_income", "=", True), epsilon="0.5"),
        count_persons("b", "org.members", epsilon="0.5"),
    ]
    forward = elderly_care(*measures, group_by=("district",))
    backward = elderly_care(*reversed(measures), group_by=("district",))
    first = decide(demo_bundle, "civil-affairs", forward)
    assert first.permitted
    assert all(decide(demo_bundle, "civil-affairs", forward) == first for _ in range(5))
    assert decide(demo_bundle, "civil-affairs", backward) == first
    reloaded = load_bundle(Path(__file__).resolve().parents[2] / "policies")
    assert decide(reloaded, "civil-affairs", forward) == first
