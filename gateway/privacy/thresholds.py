"""Data-dependent group keys: OpenDP's discrete Gaussian threshold mechanism.

When a group-by column has no public key set (an *open* category), the keys come from the data,
and a key's mere presence reveals that someone in it is in the data. The silo then releases a key
only when its noisy count clears a threshold (propose-test-release over the map key -> count,
Rogers 2023, as OpenDP implements it in ``make_gaussian_threshold``). The release is
``(rho, delta)``-approximate zCDP: rho as for the plain Gaussian, and delta the chance that a key
only one person holds still clears the threshold.

Only the discrete Gaussian is used: its map is in rho and delta directly, so the ledger charges
OpenDP's own figures. (The Laplace threshold's map is an ``(epsilon, delta)`` pair, and OpenDP has
no conversion from approximate DP to approximate zCDP; a hand-written one is what this module
exists to avoid.) So a data-dependent-key measure takes a rho spend.

The input distance is OpenDP's ``(l0, l2, linf)`` on the map: the groups one person's kept rows
can touch, the L2 change over all groups and the largest change in one group. OpenDP's map takes
integers here, so the L2 part is ``ceil(sqrt(l2_squared))``; OpenDP's own map tightens it to
``min(l2, sqrt(l0) * linf)``, which is exact for both measures this supports (see
:func:`key_distance`).

On the threshold: in opendp 0.16 the mechanism built with threshold ``t`` releases a key whose
noisy value *equals* ``t``, while ``t`` is what the privacy map is computed for. The silo
therefore plans delta at ``t`` and builds the mechanism at ``t + 1`` (:func:`release_above`): it
releases exactly the keys whose noisy value is above ``t``, never one more.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import opendp.prelude as dp

from gateway.errors import InvalidQuery
from gateway.policy.model import Dataset
from gateway.privacy.conversions import float_at_most
from gateway.privacy.noise import error95, smallest_fitting_scale
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import MeasureForm
from gateway.query.validate import THRESHOLD_MEASURES

dp.enable_features("contrib")

_CACHE = 4096
_LARGEST_THRESHOLD = 2**62


@dataclass(frozen=True)
class KeyDistance:
    """OpenDP's ``(l0, l2, linf)`` input distance of a count over data-dependent keys."""

    groups: int  # l0: groups one person's kept rows can touch
    l2: int  # ceil(sqrt(l2_squared)) of the count vector
    per_group: int  # linf: the most one person changes one group's count

    def as_opendp(self) -> tuple[int, int, int]:
        return (self.groups, self.l2, self.per_group)


@dataclass(frozen=True)
class ThresholdPlan:
    scale: float
    threshold: int  # the privacy map's threshold; the mechanism runs at threshold + 1
    rho: Fraction  # OpenDP's map, exactly
    delta: Fraction  # OpenDP's map at ``threshold``, exactly (at most the policy's key_delta)
    error95: float


def key_distance(dataset: Dataset, measure: MeasureForm, sensitivity: Sensitivity) -> KeyDistance:
    """The distance for ``measure`` (count or count_persons) grouped by data-dependent keys.

    A person's kept rows (at most ``R``, of at most ``G`` category tuples when declared) touch at
    most ``g = min(R, G)`` groups. ``count`` adds up to ``R`` to one group (linf = R) and
    ``count_persons`` exactly 1 to each touched group (linf = 1). Keys that exist only in one of
    two neighbouring datasets are the ones that person alone holds; the silo drops keys whose
    bounded count is 0 before thresholding, so a key is present exactly when its count is
    positive, and a missing key is the same as a zero count.
    """
    if measure.kind not in THRESHOLD_MEASURES:
        raise InvalidQuery(
            f"group keys from the data are released for count and count_persons only, not "
            f"{measure.kind}",
            reason="DATA_DEPENDENT_KEYS_UNSUPPORTED",
            metadata={"measure": measure.id, "kind": measure.kind},
        )
    groups = dataset.max_rows_per_person
    if dataset.max_groups_per_person is not None:
        groups = min(groups, dataset.max_groups_per_person)
    per_group = dataset.max_rows_per_person if measure.kind == "count" else 1
    return KeyDistance(groups, math.isqrt(sensitivity.l2_squared - 1) + 1, per_group)


@functools.lru_cache(maxsize=_CACHE)
def _mechanism(scale: float, threshold: int) -> Any:
    domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T=dp.i64))
    metric = dp.l02inf_distance(dp.absolute_distance(T=dp.i64))
    return dp.m.make_gaussian_threshold(domain, metric, scale=scale, threshold=threshold)


@functools.lru_cache(maxsize=_CACHE)
def cost(scale: float, threshold: int, distance: KeyDistance) -> tuple[Fraction, Fraction]:
    """OpenDP's map: ``(rho, delta)`` of the mechanism at ``threshold``, exactly as floats."""
    rho, delta = _mechanism(scale, threshold).map(distance.as_opendp())
    return Fraction(rho), Fraction(delta)


def satisfies(
    scale: float, threshold: int, distance: KeyDistance, rho: Fraction, delta: Fraction
) -> bool:
    """The silo's check of a plan: OpenDP's map at ``threshold`` is within ``(rho, delta)``.

    Fails closed on a bad scale or threshold, or on an error inside OpenDP.
    """
    if not (isinstance(scale, float | int) and math.isfinite(scale) and scale > 0):
        return False
    if not (isinstance(threshold, int) and distance.per_group <= threshold < _LARGEST_THRESHOLD):
        return False
    try:
        spent_rho, spent_delta = cost(float(scale), threshold, distance)
    except dp.OpenDPException:
        return False
    return spent_rho <= rho and spent_delta <= delta


def _minimum_scale(distance: KeyDistance, rho: Fraction) -> float:
    # The textbook scale for OpenDP's tightened L2, min(l2, sqrt(l0) * linf), then walk one float
    # at a time to the boundary of OpenDP's map (as noise.minimum_scale does for vectors).
    l2_squared = min(distance.l2**2, distance.groups * distance.per_group**2)
    budget = float_at_most(rho)
    if budget <= 0:
        raise ValueError(f"no noise scale at rho {rho}")
    return smallest_fitting_scale(
        math.sqrt(l2_squared / (2 * budget)),
        lambda scale: cost(scale, distance.per_group, distance)[0] <= rho,
        f"{distance} at rho {rho}",
    )


@functools.lru_cache(maxsize=_CACHE)
def plan_threshold(distance: KeyDistance, rho: Fraction, delta: Fraction) -> ThresholdPlan:
    """The smallest scale whose rho fits, then the smallest threshold whose delta fits."""
    if not delta > 0:
        raise ValueError("data-dependent keys need a delta above 0")
    scale = _minimum_scale(distance, rho)
    # delta falls as the threshold rises (OpenDP requires at least linf): double until it fits,
    # then bisect.
    low, high = distance.per_group - 1, distance.per_group
    while cost(scale, high, distance)[1] > delta:
        low, high = high, high * 2
        if high >= _LARGEST_THRESHOLD:
            raise ArithmeticError(f"no threshold reaches delta {delta} at scale {scale}")
    while high - low > 1:
        middle = (low + high) // 2
        if cost(scale, middle, distance)[1] <= delta:
            high = middle
        else:
            low = middle
    spent_rho, spent_delta = cost(scale, high, distance)
    assert satisfies(scale, high, distance, rho, delta)
    return ThresholdPlan(scale, high, spent_rho, spent_delta, error95("discrete_gaussian", scale))


def release_above(counts: dict[str, int], scale: float, threshold: int) -> dict[str, int]:
    """The keys whose noisy count is above ``threshold``, with their noisy counts (OpenDP).

    Keys with a bounded count of 0 are dropped first: a key is present exactly when someone's
    kept rows are in it (see :func:`key_distance`). Built at ``threshold + 1``: see the module
    docstring.
    """
    present = {key: value for key, value in counts.items() if value != 0}
    released: dict[str, int] = _mechanism(scale, threshold + 1)(present)
    return released
