"""Checks a parsed query against what the policy bundle declares, before any decision.

Names that the bundle does not declare (datasets, columns) and literals whose type does not match
the column are INVALID_ARGUMENT errors with field violations, not policy denials: the caller made a
mistake that a rule change would not fix.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from gateway.errors import FieldViolation, InvalidQuery
from gateway.policy.model import Bundle, Column
from gateway.query.form import LiteralValue, QueryForm

_NUMERIC = ("int", "decimal")


def _literal_fits(column: Column, value: LiteralValue) -> bool:
    if column.type == "category":
        return isinstance(value, str)
    if column.type == "bool":
        return isinstance(value, bool)
    if column.type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if column.type == "decimal":
        return isinstance(value, Decimal | int) and not isinstance(value, bool)
    return isinstance(value, dt.date)


def validate_against_policy(query: QueryForm, bundle: Bundle) -> None:
    """Raise InvalidQuery (reason UNKNOWN_DATASET or INVALID_QUERY) listing every violation."""
    out: list[FieldViolation] = []
    unknown: list[str] = []
    group_key_sets: dict[str, str] = {}
    for i, m in enumerate(query.measures):
        field = f"query.measures[{i}]"
        dataset = bundle.datasets.get(m.dataset)
        if dataset is None:
            unknown.append(m.dataset)
            out.append(FieldViolation(f"{field}.dataset", f"unknown dataset '{m.dataset}'"))
            continue
        if m.column:
            column = dataset.columns.get(m.column)
            if column is None or column.type not in _NUMERIC or column.bounds is None:
                out.append(
                    FieldViolation(
                        f"{field}.column",
                        f"'{m.column}' is not a bounded numeric column of '{m.dataset}'",
                    )
                )
        for j, f in enumerate(m.filters):
            column = dataset.columns.get(f.column)
            if column is None:
                out.append(
                    FieldViolation(
                        f"{field}.filters[{j}].column",
                        f"'{m.dataset}' has no column '{f.column}'",
                    )
                )
                continue
            for k, value in enumerate(f.values):
                if not _literal_fits(column, value):
                    out.append(
                        FieldViolation(
                            f"{field}.filters[{j}].values[{k}]",
                            f"column '{f.column}' is {column.type}; the literal does not fit",
                        )
                    )
                elif column.type == "category":
                    assert column.key_set is not None and isinstance(value, str)
                    if value not in bundle.key_sets.get(column.key_set, ()):
                        out.append(
                            FieldViolation(
                                f"{field}.filters[{j}].values[{k}]",
                                f"'{value}' is not a key of key set '{column.key_set}'",
                            )
                        )
        for g in query.group_by:
            column = dataset.columns.get(g)
            if column is None or column.key_set is None:
                out.append(
                    FieldViolation(
                        "query.group_by",
                        f"'{g}' is not a column of '{m.dataset}' bound to a public key set",
                    )
                )
                continue
            previous = group_key_sets.setdefault(g, column.key_set)
            if previous != column.key_set:
                out.append(
                    FieldViolation(
                        "query.group_by",
                        f"'{g}' is bound to key set '{previous}' in one dataset and "
                        f"'{column.key_set}' in '{m.dataset}'; measures cannot be merged",
                    )
                )
    if out:
        raise InvalidQuery(
            f"{out[0].field}: {out[0].description}",
            reason="UNKNOWN_DATASET" if unknown else "INVALID_QUERY",
            metadata={"violations": len(out), **({"dataset": unknown[0]} if unknown else {})},
            violations=out,
        )


def group_keys(query: QueryForm, bundle: Bundle) -> list[tuple[str, ...]]:
    """Every combination of the group-by key sets, in key-set order (the answer's rows)."""
    dataset = bundle.datasets[query.measures[0].dataset]
    rows: list[tuple[str, ...]] = [()]
    for g in query.group_by:
        key_set = dataset.columns[g].key_set
        assert key_set is not None
        rows = [(*row, key) for row in rows for key in bundle.key_sets[key_set]]
    return rows
