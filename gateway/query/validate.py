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
# The group_key_sets marker of a group-by column whose keys come from the data.
_FROM_DATA = ""
# The measures whose keys may come from the data (kept in step with privacy.thresholds).
THRESHOLD_MEASURES = ("count", "count_persons")


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
                elif column.type == "category" and column.key_set is not None:
                    assert isinstance(value, str)
                    if value not in bundle.key_sets.get(column.key_set, ()):
                        out.append(
                            FieldViolation(
                                f"{field}.filters[{j}].values[{k}]",
                                f"'{value}' is not a key of key set '{column.key_set}'",
                            )
                        )
        for g in query.group_by:
            column = dataset.columns.get(g)
            if column is None or column.type != "category":
                out.append(
                    FieldViolation(
                        "query.group_by", f"'{g}' is not a category column of '{m.dataset}'"
                    )
                )
                continue
            keys = column.key_set or _FROM_DATA
            previous = group_key_sets.setdefault(g, keys)
            if previous != keys:
                out.append(
                    FieldViolation(
                        "query.group_by",
                        f"'{g}' takes its keys from {_keys_source(previous)} in one dataset and "
                        f"from {_keys_source(keys)} in '{m.dataset}'; measures cannot be merged",
                    )
                )
    if not out and _FROM_DATA in group_key_sets.values():
        out.extend(_data_dependent_violations(query))
    if out:
        raise InvalidQuery(
            f"{out[0].field}: {out[0].description}",
            reason="UNKNOWN_DATASET" if unknown else "INVALID_QUERY",
            metadata={"violations": len(out), **({"dataset": unknown[0]} if unknown else {})},
            violations=out,
        )


def _keys_source(keys: str) -> str:
    return "the data" if keys == _FROM_DATA else f"key set '{keys}'"


def _data_dependent_violations(query: QueryForm) -> list[FieldViolation]:
    """What a query with keys from the data cannot have: the silo thresholds one count."""
    out = []
    if len(query.measures) != 1:
        out.append(
            FieldViolation(
                "query.measures",
                "a query whose group keys come from the data has exactly one measure",
            )
        )
    for i, m in enumerate(query.measures):
        if m.kind not in THRESHOLD_MEASURES:
            out.append(
                FieldViolation(
                    f"query.measures[{i}].kind",
                    f"group keys from the data are released for count and count_persons only, "
                    f"not {m.kind}",
                )
            )
        if m.spend.rho is None:
            out.append(
                FieldViolation(
                    f"query.measures[{i}].spend",
                    "group keys from the data need a rho spend (they are released with the "
                    "discrete Gaussian threshold mechanism)",
                )
            )
    return out


def data_dependent_keys(query: QueryForm, bundle: Bundle) -> bool:
    """Whether a (policy-validated) query groups by a column whose keys come from the data."""
    dataset = bundle.datasets[query.measures[0].dataset]
    return any(dataset.columns[g].open_keys for g in query.group_by)


def group_keys(query: QueryForm, bundle: Bundle) -> list[tuple[str, ...]]:
    """Every combination of the group-by key sets, in key-set order (the answer's rows).

    Not for a query whose keys come from the data (:func:`data_dependent_keys`): the silo's
    release lists those."""
    dataset = bundle.datasets[query.measures[0].dataset]
    rows: list[tuple[str, ...]] = [()]
    for g in query.group_by:
        key_set = dataset.columns[g].key_set
        if key_set is None:
            raise ValueError(f"'{g}' takes its keys from the data")
        rows = [(*row, key) for row in rows for key in bundle.key_sets[key_set]]
    return rows
