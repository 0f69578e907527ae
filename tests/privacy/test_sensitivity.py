"""Sensitivity: adding or removing one person changes the released vectors by at most the bound.

This is the property the whole DP guarantee rests on. Hypothesis draws small tables (a few
persons, several rows each, random groups, values and NULLs), contribution bounds, a measure, a
group-by and a filter, and a neighbour: the same table plus one person with any number of rows in
any groups, interleaved anywhere. The real SQL from ``compile_release_sql`` runs on a real
in-memory DuckDB table under every bounding plan; results are mapped onto the full public key
vector (zeros for absent keys, values outside the key sets dropped, bins inner), as the silo does.
For every component, the change in L1 and in squared L2 must not exceed what ``components``
claims, and every plan must return the same vectors as the bounded one.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from fractions import Fraction

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidQuery
from gateway.policy.model import Column, Dataset
from gateway.privacy.sensitivity import (
    Component,
    Sensitivity,
    components,
    histogram_bins,
)
from gateway.query.form import FilterForm, MeasureForm, MeasureKind, Spend
from gateway.silo.sql import compile_excess_rows, compile_release_sql

COMMUNITIES = ("C1", "C2", "C3")
KINDS = ("K1", "K2")
KEY_SETS = {"community": COMMUNITIES, "kind": KINDS}
AMOUNT_BINS = (Decimal(-2), Decimal(0), Decimal("1.5"), Decimal(4))
SCORE_BINS = (Decimal(0), Decimal(3), Decimal(7), Decimal(10))
# person_key, community, kind, flag, amount, score
Row = tuple[str | None, str | None, str | None, bool | None, Decimal | None, int | None]
Vector = dict[tuple[object, ...], tuple[int, ...]]
MEASURES: tuple[tuple[MeasureKind, str, tuple[Decimal, ...]], ...] = (
    ("count", "", ()),
    ("count_persons", "", ()),
    ("sum", "amount", ()),
    ("sum", "score", ()),
    ("mean", "amount", ()),
    ("mean", "score", ()),
    ("histogram", "amount", AMOUNT_BINS),
    ("histogram", "score", ()),  # the policy's bins
)
GROUPINGS: tuple[tuple[str, ...], ...] = ((), ("community",), ("community", "kind"))
FILTERS: tuple[tuple[FilterForm, ...], ...] = ((), (FilterForm("flag", "=", (True,)),))


def dataset(max_rows: int, max_groups: int | None = None) -> Dataset:
    return Dataset(
        silo="civil",
        table="t",
        population="city-residents",
        max_rows_per_person=max_rows,
        max_groups_per_person=max_groups,
        columns={
            "community": Column(type="category", key_set="communities"),
            "kind": Column(type="category", key_set="kinds"),
            "flag": Column(type="bool"),
            "amount": Column(
                type="decimal", bounds=(Decimal(-3), Decimal(5)), resolution=Decimal("0.5")
            ),
            "score": Column(type="int", bounds=(Decimal(0), Decimal(10)), bins=list(SCORE_BINS)),
        },
    )


def measure_form(
    kind: MeasureKind, column: str, bins: tuple[Decimal, ...], filters: tuple[FilterForm, ...]
) -> MeasureForm:
    return MeasureForm("m", "civil.t", kind, column, filters, Spend(epsilon=Fraction(1)), bins)


def load(db: duckdb.DuckDBPyConnection, rows: list[Row]) -> None:
    """Make the silo table ``t`` hold exactly ``rows``, in this order."""
    db.execute(
        "CREATE OR REPLACE TABLE t (person_key VARCHAR, community VARCHAR, kind VARCHAR, "
        "flag BOOLEAN, amount DECIMAL(6, 2), score INTEGER)"
    )
    if rows:
        db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)", [list(r) for r in rows])


def public_vector(
    rows: list[tuple[object, ...]], group_by: tuple[str, ...], measure: MeasureForm, data: Dataset
) -> Vector:
    """Every public key (and bin), zero where the SQL returned nothing; other keys dropped."""
    width = len(components(data, measure, group_by))
    exact = {tuple(row[:-width]): tuple(int(str(v)) for v in row[-width:]) for row in rows}
    cells: list[tuple[object, ...]] = [
        tuple(key) for key in itertools.product(*(KEY_SETS[g] for g in group_by))
    ]
    if measure.kind == "histogram":
        bins = range(len(histogram_bins(data, measure)) - 1)
        cells = [(*cell, b) for cell in cells for b in bins]
    return {cell: exact.get(cell, (0,) * width) for cell in cells}


def release_vectors(
    db: duckdb.DuckDBPyConnection,
    rows: list[Row],
    data: Dataset,
    measure: MeasureForm,
    group_by: tuple[str, ...],
    *,
    one_row: bool = False,
) -> dict[str, Vector]:
    """The vector under each bounding plan that applies to ``rows``."""
    load(db, rows)
    excess = compile_excess_rows(data)
    db.execute(f"CREATE OR REPLACE TABLE scratch.t AS {excess.sql}", excess.parameters)
    plans = {
        "bounded": compile_release_sql(measure, data, group_by),  # excess rows computed inline
        "excess": compile_release_sql(measure, data, group_by, excess_table=("scratch", "t")),
    }
    if one_row:
        plans["one-row"] = compile_release_sql(measure, data, group_by, one_row_per_person=True)
    return {
        plan: public_vector(
            db.execute(compiled.sql, compiled.parameters).fetchall(), group_by, measure, data
        )
        for plan, compiled in plans.items()
    }


def assert_within(before: Vector, after: Vector, claimed: tuple[Component, ...]) -> None:
    for i, component in enumerate(claimed):
        deltas = [after[cell][i] - before[cell][i] for cell in before]
        l1 = sum(abs(d) for d in deltas)
        l2_squared = sum(d * d for d in deltas)
        bound = component.sensitivity
        assert l1 <= bound.l1, f"{component.name}: L1 change {l1} > {bound.l1}"
        assert l2_squared <= bound.l2_squared, (
            f"{component.name}: squared L2 change {l2_squared} > {bound.l2_squared}"
        )


AMOUNTS = st.one_of(st.none(), st.decimals(min_value=-10, max_value=10, places=2, allow_nan=False))
SCORES = st.one_of(st.none(), st.integers(-5, 15))
GROUP_VALUES = st.sampled_from([*COMMUNITIES, "CX", None])  # CX: not a public key


def row_of(person: str, draw: st.DrawFn) -> Row:
    return (
        person,
        draw(GROUP_VALUES),
        draw(st.sampled_from([*KINDS, None])),
        draw(st.one_of(st.none(), st.booleans())),
        draw(AMOUNTS),
        draw(SCORES),
    )


@st.composite
def neighbours(draw: st.DrawFn, *, one_row: bool = False) -> tuple[list[Row], list[Row]]:
    """A table of a few persons and the same table plus person ``px`` interleaved anywhere."""
    persons = ["p1", "p2", "p3", "p4"]
    rows: list[Row] = []
    for person in persons:
        for _ in range(draw(st.integers(0, 1 if one_row else 5))):
            rows.insert(draw(st.integers(0, len(rows))), row_of(person, draw))
    neighbour = list(rows)
    for _ in range(draw(st.integers(0, 1 if one_row else 8))):
        neighbour.insert(draw(st.integers(0, len(neighbour))), row_of("px", draw))
    return rows, neighbour


@settings(max_examples=150, deadline=None)
@given(
    tables=neighbours(),
    max_rows=st.integers(1, 4),
    max_groups=st.one_of(st.none(), st.integers(1, 3)),
    measure=st.sampled_from(MEASURES),
    group_by=st.sampled_from(GROUPINGS),
    filters=st.sampled_from(FILTERS),
)
def test_one_person_changes_each_vector_by_at_most_its_sensitivity(
    db: duckdb.DuckDBPyConnection,
    tables: tuple[list[Row], list[Row]],
    max_rows: int,
    max_groups: int | None,
    measure: tuple[MeasureKind, str, tuple[Decimal, ...]],
    group_by: tuple[str, ...],
    filters: tuple[FilterForm, ...],
) -> None:
    data = dataset(max_rows, max_groups)
    form = measure_form(*measure, filters)
    without, with_px = (release_vectors(db, rows, data, form, group_by) for rows in tables)
    # The excess plan returns exactly what the bounded plan does, on both tables.
    assert without["excess"] == without["bounded"]
    assert with_px["excess"] == with_px["bounded"]
    assert_within(without["bounded"], with_px["bounded"], components(data, form, group_by))


@settings(max_examples=60, deadline=None)
@given(
    tables=neighbours(one_row=True),
    measure=st.sampled_from(MEASURES),
    group_by=st.sampled_from(GROUPINGS),
    filters=st.sampled_from(FILTERS),
)
def test_one_row_plan_on_unique_data_matches_the_bounded_plan(
    db: duckdb.DuckDBPyConnection,
    tables: tuple[list[Row], list[Row]],
    measure: tuple[MeasureKind, str, tuple[Decimal, ...]],
    group_by: tuple[str, ...],
    filters: tuple[FilterForm, ...],
) -> None:
    data = dataset(1)
    form = measure_form(*measure, filters)
    without, with_px = (
        release_vectors(db, rows, data, form, group_by, one_row=True) for rows in tables
    )
    assert without["one-row"] == without["bounded"]
    assert with_px["one-row"] == with_px["bounded"]
    assert_within(without["one-row"], with_px["one-row"], components(data, form, group_by))


# --- the bounds are reached: they are not loose by accident ---------------------------------------


def change(
    db: duckdb.DuckDBPyConnection,
    rows: list[Row],
    data: Dataset,
    form: MeasureForm,
    group_by: tuple[str, ...],
) -> list[tuple[int, int]]:
    """(L1, squared L2) change per component when ``px`` and all their rows are added."""
    before = release_vectors(db, [r for r in rows if r[0] != "px"], data, form, group_by)
    after = release_vectors(db, rows, data, form, group_by)
    width = len(components(data, form, group_by))
    deltas = [
        [after["bounded"][cell][i] - before["bounded"][cell][i] for cell in before["bounded"]]
        for i in range(width)
    ]
    return [(sum(abs(d) for d in ds), sum(d * d for d in ds)) for ds in deltas]


def px_rows(count: int, community: str = "C1", amount: str = "5", score: int = 10) -> list[Row]:
    return [("px", community, "K1", True, Decimal(amount), score)] * count


def test_count_and_sum_reach_their_bounds(db: duckdb.DuckDBPyConnection) -> None:
    data = dataset(max_rows=3)
    rows = [("p1", "C1", "K1", True, Decimal(1), 1), *px_rows(5)]
    for kind, column in (("count", ""), ("sum", "amount"), ("sum", "score")):
        form = measure_form(kind, column, (), ())  # type: ignore[arg-type]
        [claimed] = components(data, form, ("community",))
        assert change(db, rows, data, form, ("community",)) == [
            (claimed.sensitivity.l1, claimed.sensitivity.l2_squared)
        ]
    # 3 rows of amount 5 (hi 5 / 0.5 = 10 steps): 30; of score 10 at resolution 1: 30.
    assert components(data, measure_form("sum", "amount", (), ()), ())[0].sensitivity == (
        Sensitivity(l1=30, l2_squared=900)
    )


def test_count_persons_reaches_min_of_rows_and_groups(db: duckdb.DuckDBPyConnection) -> None:
    data = dataset(max_rows=3, max_groups=2)
    rows = [
        ("px", community, kind, True, None, None) for community in COMMUNITIES for kind in KINDS
    ]
    form = measure_form("count_persons", "", (), ())
    assert components(data, form, ("community", "kind"))[0].sensitivity == Sensitivity(2, 2)
    assert change(db, rows, data, form, ("community", "kind")) == [(2, 2)]
    assert change(db, rows, data, form, ()) == [(1, 1)]


def test_mean_releases_a_sum_and_a_count_of_the_same_rows(
    db: duckdb.DuckDBPyConnection,
) -> None:
    data = dataset(max_rows=2)
    form = measure_form("mean", "amount", (), ())
    claimed = components(data, form, ())
    assert [c.name for c in claimed] == ["sum", "count"]
    assert [c.unit for c in claimed] == [Decimal("0.5"), Decimal(1)]
    assert [c.sensitivity for c in claimed] == [Sensitivity(20, 400), Sensitivity(2, 4)]
    rows = [*px_rows(4), ("px", "C1", "K1", True, None, None)]  # the NULL row counts nowhere
    # NULL rows take part in bounding; here the hash order decides whether it is among the 2 kept.
    assert change(db, rows, data, form, ())[1][0] in (1, 2)


def test_values_are_clamped_and_rounded_into_integer_steps(
    db: duckdb.DuckDBPyConnection,
) -> None:
    data = dataset(max_rows=1)
    rows: list[Row] = [
        (f"p{i}", "C1", "K1", True, Decimal(amount), None)
        for i, amount in enumerate(["-9", "0.26", "0.74", "1.25", "7"])
    ]
    form = measure_form("sum", "amount", (), ())
    vectors = release_vectors(db, rows, data, form, ())
    # -3 (clamped) = -6 steps; 0.26 -> 1 step (0.52 rounds to 1); 0.74 -> 1; 1.25 -> 3 (2.5 rounds
    # away from zero); 5 (clamped) = 10 steps.
    assert vectors["bounded"] == {(): (-6 + 1 + 1 + 3 + 10,)}


def test_histogram_bins_are_half_open_with_the_last_closed(
    db: duckdb.DuckDBPyConnection,
) -> None:
    data = dataset(max_rows=1)
    amounts = ["-3", "-2", "-0.5", "0", "1.5", "3.99", "4", "4.5", "9"]
    rows: list[Row] = [(f"p{i}", "C1", "K1", True, Decimal(a), None) for i, a in enumerate(amounts)]
    form = measure_form("histogram", "amount", AMOUNT_BINS, ())
    vectors = release_vectors(db, rows, data, form, ())
    # -3 is outside [-2, 4]; 4.5 and 9 clamp to the upper bound 5, outside too; 4 is in the last bin.
    assert vectors["bounded"] == {(0,): (2,), (1,): (1,), (2,): (3,)}


# --- values of the contract ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_rows", "max_groups", "count", "persons_grouped"),
    [(1, None, 1, 1), (4, None, 4, 4), (4, 2, 4, 2), (2, 5, 2, 2), (20, 3, 20, 3)],
)
def test_sensitivity_values(
    max_rows: int, max_groups: int | None, count: int, persons_grouped: int
) -> None:
    data = dataset(max_rows, max_groups)
    assert components(data, measure_form("count", "", (), ()), ("community",)) == (
        Component("value", Sensitivity(count, count * count), Decimal(1)),
    )
    persons = measure_form("count_persons", "", (), ())
    assert components(data, persons, ("community",))[0].sensitivity == Sensitivity(
        persons_grouped, persons_grouped
    )
    assert components(data, persons, ())[0].sensitivity == Sensitivity(1, 1)
    assert components(data, measure_form("histogram", "score", (), ()), ())[0].sensitivity == (
        Sensitivity(count, count * count)
    )


def test_histogram_without_bins_is_refused() -> None:
    data = dataset(1)
    with pytest.raises(InvalidQuery) as info:
        components(data, measure_form("histogram", "amount", (), ()), ())
    assert info.value.reason == "INVALID_QUERY"
    assert histogram_bins(data, measure_form("histogram", "score", (), ())) == SCORE_BINS
    assert histogram_bins(data, measure_form("histogram", "score", AMOUNT_BINS, ())) == AMOUNT_BINS
