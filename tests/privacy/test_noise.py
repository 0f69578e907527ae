"""Noise planning (exact costs, OpenDP's privacy map) and the noise distribution itself.

The statistical tests sample from OpenDP, whose sampler cannot be seeded. Instead of a seed, each
tolerance is chosen so that a correct sampler fails it with probability below 1e-6, and the test
computes that probability from the exact distribution before sampling (and asserts it), so the
claim in each comment is checked rather than trusted:

- coverage (fraction of |x| <= error95): a Chernoff bound for a binomial proportion,
  P(p_hat >= hi) <= exp(-N KL(hi || p)) and P(p_hat <= lo) <= exp(-N KL(lo || p)), rigorous;
- variance (mean of x^2, the mean being known to be 0) and mean: the normal approximation,
  z = tolerance / sqrt(Var / N), two-sided tail erfc(z / sqrt 2). The noise is light-tailed
  (geometric / Gaussian), so at N = 20,000 the approximation is accurate far into the tail.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.privacy.noise import (
    MechanismName,
    add_noise,
    error95,
    measurement,
    plan_noise,
    satisfies,
)
from gateway.query.form import Spend

N = 20_000
MAX_FAILURE = 1e-6


# --- planning -------------------------------------------------------------------------------------


def test_epsilon_spend_costs_exactly_half_its_square() -> None:
    plan = plan_noise(1, Spend(epsilon=Fraction(1, 2)))
    assert plan.mechanism == "discrete_laplace"
    assert plan.rho == Fraction(1, 8)
    assert type(plan.rho) is Fraction
    assert plan.epsilon == 0.5
    assert plan.sensitivity == 1.0
    assert plan.scale == pytest.approx(2.0, rel=1e-9)
    assert plan.scale >= 2.0  # never less noise than the exact scale
    assert plan.error95 == error95("discrete_laplace", plan.scale)
    assert satisfies(plan.mechanism, plan.scale, 1, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale * 0.99, 1, plan.rho)


def test_epsilon_spend_scales_with_sensitivity() -> None:
    plan = plan_noise(20, Spend(epsilon=Fraction(1, 10)))
    assert plan.rho == Fraction(1, 200)
    assert plan.scale == pytest.approx(200.0, rel=1e-9)
    assert satisfies(plan.mechanism, plan.scale, 20, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale, 21, plan.rho)  # more sensitivity, same noise


def test_rho_spend_uses_the_discrete_gaussian() -> None:
    plan = plan_noise(1, Spend(rho=Fraction(1, 8)))
    assert plan.mechanism == "discrete_gaussian"
    assert plan.rho == Fraction(1, 8)
    assert plan.scale == pytest.approx(2.0, rel=1e-9)  # sensitivity / sqrt(2 rho)
    assert plan.scale >= 2.0
    assert satisfies(plan.mechanism, plan.scale, 1, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale * 0.99, 1, plan.rho)
    assert plan.error95 == error95("discrete_gaussian", plan.scale)


def test_target_error_spend_reaches_the_target() -> None:
    plan = plan_noise(2, Spend(target_error=Fraction(10)))
    assert plan.mechanism == "discrete_laplace"
    assert plan.error95 == pytest.approx(10.0, rel=1e-9)
    assert type(plan.rho) is Fraction
    assert float(plan.rho) == pytest.approx(plan.epsilon**2 / 2, rel=1e-12)
    assert plan.epsilon == pytest.approx(2 / plan.scale, rel=1e-9)
    assert satisfies(plan.mechanism, plan.scale, 2, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale * 0.99, 2, plan.rho)


@settings(max_examples=60, deadline=None)
@given(
    sensitivity=st.integers(1, 1000),
    amount=st.fractions(min_value=Fraction(1, 1000), max_value=10, max_denominator=1000),
    kind=st.sampled_from(["epsilon", "rho"]),
)
def test_every_planned_scale_meets_its_exact_cost_and_no_less_would(
    sensitivity: int, amount: Fraction, kind: str
) -> None:
    plan = plan_noise(sensitivity, Spend(**{kind: amount}))
    assert plan.rho == (amount**2 / 2 if kind == "epsilon" else amount)
    assert satisfies(plan.mechanism, plan.scale, sensitivity, plan.rho)
    assert not satisfies(plan.mechanism, plan.scale * 0.99, sensitivity, plan.rho)


@settings(max_examples=40, deadline=None)
@given(
    sensitivity=st.integers(1, 100),
    target=st.fractions(min_value=1, max_value=10_000, max_denominator=100),
)
def test_target_error_plans_report_the_target_accuracy(sensitivity: int, target: Fraction) -> None:
    plan = plan_noise(sensitivity, Spend(target_error=target))
    assert plan.error95 == pytest.approx(float(target), rel=1e-9)
    assert plan.error95 >= float(target) * (1 - 1e-12)
    assert satisfies(plan.mechanism, plan.scale, sensitivity, plan.rho)


@pytest.mark.parametrize("mechanism", ["discrete_laplace", "discrete_gaussian"])
@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_satisfies_refuses_impossible_scales(mechanism: MechanismName, scale: float) -> None:
    assert not satisfies(mechanism, scale, 1, Fraction(1))


@pytest.mark.parametrize("mechanism", ["discrete_laplace", "discrete_gaussian"])
def test_satisfies_refuses_a_zero_cost(mechanism: MechanismName) -> None:
    assert not satisfies(mechanism, 1e9, 1, Fraction(0))


def test_error95_grows_with_scale() -> None:
    for mechanism in ("discrete_laplace", "discrete_gaussian"):
        errors = [error95(mechanism, s) for s in (1.0, 2.0, 10.0, 100.0)]
        assert errors == sorted(errors)
        assert errors[0] < errors[-1]


# --- the noise distribution -----------------------------------------------------------------------


def pmf(mechanism: MechanismName, scale: float) -> dict[int, float]:
    """The exact (normalised) distribution of OpenDP's discrete noise, truncated where the
    remaining mass is far below 1e-30."""
    reach = int(80 * scale) + 50
    if mechanism == "discrete_laplace":
        weights = {x: math.exp(-abs(x) / scale) for x in range(-reach, reach + 1)}
    else:
        weights = {x: math.exp(-(x * x) / (2 * scale * scale)) for x in range(-reach, reach + 1)}
    total = math.fsum(weights.values())
    return {x: w / total for x, w in weights.items()}


def moment(distribution: dict[int, float], k: int) -> float:
    return math.fsum(p * x**k for x, p in distribution.items())


def kl(q: float, p: float) -> float:
    """KL divergence between Bernoulli(q) and Bernoulli(p)."""
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def normal_tail(z: float) -> float:
    return math.erfc(z / math.sqrt(2))


def check_distribution(mechanism: MechanismName, scale: float, variance: float) -> None:
    exact = pmf(mechanism, scale)
    second, fourth = moment(exact, 2), moment(exact, 4)
    assert second == pytest.approx(variance, rel=1e-9)  # the formula matches the pmf
    half_width = error95(mechanism, scale)
    coverage = math.fsum(p for x, p in exact.items() if abs(x) <= half_width)
    assert coverage >= 0.95  # OpenDP's accuracy is conservative for the discrete noise

    # Failure probabilities of the tolerances below, for a correct sampler.
    low, high = 0.94, 0.96
    coverage_failure = math.exp(-N * kl(high, coverage)) + math.exp(-N * kl(low, coverage))
    variance_failure = normal_tail(0.10 * variance / math.sqrt((fourth - second**2) / N))
    mean_tolerance = 6 * math.sqrt(variance / N)
    mean_failure = normal_tail(6.0)
    assert coverage_failure < MAX_FAILURE
    assert variance_failure < MAX_FAILURE
    assert mean_failure < MAX_FAILURE

    noise = add_noise([0] * N, mechanism, scale)
    assert len(noise) == N
    assert all(type(x) is int for x in noise)
    empirical_variance = math.fsum(x * x for x in noise) / N  # the mean is known: 0
    assert empirical_variance == pytest.approx(variance, rel=0.10)
    assert abs(math.fsum(noise) / N) <= mean_tolerance
    inside = sum(1 for x in noise if abs(x) <= half_width) / N
    assert low <= inside <= high


def test_discrete_laplace_matches_its_variance_and_stated_accuracy() -> None:
    """Scale 100: variance 2p/(1-p)^2 with p = exp(-1/100) (about 20,000), kurtosis about 6;
    the 10% tolerance is 6.3 standard errors (failure about 3e-10). Exact coverage of error95
    is 0.9505; the Chernoff bound of leaving [0.94, 0.96] is about 1e-9."""
    scale = 100.0
    p = math.exp(-1 / scale)
    check_distribution("discrete_laplace", scale, 2 * p / (1 - p) ** 2)


def test_discrete_gaussian_matches_its_variance_and_stated_accuracy() -> None:
    """Scale 100: variance scale^2 (exact to 1e-9 at this scale), kurtosis 3; the 10%
    tolerance is 10 standard errors (failure about 2e-23). Exact coverage of error95 is 0.9517;
    the Chernoff bound of leaving [0.94, 0.96] is about 2e-7."""
    check_distribution("discrete_gaussian", 100.0, 100.0**2)


def test_noise_is_added_to_each_value() -> None:
    values = [10**9, -(10**9), 0, 5]
    noisy = add_noise(values, "discrete_laplace", 1.0)
    assert len(noisy) == len(values)
    # 4 values at scale 1: each is off by more than 40 with probability below 2 exp(-40).
    assert all(abs(n - v) <= 40 for n, v in zip(noisy, values, strict=True))


def test_measurement_is_opendp_on_integer_vectors() -> None:
    meas = measurement("discrete_laplace", 2.0)
    assert meas.map(1) == pytest.approx(0.5)
    assert meas.map(2) == pytest.approx(1.0)
