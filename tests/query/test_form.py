"""Parsing API queries into the internal form: every violation at once, exact amounts, digests.

The canonical digest identifies a query for idempotency, caching and the audit log, so it must
not depend on the order in which a client lists measures, filters or IN values, and must change
when any literal does. Hypothesis checks both on generated queries.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.v1 import query_pb2
from gateway.client.client import count, where
from gateway.errors import FieldViolation, InvalidQuery
from gateway.privacy.noise import plan_noise
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import FILTER_OP_NUMBERS, QueryForm, parse_query


def violations_of(query: query_pb2.Query) -> list[tuple[str, str]]:
    with pytest.raises(InvalidQuery) as info:
        parse_query(query)
    err = info.value
    assert err.reason == "INVALID_QUERY"
    assert err.metadata == {"violations": str(len(err.violations))}
    first = err.violations[0]
    assert err.message == f"the query is malformed: {first.field}: {first.description}"
    return [(v.field, v.description) for v in err.violations]


def one_count(**spend: str) -> query_pb2.Query:
    return query_pb2.Query(
        purpose="p",
        measures=[
            query_pb2.Measure(
                id="m",
                dataset="civil.residents",
                kind=query_pb2.MEASURE_KIND_COUNT,
                spend=query_pb2.PrivacySpend(**spend),
            )
        ],
    )


# --- structural violations ------------------------------------------------------------------------


def test_every_violation_is_collected_with_its_field_path() -> None:
    lit = query_pb2.Literal
    query = query_pb2.Query(
        group_by=["community", "community"],
        measures=[
            query_pb2.Measure(
                id="Bad-Id",
                kind=query_pb2.MEASURE_KIND_COUNT,
                column="x",
                filters=[
                    query_pb2.Filter(values=[lit(date_value="2024-13-01")]),
                    query_pb2.Filter(
                        column="age",
                        op=query_pb2.FILTER_OP_BETWEEN,
                        values=[lit(decimal_value="NaN")],
                    ),
                    query_pb2.Filter(
                        column="age", op=query_pb2.FILTER_OP_IS_NULL, values=[lit(int_value=1)]
                    ),
                    query_pb2.Filter(column="age", op=query_pb2.FILTER_OP_EQ, values=[lit()]),
                ],
            ),
            query_pb2.Measure(
                id="m",
                dataset="d",
                kind=query_pb2.MEASURE_KIND_SUM,
                spend=query_pb2.PrivacySpend(rho="-1"),
            ),
            query_pb2.Measure(
                id="m", dataset="d", spend=query_pb2.PrivacySpend(target_error="abc")
            ),
        ],
    )
    assert violations_of(query) == [
        ("query.purpose", "purpose is required"),
        ("query.measures[0].id", "id must be lowercase letters, digits, underscores"),
        ("query.measures[0].dataset", "dataset is required"),
        ("query.measures[0].column", "'count' takes no column"),
        ("query.measures[0].filters[0].op", "filter operator is not set"),
        ("query.measures[0].filters[0].column", "column is required"),
        ("query.measures[0].filters[0].values[0]", "'2024-13-01' is not a date (YYYY-MM-DD)"),
        ("query.measures[0].filters[1].values", "'between' takes 2..2 values, got 1"),
        ("query.measures[0].filters[1].values[0]", "'NaN' is not a finite decimal"),
        ("query.measures[0].filters[2].values", "'is null' takes 0..0 values, got 1"),
        ("query.measures[0].filters[3].values[0]", "literal has no value"),
        ("query.measures[0].spend", "set one of epsilon, rho or target_error"),
        ("query.measures[1].column", "'sum' needs a numeric column"),
        ("query.measures[1].spend.rho", out_of_range("-1")),
        ("query.measures[2].id", "duplicate measure id 'm'"),
        ("query.measures[2].kind", "measure kind is not set"),
        ("query.measures[2].spend.target_error", "'abc' is not a decimal number"),
        ("query.group_by", "group-by columns repeat"),
    ]


def test_a_query_needs_a_measure() -> None:
    assert violations_of(query_pb2.Query(purpose="p")) == [
        ("query.measures", "at least one measure is required")
    ]


def test_violations_are_field_violations() -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_query(one_count(epsilon="0"))
    assert info.value.violations == (
        FieldViolation("query.measures[0].spend.epsilon", out_of_range("0")),
    )


def out_of_range(text: str) -> str:
    return f"must be a decimal in [0.000001, 1000] with at most 30 digits, got '{text}'"


# --- amounts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["epsilon", "rho", "target_error"])
@pytest.mark.parametrize(
    "text",
    [
        *("NaN", "nan", "sNaN", "inf", "-Infinity", "-1", "-0.5", "0", "0.000", "-0", "1e9"),
        *("1000.1", "0.0000009", "1e-400", "1e-10000000", "1e10000000", "1." + "1" * 30),
    ],
)
def test_amount_outside_the_allowed_range_is_refused(which: str, text: str) -> None:
    assert violations_of(one_count(**{which: text})) == [
        (f"query.measures[0].spend.{which}", out_of_range(text))
    ]


@pytest.mark.parametrize("text", ["abc", "", "0x10", "1/2", "1,5", "one"])
def test_amount_that_is_not_a_decimal_is_refused(text: str) -> None:
    assert violations_of(one_count(epsilon=text)) == [
        ("query.measures[0].spend.epsilon", f"'{text}' is not a decimal number")
    ]


@pytest.mark.parametrize(
    ("text", "exact"),
    [
        ("0.1", Fraction(1, 10)),
        ("0.3", Fraction(3, 10)),
        ("1", Fraction(1)),
        ("2.50", Fraction(5, 2)),
        ("1e-3", Fraction(1, 1000)),
        ("1000", Fraction(1000)),
        ("0.000001", Fraction(1, 10**6)),
    ],
)
@pytest.mark.parametrize("which", ["epsilon", "rho", "target_error"])
def test_amount_is_the_exact_fraction_of_its_decimal_text(
    which: str, text: str, exact: Fraction
) -> None:
    spend = parse_query(one_count(**{which: text})).measures[0].spend
    assert getattr(spend, which) == exact
    assert type(getattr(spend, which)) is Fraction
    others = {"epsilon", "rho", "target_error"} - {which}
    assert all(getattr(spend, other) is None for other in others)
    assert spend.canonical() == {which: str(exact)}


@pytest.mark.parametrize("which", ["epsilon", "rho", "target_error"])
def test_an_accepted_amount_can_be_planned(which: str) -> None:
    """Whatever the parser accepts, the planner turns into a noise plan (or a domain error).

    A tiny but positive amount such as ``1e-400`` passes the parser's range check and then
    crashes ``plan_noise`` with OverflowError / ZeroDivisionError (an INTERNAL error for the
    caller) instead of being refused as INVALID_QUERY on the field.
    """
    try:
        form = parse_query(one_count(**{which: "1e-400"}))
    except InvalidQuery as err:
        assert [v.field for v in err.violations] == [f"query.measures[0].spend.{which}"]
        return
    plan = plan_noise(Sensitivity(1, 1), form.measures[0].spend)
    assert plan.scale > 0
    assert plan.rho > 0


# --- literals -------------------------------------------------------------------------------------


def test_literals_keep_their_type() -> None:
    form = parse_query(
        query_pb2.Query(
            purpose="p",
            measures=[
                count(
                    "m",
                    "civil.residents",
                    where("community", "=", "C001"),
                    where("birth_year", "between", 1950, 1960),
                    where("low_income", "=", False),
                    where("amount", ">=", Decimal("12.50")),
                    where("opened", "<", dt.date(2024, 2, 29)),
                    where("street", "is null"),
                    epsilon="1",
                )
            ],
        )
    )
    values = [f.values for f in form.measures[0].filters]
    assert values == [
        ("C001",),
        (1950, 1960),
        (False,),
        (Decimal("12.50"),),
        (dt.date(2024, 2, 29),),
        (),
    ]
    assert [type(v[0]) for v in values[:-1]] == [str, int, bool, Decimal, dt.date]
    assert [f.op for f in form.measures[0].filters] == ["=", "between", "=", ">=", "<", "is null"]


def test_decimal_literals_that_are_not_finite_are_refused() -> None:
    query = query_pb2.Query(
        purpose="p",
        measures=[
            query_pb2.Measure(
                id="m",
                dataset="d",
                kind=query_pb2.MEASURE_KIND_COUNT,
                spend=query_pb2.PrivacySpend(epsilon="1"),
                filters=[
                    query_pb2.Filter(
                        column="x",
                        op=query_pb2.FILTER_OP_IN,
                        values=[
                            query_pb2.Literal(decimal_value=text)
                            for text in ("Infinity", "-inf", "nan", "1.2.3", "12")
                        ],
                    )
                ],
            )
        ],
    )
    assert violations_of(query) == [
        (f"query.measures[0].filters[0].values[{i}]", f"'{text}' is not a finite decimal")
        for i, text in enumerate(("Infinity", "-inf", "nan", "1.2.3"))
    ]


# --- the canonical digest -------------------------------------------------------------------------

LiteralType = str
OPS = ["=", "!=", "<", "<=", ">", ">=", "in", "between"]


@dataclass(frozen=True)
class FilterSpec:
    column: str
    op: str
    kind: LiteralType
    values: tuple[object, ...]


@dataclass(frozen=True)
class MeasureSpec:
    id: str
    dataset: str
    kind: str
    filters: tuple[FilterSpec, ...]
    spend: tuple[str, str]


def literal(kind: LiteralType, value: object) -> query_pb2.Literal:
    if kind == "decimal":
        return query_pb2.Literal(decimal_value=str(value))
    if kind == "date":
        assert isinstance(value, dt.date)
        return query_pb2.Literal(date_value=value.isoformat())
    return query_pb2.Literal(**{f"{kind}_value": value})


def build(purpose: str, measures: list[MeasureSpec], group_by: list[str]) -> QueryForm:
    return parse_query(
        query_pb2.Query(
            purpose=purpose,
            group_by=group_by,
            measures=[
                query_pb2.Measure(
                    id=m.id,
                    dataset=m.dataset,
                    kind=query_pb2.MEASURE_KIND_COUNT
                    if m.kind == "count"
                    else query_pb2.MEASURE_KIND_COUNT_PERSONS,
                    spend=query_pb2.PrivacySpend(**{m.spend[0]: m.spend[1]}),
                    filters=[
                        query_pb2.Filter(
                            column=f.column,
                            op=FILTER_OP_NUMBERS[f.op],
                            values=[literal(f.kind, v) for v in f.values],
                        )
                        for f in m.filters
                    ],
                )
                for m in measures
            ],
        )
    )


VALUES: dict[LiteralType, st.SearchStrategy[object]] = {
    "string": st.text(max_size=6),
    "int": st.integers(-(10**6), 10**6),
    "bool": st.booleans(),
    "decimal": st.decimals(
        min_value=-1000, max_value=1000, places=2, allow_nan=False, allow_infinity=False
    ),
    "date": st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2100, 1, 1)),
}


def fresh(kind: LiteralType, taken: tuple[object, ...]) -> object | None:
    """A literal of ``kind`` different from every value in ``taken`` (None if there is none)."""
    if kind == "string":
        return "~".join(str(t) for t in taken) + "!"
    if kind == "bool":
        missing = {True, False} - set(taken)
        return missing.pop() if missing else None
    if kind == "date":
        return max(taken) + dt.timedelta(days=1)
    return max(taken) + 1


@st.composite
def filter_specs(draw: st.DrawFn, types: tuple[LiteralType, ...]) -> FilterSpec:
    op = draw(st.sampled_from(OPS))
    kind = draw(st.sampled_from(types))
    size = {"in": draw(st.integers(1, 4)), "between": 2}.get(op, 1)
    # IN lists are sets: their values are distinct (Decimal 1.0 == 1.00 counts as one value).
    values = draw(st.lists(VALUES[kind], min_size=size, max_size=size, unique=op == "in"))
    column = draw(st.sampled_from(["a", "b", "c"]))
    return FilterSpec(column, op, kind, tuple(values))


@st.composite
def query_specs(
    draw: st.DrawFn, types: tuple[LiteralType, ...]
) -> tuple[str, list[MeasureSpec], list[str]]:
    ids = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3, unique=True))
    measures = [
        MeasureSpec(
            id=measure_id,
            dataset=draw(st.sampled_from(["civil.residents", "org.members"])),
            kind=draw(st.sampled_from(["count", "count_persons"])),
            filters=tuple(draw(st.lists(filter_specs(types), max_size=3))),
            spend=(
                draw(st.sampled_from(["epsilon", "rho", "target_error"])),
                draw(st.sampled_from(["0.1", "0.5", "1", "2.25"])),
            ),
        )
        for measure_id in ids
    ]
    group_by = draw(st.lists(st.sampled_from(["community", "sex"]), unique=True))
    return draw(st.sampled_from(["p", "q"])), measures, group_by


TYPE_FAMILIES = [
    pytest.param(("string", "int", "bool"), id="string-int-bool"),
    pytest.param(("decimal", "date"), id="decimal-date"),
]


@pytest.mark.parametrize("types", TYPE_FAMILIES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_digest_ignores_the_order_of_measures_filters_and_in_values(
    types: tuple[LiteralType, ...], data: st.DataObject
) -> None:
    purpose, measures, group_by = data.draw(query_specs(types))
    original = build(purpose, measures, group_by)

    shuffled = []
    for m in data.draw(st.permutations(measures)):
        filters = [
            replace(f, values=tuple(data.draw(st.permutations(f.values)))) if f.op == "in" else f
            for f in data.draw(st.permutations(m.filters))
        ]
        shuffled.append(replace(m, filters=tuple(filters)))
    permuted = build(purpose, shuffled, group_by)

    assert permuted.digest == original.digest
    assert permuted.canonical_json() == original.canonical_json()


@pytest.mark.parametrize("types", TYPE_FAMILIES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_digest_changes_when_any_literal_changes(
    types: tuple[LiteralType, ...], data: st.DataObject
) -> None:
    purpose, measures, group_by = data.draw(query_specs(types))
    places = [
        (i, j, k)
        for i, m in enumerate(measures)
        for j, f in enumerate(m.filters)
        for k in range(len(f.values))
        if fresh(f.kind, f.values) is not None
    ]
    if not places:
        return  # no literal to change; the other examples cover this property
    i, j, k = data.draw(st.sampled_from(places))
    target = measures[i].filters[j]
    values = list(target.values)
    values[k] = fresh(target.kind, target.values)
    changed = list(measures)
    filters = list(changed[i].filters)
    filters[j] = replace(target, values=tuple(values))
    changed[i] = replace(changed[i], filters=tuple(filters))

    assert build(purpose, changed, group_by).digest != build(purpose, measures, group_by).digest


def test_digest_of_an_in_list_of_dates_or_decimals() -> None:
    """IN lists are deduplicated through a set of canonical literals; dates and decimals
    canonicalise to dicts, which are unhashable, so the digest raised TypeError."""
    dates = parse_query(
        query_pb2.Query(
            purpose="casework-monitoring",
            measures=[
                count(
                    "m",
                    "events.cases",
                    where("opened", "in", dt.date(2024, 2, 1), dt.date(2024, 1, 1)),
                    epsilon="1",
                )
            ],
        )
    )
    same_dates = parse_query(
        query_pb2.Query(
            purpose="casework-monitoring",
            measures=[
                count(
                    "m",
                    "events.cases",
                    where("opened", "in", dt.date(2024, 1, 1), dt.date(2024, 2, 1)),
                    epsilon="1",
                )
            ],
        )
    )
    assert dates.digest == same_dates.digest
    assert len(dates.digest) == 64


def test_digest_normalises_decimal_spelling_and_depends_on_spend_and_group_by() -> None:
    def form(value: str, spend: str = "1", group_by: tuple[str, ...] = ()) -> QueryForm:
        return parse_query(
            query_pb2.Query(
                purpose="p",
                group_by=list(group_by),
                measures=[
                    count(
                        "m", "org.activities", where("hours", ">=", Decimal(value)), epsilon=spend
                    )
                ],
            )
        )

    assert form("1.50").digest == form("1.5").digest
    assert form("1.5").digest != form("1.6").digest
    assert form("1.5", spend="0.10").digest == form("1.5", spend="0.1").digest
    assert form("1.5", spend="0.2").digest != form("1.5", spend="0.1").digest
    assert form("1.5", group_by=("branch",)).digest != form("1.5").digest
