"""The internal query form and its canonical representation.

The API's protobuf query is parsed once into these frozen dataclasses; everything after that
(policy decision, planning, SQL compilation, ledger, audit) reads only this form. Amounts are
exact (``Fraction`` from decimal strings). The canonical JSON (sorted keys, normalised literals)
and its SHA-256 identify a query for idempotency, caching and the audit log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal

from gateway.api.v1 import query_pb2
from gateway.errors import FieldViolation, InvalidQuery

MeasureKind = Literal["count", "count_persons", "sum", "mean", "histogram"]
FilterOp = Literal["=", "!=", "<", "<=", ">", ">=", "in", "between", "is null"]
LiteralValue = str | int | Decimal | bool | dt.date

MEASURE_KINDS: dict[query_pb2.MeasureKind.ValueType, MeasureKind] = {
    query_pb2.MEASURE_KIND_COUNT: "count",
    query_pb2.MEASURE_KIND_COUNT_PERSONS: "count_persons",
    query_pb2.MEASURE_KIND_SUM: "sum",
    query_pb2.MEASURE_KIND_MEAN: "mean",
    query_pb2.MEASURE_KIND_HISTOGRAM: "histogram",
}
MEASURE_KIND_NUMBERS = {name: number for number, name in MEASURE_KINDS.items()}
FILTER_OPS: dict[query_pb2.FilterOp.ValueType, FilterOp] = {
    query_pb2.FILTER_OP_EQ: "=",
    query_pb2.FILTER_OP_NE: "!=",
    query_pb2.FILTER_OP_LT: "<",
    query_pb2.FILTER_OP_LE: "<=",
    query_pb2.FILTER_OP_GT: ">",
    query_pb2.FILTER_OP_GE: ">=",
    query_pb2.FILTER_OP_IN: "in",
    query_pb2.FILTER_OP_BETWEEN: "between",
    query_pb2.FILTER_OP_IS_NULL: "is null",
}
FILTER_OP_NUMBERS = {name: number for number, name in FILTER_OPS.items()}
_ARITY: dict[FilterOp, tuple[int, int]] = {
    "in": (1, 1000),
    "between": (2, 2),
    "is null": (0, 0),
}
_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MAX_AMOUNT = Fraction(1000)
# Below this, noise scales overflow floats; no useful release spends less.
_MIN_AMOUNT_TEXT = "0.000001"
_MIN_AMOUNT = Fraction(_MIN_AMOUNT_TEXT)
_MIN_EXPONENT, _MAX_EXPONENT, _MAX_DIGITS = -7, 3, 30
MAX_BIN_EDGES = 1001


@dataclass(frozen=True)
class Spend:
    """Exactly one of epsilon, rho or a target 95% error half-width."""

    epsilon: Fraction | None = None
    rho: Fraction | None = None
    target_error: Fraction | None = None

    def canonical(self) -> dict[str, str]:
        for name in ("epsilon", "rho", "target_error"):
            value = getattr(self, name)
            if value is not None:
                return {name: str(value)}
        return {}


@dataclass(frozen=True)
class FilterForm:
    column: str
    op: FilterOp
    values: tuple[LiteralValue, ...]

    def canonical(self) -> dict[str, object]:
        values = [_literal_json(v) for v in self.values]
        if self.op == "in":  # a set: order and repeats do not change the query
            unique = {json.dumps(v, sort_keys=True): v for v in values}
            values = [unique[key] for key in sorted(unique)]
        return {"column": self.column, "op": self.op, "values": values}


@dataclass(frozen=True)
class MeasureForm:
    id: str
    dataset: str
    kind: MeasureKind
    column: str
    filters: tuple[FilterForm, ...]
    spend: Spend
    # HISTOGRAM bin edges as the caller gave them (strictly increasing); empty: the policy's.
    bins: tuple[Decimal, ...] = ()

    def canonical(self) -> dict[str, object]:
        filters = sorted((f.canonical() for f in self.filters), key=json.dumps)
        canonical: dict[str, object] = {
            "id": self.id,
            "dataset": self.dataset,
            "kind": self.kind,
            "column": self.column,
            "filters": filters,
            "spend": self.spend.canonical(),
        }
        if self.bins:
            canonical["bins"] = [str(edge.normalize()) for edge in self.bins]
        return canonical


@dataclass(frozen=True)
class QueryForm:
    purpose: str
    measures: tuple[MeasureForm, ...]
    group_by: tuple[str, ...]

    def canonical(self) -> dict[str, object]:
        return {
            "purpose": self.purpose,
            "measures": sorted((m.canonical() for m in self.measures), key=lambda m: str(m["id"])),
            "group_by": list(self.group_by),
        }

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON: the query's identity."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(sorted({m.dataset for m in self.measures}))


def _literal_json(value: LiteralValue) -> object:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        return {"decimal": str(value.normalize())}
    return {"date": value.isoformat()}


def _amount(text: str, field: str, violations: list[FieldViolation]) -> Fraction | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        violations.append(FieldViolation(field, f"'{text}' is not a decimal number"))
        return None
    # The range and digit checks come before any exact conversion: Fraction("1e-10000000") alone
    # would build a ten-million-digit integer.
    in_range = (
        value.is_finite()
        and value > 0
        and _MIN_EXPONENT <= value.adjusted() <= _MAX_EXPONENT
        and len(value.as_tuple().digits) <= _MAX_DIGITS
        and _MIN_AMOUNT <= Fraction(value) <= _MAX_AMOUNT
    )
    if not in_range:
        violations.append(
            FieldViolation(
                field,
                f"must be a decimal in [{_MIN_AMOUNT_TEXT}, {_MAX_AMOUNT}] with at most "
                f"{_MAX_DIGITS} digits, got '{text}'",
            )
        )
        return None
    return Fraction(value)


def _parse_spend(spend: query_pb2.PrivacySpend, field: str, out: list[FieldViolation]) -> Spend:
    which = spend.WhichOneof("spend")
    if which is None:
        out.append(FieldViolation(field, "set one of epsilon, rho or target_error"))
        return Spend()
    amount = _amount(getattr(spend, which), f"{field}.{which}", out)
    return Spend(**{which: amount}) if amount is not None else Spend()


def _parse_literal(lit: query_pb2.Literal, field: str, out: list[FieldViolation]) -> LiteralValue:
    which = lit.WhichOneof("kind")
    if which == "string_value":
        return lit.string_value
    if which == "int_value":
        return lit.int_value
    if which == "bool_value":
        return lit.bool_value
    if which == "decimal_value":
        try:
            value = Decimal(lit.decimal_value)
            if value.is_finite():
                return value
        except InvalidOperation:
            pass
        out.append(FieldViolation(field, f"'{lit.decimal_value}' is not a finite decimal"))
        return Decimal(0)
    if which == "date_value":
        try:
            return dt.date.fromisoformat(lit.date_value)
        except ValueError:
            out.append(FieldViolation(field, f"'{lit.date_value}' is not a date (YYYY-MM-DD)"))
            return dt.date.min
    out.append(FieldViolation(field, "literal has no value"))
    return ""


def _parse_filter(f: query_pb2.Filter, field: str, out: list[FieldViolation]) -> FilterForm:
    op = FILTER_OPS.get(f.op)
    if op is None:
        out.append(FieldViolation(f"{field}.op", "filter operator is not set"))
        op = "="
    low, high = _ARITY.get(op, (1, 1))
    if not low <= len(f.values) <= high:
        out.append(
            FieldViolation(
                f"{field}.values", f"'{op}' takes {low}..{high} values, got {len(f.values)}"
            )
        )
    if not f.column:
        out.append(FieldViolation(f"{field}.column", "column is required"))
    values = tuple(_parse_literal(v, f"{field}.values[{i}]", out) for i, v in enumerate(f.values))
    return FilterForm(column=f.column, op=op, values=values)


def _parse_bins(
    texts: Sequence[str], kind: MeasureKind, field: str, out: list[FieldViolation]
) -> tuple[Decimal, ...]:
    if not texts:
        return ()
    if kind != "histogram":
        out.append(FieldViolation(field, f"only histogram measures take bins, not '{kind}'"))
        return ()
    if not 2 <= len(texts) <= MAX_BIN_EDGES:
        out.append(FieldViolation(field, f"give 2..{MAX_BIN_EDGES} bin edges, got {len(texts)}"))
        return ()
    edges: list[Decimal] = []
    for i, text in enumerate(texts):
        try:
            edge = Decimal(text)
        except InvalidOperation:
            edge = Decimal("NaN")
        if (
            not edge.is_finite()
            or len(edge.as_tuple().digits) > _MAX_DIGITS
            or not (-(10**15) < edge < 10**15)
        ):
            out.append(FieldViolation(f"{field}[{i}]", f"'{text}' is not a finite decimal"))
            return ()
        edges.append(edge)
    if any(a >= b for a, b in itertools.pairwise(edges)):
        out.append(FieldViolation(field, "bin edges must be strictly increasing"))
        return ()
    return tuple(edges)


def parse_query(query: query_pb2.Query) -> QueryForm:
    """Parse and structurally validate an API query; raises InvalidQuery with every violation."""
    out: list[FieldViolation] = []
    if not query.purpose:
        out.append(FieldViolation("query.purpose", "purpose is required"))
    if not query.measures:
        out.append(FieldViolation("query.measures", "at least one measure is required"))
    measures: list[MeasureForm] = []
    seen: set[str] = set()
    for i, m in enumerate(query.measures):
        field = f"query.measures[{i}]"
        if not _ID.match(m.id):
            out.append(
                FieldViolation(f"{field}.id", "id must be lowercase letters, digits, underscores")
            )
        elif m.id in seen:
            out.append(FieldViolation(f"{field}.id", f"duplicate measure id '{m.id}'"))
        seen.add(m.id)
        if not m.dataset:
            out.append(FieldViolation(f"{field}.dataset", "dataset is required"))
        kind = MEASURE_KINDS.get(m.kind)
        if kind is None:
            out.append(FieldViolation(f"{field}.kind", "measure kind is not set"))
            kind = "count"
        needs_column = kind in ("sum", "mean", "histogram")
        if needs_column and not m.column:
            out.append(FieldViolation(f"{field}.column", f"'{kind}' needs a numeric column"))
        if not needs_column and m.column:
            out.append(FieldViolation(f"{field}.column", f"'{kind}' takes no column"))
        filters = tuple(
            _parse_filter(f, f"{field}.filters[{j}]", out) for j, f in enumerate(m.filters)
        )
        spend = _parse_spend(m.spend, f"{field}.spend", out)
        bins = _parse_bins(m.bins, kind, f"{field}.bins", out)
        measures.append(MeasureForm(m.id, m.dataset, kind, m.column, filters, spend, bins))
    if len(set(query.group_by)) != len(query.group_by):
        out.append(FieldViolation("query.group_by", "group-by columns repeat"))
    if out:
        raise InvalidQuery(
            f"the query is malformed: {out[0].field}: {out[0].description}",
            metadata={"violations": len(out)},
            violations=out,
        )
    return QueryForm(query.purpose, tuple(measures), tuple(query.group_by))
