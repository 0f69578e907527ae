"""Compiles a measure of the internal query form into contribution-bounded SQL for the silo's engine.

Identifiers come only from the policy bundle (validated names, quoted); every literal, bounds and
bin edges included, is a bound parameter. No string from a request is ever interpolated into SQL:
the text depends on the query's shape only (kinds, column names from policy, numbers of values).

Which rows a person keeps. Bounding happens on the person's rows in the table, before filters,
and picks rows by an order that depends on each row's own values only: rows are ranked within the
person by a hash of the dataset's declared columns, then by the columns themselves, so the kept set
is a pseudo-random subset that a function of that person's rows alone. When the dataset declares
``max_groups_per_person`` the person's distinct tuples of category columns (the only columns a
query can group by) are ranked the same way first and only rows of the first ``G`` tuples are
kept. A person keeps at most ``R`` rows in at most ``G`` tuples, whatever the query's filters and
group-by, and adding or removing a person never changes anyone else's kept rows: this is what the
derivations in :mod:`gateway.privacy.sensitivity` rest on. Because the kept set does not depend on
the query, the silo can compute it once (see the excess plan) and every plan returns the same
numbers.

Three plans, same result:

- *bounded*: ranks every person's rows with window functions in the query; correct on any table.
- *one row per person*: no bounding at all. Only for a table the silo verified at start-up to hold
  at most one row per person (``max_rows_per_person == 1``); on such a table the bounded plan keeps
  every row, so this plan returns exactly what it would.
- *excess*: the silo materialises once the rows of the few persons whose rows bounding drops (with
  a ``_kept`` flag), then answers with the plain aggregate of the table minus the dropped rows'
  aggregate (and, for ``count_persons``, minus those persons' distinct counts plus their kept ones).
  Also exact: every other person keeps all their rows.

Values are clamped to the column's bounds, converted to integers of its resolution and clamped
again in integers, so sums are integer sums (DuckDB sums INTEGER and BIGINT into HUGEINT).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from gateway.policy.model import Dataset
from gateway.privacy.sensitivity import (
    components,
    histogram_bins,
    integer_bounds,
    measured_column,
    resolution,
)
from gateway.query.form import FilterForm, LiteralValue, MeasureForm

Parameter = LiteralValue | int
_COMPARISONS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
# Names the compiler gives its own columns start with "_": policy identifiers cannot.
_PERSON, _ROW_RANK, _TUPLE_RANK, _KEPT = '"_person"', '"_rn"', '"_tr"', '"_kept"'
_VALUE, _CLAMPED, _BIN = '"_q"', '"_x"', '"_bin"'


@dataclass(frozen=True)
class Dialect:
    """What differs between SQL engines, in one place; the compiler reads nothing else."""

    name: str
    placeholder: str
    double: str
    # Integer types from narrow to wide, with the largest magnitude each holds.
    integers: tuple[tuple[str, int], ...]
    # A deterministic hash of any number of values (for the per-person row order).
    row_hash: str


DUCKDB = Dialect(
    name="duckdb",
    placeholder="?",
    double="DOUBLE",
    integers=(("INTEGER", 2**31 - 1), ("BIGINT", 2**63 - 1), ("HUGEINT", 2**127 - 1)),
    row_hash="hash",
)


@dataclass(frozen=True)
class CompiledSql:
    """SQL text with placeholders and its parameters, in order."""

    sql: str
    parameters: tuple[Parameter, ...]


@dataclass(frozen=True)
class _Sql:
    """A piece of SQL text and the parameters its placeholders take, in order."""

    text: str
    parameters: tuple[Parameter, ...] = ()

    def __add__(self, other: _Sql | str) -> _Sql:
        if isinstance(other, str):
            return _Sql(self.text + other, self.parameters)
        return _Sql(self.text + other.text, self.parameters + other.parameters)

    def __radd__(self, other: str) -> _Sql:
        return _Sql(other + self.text, self.parameters)


def _join(separator: str, parts: Iterable[_Sql | str]) -> _Sql:
    joined = _Sql("")
    for i, part in enumerate(parts):
        joined = joined + (separator if i else "") + part
    return joined


def quote(identifier: str) -> str:
    """Quote an identifier taken from policy (never from a request)."""
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Context:
    measure: MeasureForm
    dataset: Dataset
    group_by: tuple[str, ...]
    dialect: Dialect

    def bind(self, value: Parameter) -> _Sql:
        return _Sql(self.dialect.placeholder, (value,))

    def double(self, value: Decimal) -> _Sql:
        return "CAST(" + self.bind(value) + f" AS {self.dialect.double})"

    @property
    def groups(self) -> list[str]:
        return [quote(g) for g in self.group_by]


def _filter_sql(ctx: _Context, f: FilterForm) -> _Sql:
    column = quote(f.column)
    if f.op == "is null":
        return _Sql(f"{column} IS NULL")
    if f.op == "in":
        return f"{column} IN (" + _join(", ", (ctx.bind(v) for v in f.values)) + ")"
    if f.op == "between":
        low, high = f.values
        return f"{column} BETWEEN " + ctx.bind(low) + " AND " + ctx.bind(high)
    [value] = f.values
    return f"{column} {_COMPARISONS[f.op]} " + ctx.bind(value)


def _integer_type(dialect: Dialect, magnitude: int) -> str:
    for name, largest in dialect.integers:
        if magnitude <= largest:
            return name
    raise ValueError(f"no integer type of {dialect.name} holds {magnitude}")


def _clamped(ctx: _Context) -> _Sql:
    """The measured column as a float clamped to its bounds (NaN becomes the upper bound)."""
    column = measured_column(ctx.dataset, ctx.measure)
    assert column.bounds is not None
    low, high = column.bounds
    value = f"CAST({quote(ctx.measure.column)} AS {ctx.dialect.double})"
    return "LEAST(GREATEST(" + value + ", " + ctx.double(low) + "), " + ctx.double(high) + ")"


def _integer_value(ctx: _Context) -> _Sql:
    """The measured column in integer steps of its resolution, within the exact integer bounds."""
    column = measured_column(ctx.dataset, ctx.measure)
    low, high = integer_bounds(column)
    # One step of margin: float division may round just past a bound before the integer clamp.
    kind = _integer_type(ctx.dialect, max(abs(low), abs(high)) + 1)
    step = resolution(column)
    if column.type == "int" and step == 1:
        # Integers need no division: clamp them as they are (the common and fastest case).
        inner = _Sql(quote(ctx.measure.column))
    else:
        inner = "CAST(ROUND(" + _clamped(ctx) + " / " + ctx.double(step) + f") AS {kind})"
    low_sql = "CAST(" + ctx.bind(low) + f" AS {kind})"
    high_sql = "CAST(" + ctx.bind(high) + f" AS {kind})"
    return "CAST(LEAST(GREATEST(" + inner + ", " + low_sql + "), " + high_sql + f") AS {kind})"


def _bin_index(ctx: _Context) -> _Sql:
    """0-based bin of the clamped value: [e_i, e_(i+1)), the last bin closed; NULL outside."""
    edges = histogram_bins(ctx.dataset, ctx.measure)
    cases: list[_Sql] = ["WHEN " + _Sql(_CLAMPED) + " < " + ctx.double(edges[0]) + " THEN NULL"]
    for index, edge in enumerate(edges[1:]):
        last = index == len(edges) - 2
        cases.append(
            f"WHEN {_CLAMPED} {'<=' if last else '<'} "
            + ctx.double(edge)
            + " THEN "
            + ctx.bind(index)
        )
    return "CASE " + _join(" ", cases) + " END"


def _aggregate(
    ctx: _Context,
    source: _Sql,
    conditions: Sequence[_Sql],
    *,
    persons_are_rows: bool = False,
    sign: str = "",
) -> _Sql:
    """``SELECT groups[, bin], component... FROM source WHERE conditions GROUP BY ...``.

    Component columns are named ``_c0``, ``_c1``, ...; ``sign`` ("-") negates them.
    """
    kind = ctx.measure.kind
    where = list(conditions) + [_filter_sql(ctx, f) for f in ctx.measure.filters]
    if kind in ("sum", "mean", "histogram"):
        # Rows whose measured value is NULL count towards nothing.
        where.append(_Sql(f"{quote(ctx.measure.column)} IS NOT NULL"))
    carried: list[_Sql | str] = list(ctx.groups)
    if kind in ("sum", "mean"):
        carried.append(_integer_value(ctx) + f" AS {_VALUE}")
    elif kind == "histogram":
        carried.append(_clamped(ctx) + f" AS {_CLAMPED}")
    elif kind == "count_persons" and not persons_are_rows:
        carried.append(f"{quote(ctx.dataset.privacy_unit)} AS {_PERSON}")
    if not carried:
        carried.append("1 AS _one")  # a row per kept row; the select list may not be empty
    rows = "SELECT " + _join(", ", carried) + " FROM " + source
    if where:
        rows = rows + " WHERE " + _join(" AND ", where)
    keys = list(ctx.groups)
    if kind == "histogram":
        binned = ", ".join([*keys, ""]) + _bin_index(ctx) + f" AS {_BIN}"
        rows = "SELECT " + binned + " FROM (" + rows + ") AS _rows"
        keys.append(_BIN)
    aggregates = {
        "count": ["COUNT(*)"],
        "histogram": ["COUNT(*)"],
        "count_persons": ["COUNT(*)" if persons_are_rows else f"COUNT(DISTINCT {_PERSON})"],
        # COALESCE: SUM over no rows is NULL, and the release needs 0.
        "sum": [f"COALESCE(SUM({_VALUE}), 0)"],
        "mean": [f"COALESCE(SUM({_VALUE}), 0)", "COUNT(*)"],
    }[kind]
    assert len(aggregates) == len(components(ctx.dataset, ctx.measure, ctx.group_by))
    selected = [*keys, *(f"{sign}{a} AS _c{i}" for i, a in enumerate(aggregates))]
    query = f"SELECT {', '.join(selected)} FROM (" + rows + ") AS _kept_rows"
    if kind == "histogram":
        query = query + f" WHERE {_BIN} IS NOT NULL"
    if keys:
        query = query + f" GROUP BY {', '.join(keys)}"
    return query


def _declared(dataset: Dataset) -> tuple[list[str], list[str]]:
    """The dataset's declared columns and its category columns, sorted, quoted."""
    names = sorted(dataset.columns)
    categories = [n for n in names if dataset.columns[n].key_set is not None]
    return [quote(n) for n in names], [quote(n) for n in categories]


def _ranked_rows(dataset: Dataset, dialect: Dialect, persons: str = "") -> str:
    """Every row with its rank among the person's rows (and its tuple's rank, when G applies).

    The order depends only on the row's own declared values: a hash first (so the kept rows are
    spread over months, types and values rather than the smallest ones), then the values, so that
    only identical rows tie, and identical rows add the same to every aggregate.
    """
    person = quote(dataset.privacy_unit)
    columns, categories = _declared(dataset)
    row_order = [f"{dialect.row_hash}({', '.join(columns)})", *columns]
    ranks = []
    if dataset.max_groups_per_person is not None and categories:
        tuple_order = [f"{dialect.row_hash}({', '.join(categories)})", *categories]
        row_order = tuple_order + row_order  # rows of the first G tuples come first
        ranks.append(
            f"DENSE_RANK() OVER (PARTITION BY {person} ORDER BY {', '.join(tuple_order)}) "
            f"AS {_TUPLE_RANK}"
        )
    ranks.insert(
        0,
        f"ROW_NUMBER() OVER (PARTITION BY {person} ORDER BY {', '.join(row_order)}) AS {_ROW_RANK}",
    )
    rows = f"SELECT {person}, {', '.join([*columns, *ranks])} FROM {quote(dataset.table)} AS _t"
    # ``persons``: a relation of the persons to rank (column ``_person``); NULL keys form one person.
    if persons:
        rows += (
            f" WHERE EXISTS (SELECT 1 FROM {persons} "
            f"WHERE {persons}.{_PERSON} IS NOT DISTINCT FROM _t.{person})"
        )
    return rows


def _kept_condition(dataset: Dataset, dialect: Dialect) -> _Sql:
    kept = _Sql(f"{_ROW_RANK} <= {dialect.placeholder}", (dataset.max_rows_per_person,))
    _, categories = _declared(dataset)
    if dataset.max_groups_per_person is not None and categories:
        kept = kept + _Sql(
            f" AND {_TUPLE_RANK} <= {dialect.placeholder}", (dataset.max_groups_per_person,)
        )
    return kept


def compile_release_sql(
    measure: MeasureForm,
    dataset: Dataset,
    group_by: tuple[str, ...],
    *,
    one_row_per_person: bool = False,
    excess_table: tuple[str, str] | None = None,
    dialect: Dialect = DUCKDB,
) -> CompiledSql:
    """SQL returning one row per observed group: the group columns, the 0-based bin index
    (histograms), then one integer column per :func:`~gateway.privacy.sensitivity.components`.

    ``one_row_per_person``: the silo verified that the table holds at most one row per person
    (see :meth:`gateway.silo.engine.DuckDbEngine.is_unique`); ``excess_table`` (catalog, table):
    the rows of persons beyond a bound, as :func:`compile_excess_rows` selects them. Neither may
    come from a request.
    """
    ctx = _Context(measure, dataset, group_by, dialect)
    table = _Sql(quote(dataset.table))
    if one_row_per_person:
        query = _aggregate(ctx, table, (), persons_are_rows=True)
    elif excess_table is None:
        ranked = "(" + _Sql(_ranked_rows(dataset, dialect)) + ") AS _ranked"
        query = _aggregate(ctx, ranked, [_kept_condition(dataset, dialect)])
    else:
        excess = _Sql(".".join(quote(part) for part in excess_table))
        # Plain aggregate of every row, minus what bounding drops; only the excess persons' rows
        # differ between the two, and those are in the small excess table.
        parts = [_aggregate(ctx, table, ())]
        if measure.kind == "count_persons":
            # Distinct persons do not subtract row by row: take the excess persons out whole,
            # then put back what their kept rows count.
            parts.append(_aggregate(ctx, excess, (), sign="-"))
            parts.append(_aggregate(ctx, excess, [_Sql(_KEPT)]))
        else:
            parts.append(_aggregate(ctx, excess, [_Sql(f"NOT {_KEPT}")], sign="-"))
        keys = [*ctx.groups, *([_BIN] if measure.kind == "histogram" else [])]
        count = len(components(dataset, measure, group_by))
        totals = [f"COALESCE(SUM(_c{i}), 0) AS _c{i}" for i in range(count)]
        query = (
            f"SELECT {', '.join([*keys, *totals])} FROM ("
            + _join(" UNION ALL ", parts)
            + ") AS _parts"
            + (f" GROUP BY {', '.join(keys)}" if keys else "")
        )
    return CompiledSql(sql=query.text, parameters=query.parameters)


def compile_excess_rows(dataset: Dataset, dialect: Dialect = DUCKDB) -> CompiledSql:
    """Every row of each person whose rows bounding does not all keep, with ``_kept``.

    The silo runs this once at start-up into its scratch catalog (for the excess plan). Persons
    within both bounds (at most ``R`` rows, at most ``G`` category tuples) keep every row and are
    left out; the rest are ranked exactly as the bounded plan ranks them.
    """
    person = quote(dataset.privacy_unit)
    columns, categories = _declared(dataset)
    use_groups = dataset.max_groups_per_person is not None and bool(categories)
    if use_groups:
        per_tuple = (
            f"SELECT {person} AS {_PERSON}, COUNT(*) AS _n FROM {quote(dataset.table)} "
            f"GROUP BY {', '.join([person, *categories])}"
        )
        over = _Sql(
            f"SELECT {_PERSON} FROM ({per_tuple}) AS _tuples GROUP BY {_PERSON} "
            f"HAVING SUM(_n) > {dialect.placeholder} OR COUNT(*) > {dialect.placeholder}",
            (dataset.max_rows_per_person, dataset.max_groups_per_person or 0),
        )
    else:
        over = _Sql(
            f"SELECT {person} AS {_PERSON} FROM {quote(dataset.table)} GROUP BY {person} "
            f"HAVING COUNT(*) > {dialect.placeholder}",
            (dataset.max_rows_per_person,),
        )
    ranked = _ranked_rows(dataset, dialect, persons="_over")
    query = (
        "WITH _over AS ("
        + over
        + f") SELECT {person}, {', '.join(columns)}, "
        + "("
        + _kept_condition(dataset, dialect)
        + f") AS {_KEPT} FROM ({ranked}) AS _ranked"
    )
    return CompiledSql(sql=query.text, parameters=query.parameters)
