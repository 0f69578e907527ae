"""Conversions between privacy currencies for reports (never for charging), and exact roundings.

The ledger charges exact rho. Reports add epsilon: at delta 0 the pure-DP epsilon whose zCDP cost
is rho (epsilon = sqrt(2 rho), the convention policy budgets use), at delta > 0 OpenDP's own
zCDP-to-approximate-DP conversion. Both round towards a larger epsilon, never a smaller one.

The rounding helpers turn exact rationals into the floats OpenDP takes, always on the side that
keeps a privacy claim true: a distance or cost rounded up, a budget rounded down. They never
return a float that is merely "close".
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import opendp.prelude as dp

dp.enable_features("contrib")


def float_at_most(x: Fraction) -> float:
    """The largest float that is not larger than ``x``."""
    value = float(x)
    return math.nextafter(value, -math.inf) if Fraction(value) > x else value


def sqrt_at_least(x: Fraction | int) -> float:
    """The smallest float whose square is at least ``x`` (x >= 0): sqrt(x) rounded up, exactly.

    ``math.sqrt(float(x))`` may land a few units in the last place either side of the true root
    (``float(x)`` rounds, then the root rounds); the loops settle it against the exact square.
    """
    if x < 0:
        raise ValueError(f"sqrt_at_least of a negative number: {x}")
    exact = Fraction(x)
    value = math.sqrt(float(exact))
    while value > 0 and Fraction(math.nextafter(value, 0.0)) ** 2 >= exact:
        value = math.nextafter(value, 0.0)
    while Fraction(value) ** 2 < exact:
        value = math.nextafter(value, math.inf)
    return value


def epsilon_at_delta(rho: Fraction, delta: Fraction) -> float:
    """The epsilon that ``rho``-zCDP implies at ``delta`` (rounded up)."""
    if rho <= 0:
        return 0.0
    if delta <= 0:
        return sqrt_at_least(2 * rho)
    # A unit-scale Gaussian mechanism at an L2 distance of sqrt(2 rho) (rounded up) costs
    # d^2 / 2 >= rho in OpenDP's map, which rounds up again; OpenDP then casts it to a privacy
    # profile and reads epsilon off at delta.
    gaussian = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float), 1.0
    )
    profile: Any = dp.c.make_zCDP_to_approxDP(gaussian)
    # A smaller delta only raises epsilon, so delta is rounded down.
    return float(profile.map(sqrt_at_least(2 * rho)).epsilon(float_at_most(delta)))
