"""Conversions from internal values to API messages (costs, balances, plans)."""

from __future__ import annotations

import math
from fractions import Fraction

from gateway.api.v1 import query_pb2, query_service_pb2
from gateway.budget.ledger import Balance
from gateway.server.planning import MeasurePlanning

MECHANISM_NUMBERS = {
    "discrete_laplace": query_pb2.MECHANISM_DISCRETE_LAPLACE,
    "discrete_gaussian": query_pb2.MECHANISM_DISCRETE_GAUSSIAN,
}


def epsilon_for(rho: Fraction, delta: Fraction) -> float:
    """Epsilon for reports. At delta 0: the pure-DP epsilon whose zCDP cost is rho
    (sqrt(2 rho)); at delta > 0: the standard zCDP to (epsilon, delta) conversion
    rho + 2 sqrt(rho ln(1/delta))."""
    if rho <= 0:
        return 0.0
    if delta == 0:
        return math.sqrt(2 * float(rho))
    return float(rho) + 2 * math.sqrt(float(rho) * math.log(1 / float(delta)))


def privacy_cost(rho: Fraction, delta: Fraction = Fraction(0)) -> query_pb2.PrivacyCost:
    return query_pb2.PrivacyCost(
        rho=f"{rho.numerator}/{rho.denominator}" if rho.denominator != 1 else str(rho.numerator),
        rho_value=float(rho),
        epsilon=epsilon_for(rho, delta),
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
    noise = planning.noise
    return query_service_pb2.MeasurePlan(
        measure_id=planning.measure.id,
        silo=planning.silo,
        mechanism=MECHANISM_NUMBERS[noise.mechanism],
        scale=noise.scale,
        sensitivity=noise.sensitivity,
        error95=noise.error95,
        cost=privacy_cost(noise.rho),
    )
