"""Conversions from internal values to API messages (costs, balances, plans)."""

from __future__ import annotations

import functools
from fractions import Fraction

from gateway.api.v1 import query_pb2, query_service_pb2
from gateway.budget.ledger import Balance
from gateway.privacy.conversions import epsilon_at_delta
from gateway.privacy.noise import MECHANISM_NUMBERS
from gateway.server.planning import MeasurePlanning

# Every answer shows the same totals and per-query costs again; the exact square root (or OpenDP
# conversion) behind each epsilon costs more than the rest of the message. A pure function of
# exact values, so remembering recent results changes nothing but the time.
_epsilon_at_delta = functools.lru_cache(maxsize=4096)(epsilon_at_delta)


def exact_text(x: Fraction) -> str:
    """An exact rational as "p/q", or an integer string."""
    return f"{x.numerator}/{x.denominator}" if x.denominator != 1 else str(x.numerator)


def privacy_cost(
    rho: Fraction, delta: Fraction = Fraction(0), key_delta: Fraction = Fraction(0)
) -> query_pb2.PrivacyCost:
    return query_pb2.PrivacyCost(
        rho=exact_text(rho),
        rho_value=float(rho),
        epsilon=_epsilon_at_delta(rho, delta),
        delta=float(delta),
        key_delta=exact_text(key_delta) if key_delta else "",
    )


def balance_message(
    balance: Balance, delta: Fraction, key_delta: Balance | None = None
) -> query_service_pb2.BudgetBalance:
    """A scope's rho balance and, when given, its balance of delta for data-dependent keys."""
    return query_service_pb2.BudgetBalance(
        scope=balance.scope,
        total=privacy_cost(balance.total, delta),
        spent=privacy_cost(balance.spent, delta),
        reserved=privacy_cost(balance.reserved, delta),
        remaining=privacy_cost(max(balance.remaining, Fraction(0)), delta),
        period_end=balance.period_end.isoformat() if balance.period_end else "",
        key_delta=(
            query_service_pb2.KeyDeltaBalance(
                total=exact_text(key_delta.total),
                spent=exact_text(key_delta.spent),
                reserved=exact_text(key_delta.reserved),
                remaining=exact_text(max(key_delta.remaining, Fraction(0))),
            )
            if key_delta is not None
            else None
        ),
    )


def remaining_message(balance: Balance, delta: Fraction) -> query_service_pb2.BudgetBalance:
    """A balance with its scope and what remains only (what an audit record's ``budget_left``
    reads; :func:`balance_message` is the whole balance)."""
    return query_service_pb2.BudgetBalance(
        scope=balance.scope, remaining=privacy_cost(max(balance.remaining, Fraction(0)), delta)
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
        cost=privacy_cost(planning.rho, key_delta=planning.key_delta),
        key_threshold=planning.threshold.threshold if planning.threshold else 0,
    )
