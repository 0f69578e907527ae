"""Sensitivity: removing one person changes the released vector by at most the declared bound.

This is the property the whole DP guarantee rests on. Hypothesis generates small tables of rows
(persons, communities, a bool column) and contribution bounds; the real SQL from
``compile_release_sql`` runs on a real in-memory DuckDB table, results are mapped onto the full
public key vector (zeros for absent keys, as the silo does), then one person and all their rows
are removed and the vectors recomputed. The L1 distance must never exceed ``l1_sensitivity``,
for ``count`` and ``count_persons``, with and without group-by, with and without a filter.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidQuery
from gateway.policy.model import Column, Dataset
from gateway.privacy.sensitivity import l1_sensitivity
from gateway.query.form import FilterForm, MeasureForm, MeasureKind, Spend
from gateway.silo.sql import compile_release_sql

KEYS = ("C1", "C2", "C3", "C4")
OTHERS = ("p1", "p2", "p3", "p4")
Row = tuple[str, str, bool]  # person_key, community, flag
Label = tuple[str, str, str]  # kind, group-by, filter
GROUPINGS: tuple[tuple[str, ...], ...] = ((), ("community",))
FILTERS: tuple[tuple[FilterForm, ...], ...] = ((), (FilterForm("flag", "=", (True,)),))
KINDS: tuple[MeasureKind, ...] = ("count", "count_persons")


def dataset(max_rows: int, max_groups: int | None = None) -> Dataset:
    return Dataset(
        silo="civil",
        table="residents",
        population="city-residents",
        max_rows_per_person=max_rows,
        max_groups_per_person=max_groups,
        columns={
            "community": Column(type="category", key_set="communities"),
            "flag": Column(type="bool"),
        },
    )


@pytest.fixture(scope="module")
def db() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    yield connection
    connection.close()


def load(db: duckdb.DuckDBPyConnection, rows: list[Row]) -> None:
    """Make the silo table ``residents`` hold exactly ``rows``, in this order."""
    db.execute(
        "CREATE OR REPLACE TABLE residents (person_key VARCHAR, community VARCHAR, flag BOOLEAN)"
    )
    if rows:
        db.executemany("INSERT INTO residents VALUES (?, ?, ?)", [list(r) for r in rows])


def release_vector(
    db: duckdb.DuckDBPyConnection,
    data: Dataset,
    kind: MeasureKind,
    group_by: tuple[str, ...],
    filters: tuple[FilterForm, ...],
) -> list[int]:
    """The exact aggregate vector the silo noises: every public key, zero when absent."""
    measure = MeasureForm("m", "civil.residents", kind, "", filters, Spend(epsilon=Fraction(1)))
    compiled = compile_release_sql(measure, data, group_by)
    exact = {
        tuple(str(v) for v in row[:-1]): int(str(row[-1]))
        for row in db.execute(compiled.sql, compiled.parameters).fetchall()
    }
    keys = [(k,) for k in KEYS] if group_by else [()]
    return [exact.get(key, 0) for key in keys]


def all_vectors(
    db: duckdb.DuckDBPyConnection, rows: list[Row], data: Dataset
) -> dict[Label, list[int]]:
    """The release vector of every (kind, group-by, filter) combination on ``rows``."""
    load(db, rows)
    return {
        (kind, ",".join(group_by) or "-", "filtered" if filters else "all"): release_vector(
            db, data, kind, group_by, filters
        )
        for kind in KINDS
        for group_by in GROUPINGS
        for filters in FILTERS
    }


def changes_without(
    db: duckdb.DuckDBPyConnection, rows: list[Row], person: str, data: Dataset
) -> dict[Label, int]:
    """L1 distance per (kind, group-by, filter) between the table and the table without person."""
    before = all_vectors(db, rows, data)
    after = all_vectors(db, [r for r in rows if r[0] != person], data)
    return {
        label: sum(abs(x - y) for x, y in zip(before[label], after[label], strict=True))
        for label in before
    }


@st.composite
def tables_with_p0(draw: st.DrawFn) -> list[Row]:
    """Rows of a few persons, where ``p0`` (the person to remove; by symmetry any person will
    do) has 0..7 rows interleaved anywhere among the others' rows."""
    cell = st.tuples(st.sampled_from(KEYS), st.booleans())
    others = draw(st.lists(st.tuples(st.sampled_from(OTHERS), cell), max_size=10))
    rows: list[Row] = [(person, community, flag) for person, (community, flag) in others]
    for community, flag in draw(st.lists(cell, max_size=7)):
        rows.insert(draw(st.integers(0, len(rows))), ("p0", community, flag))
    return rows


@pytest.mark.parametrize("groups_declared", [False, True], ids=["rows-only", "rows-and-groups"])
@settings(max_examples=100, deadline=None)
@given(rows=tables_with_p0(), max_rows=st.integers(1, 4), max_groups=st.integers(1, 4))
def test_removing_one_person_changes_the_vector_by_at_most_the_sensitivity(
    db: duckdb.DuckDBPyConnection,
    groups_declared: bool,
    rows: list[Row],
    max_rows: int,
    max_groups: int,
) -> None:
    data = dataset(max_rows, max_groups if groups_declared else None)
    sensitivity = {kind: l1_sensitivity(data, kind) for kind in KINDS}
    changes = changes_without(db, rows, "p0", data)
    exceeded = {label: c for label, c in changes.items() if c > sensitivity[label[0]]}
    assert not exceeded, f"changes {exceeded} exceed the sensitivities {sensitivity}"


def test_sensitivity_is_reached_for_count_by_group(db: duckdb.DuckDBPyConnection) -> None:
    """Tightness: a person with more rows than the bound, spread over groups, moves the vector
    by exactly max_rows_per_person; the rows beyond the bound are dropped by the SQL."""
    data = dataset(max_rows=3)
    rows: list[Row] = [
        ("p0", "C1", True),
        ("p1", "C1", False),
        ("p0", "C2", True),
        ("p0", "C3", True),
        ("p2", "C2", True),
        ("p0", "C4", True),
        ("p0", "C1", True),
    ]
    changes = changes_without(db, rows, "p0", data)
    assert l1_sensitivity(data, "count") == 3
    assert changes[("count", "community", "all")] == 3
    assert changes[("count", "community", "filtered")] == 3
    assert changes[("count", "-", "all")] == 3
    assert l1_sensitivity(data, "count_persons") == 3
    assert changes[("count_persons", "community", "all")] == 3
    assert changes[("count_persons", "-", "all")] == 1


def test_sensitivity_is_reached_for_one_row_per_person(db: duckdb.DuckDBPyConnection) -> None:
    data = dataset(max_rows=1)
    rows: list[Row] = [("p0", "C1", True), ("p0", "C2", True), ("p1", "C1", True)]
    changes = changes_without(db, rows, "p0", data)
    assert set(changes.values()) == {1}
    assert l1_sensitivity(data, "count") == l1_sensitivity(data, "count_persons") == 1


def test_count_persons_respects_max_groups_per_person(db: duckdb.DuckDBPyConnection) -> None:
    """A declared ``max_groups_per_person`` lowers the count_persons sensitivity to
    min(max_rows, max_groups) = 1, so the silo must keep each person in at most one group.

    The compiled SQL bounds rows per person only: a person with three rows in three communities
    adds 1 to each of three groups, an L1 change of 3 against a declared sensitivity of 1.
    """
    data = dataset(max_rows=3, max_groups=1)
    rows: list[Row] = [("p0", "C1", True), ("p0", "C2", True), ("p0", "C3", True)]
    changes = changes_without(db, rows, "p0", data)
    assert l1_sensitivity(data, "count_persons") == 1
    assert changes[("count_persons", "community", "all")] <= 1


@pytest.mark.parametrize(
    ("max_rows", "max_groups", "count", "count_persons"),
    [(1, None, 1, 1), (4, None, 4, 4), (4, 2, 4, 2), (2, 5, 2, 2), (20, 3, 20, 3)],
)
def test_sensitivity_values(
    max_rows: int, max_groups: int | None, count: int, count_persons: int
) -> None:
    data = dataset(max_rows, max_groups)
    assert l1_sensitivity(data, "count") == count
    assert l1_sensitivity(data, "count_persons") == count_persons


@pytest.mark.parametrize("kind", ["sum", "mean", "histogram"])
def test_unsupported_measures_are_refused(kind: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        l1_sensitivity(dataset(1), kind)
    assert info.value.reason == "MEASURE_NOT_SUPPORTED"
    assert info.value.metadata == {"measure": kind}
