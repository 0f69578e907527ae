"""The silo's release of one measure: check the gateway's plan, compute, add noise.

The silo trusts nothing in a plan but the measure itself. It derives the components and their
sensitivities from its own policy copy (:func:`gateway.privacy.sensitivity.components`) and accepts
a component's scale only when OpenDP's privacy map says that scale costs at most the rho the plan
states (:func:`gateway.privacy.noise.satisfies`); the stated rhos must add up to the measure's
stated cost exactly. Every check runs before any SQL does.

Group keys from the data (a group-by on a column without a public key set) are released with
OpenDP's threshold mechanism (:mod:`gateway.privacy.thresholds`): the silo accepts the plan's
threshold only when OpenDP's map at it stays within the stated rho and delta, and the stated delta
within its own rule's ``key_delta``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from gateway.api.v1 import silo_service_pb2
from gateway.errors import ReleaseRefused
from gateway.policy.model import Dataset
from gateway.privacy.noise import (
    MECHANISM_NUMBERS,
    MECHANISMS,
    MechanismName,
    add_noise,
    satisfies,
)
from gateway.privacy.sensitivity import Sensitivity, components, histogram_bins
from gateway.privacy.thresholds import KeyDistance, key_distance, release_above
from gateway.privacy.thresholds import satisfies as threshold_satisfies
from gateway.query.form import MeasureForm
from gateway.silo.engine import Engine
from gateway.silo.sql import compile_release_sql

_MAX_RHO_TEXT = 80  # "p/q" of any sane amount fits; longer text is refused before parsing


@dataclass(frozen=True)
class CheckedComponent:
    name: str
    mechanism: MechanismName
    scale: float
    rho: Fraction
    sensitivity: Sensitivity


@dataclass(frozen=True)
class CheckedThreshold:
    """A checked threshold release of data-dependent keys."""

    threshold: int  # the privacy map's; the mechanism runs at threshold + 1
    delta: Fraction  # the stated delta, which OpenDP's map at the threshold does not exceed
    max_keys: int
    distance: KeyDistance


@dataclass(frozen=True)
class CheckedMeasure:
    measure: MeasureForm
    dataset: Dataset
    components: tuple[CheckedComponent, ...]
    cells_per_key: int  # 1, or the number of bins of a histogram
    threshold: CheckedThreshold | None = None

    @property
    def rho(self) -> Fraction:
        return sum((c.rho for c in self.components), Fraction(0))


def parse_rho(text: str, what: str) -> Fraction:
    try:
        if len(text) > _MAX_RHO_TEXT:
            raise ValueError(text)
        rho = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ReleaseRefused(
            f"{what}: '{text[:_MAX_RHO_TEXT]}' is not an exact rho", reason="PLAN_INVALID"
        ) from None
    if rho <= 0:
        raise ReleaseRefused(f"{what}: rho must be positive, got {rho}", reason="PLAN_INVALID")
    return rho


def _check_threshold(
    plan: silo_service_pb2.ReleasePlan,
    measure: MeasureForm,
    dataset: Dataset,
    component: CheckedComponent,
    key_delta: Fraction | None,
) -> CheckedThreshold:
    """The threshold of a release of keys from the data; raises ReleaseRefused otherwise."""
    if not plan.HasField("key_threshold") or key_delta is None:
        raise ReleaseRefused(
            f"measure '{measure.id}': its group keys come from the data, so the plan needs a "
            "key threshold and a rule of this silo's policy that allows it",
            reason="PLAN_INVALID",
            metadata={"measure": measure.id},
        )
    stated = plan.key_threshold
    delta = parse_rho(stated.delta, f"measure '{measure.id}' key delta")
    distance = key_distance(dataset, measure, component.sensitivity)
    if (
        component.mechanism != "discrete_gaussian"
        or delta > key_delta
        or not threshold_satisfies(
            component.scale, stated.threshold, distance, component.rho, delta
        )
    ):
        raise ReleaseRefused(
            f"measure '{measure.id}': the planned threshold {stated.threshold} does not keep "
            f"the key release within the stated cost (rho {component.rho}, delta {delta}; the "
            f"rule allows delta {key_delta})",
            reason="THRESHOLD_TOO_LOW",
            metadata={"measure": measure.id, "threshold": stated.threshold, "delta": stated.delta},
        )
    if stated.max_keys < 1:
        raise ReleaseRefused(
            f"measure '{measure.id}': max_keys must be at least 1", reason="PLAN_INVALID"
        )
    return CheckedThreshold(stated.threshold, delta, stated.max_keys, distance)


def check_plan(
    plan: silo_service_pb2.ReleasePlan,
    measure: MeasureForm,
    dataset: Dataset,
    group_by: tuple[str, ...],
    *,
    key_delta: Fraction | None = None,
) -> CheckedMeasure:
    """The plan's components as this silo computes them; raises ReleaseRefused otherwise.

    ``key_delta``: the delta per release that the silo's own granting rule allows for keys from
    the data (None when it allows none).
    """
    own = components(dataset, measure, group_by)
    stated = [c.name for c in plan.components]
    if stated != [c.name for c in own]:
        raise ReleaseRefused(
            f"measure '{measure.id}': the plan's noise components {stated} are not this silo's "
            f"{[c.name for c in own]}",
            reason="PLAN_INVALID",
            metadata={"measure": measure.id},
        )
    checked = []
    for mine, theirs in zip(own, plan.components, strict=True):
        mechanism = MECHANISMS.get(theirs.mechanism)
        rho = parse_rho(theirs.rho, f"measure '{measure.id}' component '{mine.name}'")
        if mechanism is None or not satisfies(mechanism, theirs.scale, mine.sensitivity, rho):
            raise ReleaseRefused(
                f"measure '{measure.id}': the planned noise of '{mine.name}' is too small for "
                "the stated cost",
                reason="NOISE_TOO_SMALL",
                metadata={
                    "measure": measure.id,
                    "component": mine.name,
                    "scale": theirs.scale,
                    "rho": theirs.rho,
                },
            )
        checked.append(CheckedComponent(mine.name, mechanism, theirs.scale, rho, mine.sensitivity))
    threshold = None
    if any(dataset.columns[g].open_keys for g in group_by):
        [component] = checked  # the query's validation admits only counts
        threshold = _check_threshold(plan, measure, dataset, component, key_delta)
    elif plan.HasField("key_threshold"):
        raise ReleaseRefused(
            f"measure '{measure.id}': the plan has a key threshold, but its keys are public",
            reason="PLAN_INVALID",
            metadata={"measure": measure.id},
        )
    result = CheckedMeasure(
        measure,
        dataset,
        tuple(checked),
        len(histogram_bins(dataset, measure)) - 1 if measure.kind == "histogram" else 1,
        threshold,
    )
    stated_cost = parse_rho(plan.cost.rho, f"measure '{measure.id}' cost")
    if stated_cost != result.rho:
        raise ReleaseRefused(
            f"measure '{measure.id}': the stated cost {stated_cost} is not the sum of its "
            f"components' {result.rho}",
            reason="PLAN_INVALID",
            metadata={"measure": measure.id},
        )
    return result


def exact_vectors(
    rows: Sequence[tuple[object, ...]],
    keys: Sequence[tuple[str, ...]],
    cells_per_key: int,
    n_components: int,
    *,
    binned: bool,
) -> list[list[int]]:
    """One integer vector per component over every public key (bins inner).

    Keys absent from the data are 0 and values outside the key set are dropped, so the vector's
    shape never depends on the data.
    """
    width = len(keys[0]) if keys else 0
    index = {key: i for i, key in enumerate(keys)}
    vectors = [[0] * (len(keys) * cells_per_key) for _ in range(n_components)]
    for row in rows:
        position = index.get(tuple(str(v) for v in row[:width]))
        if position is None:
            continue
        cell = position * cells_per_key
        if binned:
            bin_index = int(str(row[width]))
            if not 0 <= bin_index < cells_per_key:
                continue
            cell += bin_index
        for c in range(n_components):
            vectors[c][cell] = int(str(row[len(row) - n_components + c]))
    return vectors


async def release_measure(
    checked: CheckedMeasure,
    engine: Engine,
    group_by: tuple[str, ...],
    keys: Sequence[tuple[str, ...]],
    *,
    one_row_per_person: bool,
) -> silo_service_pb2.MeasureRelease:
    """Run the bounded SQL, then add each component's noise; nothing exact is returned."""
    compiled = compile_release_sql(
        checked.measure,
        checked.dataset,
        group_by,
        one_row_per_person=one_row_per_person,
        # Rows beyond the bounds, stored at start-up for exactly this declaration (None after a
        # reload changed it: then computed in the query, slower but the same rows).
        excess_table=engine.excess_rows(checked.dataset),
        dialect=engine.dialect,
    )
    rows = await engine.fetch(compiled)
    if checked.threshold is not None:
        return _release_keys_from_data(checked, checked.threshold, rows, len(group_by))
    vectors = exact_vectors(
        rows,
        keys,
        checked.cells_per_key,
        len(checked.components),
        binned=checked.measure.kind == "histogram",
    )
    return silo_service_pb2.MeasureRelease(
        measure_id=checked.measure.id,
        components=[
            silo_service_pb2.ComponentRelease(
                name=c.name,
                values=add_noise(vector, c.mechanism, c.scale),
                mechanism=MECHANISM_NUMBERS[c.mechanism],
                scale=c.scale,
            )
            for c, vector in zip(checked.components, vectors, strict=True)
        ],
    )


def exact_key_counts(rows: Sequence[tuple[object, ...]], width: int) -> dict[str, int]:
    """The bounded count of every key the SQL found, keyed by the JSON array of its values;
    keys with a NULL value are left out (a NULL is no key)."""
    return {
        json.dumps([str(v) for v in row[:width]]): int(str(row[-1]))
        for row in rows
        if all(v is not None for v in row[:width])
    }


def _release_keys_from_data(
    checked: CheckedMeasure,
    threshold: CheckedThreshold,
    rows: Sequence[tuple[object, ...]],
    width: int,
) -> silo_service_pb2.MeasureRelease:
    """The keys whose noisy count is above the threshold, with their noisy counts.

    The mechanism takes string keys (:func:`exact_key_counts`). Beyond ``max_keys``, the keys with the largest noisy
    counts are kept (post-processing of the release); the answer lists keys in sorted order.
    """
    [component] = checked.components
    released = release_above(exact_key_counts(rows, width), component.scale, threshold.threshold)
    kept = sorted(released.items(), key=lambda kv: (-kv[1], kv[0]))[: threshold.max_keys]
    ordered = sorted((json.loads(key), value) for key, value in kept)
    return silo_service_pb2.MeasureRelease(
        measure_id=checked.measure.id,
        components=[
            silo_service_pb2.ComponentRelease(
                name=component.name,
                values=[value for _, value in ordered],
                mechanism=MECHANISM_NUMBERS[component.mechanism],
                scale=component.scale,
            )
        ],
        keys=[silo_service_pb2.ReleasedKey(values=key) for key, _ in ordered],
    )
