"""Conversions into the ledger's currency round in the conservative direction: an epsilon budget or
spend becomes rho = epsilon^2 / 2 exactly (never less), and the planned noise costs no more than
that by OpenDP's own privacy map."""

from __future__ import annotations

import decimal
from decimal import Decimal
from fractions import Fraction

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.policy.model import BudgetSpec
from gateway.privacy.noise import measurement, plan_noise, satisfies
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import Spend


def decimals(low: str, high: str) -> st.SearchStrategy[Decimal]:
    """Decimals in [low, high] with up to 20 places, as a policy or a request may write them."""
    return st.integers(0, 20).flatmap(
        lambda places: st.decimals(
            min_value=Decimal(low),
            max_value=Decimal(high),
            places=places,
            allow_nan=False,
            allow_infinity=False,
        )
    )


def exact_half_square(epsilon: Decimal) -> Fraction:
    """epsilon^2 / 2 by exact decimal arithmetic, independently of ``Fraction``'s power."""
    with decimal.localcontext() as context:
        context.prec = 100  # twice the digits of any epsilon here: the square is exact
        context.traps[decimal.Inexact] = True
        return Fraction(epsilon * epsilon) / 2


@settings(max_examples=300, deadline=None)
@given(epsilon=decimals("0.00000000000000000001", "9999999999"))
@example(epsilon=Decimal("0.1"))
@example(epsilon=Decimal("1.00000000000000000001"))
def test_an_epsilon_budget_is_exactly_half_its_square_in_rho(epsilon: Decimal) -> None:
    rho = BudgetSpec(epsilon=epsilon).rho_total
    assert type(rho) is Fraction
    assert rho == exact_half_square(epsilon)


@settings(max_examples=100, deadline=None)
@given(rho=decimals("0.00000000000000000001", "9999999999"))
def test_a_rho_budget_is_itself(rho: Decimal) -> None:
    assert BudgetSpec(rho=rho).rho_total == Fraction(rho)


@settings(max_examples=200, deadline=None)
@given(sensitivity=st.integers(1, 10_000), epsilon=decimals("0.000001", "1000"))
@example(sensitivity=1, epsilon=Decimal("0.000001"))
@example(sensitivity=10_000, epsilon=Decimal("0.000001"))
@example(sensitivity=1, epsilon=Decimal("1000"))
@example(sensitivity=3, epsilon=Decimal("0.1"))
def test_an_epsilon_spend_is_charged_exactly_and_its_noise_costs_no_more(
    sensitivity: int, epsilon: Decimal
) -> None:
    """The amounts a request may carry (the query form accepts [0.000001, 1000])."""
    exact = Fraction(epsilon)
    plan = plan_noise(Sensitivity(sensitivity, sensitivity**2), Spend(epsilon=exact))
    assert type(plan.rho) is Fraction
    assert plan.rho == exact_half_square(epsilon)
    # The silo's check of the plan passes at the charged cost ...
    assert satisfies(plan.mechanism, plan.scale, Sensitivity(sensitivity, sensitivity**2), plan.rho)
    # ... and the noise is at least the exact scale sensitivity / epsilon, so OpenDP's (rounded
    # up) privacy loss for it is at most the charged epsilon, hence at most the charged rho.
    assert Fraction(plan.scale) >= Fraction(sensitivity) / exact
    loss = Fraction(measurement(plan.mechanism, plan.scale).map(sensitivity))
    assert loss <= exact
    assert loss**2 / 2 <= plan.rho
