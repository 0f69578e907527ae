"""Data-dependent group keys: the (l0, l2, linf) distance, the threshold plan, the +1 rule.

The property test runs the silo's real bounded SQL on DuckDB for a random table and its neighbour
(one person added with any rows), builds the key map the silo thresholds
(:func:`gateway.silo.release.exact_key_counts`, zero counts dropped as ``release_above`` does) and
checks the change against :func:`gateway.privacy.thresholds.key_distance` in all three norms.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.model import Column, Dataset
from gateway.privacy import thresholds
from gateway.privacy.sensitivity import components
from gateway.privacy.thresholds import KeyDistance, key_distance, plan_threshold, release_above
from gateway.query.form import FilterForm, MeasureForm, MeasureKind, Spend
from gateway.silo.release import exact_key_counts
from gateway.silo.sql import compile_excess_rows, compile_release_sql
from tests.privacy.test_sensitivity import Row, dataset, load, neighbours

GROUPINGS: tuple[tuple[str, ...], ...] = (("community",), ("community", "kind"))


def open_dataset(max_rows: int, max_groups: int | None) -> Dataset:
    """The sensitivity tests' table with ``community`` an open category (keys from the data)."""
    data = dataset(max_rows, max_groups)
    return data.model_copy(
        update={"columns": {**data.columns, "community": Column(type="category")}}
    )


def count_form(kind: MeasureKind, filters: tuple[FilterForm, ...] = ()) -> MeasureForm:
    return MeasureForm("m", "civil.t", kind, "", filters, Spend(rho=Fraction(1, 2)), ())


def key_counts(
    db: duckdb.DuckDBPyConnection,
    rows: list[Row],
    data: Dataset,
    measure: MeasureForm,
    group_by: tuple[str, ...],
) -> dict[str, dict[str, int]]:
    """The silo's key map under each bounding plan, zero counts dropped."""
    load(db, rows)
    excess = compile_excess_rows(data)
    db.execute(f"CREATE OR REPLACE TABLE scratch.t AS {excess.sql}", excess.parameters)
    plans = {
        "bounded": compile_release_sql(measure, data, group_by),
        "excess": compile_release_sql(measure, data, group_by, excess_table=("scratch", "t")),
    }
    out = {}
    for plan, compiled in plans.items():
        found = exact_key_counts(
            db.execute(compiled.sql, compiled.parameters).fetchall(), len(group_by)
        )
        out[plan] = {key: value for key, value in found.items() if value != 0}
    return out


@settings(max_examples=150, deadline=None)
@given(
    tables=neighbours(),
    max_rows=st.integers(1, 4),
    max_groups=st.one_of(st.none(), st.integers(1, 3)),
    kind=st.sampled_from(("count", "count_persons")),
    group_by=st.sampled_from(GROUPINGS),
    filtered=st.booleans(),
)
def test_one_person_changes_the_key_map_within_l0_l2_and_linf(
    db: duckdb.DuckDBPyConnection,
    tables: tuple[list[Row], list[Row]],
    max_rows: int,
    max_groups: int | None,
    kind: MeasureKind,
    group_by: tuple[str, ...],
    filtered: bool,
) -> None:
    data = open_dataset(max_rows, max_groups)
    form = count_form(kind, (FilterForm("flag", "=", (True,)),) if filtered else ())
    without, with_px = (key_counts(db, rows, data, form, group_by) for rows in tables)
    assert without["excess"] == without["bounded"] and with_px["excess"] == with_px["bounded"]
    before, after = without["bounded"], with_px["bounded"]
    [component] = components(data, form, group_by)
    distance = key_distance(data, form, component.sensitivity)
    changes = [after.get(k, 0) - before.get(k, 0) for k in before.keys() | after.keys()]
    changed = [c for c in changes if c]
    assert len(changed) <= distance.groups  # l0
    assert all(abs(c) <= distance.per_group for c in changed)  # linf
    assert sum(c * c for c in changed) <= distance.l2**2  # l2
    # Adding a person only adds: no key disappears and no count falls.
    assert all(c >= 0 for c in changes)


def test_distances_of_the_two_measures() -> None:
    data = open_dataset(max_rows=5, max_groups=3)
    count = components(data, count_form("count"), ("community",))[0].sensitivity
    persons = components(data, count_form("count_persons"), ("community",))[0].sensitivity
    assert key_distance(data, count_form("count"), count) == KeyDistance(3, 5, 5)
    # count_persons: 1 in each of min(R, G) = 3 groups; L2 sqrt(3) rounds up to 2 for OpenDP,
    # which tightens it back to sqrt(l0) * linf = sqrt(3) (the rho below shows it).
    assert key_distance(data, count_form("count_persons"), persons) == KeyDistance(3, 2, 1)
    plan = plan_threshold(KeyDistance(3, 2, 1), Fraction(1, 2), Fraction(1, 10**9))
    assert plan.rho <= Fraction(1, 2)
    assert float(plan.rho) == pytest.approx(3 / (2 * plan.scale**2), rel=1e-12)


def test_sum_mean_and_histogram_take_no_keys_from_the_data() -> None:
    data = open_dataset(max_rows=2, max_groups=None)
    summed = MeasureForm("m", "civil.t", "sum", "score", (), Spend(rho=Fraction(1)), ())
    [component] = components(data, summed, ("community",))
    with pytest.raises(Exception, match="count and count_persons only"):
        key_distance(data, summed, component.sensitivity)


@pytest.mark.parametrize(
    ("distance", "rho", "delta"),
    [
        (KeyDistance(1, 1, 1), Fraction(1, 2), Fraction(1, 10**6)),
        (KeyDistance(5, 5, 5), Fraction(1, 8), Fraction(1, 10**9)),
        (KeyDistance(3, 2, 1), Fraction(2), Fraction(1, 10**12)),
    ],
)
def test_the_plan_is_the_smallest_threshold_opendp_accepts(
    distance: KeyDistance, rho: Fraction, delta: Fraction
) -> None:
    plan = plan_threshold(distance, rho, delta)
    assert plan.delta <= delta and plan.rho <= rho
    assert thresholds.satisfies(plan.scale, plan.threshold, distance, rho, delta)
    # One less is not enough, and a smaller scale does not fit the rho.
    assert not thresholds.satisfies(plan.scale, plan.threshold - 1, distance, rho, delta)
    smaller = math.nextafter(plan.scale, 0.0)
    assert not thresholds.satisfies(smaller, plan.threshold, distance, rho, delta)
    # The threshold is OpenDP's own map: delta just below it at threshold - 1 is larger.
    assert thresholds.cost(plan.scale, plan.threshold - 1, distance)[1] > delta


def test_the_silo_check_fails_closed() -> None:
    distance = KeyDistance(1, 1, 1)
    plan = plan_threshold(distance, Fraction(1, 2), Fraction(1, 10**6))
    for scale in (0.0, -1.0, math.nan, math.inf):
        assert not thresholds.satisfies(scale, plan.threshold, distance, plan.rho, plan.delta)
    for threshold in (0, -5, 2**62):
        assert not thresholds.satisfies(plan.scale, threshold, distance, plan.rho, plan.delta)
    assert not thresholds.satisfies(plan.scale, plan.threshold, distance, plan.rho / 2, plan.delta)


def test_a_noisy_value_equal_to_the_threshold_is_never_released() -> None:
    # opendp 0.16 releases a value equal to the threshold it is built with; release_above builds
    # it at threshold + 1, so every released value is above the planned threshold.
    scale, threshold = 3.0, 20
    counts = {f"k{i}": threshold for i in range(200)}
    released_values = []
    for _ in range(50):
        released_values.extend(release_above(counts, scale, threshold).values())
    assert released_values, "some keys at the threshold are pushed above it by the noise"
    assert min(released_values) > threshold


def test_zero_counts_are_dropped_before_thresholding() -> None:
    # A zero count is no key: with a threshold of 1 and a tiny scale only k1 can come out.
    released = release_above({"k0": 0, "k1": 100}, 0.5, 1)
    assert set(released) == {"k1"}


def test_release_frequency_matches_the_discrete_gaussian_tail() -> None:
    # A key whose exact count is c is released when c + noise > t: P = P(noise >= t + 1 - c).
    # Discrete Gaussian at scale 3 is close to N(0, 9) here (the continuous tail is within 1e-3
    # of the discrete one at these points). 4,000 trials per count; alpha 1e-6 per count.
    scale, threshold, trials = 3.0, 20, 4000
    for exact in (15, 20, 24):
        counts = {f"k{i}": exact for i in range(trials)}
        released = len(release_above(counts, scale, threshold))
        # Continuity-corrected normal tail of the discrete Gaussian: P(X >= m) ~ P(Z >= m - 0.5).
        z = (threshold + 1 - exact - 0.5) / scale
        expected = 0.5 * math.erfc(z / math.sqrt(2))
        # Binomial count within 4.9 standard deviations (two-sided alpha 1e-6), plus 1% of the
        # trials for the normal approximation's error on the discrete tail.
        spread = 4.9 * math.sqrt(trials * expected * (1 - expected)) + 0.01 * trials
        assert abs(released - expected * trials) <= spread, (exact, released, expected * trials)


def test_keys_are_json_arrays_of_their_values() -> None:
    rows = [("C1", "K1", 4), ("C2", None, 3), ("C'3", "K2", 0)]
    found = exact_key_counts(rows, 2)
    assert found == {json.dumps(["C1", "K1"]): 4, json.dumps(["C'3", "K2"]): 0}
