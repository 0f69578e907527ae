"""Post-processing of the silos' noisy vectors: units, means, histogram bins and suppression."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from gateway.api.v1 import query_pb2, silo_service_pb2
from gateway.policy.decision import decide
from gateway.policy.loader import load_bundle
from gateway.query.form import parse_query
from gateway.server.merge import bin_labels, merge_releases
from gateway.server.planning import QueryPlan, plan_query

BUNDLE = load_bundle(Path(__file__).resolve().parents[2] / "policies")
KEYS = [("D01",), ("D02",)]


def _plan(
    consumer: str, purpose: str, measure: query_pb2.Measure, group_by: str = "district"
) -> QueryPlan:
    query = parse_query(query_pb2.Query(purpose=purpose, measures=[measure], group_by=[group_by]))
    decision = decide(BUNDLE, consumer, query)
    assert decision.permitted, decision.reasons
    return plan_query(BUNDLE, decision, query)


def _release(plan: QueryPlan, **components: list[int]) -> silo_service_pb2.MeasureRelease:
    """The release of measure "m" at its planned scales."""
    scales = {c.name: c.noise.scale for c in plan.measures[0].components}
    return silo_service_pb2.MeasureRelease(
        measure_id="m",
        components=[
            silo_service_pb2.ComponentRelease(name=name, values=values, scale=scales[name])
            for name, values in components.items()
        ],
    )


def _measure(kind: int, column: str = "", bins: tuple[str, ...] = ()) -> query_pb2.Measure:
    return query_pb2.Measure(
        id="m",
        dataset="civil.residents",
        kind=kind,
        column=column,
        bins=list(bins),
        spend=query_pb2.PrivacySpend(epsilon="1"),
    )


def test_bin_labels_are_half_open_but_the_last() -> None:
    assert bin_labels([Decimal("0"), Decimal("7.50"), Decimal(15)]) == ["[0,7.5)", "[7.5,15]"]


def test_a_mean_divides_clamps_and_states_a_first_order_error() -> None:
    plan = _plan(
        "civil-affairs",
        "elderly-care-planning",
        _measure(query_pb2.MEASURE_KIND_MEAN, "household_size"),
    )
    sum_part, count_part = plan.measures[0].components
    assert (sum_part.name, count_part.name) == ("sum", "count")
    # epsilon 1 split in halves: sensitivity 8 (household size <= 8) and 1, at epsilon 1/2 each.
    assert sum_part.noise.scale == pytest.approx(16) and count_part.noise.scale == pytest.approx(2)
    assert plan.measures[0].rho == Fraction(1, 4)
    rows = merge_releases(plan, KEYS, {"m": _release(plan, sum=[300, 90], count=[100, 4])}, BUNDLE)
    first, second = rows[0].values[0], rows[1].values[0]
    assert first.value == pytest.approx(3.0) and not first.suppressed
    expected = math.sqrt(sum_part.error95**2 + (3.0 * count_part.error95) ** 2) / 100
    assert first.error95 == pytest.approx(expected)
    # A noisy count of 4 is below the rule's min_group_size (5): withheld, not divided.
    assert second.suppressed and second.value == 0 and second.error95 == 0
    # A ratio beyond the bounds is clamped to them (household size is in [1, 8]).
    [high] = merge_releases(plan, KEYS[:1], {"m": _release(plan, sum=[5000], count=[10])}, BUNDLE)
    assert high.values[0].value == 8


def test_histogram_cells_come_bins_inner_with_their_labels_and_are_suppressed_alone() -> None:
    plan = _plan(
        "civil-affairs",
        "elderly-care-planning",
        _measure(query_pb2.MEASURE_KIND_HISTOGRAM, "birth_year", ("1920", "1966", "2026")),
    )
    assert plan.measures[0].cells_per_key == 2
    rows = merge_releases(plan, KEYS, {"m": _release(plan, value=[40, 3, 7, 60])}, BUNDLE)
    assert [(v.bin, v.value, v.suppressed) for v in rows[0].values] == [
        ("[1920,1966)", 40, False),
        ("[1966,2026]", 0, True),
    ]
    assert [v.value for v in rows[1].values] == [7, 60]


def test_a_sum_is_in_column_units_and_never_suppressed() -> None:
    plan = _plan(
        "org-department",
        "volunteer-planning",
        query_pb2.Measure(
            id="m",
            dataset="org.activities",
            kind=query_pb2.MEASURE_KIND_SUM,
            column="hours",
            spend=query_pb2.PrivacySpend(epsilon="0.5"),
        ),
        group_by="branch",
    )
    part = plan.measures[0].components[0]
    assert part.unit == Decimal("0.5")  # hours are released in half hours
    [row] = merge_releases(plan, KEYS[:1], {"m": _release(plan, value=[3])}, BUNDLE)
    assert row.values[0].value == 1.5 and not row.values[0].suppressed
    assert row.values[0].error95 == pytest.approx(part.noise.error95 * 0.5)
    # A silo that used more noise than planned: the error stated is that of the scale it used.
    wider = _release(plan, value=[3])
    wider.components[0].scale *= 2
    [row] = merge_releases(plan, KEYS[:1], {"m": wider}, BUNDLE)
    assert row.values[0].error95 == pytest.approx(part.noise.error95, rel=0.01)
