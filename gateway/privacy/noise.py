"""Noise planning and release with OpenDP measurements on integer aggregate vectors.

Discrete Laplace (pure DP) takes the vector's L1 sensitivity, the discrete Gaussian (zCDP) its L2
sensitivity. Every cost and every check goes through OpenDP's privacy maps; this module adds only
the exact bookkeeping around them:

- an epsilon spend is charged as rho = epsilon^2 / 2, the map of OpenDP's pure-DP-to-zCDP
  conversion, and planned with the discrete Laplace;
- a rho spend is charged as itself and planned with the discrete Gaussian;
- a target 95% error: OpenDP's accuracy helper gives the discrete Laplace scale, and the cost is
  OpenDP's (upward-rounded) map at that scale, converted to a ``Fraction`` without rounding.

The L2 sensitivity is exact as ``l2_squared``; OpenDP's L2 metric on integer vectors also takes a
float distance (``l2_distance(T=float)``), so the distance given to OpenDP is the smallest float
not below sqrt(l2_squared): conservative by under one unit in the last place (relative 2.2e-16),
where an integer distance (a ceiling, sqrt(2) -> 2) could double the cost.

The gateway plans the smallest scale that OpenDP accepts for the cost (:func:`minimum_scale`); the
silo recomputes the sensitivity from its own policy copy and refuses any plan :func:`satisfies`
rejects. This module never draws noise outside OpenDP and never charges a float.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import opendp.prelude as dp

from gateway.api.v1 import query_pb2
from gateway.errors import InvalidQuery
from gateway.privacy.conversions import float_at_most, sqrt_at_least
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import Spend

dp.enable_features("contrib")

MechanismName = Literal["discrete_laplace", "discrete_gaussian"]
# The API's numbers for the mechanisms, both ways (plans, releases, answers).
MECHANISMS: dict[query_pb2.Mechanism.ValueType, MechanismName] = {
    query_pb2.MECHANISM_DISCRETE_LAPLACE: "discrete_laplace",
    query_pb2.MECHANISM_DISCRETE_GAUSSIAN: "discrete_gaussian",
}
MECHANISM_NUMBERS = {name: number for number, name in MECHANISMS.items()}
ALPHA = 0.05  # 95% confidence intervals everywhere
# 64-bit integers: wide enough for the silo's integer sums (OpenDP's `int` is 32-bit).
_INTEGER = "i64"
# Floats walked from the textbook scale to the boundary of OpenDP's check before giving up.
_MAX_STEPS = 64


@dataclass(frozen=True)
class NoisePlan:
    mechanism: MechanismName
    sensitivity: Sensitivity
    scale: float
    # Exact zCDP cost charged for this vector.
    rho: Fraction
    # The pure-DP epsilon of a discrete Laplace plan; 0.0 for the discrete Gaussian (not pure DP).
    epsilon: float
    error95: float


# Everything below is a pure function of small hashable arguments, and a workload repeats a few
# (sensitivity, spend) pairs: caching spares the OpenDP calls (a plan is ~1 ms of them) on every
# query after the first. The caches are bounded.
_CACHE = 4096
_GAUSSIAN_EXACT_UP_TO = 10_000.0
_Z_975 = 1.959963984540054  # the standard normal's 97.5% quantile


@functools.lru_cache(maxsize=_CACHE)
def measurement(mechanism: MechanismName, scale: float) -> Any:
    """The OpenDP measurement that adds noise to a vector of (64-bit) integers."""
    domain = dp.vector_domain(dp.atom_domain(T=_INTEGER))
    if mechanism == "discrete_laplace":
        return dp.m.make_laplace(domain, dp.l1_distance(T=_INTEGER), scale)
    return dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale)


def _zcdp_measurement(mechanism: MechanismName, scale: float) -> Any:
    """The measurement whose privacy map is in rho: the discrete Laplace goes through OpenDP's
    pure-DP-to-zCDP conversion (rho = epsilon^2 / 2, rounded up by OpenDP)."""
    meas = measurement(mechanism, scale)
    return dp.c.make_pureDP_to_zCDP(meas) if mechanism == "discrete_laplace" else meas


def distance(mechanism: MechanismName, sensitivity: Sensitivity) -> int | float:
    """The input distance OpenDP's map takes: L1 exactly, or sqrt(l2_squared) rounded up."""
    if mechanism == "discrete_laplace":
        return sensitivity.l1
    return sqrt_at_least(sensitivity.l2_squared)


@functools.lru_cache(maxsize=_CACHE)
def error95(mechanism: MechanismName, scale: float) -> float:
    """Half-width that holds each released value's noise with probability 95% (OpenDP)."""
    if mechanism == "discrete_laplace":
        return float(dp.discrete_laplacian_scale_to_accuracy(scale, ALPHA))
    if scale > _GAUSSIAN_EXACT_UP_TO:
        # OpenDP sums the discrete Gaussian's pmf term by term: its time grows with the scale
        # (0.3 s at 1e6, minutes beyond 1e8), which a caller could ask for with a tiny rho. Far
        # above 1 the discrete Gaussian's quantiles are the continuous one's to within one step:
        # one more step keeps the half-width conservative (OpenDP agrees to within 1 up to 1e6).
        return float(math.ceil(scale * _Z_975) + 1)
    return float(dp.discrete_gaussian_scale_to_accuracy(scale, ALPHA))


@functools.lru_cache(maxsize=_CACHE)
def satisfies(
    mechanism: MechanismName, scale: float, sensitivity: Sensitivity, rho: Fraction
) -> bool:
    """Whether the mechanism at ``scale`` costs at most ``rho`` at ``sensitivity`` (OpenDP's map).

    This is the silo's check of a plan: it trusts only its own sensitivity and OpenDP's privacy
    map, never the gateway's arithmetic. The budget is rounded down to a float and OpenDP rounds
    the cost up, so a scale below the exact requirement is never accepted. Fails closed: an
    impossible scale, a zero cost or an error inside OpenDP is a refusal.
    """
    if not (isinstance(scale, float | int) and math.isfinite(scale) and scale > 0):
        return False
    budget = float_at_most(rho)
    if budget <= 0 or sensitivity.l1 < 0 or sensitivity.l2_squared < 0:
        return False
    try:
        meas = _zcdp_measurement(mechanism, float(scale))
        return bool(meas.check(distance(mechanism, sensitivity), budget))
    except dp.OpenDPException:
        return False


def minimum_scale(mechanism: MechanismName, sensitivity: Sensitivity, rho: Fraction) -> float:
    """The smallest float scale that :func:`satisfies` accepts for ``rho`` at ``sensitivity``.

    Starts at the textbook scale d / sqrt(2 rho) and walks one float at a time to the boundary of
    OpenDP's check. OpenDP's map differs from the textbook formula only by its roundings, so the
    boundary is a few floats away (at most 3 in 400 random cases); the walk gives up after 64.
    Each step is one OpenDP check (about 0.3 ms), far cheaper than a bisection from a wide
    bracket (``dp.binary_search_param``, about 35 checks).
    """
    d_in = distance(mechanism, sensitivity)
    budget = float_at_most(rho)
    if not (d_in > 0 and budget > 0):
        raise ValueError(f"no noise scale for sensitivity {sensitivity} at rho {rho}")
    return smallest_fitting_scale(
        d_in / math.sqrt(2 * budget),
        lambda scale: satisfies(mechanism, scale, sensitivity, rho),
        f"{sensitivity} at rho {rho}",
    )


def smallest_fitting_scale(start: float, fits: Callable[[float], bool], what: str) -> float:
    """The smallest float scale that ``fits`` (a privacy map's check, monotone in the scale),
    walking one float at a time from ``start``, a textbook scale a few floats from the boundary;
    gives up after 64 steps."""
    scale = start
    for _ in range(_MAX_STEPS):
        if fits(scale):
            smaller = math.nextafter(scale, 0.0)
            if not fits(smaller):
                return scale
            scale = smaller
        else:
            scale = math.nextafter(scale, math.inf)
    raise ArithmeticError(f"no minimum scale near {scale} for {what}")


@functools.lru_cache(maxsize=_CACHE)
def plan_noise(sensitivity: Sensitivity, spend: Spend) -> NoisePlan:
    """Choose mechanism and scale for a spend; the cost is exact and the plan always
    :func:`satisfies` its own cost."""
    mechanism: MechanismName
    if spend.epsilon is not None:
        mechanism = "discrete_laplace"
        rho = spend.epsilon**2 / 2
        scale = minimum_scale(mechanism, sensitivity, rho)
        epsilon = float(spend.epsilon)
    elif spend.rho is not None:
        mechanism = "discrete_gaussian"
        rho = spend.rho
        scale = minimum_scale(mechanism, sensitivity, rho)
        epsilon = 0.0
    else:
        assert spend.target_error is not None
        mechanism = "discrete_laplace"
        if not spend.target_error > 0:
            raise InvalidQuery(
                f"target error must be positive, got {spend.target_error}",
                metadata={"target_error": spend.target_error},
            )
        scale = float(dp.accuracy_to_discrete_laplacian_scale(float(spend.target_error), ALPHA))
        if sensitivity.l1 <= 0:
            raise ValueError(f"no noise scale for sensitivity {sensitivity}")
        # OpenDP's maps at the scale that reaches the target, both rounded up by OpenDP; the
        # float-to-Fraction conversion is exact, so the charge is exactly OpenDP's cost.
        rho = Fraction(_zcdp_measurement(mechanism, scale).map(sensitivity.l1))
        epsilon = float(measurement(mechanism, scale).map(sensitivity.l1))
    if not satisfies(mechanism, scale, sensitivity, rho):
        raise ArithmeticError("planned scale does not meet its own cost")
    return NoisePlan(
        mechanism=mechanism,
        sensitivity=sensitivity,
        scale=scale,
        rho=rho,
        epsilon=epsilon,
        error95=error95(mechanism, scale),
    )


def split_spend(spend: Spend, parts: int) -> Spend:
    """The spend of each of ``parts`` noisy vectors released together for one measure (a mean's
    sum and count), so that together they spend no more than ``spend``.

    - rho r: each part r / parts; zCDP composes by adding rho, so the charge is exactly r.
    - epsilon e: each part e / parts; pure DP composes by adding epsilon, so the release is
      exactly e-DP, as in OpenDP's ``split_evenly_over``. The charge (the parts' rho, each
      (e / parts)^2 / 2) is e^2 / (2 parts), below e^2 / 2: zCDP composes the parts more tightly
      than pure DP. An exact split keeping the charge at e^2 / 2 would need e / sqrt(parts),
      which is not rational.
    - a target error fixes each part's scale, not a share of a cost: it cannot be split.
    """
    if parts < 1:
        raise ValueError(f"a spend is split over at least one part, got {parts}")
    if parts == 1:
        return spend
    if spend.rho is not None:
        return Spend(rho=spend.rho / parts)
    if spend.epsilon is not None:
        return Spend(epsilon=spend.epsilon / parts)
    raise InvalidQuery(
        f"a target error cannot be split over the {parts} noisy values this measure releases "
        "(a mean is a noisy sum over a noisy count): give epsilon or rho instead",
        reason="INVALID_QUERY",
        metadata={"parts": parts, "target_error": spend.target_error},
    )


def add_noise(values: list[int], mechanism: MechanismName, scale: float) -> list[int]:
    """Release ``values`` with OpenDP noise of the given scale."""
    release: list[int] = measurement(mechanism, scale)(values)
    return release
