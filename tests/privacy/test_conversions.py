"""Reported epsilon: conservative, and OpenDP's conversion where delta > 0."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.privacy.conversions import epsilon_at_delta


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
