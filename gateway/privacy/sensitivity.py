"""Sensitivity of the aggregate vectors the silo computes, from the dataset's declared bounds.

Neighbouring datasets differ by one *person* with all of their rows (add/remove). The silo's SQL
(:mod:`gateway.silo.sql`) keeps, for every person, a set of at most ``R = max_rows_per_person``
rows that is a function of that person's own rows only, and, when the dataset declares
``G = max_groups_per_person``, rows of at most ``G`` distinct values of the dataset's category
columns (so of at most ``G`` groups under any group-by). Adding or removing a person therefore
changes only that person's kept rows; every other person's contribution stays the same. Each bound
below is the largest change that person's kept rows can make, whatever the database contains.

Values are clamped to the column's ``bounds`` and converted to integers of its ``resolution``;
the silo clamps the integer again to ``[round(lo / res), round(hi / res)]`` (rounding half away
from zero), so every kept value ``q`` satisfies ``|q| <= M = max(|round(lo / res)|,
|round(hi / res)|)``. Everything is an exact integer: no floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from gateway.errors import InvalidQuery
from gateway.policy.model import Column, Dataset
from gateway.query.form import MeasureForm


@dataclass(frozen=True)
class Sensitivity:
    l1: int  # L1 sensitivity of the integer vector
    l2_squared: int  # squared L2 sensitivity, exact


@dataclass(frozen=True)
class Component:
    """One integer vector a measure releases (one noise draw per element)."""

    name: str  # "value" for count, count_persons, sum, histogram; "sum" and "count" for mean
    sensitivity: Sensitivity
    unit: Decimal  # what one integer step is worth: the column's resolution for sums, 1 for counts


def _rows_bound(dataset: Dataset) -> Sensitivity:
    # count, histogram and mean's count: each kept row adds 1 to exactly one cell (group, or
    # (group, bin)), at most R rows. L1 <= R; the squared L2 is largest with all R rows in one cell.
    rows = dataset.max_rows_per_person
    return Sensitivity(l1=rows, l2_squared=rows * rows)


def _persons_bound(dataset: Dataset, group_by: tuple[str, ...]) -> Sensitivity:
    # count_persons: the person adds 1 to each group holding at least one of their kept rows.
    # Without a group-by there is one group: 1. With one, the kept rows (at most R) lie in at most
    # min(R, G) groups (G when declared), each changing by exactly 1: L1 = L2^2 = min(R, G).
    if not group_by:
        return Sensitivity(l1=1, l2_squared=1)
    groups = dataset.max_rows_per_person
    if dataset.max_groups_per_person is not None:
        groups = min(groups, dataset.max_groups_per_person)
    return Sensitivity(l1=groups, l2_squared=groups)


def measured_column(dataset: Dataset, measure: MeasureForm) -> Column:
    """The bounded numeric column a sum, mean or histogram measures."""
    column = dataset.columns.get(measure.column)
    if column is None or column.bounds is None or column.type not in ("int", "decimal"):
        raise InvalidQuery(
            f"'{measure.column}' is not a bounded numeric column of '{measure.dataset}'",
            metadata={"column": measure.column, "dataset": measure.dataset},
        )
    return column


def resolution(column: Column) -> Decimal:
    """The fixed-point step of a column's sums; 1 when the policy declares none."""
    return column.resolution if column.resolution is not None else Decimal(1)


def integer_bounds(column: Column) -> tuple[int, int]:
    """``(round(lo / res), round(hi / res))`` exactly, rounding half away from zero.

    Rounding is monotone, so a value clamped to ``[lo, hi]`` converts into this range; the SQL
    clamps the integer to it again, so float rounding in the engine can never leave it.
    """
    assert column.bounds is not None
    step = resolution(column)
    low, high = (int((edge / step).quantize(Decimal(1), ROUND_HALF_UP)) for edge in column.bounds)
    return low, high


def histogram_bins(dataset: Dataset, measure: MeasureForm) -> tuple[Decimal, ...]:
    """The measure's bin edges, else the column's policy ``bins``; k + 1 edges make k bins."""
    if measure.bins:
        return measure.bins
    column = measured_column(dataset, measure)
    if column.bins is None:
        raise InvalidQuery(
            f"histogram of '{measure.column}' needs bins: the query gives none and the policy "
            "declares none",
            reason="INVALID_QUERY",
            metadata={"column": measure.column, "dataset": measure.dataset},
        )
    return tuple(column.bins)


def components(
    dataset: Dataset, measure: MeasureForm, group_by: tuple[str, ...]
) -> tuple[Component, ...]:
    """The integer vectors a measure releases, in the order of the compiled SQL's columns."""
    one = Decimal(1)
    if measure.kind in ("count", "histogram"):
        if measure.kind == "histogram":
            histogram_bins(dataset, measure)  # refuses a histogram without bins
        return (Component("value", _rows_bound(dataset), one),)
    if measure.kind == "count_persons":
        return (Component("value", _persons_bound(dataset, group_by), one),)
    column = measured_column(dataset, measure)
    low, high = integer_bounds(column)
    # sum: each kept row adds its q (|q| <= M) to one group. The person's change to the vector is
    # sum over groups |sum of their q there| <= sum of |q| <= R * M, reached with R rows of the same
    # sign in one group; then the squared L2 is (R * M)^2 as well, and no spread is larger.
    largest = max(abs(low), abs(high)) * dataset.max_rows_per_person
    total = Component(
        "value", Sensitivity(l1=largest, l2_squared=largest * largest), resolution(column)
    )
    if measure.kind == "sum":
        return (total,)
    # mean: a noisy sum over a noisy count of the same kept, non-NULL rows; two releases.
    return (
        Component("sum", total.sensitivity, total.unit),
        Component("count", _rows_bound(dataset), one),
    )
