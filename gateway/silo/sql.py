"""Compiles a measure of the internal query form into SQL for the silo's engine.

Identifiers come only from the policy bundle (validated names, quoted); literals are bound
parameters. No string from a request is ever interpolated into SQL.

Contribution bounding: each person keeps at most ``max_rows_per_person`` rows (an arbitrary
subset, chosen by ``ROW_NUMBER`` over the person's rows) and, when the dataset declares
``max_groups_per_person`` and the query groups, only rows in their first ``max_groups_per_person``
groups (``DENSE_RANK`` over the person's group keys). Both caps hold together on the kept rows, which
is what makes the sensitivity in :mod:`gateway.privacy.sensitivity` hold whatever the table
contains.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy.model import Dataset
from gateway.query.form import FilterForm, LiteralValue, MeasureForm

_COMPARISONS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True)
class CompiledSql:
    """SQL text with ``?`` placeholders and its parameters, in order."""

    sql: str
    parameters: tuple[LiteralValue | int, ...]


def quote(identifier: str) -> str:
    """Quote an identifier taken from policy (never from a request)."""
    return '"' + identifier.replace('"', '""') + '"'


def _filter_sql(f: FilterForm) -> tuple[str, list[LiteralValue]]:
    column = quote(f.column)
    if f.op == "is null":
        return f"{column} IS NULL", []
    if f.op == "in":
        return f"{column} IN ({', '.join('?' * len(f.values))})", list(f.values)
    if f.op == "between":
        return f"{column} BETWEEN ? AND ?", list(f.values)
    return f"{column} {_COMPARISONS[f.op]} ?", list(f.values)


def compile_release_sql(
    measure: MeasureForm, dataset: Dataset, group_by: tuple[str, ...]
) -> CompiledSql:
    """SQL returning one row per observed group: the group columns, then the bounded aggregate."""
    unit = quote(dataset.privacy_unit)
    groups = [quote(g) for g in group_by]
    conditions: list[str] = []
    parameters: list[LiteralValue | int] = []
    for f in measure.filters:
        text, values = _filter_sql(f)
        conditions.append(text)
        parameters.extend(values)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    carried = ", ".join([*groups, f"{unit} AS person"])
    aggregate = "COUNT(*)" if measure.kind == "count" else "COUNT(DISTINCT person)"
    group_list = ", ".join(groups)
    cap_groups = dataset.max_groups_per_person is not None and bool(groups)
    group_rank = (
        f", DENSE_RANK() OVER (PARTITION BY person ORDER BY {group_list}) AS group_in_person"
        if cap_groups
        else ""
    )
    sql = (
        f"WITH filtered AS (SELECT {carried} FROM {quote(dataset.table)} {where}), "
        "bounded AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY person) AS row_in_person"
        f"{group_rank} FROM filtered) "
        f"SELECT {group_list + ', ' if groups else ''}{aggregate} AS value "
        f"FROM bounded WHERE row_in_person <= ?{' AND group_in_person <= ?' if cap_groups else ''} "
        f"{'GROUP BY ' + group_list if groups else ''}"
    )
    parameters.append(dataset.max_rows_per_person)
    if cap_groups:
        assert dataset.max_groups_per_person is not None
        parameters.append(dataset.max_groups_per_person)
    return CompiledSql(sql=" ".join(sql.split()), parameters=tuple(parameters))
