"""Compiles a measure of the internal query form into contribution-bounded SQL for the silo's engine.

Identifiers come only from the policy bundle (validated names, quoted); every literal, bounds and
bin edges included, is a bound parameter. No string from a request is ever interpolated into SQL:
the text depends on the query's shape only (kinds, column names from policy, numbers of values).

Which rows a person keeps. Bounding happens on the person's rows in the table, before filters,
and picks rows by an order that depends on each row's own values only (see :func:`_excess_rows`),
so the kept set is a function of that person's rows alone. A person keeps at most ``R =
max_rows_per_person`` rows and, when the dataset declares ``G = max_groups_per_person``, rows of at
most ``G`` distinct tuples of its category columns (the only columns a query can group by), whatever
the query's filters and group-by; adding or removing a person never changes anyone else's kept
rows. This is what the derivations in :mod:`gateway.privacy.sensitivity` rest on.

Plans (all return exactly the bounded aggregates):

- *excess* (default): the plain aggregate of the table minus the aggregate of the rows bounding
  drops; for ``count_persons``, minus the excess persons' distinct counts plus their kept ones.
  Only persons beyond a bound are ranked (window functions), and they are few: a window over every
  row costs 13-17x the plain GROUP BY, a hash aggregate over persons several times. The excess rows
  are computed in the query (``WITH _excess``) or, faster, read from a table the silo stored at
  start-up (``excess_table``) from :func:`compile_excess_rows`; the table cannot change meanwhile,
  because the silo holds DuckDB's lock on its read-only file.
- *one row per person*: no bounding at all, for a table the silo verified at start-up to hold at
  most one row per person (``max_rows_per_person == 1``); on such a table bounding keeps every row,
  so this plan returns exactly what the excess plan would.

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


def _clamp(
    value: _Sql | str,
    low: _Sql,
    high: _Sql,
    results: tuple[_Sql, _Sql] | None = None,
    inside: _Sql | str | None = None,
) -> _Sql:
    """``value`` clamped to ``[low, high]``: ``results`` below and above, else ``inside``.

    CASE, not LEAST/GREATEST: DuckDB runs it about twice as fast. NaN compares greater than any
    number (DuckDB and PostgreSQL), so NaN takes the upper result.
    """
    below, above = results or (low, high)
    return (
        "CASE WHEN "
        + value
        + " < "
        + low
        + " THEN "
        + below
        + " WHEN "
        + value
        + " > "
        + high
        + " THEN "
        + above
        + " ELSE "
        + (value if inside is None else inside)
        + " END"
    )


def _clamped(ctx: _Context) -> _Sql:
    """The measured column as a float clamped to its bounds."""
    column = measured_column(ctx.dataset, ctx.measure)
    assert column.bounds is not None
    low, high = column.bounds
    value = f"CAST({quote(ctx.measure.column)} AS {ctx.dialect.double})"
    return _clamp(value, ctx.double(low), ctx.double(high))


def _integer_value(ctx: _Context) -> _Sql:
    """The measured column in integer steps of its resolution, within the exact integer bounds
    ``[qlo, qhi]`` of :func:`~gateway.privacy.sensitivity.integer_bounds`.

    Clamping ``y = v / res`` to ``[qlo, qhi]`` and then rounding gives the same integer as rounding
    ``v`` clamped to the bounds (rounding is monotone and qlo, qhi are integers), and it cannot
    leave ``[qlo, qhi]`` while they are exact doubles (up to 2^53); beyond that the integer is
    clamped once more.
    """
    column = measured_column(ctx.dataset, ctx.measure)
    low, high = integer_bounds(column)
    largest = max(abs(low), abs(high))
    kind = _integer_type(ctx.dialect, largest)

    def integer(value: int) -> _Sql:
        return "CAST(" + ctx.bind(value) + f" AS {kind})"

    step = resolution(column)
    if column.type == "int" and step == 1:
        # Steps of 1 on an integer column: no division, no rounding (the common, fastest case).
        value = quote(ctx.measure.column)
        return "CAST(" + _clamp(value, integer(low), integer(high)) + f" AS {kind})"
    steps = (
        f"(CAST({quote(ctx.measure.column)} AS {ctx.dialect.double}) / " + ctx.double(step) + ")"
    )
    converted = _clamp(
        steps,
        ctx.double(Decimal(low)),
        ctx.double(Decimal(high)),
        results=(integer(low), integer(high)),
        inside="CAST(ROUND(" + steps + f") AS {kind})",
    )
    if largest > 2**53:
        converted = _clamp("(" + converted + ")", integer(low), integer(high))
    return converted


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
    categories = [n for n in names if dataset.columns[n].type == "category"]
    return [quote(n) for n in names], [quote(n) for n in categories]


def _excess_rows(dataset: Dataset, dialect: Dialect) -> _Sql:
    """Every row of each person whose rows bounding does not all keep, with ``_kept``.

    Persons within both bounds (at most ``R`` rows, at most ``G`` category tuples) keep every row
    and are left out: the silo's tables hold few others, so only their rows are ranked. Within a
    person the order depends only on the row's own declared values: a hash first (so the kept rows
    spread over months, types and values instead of being the smallest), then the values, so only
    identical rows tie, and identical rows add the same to every aggregate. With ``G`` the
    person's category tuples are ranked the same way first, and only rows of the first ``G``
    tuples are kept. NULL privacy-unit values form one person, as they do in a GROUP BY.
    """
    person = quote(dataset.privacy_unit)
    table = quote(dataset.table)
    columns, categories = _declared(dataset)
    use_groups = dataset.max_groups_per_person is not None and bool(categories)
    placeholder = dialect.placeholder
    if use_groups:
        assert dataset.max_groups_per_person is not None
        per_tuple = (
            f"SELECT {person} AS {_PERSON}, COUNT(*) AS _n FROM {table} "
            f"GROUP BY {', '.join([person, *categories])}"
        )
        over = _Sql(
            f"SELECT {_PERSON} FROM ({per_tuple}) AS _tuples GROUP BY {_PERSON} "
            f"HAVING SUM(_n) > {placeholder} OR COUNT(*) > {placeholder}",
            (dataset.max_rows_per_person, dataset.max_groups_per_person),
        )
    else:
        over = _Sql(
            f"SELECT {person} AS {_PERSON} FROM {table} GROUP BY {person} "
            f"HAVING COUNT(*) > {placeholder}",
            (dataset.max_rows_per_person,),
        )
    row_order = [f"{dialect.row_hash}({', '.join(columns)})", *columns]
    ranks = []
    kept = _Sql(f"{_ROW_RANK} <= {placeholder}", (dataset.max_rows_per_person,))
    if use_groups:
        tuple_order = [f"{dialect.row_hash}({', '.join(categories)})", *categories]
        row_order = tuple_order + row_order  # rows of the first G tuples come first
        ranks.append(
            f"DENSE_RANK() OVER (PARTITION BY {person} ORDER BY {', '.join(tuple_order)}) "
            f"AS {_TUPLE_RANK}"
        )
        kept = kept + _Sql(
            f" AND {_TUPLE_RANK} <= {placeholder}", (dataset.max_groups_per_person or 0,)
        )
    ranks.insert(
        0,
        f"ROW_NUMBER() OVER (PARTITION BY {person} ORDER BY {', '.join(row_order)}) AS {_ROW_RANK}",
    )
    ranked = (
        f"SELECT {', '.join([person, *columns, *ranks])} FROM {table} AS _t "
        "WHERE EXISTS (SELECT 1 FROM ("
        + over
        + f") AS _over WHERE _over.{_PERSON} IS NOT DISTINCT FROM _t.{person})"
    )
    return (
        f"SELECT {', '.join([person, *columns])}, ("
        + kept
        + f") AS {_KEPT} FROM ("
        + ranked
        + ") AS _ranked"
    )


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
    (:meth:`gateway.silo.engine.Engine.is_unique`). ``excess_table`` (catalog, table): where the
    silo stored :func:`compile_excess_rows` at start-up; without it they are computed in the
    query. Neither may come from a request.
    """
    ctx = _Context(measure, dataset, group_by, dialect)
    table = _Sql(quote(dataset.table))
    if one_row_per_person:
        query = _aggregate(ctx, table, (), persons_are_rows=True)
        return CompiledSql(sql=query.text, parameters=query.parameters)
    prefix = _Sql("")
    if excess_table is None:
        prefix = "WITH _excess AS (" + _excess_rows(dataset, dialect) + ") "
        excess = _Sql("_excess")
    else:
        excess = _Sql(".".join(quote(part) for part in excess_table))
    # The plain aggregate of every row, minus what bounding drops: only the excess persons' rows
    # differ between the two, and those are few.
    parts = [_aggregate(ctx, table, ())]
    if measure.kind == "count_persons":
        # Distinct persons do not subtract row by row: take the excess persons out whole, then
        # put back what their kept rows count.
        parts.append(_aggregate(ctx, excess, (), sign="-"))
        parts.append(_aggregate(ctx, excess, [_Sql(_KEPT)]))
    else:
        parts.append(_aggregate(ctx, excess, [_Sql(f"NOT {_KEPT}")], sign="-"))
    keys = [*ctx.groups, *([_BIN] if measure.kind == "histogram" else [])]
    count = len(components(dataset, measure, group_by))
    totals = [f"COALESCE(SUM(_c{i}), 0) AS _c{i}" for i in range(count)]
    query = (
        prefix
        + f"SELECT {', '.join([*keys, *totals])} FROM ("
        + _join(" UNION ALL ", parts)
        + ") AS _parts"
        + (f" GROUP BY {', '.join(keys)}" if keys else "")
    )
    return CompiledSql(sql=query.text, parameters=query.parameters)


def compile_excess_rows(dataset: Dataset, dialect: Dialect = DUCKDB) -> CompiledSql:
    """The rows of persons beyond a bound, with ``_kept``, for the silo to store at start-up."""
    query = _excess_rows(dataset, dialect)
    return CompiledSql(sql=query.text, parameters=query.parameters)
