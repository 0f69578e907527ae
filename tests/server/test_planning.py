"""Planning: costs per scope and whether an answer may come from the cache."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

from support import POLICY

from gateway.api.v1 import query_pb2
from gateway.client import count
from gateway.policy.decision import decide
from gateway.policy.loader import load_bundle
from gateway.query.form import QueryForm, parse_query
from gateway.server.planning import plan_query


def _query() -> QueryForm:
    return parse_query(
        query_pb2.Query(
            purpose="elderly-care-planning",
            measures=[
                count("residents", "civil.residents", epsilon="0.5"),
                count("members", "org.members", epsilon="0.25"),
            ],
            group_by=["community"],
        )
    )


def test_costs_add_up_per_scope_and_answers_are_cacheable_by_default() -> None:
    bundle = load_bundle(POLICY)
    query = _query()
    plan = plan_query(bundle, decide(bundle, "civil-affairs", query), query)
    assert plan.cacheable
    expected = Fraction(1, 8) + Fraction(1, 32)
    assert plan.total_rho == expected
    assert plan.charges == {
        "consumer:civil-affairs/rule:civil-elderly-care/lifetime": expected,
        "population:city-residents/lifetime": expected,
    }


def test_a_rule_can_turn_the_answer_cache_off() -> None:
    bundle = load_bundle(POLICY)
    rules = dict(bundle.rules)
    rules["civil-elderly-care"] = rules["civil-elderly-care"].model_copy(
        update={"cache_answers": False}
    )
    bundle = replace(bundle, rules=rules)
    query = _query()
    assert not plan_query(bundle, decide(bundle, "civil-affairs", query), query).cacheable


def test_each_silo_share_pays_for_its_own_measures_and_the_shares_add_up() -> None:
    bundle = load_bundle(POLICY)
    query = _query()
    plan = plan_query(bundle, decide(bundle, "civil-affairs", query), query)
    grant = "consumer:civil-affairs/rule:civil-elderly-care/lifetime"
    population = "population:city-residents/lifetime"
    assert plan.silo_share("civil") == {grant: Fraction(1, 8), population: Fraction(1, 8)}
    assert plan.silo_share("org") == {grant: Fraction(1, 32), population: Fraction(1, 32)}
    assert plan.silo_share("events") == {}
    for scope, total in plan.charges.items():
        assert sum(plan.silo_share(s).get(scope, Fraction(0)) for s in plan.silos) == total
