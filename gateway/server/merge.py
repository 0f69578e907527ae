"""Merges the silos' noisy component vectors into the answer's rows (post-processing only).

Everything here works on released noisy integers and public facts (key sets, bins, units, noise
scales), so none of it costs privacy:

- a value is its noisy integer times the component's unit (the column's resolution for sums);
- a MEAN is its noisy sum divided by its noisy count, clamped to the column's bounds, with a
  first-order (delta method) 95% error: ``sqrt(e_sum^2 + (mean * e_count)^2) / count``. It is an
  approximation, stated as such in the docs; it is exact neither for small counts nor near the
  bounds;
- suppression: a COUNT, COUNT_PERSONS or HISTOGRAM cell whose noisy value is below the rule's
  ``min_group_size`` is withheld, and so is a MEAN whose noisy count is (or is below 1, where the
  ratio means nothing). A SUM carries no count of its own and is never suppressed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal

from gateway.api.v1 import query_pb2, silo_service_pb2
from gateway.policy.model import Bundle
from gateway.privacy.noise import error95
from gateway.server.planning import MeasurePlanning, QueryPlan


def bin_labels(edges: Sequence[Decimal]) -> list[str]:
    """``[a,b)`` for every bin but the last, which is closed: ``[a,b]``."""
    labels = []
    for i in range(len(edges) - 1):
        close = "]" if i == len(edges) - 2 else ")"
        labels.append(f"[{_number(edges[i])},{_number(edges[i + 1])}{close}")
    return labels


def _number(edge: Decimal) -> str:
    return format(edge.normalize(), "f")  # 7.50 -> "7.5", 1E+3 -> "1000"


def _cell(
    measure_id: str, value: float, error: float, *, suppressed: bool, bin: str = ""
) -> query_pb2.MeasureValue:
    return query_pb2.MeasureValue(
        measure_id=measure_id,
        value=0.0 if suppressed else value,
        error95=error,
        suppressed=suppressed,
        bin=bin,
    )


def _errors(
    planning: MeasurePlanning, release: silo_service_pb2.MeasureRelease
) -> dict[str, float]:
    """Each component's 95% error in the measure's unit, at the scale the silo actually used (the
    gateway accepts more noise than planned, never less)."""
    used = {c.name: c.scale for c in release.components}
    errors = {}
    for c in planning.components:
        scale = used.get(c.name, c.noise.scale)
        errors[c.name] = (
            c.error95
            if scale == c.noise.scale
            else error95(c.noise.mechanism, scale) * float(c.unit)
        )
    return errors


def _measure_values(
    planning: MeasurePlanning,
    release: silo_service_pb2.MeasureRelease,
    bundle: Bundle,
    n_keys: int,
) -> list[list[query_pb2.MeasureValue]]:
    """The values of one measure for each of the ``n_keys`` groups, in key order."""
    measure = planning.measure
    released = {c.name: list(c.values) for c in release.components}
    errors = _errors(planning, release)
    out: list[list[query_pb2.MeasureValue]] = [[] for _ in range(n_keys)]
    minimum = planning.min_group_size
    if measure.kind == "mean":
        sums, counts = released["sum"], released["count"]
        parts = {c.name: c for c in planning.components}
        unit = float(parts["sum"].unit)
        e_sum, e_count = errors["sum"], errors["count"]
        column = bundle.datasets[measure.dataset].columns[measure.column]
        assert column.bounds is not None
        low, high = float(column.bounds[0]), float(column.bounds[1])
        for k in range(n_keys):
            count = counts[k]
            if count < max(minimum, 1):
                out[k].append(_cell(measure.id, 0.0, 0.0, suppressed=True))
                continue
            mean = min(max(sums[k] * unit / count, low), high)
            error = math.sqrt(e_sum**2 + (mean * e_count) ** 2) / count
            out[k].append(_cell(measure.id, mean, error, suppressed=False))
        return out
    component = planning.components[0]
    values = released[component.name]
    unit = float(component.unit)
    counted = measure.kind != "sum"
    if measure.kind == "histogram":
        labels = bin_labels(planning.bins)
        for k in range(n_keys):
            for b, label in enumerate(labels):
                v = values[k * len(labels) + b]
                out[k].append(
                    _cell(
                        measure.id, v * unit, component.error95, suppressed=v < minimum, bin=label
                    )
                )
        return out
    for k in range(n_keys):
        v = values[k]
        out[k].append(
            _cell(measure.id, v * unit, errors[component.name], suppressed=counted and v < minimum)
        )
    return out


def merge_releases(
    plan: QueryPlan,
    keys: Sequence[tuple[str, ...]],
    releases: Mapping[str, silo_service_pb2.MeasureRelease],
    bundle: Bundle,
) -> list[query_pb2.GroupResult]:
    """One row per public key, every measure's values in plan order."""
    groups = [query_pb2.GroupResult(keys=list(key)) for key in keys]
    for planning in plan.measures:
        per_key = _measure_values(planning, releases[planning.measure.id], bundle, len(keys))
        for group, values in zip(groups, per_key, strict=True):
            group.values.extend(values)
    return groups
