"""Noise planning: exact costs, OpenDP's privacy map, the silo's check, spend splitting.

The noise distribution itself is tested in ``test_noise_statistics.py``; the comparison with
OpenDP's own query planner in ``test_opendp_oracle.py``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import opendp.prelude as dp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidQuery
from gateway.privacy.noise import (
    MechanismName,
    add_noise,
    distance,
    error95,
    measurement,
    minimum_scale,
    plan_noise,
    satisfies,
    split_spend,
)
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import Spend

ONE = Sensitivity(l1=1, l2_squared=1)


def required(mechanism: MechanismName, sensitivity: Sensitivity) -> int:
    """The squared sensitivity the exact requirement uses: rho >= d^2 / (2 scale^2)."""
    return sensitivity.l1**2 if mechanism == "discrete_laplace" else sensitivity.l2_squared


def meets_exactly(
    mechanism: MechanismName, scale: float, sensitivity: Sensitivity, rho: Fraction
) -> bool:
    """The exact requirement in rationals: d^2 / (2 scale^2) <= rho."""
    return required(mechanism, sensitivity) <= 2 * rho * Fraction(scale) ** 2


def below(scale: float) -> float:
    return math.nextafter(scale, 0.0)


# --- planning -------------------------------------------------------------------------------------


def test_epsilon_spend_costs_exactly_half_its_square() -> None:
    plan = plan_noise(ONE, Spend(epsilon=Fraction(1, 2)))
    assert plan.mechanism == "discrete_laplace"
    assert plan.rho == Fraction(1, 8)
    assert type(plan.rho) is Fraction
    assert plan.epsilon == 0.5
    assert plan.sensitivity == ONE
    assert plan.scale == 2.0  # exactly: 1 / 0.5 is representable and OpenDP's map is exact there
    assert plan.error95 == error95("discrete_laplace", plan.scale)
    assert satisfies(plan.mechanism, plan.scale, ONE, plan.rho)
    assert not satisfies(plan.mechanism, below(plan.scale), ONE, plan.rho)


def test_epsilon_spend_scales_with_l1_and_ignores_l2() -> None:
    sensitivity = Sensitivity(l1=20, l2_squared=400)
    plan = plan_noise(sensitivity, Spend(epsilon=Fraction(1, 10)))
    assert plan.rho == Fraction(1, 200)
    assert plan.scale == pytest.approx(200.0, rel=1e-15)
    assert plan.scale >= 200.0
    assert satisfies(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale, Sensitivity(21, 400), plan.rho)
    # The Laplace map reads only L1: a smaller L2 changes nothing.
    assert plan_noise(Sensitivity(20, 1), Spend(epsilon=Fraction(1, 10))).scale == plan.scale


def test_rho_spend_uses_the_discrete_gaussian_on_l2() -> None:
    plan = plan_noise(ONE, Spend(rho=Fraction(1, 8)))
    assert plan.mechanism == "discrete_gaussian"
    assert plan.rho == Fraction(1, 8)
    assert plan.scale == 2.0  # sensitivity / sqrt(2 rho)
    assert plan.epsilon == 0.0
    assert satisfies(plan.mechanism, plan.scale, ONE, plan.rho)
    assert not satisfies(plan.mechanism, below(plan.scale), ONE, plan.rho)
    assert plan.error95 == error95("discrete_gaussian", plan.scale)


def test_gaussian_scale_follows_sqrt_of_l2_squared_not_l1() -> None:
    # A person in 2 groups with 1 row each: L1 = 2, L2 = sqrt(2).
    sensitivity = Sensitivity(l1=2, l2_squared=2)
    plan = plan_noise(sensitivity, Spend(rho=Fraction(1, 4)))
    assert plan.scale == pytest.approx(2.0, rel=1e-15)  # sqrt(2) / sqrt(1/2)
    assert meets_exactly(plan.mechanism, plan.scale, sensitivity, plan.rho)
    # An integer L2 distance would have been ceil(sqrt 2) = 2: scale 2 sqrt 2, twice the variance.
    assert plan.scale < 2 * math.sqrt(2) * 0.75


def test_l2_distance_given_to_opendp_is_the_smallest_float_at_least_the_root() -> None:
    for l2_squared in (1, 2, 3, 10**12 + 39, 2**62 + 1):
        d = distance("discrete_gaussian", Sensitivity(l1=1, l2_squared=l2_squared))
        assert isinstance(d, float)
        assert Fraction(d) ** 2 >= l2_squared
        assert Fraction(below(d)) ** 2 < l2_squared
    assert distance("discrete_laplace", Sensitivity(l1=7, l2_squared=49)) == 7


def test_target_error_spend_reaches_the_target() -> None:
    sensitivity = Sensitivity(l1=2, l2_squared=4)
    plan = plan_noise(sensitivity, Spend(target_error=Fraction(10)))
    assert plan.mechanism == "discrete_laplace"
    assert plan.error95 == pytest.approx(10.0, rel=1e-12)
    assert type(plan.rho) is Fraction
    # The charge is OpenDP's cost at the scale, rounded up by OpenDP, never below the exact one.
    assert meets_exactly(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert float(plan.rho) == pytest.approx(plan.epsilon**2 / 2, rel=1e-12)
    assert plan.epsilon == pytest.approx(2 / plan.scale, rel=1e-12)
    assert satisfies(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale * 0.99, sensitivity, plan.rho)


@pytest.mark.parametrize("target", [Fraction(0), Fraction(-1)])
def test_target_error_must_be_positive(target: Fraction) -> None:
    with pytest.raises(InvalidQuery) as caught:
        plan_noise(ONE, Spend(target_error=target))
    assert caught.value.reason == "INVALID_QUERY"


sensitivities = st.builds(Sensitivity, l1=st.integers(1, 10**6), l2_squared=st.integers(1, 10**12))
amounts = st.fractions(min_value=Fraction(1, 10**4), max_value=100, max_denominator=10**4)


@settings(max_examples=150, deadline=None)
@given(sensitivity=sensitivities, amount=amounts, kind=st.sampled_from(["epsilon", "rho"]))
def test_every_plan_meets_its_exact_cost_and_one_float_less_would_not(
    sensitivity: Sensitivity, amount: Fraction, kind: str
) -> None:
    plan = plan_noise(sensitivity, Spend(**{kind: amount}))
    assert plan.rho == (amount**2 / 2 if kind == "epsilon" else amount)
    assert satisfies(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert meets_exactly(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert not satisfies(plan.mechanism, below(plan.scale), sensitivity, plan.rho)
    # ...and the plan is tight: OpenDP's roundings cost a few floats at most.
    exact = math.sqrt(required(plan.mechanism, sensitivity) / (2 * float(plan.rho)))
    assert plan.scale == pytest.approx(exact, rel=1e-14)


@settings(max_examples=60, deadline=None)
@given(
    sensitivity=sensitivities,
    target=st.fractions(min_value=1, max_value=10**6, max_denominator=100),
)
def test_target_error_plans_meet_their_cost_and_report_the_target(
    sensitivity: Sensitivity, target: Fraction
) -> None:
    plan = plan_noise(sensitivity, Spend(target_error=target))
    assert plan.error95 == pytest.approx(float(target), rel=1e-9)
    assert satisfies(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert meets_exactly(plan.mechanism, plan.scale, sensitivity, plan.rho)
    # OpenDP's upward rounding of the cost is tiny: the charge is not inflated.
    exact = Fraction(sensitivity.l1) ** 2 / (2 * Fraction(plan.scale) ** 2)
    assert plan.rho <= exact * (1 + Fraction(1, 10**12))


@settings(max_examples=200, deadline=None)
@given(
    sensitivity=sensitivities,
    rho=amounts,
    mechanism=st.sampled_from(["discrete_laplace", "discrete_gaussian"]),
    floats_off=st.integers(-16, 16),
)
def test_satisfies_never_accepts_a_scale_below_the_exact_requirement(
    sensitivity: Sensitivity, rho: Fraction, mechanism: MechanismName, floats_off: int
) -> None:
    """Scales a few floats either side of the exact boundary, where rounding decides."""
    scale = math.sqrt(required(mechanism, sensitivity) / (2 * float(rho)))
    step = math.inf if floats_off > 0 else 0.0
    for _ in range(abs(floats_off)):
        scale = math.nextafter(scale, step)
    accepted = satisfies(mechanism, scale, sensitivity, rho)
    assert meets_exactly(mechanism, scale, sensitivity, rho) or not accepted
    if floats_off >= 8:  # OpenDP's roundings are tight: well above the boundary, it accepts
        assert accepted


def test_minimum_scale_is_what_plan_noise_uses() -> None:
    sensitivity = Sensitivity(l1=3, l2_squared=5)
    plan = plan_noise(sensitivity, Spend(rho=Fraction(2, 3)))
    assert minimum_scale("discrete_gaussian", sensitivity, Fraction(2, 3)) == plan.scale
    with pytest.raises(ValueError, match="no noise scale"):
        minimum_scale("discrete_laplace", Sensitivity(l1=0, l2_squared=0), Fraction(1))


@pytest.mark.parametrize("mechanism", ["discrete_laplace", "discrete_gaussian"])
@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, -math.inf, math.nan])
def test_satisfies_refuses_impossible_scales(mechanism: MechanismName, scale: float) -> None:
    assert not satisfies(mechanism, scale, ONE, Fraction(1))


@pytest.mark.parametrize("mechanism", ["discrete_laplace", "discrete_gaussian"])
@pytest.mark.parametrize("rho", [Fraction(0), Fraction(-1), Fraction(1, 10**400)])
def test_satisfies_refuses_a_cost_that_is_not_positive_as_a_float(
    mechanism: MechanismName, rho: Fraction
) -> None:
    assert not satisfies(mechanism, 1e9, ONE, rho)


@pytest.mark.parametrize("mechanism", ["discrete_laplace", "discrete_gaussian"])
def test_satisfies_refuses_a_negative_sensitivity(mechanism: MechanismName) -> None:
    assert not satisfies(mechanism, 1e9, Sensitivity(l1=-1, l2_squared=-1), Fraction(1))


def test_error95_grows_with_scale() -> None:
    for mechanism in ("discrete_laplace", "discrete_gaussian"):
        errors = [error95(mechanism, s) for s in (1.0, 2.0, 10.0, 100.0)]
        assert errors == sorted(errors)
        assert errors[0] < errors[-1]


# --- splitting a spend ----------------------------------------------------------------------------


@given(rho=amounts, parts=st.integers(1, 12))
def test_a_rho_split_charges_exactly_the_spend(rho: Fraction, parts: int) -> None:
    part = split_spend(Spend(rho=rho), parts)
    assert part.rho is not None and part.epsilon is None and part.target_error is None
    assert part.rho * parts == rho


@settings(max_examples=30, deadline=None)
@given(epsilon=amounts, parts=st.integers(2, 12))
def test_an_epsilon_split_composes_to_the_epsilon_and_charges_its_zcdp_cost(
    epsilon: Fraction, parts: int
) -> None:
    part = split_spend(Spend(epsilon=epsilon), parts)
    assert part.epsilon is not None and part.rho is None
    assert part.epsilon * parts == epsilon  # pure DP composes by adding epsilon
    charge = plan_noise(ONE, part).rho * parts
    assert charge == epsilon**2 / (2 * parts)  # zCDP composes the parts by adding rho
    assert charge <= epsilon**2 / 2


def test_one_part_is_the_spend_itself() -> None:
    for spend in (
        Spend(epsilon=Fraction(1)),
        Spend(rho=Fraction(1)),
        Spend(target_error=Fraction(5)),
    ):
        assert split_spend(spend, 1) == spend


def test_a_target_error_cannot_be_split() -> None:
    with pytest.raises(InvalidQuery) as caught:
        split_spend(Spend(target_error=Fraction(5)), 2)
    error = caught.value
    assert error.reason == "INVALID_QUERY"
    assert error.violations == ()
    assert "epsilon or rho" in error.message
    assert error.metadata == {"parts": "2", "target_error": "5"}


def test_a_spend_is_split_over_at_least_one_part() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        split_spend(Spend(rho=Fraction(1)), 0)


# --- the measurement ------------------------------------------------------------------------------


def test_noise_is_added_to_each_value_of_a_64_bit_vector() -> None:
    values = [10**15, -(10**15), 0, 5]  # beyond OpenDP's default 32-bit integers
    noisy = add_noise(values, "discrete_laplace", 1.0)
    assert len(noisy) == len(values)
    assert all(type(n) is int for n in noisy)
    # 4 values at scale 1: each is off by more than 40 with probability below 2 exp(-40).
    assert all(abs(n - v) <= 40 for n, v in zip(noisy, values, strict=True))
    assert len(add_noise(values, "discrete_gaussian", 1.0)) == len(values)


def test_measurement_is_opendp_on_integer_vectors() -> None:
    laplace = measurement("discrete_laplace", 2.0)
    assert laplace.map(1) == pytest.approx(0.5)
    assert laplace.map(2) == pytest.approx(1.0)
    gaussian = measurement("discrete_gaussian", 2.0)
    assert gaussian.map(math.sqrt(2)) == pytest.approx(0.25)  # a float L2 distance


@pytest.mark.parametrize("scale", [10_000.5, 20_000.0, 123_456.7, 1_000_000.0])
def test_gaussian_error95_far_above_one_is_the_continuous_bound_and_never_below_opendps(
    scale: float,
) -> None:
    """Above 1e4 the half-width comes from the normal quantile (OpenDP's exact sum would take
    minutes at the scales a tiny rho asks for); it is at most 2 above OpenDP's, never below."""
    exact = float(dp.discrete_gaussian_scale_to_accuracy(scale, 0.05))
    assert exact <= error95("discrete_gaussian", scale) <= exact + 2
    # A scale a tiny rho asks for: the bound still comes back (OpenDP's sum would not, soon).
    assert error95("discrete_gaussian", 1e12) == math.ceil(1e12 * 1.959963984540054) + 1
