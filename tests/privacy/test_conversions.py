"""Reported epsilon (conservative, OpenDP's conversion where delta > 0) and the exact roundings."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.privacy.conversions import epsilon_at_delta, float_at_most, sqrt_at_least


@given(st.fractions(min_value=Fraction(1, 10**6), max_value=Fraction(1000)))
def test_at_delta_zero_it_is_the_pure_epsilon_of_the_same_cost(rho: Fraction) -> None:
    epsilon = epsilon_at_delta(rho, Fraction(0))
    assert Fraction(epsilon) ** 2 / 2 >= rho  # never reports less than the cost


@given(
    st.fractions(min_value=Fraction(1, 10**4), max_value=Fraction(100)),
    st.sampled_from([Fraction(1, 10**3), Fraction(1, 10**6), Fraction(1, 10**9)]),
)
def test_at_positive_delta_it_is_at_most_the_classic_bound(rho: Fraction, delta: Fraction) -> None:
    epsilon = epsilon_at_delta(rho, delta)
    classic = float(rho) + 2 * math.sqrt(float(rho) * math.log(1 / float(delta)))
    assert 0 < epsilon <= classic * (1 + 1e-9)  # OpenDP's conversion is the tighter one


def test_a_known_value() -> None:
    assert epsilon_at_delta(Fraction(1, 4), Fraction(1, 10**6)) == pytest.approx(3.5423, rel=1e-4)


@given(st.fractions(min_value=0, max_value=Fraction(10**30)))
def test_sqrt_at_least_is_the_smallest_float_whose_square_is_not_below(x: Fraction) -> None:
    root = sqrt_at_least(x)
    assert Fraction(root) ** 2 >= x
    assert root == 0 or Fraction(math.nextafter(root, 0.0)) ** 2 < x


@given(st.integers(0, 2**80))
def test_sqrt_at_least_of_integers(n: int) -> None:
    root = sqrt_at_least(n)
    assert Fraction(root) ** 2 >= n
    assert root == 0 or Fraction(math.nextafter(root, 0.0)) ** 2 < n


def test_sqrt_at_least_refuses_negatives() -> None:
    with pytest.raises(ValueError, match="negative"):
        sqrt_at_least(-1)


@given(st.fractions(min_value=-(10**300), max_value=10**300))
def test_float_at_most_is_the_largest_float_not_above(x: Fraction) -> None:
    value = float_at_most(x)
    assert Fraction(value) <= x
    assert Fraction(math.nextafter(value, math.inf)) > x
