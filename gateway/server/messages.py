"""Conversions from internal values to API messages (costs, balances, plans)."""

from __future__ import annotations

from fractions import Fraction

from gateway.api.v1 import query_pb2, query_service_pb2
from gateway.budget.ledger import Balance
from gateway.privacy.conversions import epsilon_at_delta
from gateway.privacy.noise import MECHANISM_NUMBERS
from gateway.server.planning import MeasurePlanning


def privacy_cost(rho: Fraction, delta: Fraction = Fraction(0)) -> query_pb2.PrivacyCost:
    return query_pb2.PrivacyCost(
        rho=f"{rho.numerator}/{rho.denominator}" if rho.denominator != 1 else str(rho.numerator),
        rho_value=float(rho),
        epsilon=epsilon_at_delta(rho, delta),
        delta=float(delta),
    )


def balance_message(balance: Balance, delta: Fraction) -> query_service_pb2.BudgetBalance:
    return query_service_pb2.BudgetBalance(
        scope=balance.scope,
        total=privacy_cost(balance.total, delta),
        spent=privacy_cost(balance.spent, delta),
        reserved=privacy_cost(balance.reserved, delta),
        remaining=privacy_cost(max(balance.remaining, Fraction(0)), delta),
        period_end=balance.period_end.isoformat() if balance.period_end else "",
    )


def measure_plan_message(planning: MeasurePlanning) -> query_service_pb2.MeasurePlan:
    """The plan of a measure; for MEAN the first component (the sum) and no fixed error."""
    first = planning.components[0]
    return query_service_pb2.MeasurePlan(
        measure_id=planning.measure.id,
        silo=planning.silo,
        mechanism=MECHANISM_NUMBERS[first.noise.mechanism],
        scale=first.noise.scale,
        sensitivity=first.sensitivity,
        # A mean's error depends on each group's noisy count: every value carries its own.
        error95=0.0 if planning.measure.kind == "mean" else first.error95,
        cost=privacy_cost(planning.rho),
    )
