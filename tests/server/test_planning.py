"""Planning: costs per scope and whether an answer may come from the cache."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from fractions import Fraction

import pytest
from support import POLICY

from gateway.api.v1 import query_pb2
from gateway.budget.ledger import PrivacyLedger
from gateway.client import count
from gateway.errors import BudgetExhausted
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


def _handler_query(rho: str = "0.5") -> QueryForm:
    return parse_query(
        query_pb2.Query(
            purpose="casework-monitoring",
            measures=[count("cases", "events.cases", rho=rho)],
            group_by=["handler"],
        )
    )


def test_keys_from_the_data_charge_key_delta_in_a_parallel_scope_of_every_scope(
    tmp_path,
) -> None:
    bundle = load_bundle(POLICY)
    query = _handler_query()
    plan = plan_query(bundle, decide(bundle, "grid-centre", query), query)
    assert plan.from_data and plan.key_delta == Fraction(1, 10**9)
    [measure] = plan.measures
    assert measure.threshold is not None and measure.threshold.delta <= Fraction(1, 10**9)
    charges = {c.limit.scope: (c.cost, c.limit.total) for c in plan.ledger_charges()}
    rule = "consumer:grid-centre/rule:grid-handler-workload/lifetime"
    population = "population:city-residents/lifetime"
    assert charges == {
        rule: (plan.total_rho, Fraction(2)),
        population: (plan.total_rho, Fraction(800)),
        f"{rule}#key_delta": (Fraction(1, 10**9), Fraction(1, 10**7)),
        f"{population}#key_delta": (Fraction(1, 10**9), Fraction(1, 10**6)),
    }
    # Cancelling the only silo's share gives back exactly what was charged, delta included.
    assert plan.silo_share("events") == {scope: cost for scope, (cost, _) in charges.items()}
    # The ledger refuses the 101st release: the rule's key delta (1e-7) is spent by 100.
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    cheap = _handler_query("0.001")
    small = plan_query(bundle, decide(bundle, "grid-centre", cheap), cheap)
    for i in range(100):
        ledger.reserve("grid-centre", f"r{i}", "d", small.ledger_charges())
        ledger.commit("grid-centre", f"r{i}", b"")
    with pytest.raises(BudgetExhausted) as caught:
        ledger.reserve("grid-centre", "r100", "d", small.ledger_charges())
    assert caught.value.metadata["scope"] == f"{rule}#key_delta"
    assert "delta" in caught.value.message and "requested_delta" in caught.value.metadata


def test_a_scope_without_key_delta_refuses_keys_from_the_data_before_the_ledger() -> None:
    bundle = load_bundle(POLICY)
    populations = dict(bundle.populations)
    budget = populations["city-residents"].budget.model_copy(update={"key_delta": Decimal(0)})
    populations["city-residents"] = populations["city-residents"].model_copy(
        update={"budget": budget}
    )
    bundle = replace(bundle, populations=populations)
    query = _handler_query()
    with pytest.raises(BudgetExhausted, match="population:city-residents"):
        plan_query(bundle, decide(bundle, "grid-centre", query), query)
