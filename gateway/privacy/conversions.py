"""Conversions between privacy currencies for reports (never for charging).

The ledger charges exact rho. Reports add epsilon: at delta 0 the pure-DP epsilon whose zCDP cost
is rho (epsilon = sqrt(2 rho), the convention policy budgets use), at delta > 0 OpenDP's own
zCDP-to-approximate-DP conversion. Both round towards a larger epsilon, never a smaller one.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import opendp.prelude as dp

dp.enable_features("contrib")


def epsilon_at_delta(rho: Fraction, delta: Fraction) -> float:
    """The epsilon that ``rho``-zCDP implies at ``delta`` (rounded up)."""
    if rho <= 0:
        return 0.0
    if delta <= 0:
        return math.nextafter(math.sqrt(2 * float(rho)), math.inf)
    # A Gaussian mechanism whose zCDP cost at sensitivity 1 is at least rho (the scale is nudged
    # down so float rounding can only raise the cost), cast by OpenDP to a privacy profile.
    scale = (1 / math.sqrt(2 * float(rho))) * (1 - 1e-12)
    gaussian = dp.m.make_gaussian(
        dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale
    )
    profile: Any = dp.c.make_zCDP_to_approxDP(gaussian)
    return float(profile.map(1.0).epsilon(float(delta)))
