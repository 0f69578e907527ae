"""Noise planning and release with OpenDP measurements on integer aggregate vectors.

The gateway plans a scale from the consumer's spend; the silo recomputes the minimum scale for the
stated cost with :func:`minimum_scale` and refuses anything smaller. Costs are exact: an epsilon
spend is charged as rho = epsilon^2 / 2 (pure DP implies zCDP); a rho spend as itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import opendp.prelude as dp

from gateway.query.form import Spend

dp.enable_features("contrib")

MechanismName = Literal["discrete_laplace", "discrete_gaussian"]
ALPHA = 0.05  # 95% confidence intervals everywhere
# Scales are nudged up by this relative amount so that OpenDP's conservatively rounded privacy
# map never exceeds the exact amount we charge.
_SCALE_MARGIN = 1 + 2**-40


@dataclass(frozen=True)
class NoisePlan:
    mechanism: MechanismName
    sensitivity: float
    scale: float
    rho: Fraction
    epsilon: float
    error95: float


def _float_at_most(x: Fraction) -> float:
    value = float(x)
    return math.nextafter(value, 0.0) if Fraction(value) > x else value


def measurement(mechanism: MechanismName, scale: float) -> Any:
    """The OpenDP measurement that adds noise to a vector of integers."""
    domain = dp.vector_domain(dp.atom_domain(T=int))
    if mechanism == "discrete_laplace":
        return dp.m.make_laplace(domain, dp.l1_distance(T=int), scale)
    return dp.m.make_gaussian(domain, dp.l2_distance(T=int), scale)


def error95(mechanism: MechanismName, scale: float) -> float:
    if mechanism == "discrete_laplace":
        return float(dp.discrete_laplacian_scale_to_accuracy(scale, ALPHA))
    return float(dp.discrete_gaussian_scale_to_accuracy(scale, ALPHA))


def _epsilon_at_most(rho: Fraction) -> float:
    """A float no larger than the exact sqrt(2 rho) (the pure-DP epsilon that costs rho)."""
    value = math.sqrt(float(2 * rho))
    for _ in range(2):  # two rounding steps (2*rho to float, sqrt) may each have rounded up
        value = math.nextafter(value, 0.0)
    return value


def satisfies(mechanism: MechanismName, scale: float, sensitivity: float, rho: Fraction) -> bool:
    """Whether the mechanism at ``scale`` costs at most ``rho`` at ``sensitivity`` (OpenDP's map).

    This is the silo's check of a plan: it trusts only its own sensitivity and OpenDP's privacy
    map, never the gateway's arithmetic.
    """
    if not (math.isfinite(scale) and scale > 0 and rho > 0):
        return False
    bound = _epsilon_at_most(rho) if mechanism == "discrete_laplace" else _float_at_most(rho)
    return bool(measurement(mechanism, scale).check(sensitivity, bound))


def plan_noise(sensitivity: int, spend: Spend) -> NoisePlan:
    """Choose mechanism and scale for a spend; the cost is exact."""
    if spend.epsilon is not None:
        rho = spend.epsilon**2 / 2
        scale = float(Fraction(sensitivity) / spend.epsilon) * _SCALE_MARGIN
        mechanism: MechanismName = "discrete_laplace"
        epsilon = spend.epsilon
    elif spend.rho is not None:
        mechanism = "discrete_gaussian"
        rho = spend.rho
        scale = sensitivity / math.sqrt(2 * rho) * _SCALE_MARGIN
        epsilon = Fraction(0)
    else:
        assert spend.target_error is not None
        mechanism = "discrete_laplace"
        target_scale = float(
            dp.accuracy_to_discrete_laplacian_scale(float(spend.target_error), ALPHA)
        )
        epsilon = Fraction(sensitivity) / Fraction(target_scale)
        rho = epsilon**2 / 2
        scale = target_scale * _SCALE_MARGIN
    if not satisfies(mechanism, scale, sensitivity, rho):
        raise ArithmeticError("planned scale does not meet its own cost; widen _SCALE_MARGIN")
    return NoisePlan(
        mechanism=mechanism,
        sensitivity=float(sensitivity),
        scale=scale,
        rho=rho,
        epsilon=float(epsilon),
        error95=error95(mechanism, scale),
    )


def add_noise(values: list[int], mechanism: MechanismName, scale: float) -> list[int]:
    """Release ``values`` with OpenDP noise of the given scale."""
    release: list[int] = measurement(mechanism, scale)(values)
    return release
