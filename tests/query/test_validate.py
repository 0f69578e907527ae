"""Checking a parsed query against the datasets, columns and key sets the bundle declares."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

import pytest

from gateway.api.v1 import query_pb2
from gateway.client.client import count, count_persons, where
from gateway.errors import InvalidQuery
from gateway.policy.model import Bundle, Column, Dataset
from gateway.query.form import QueryForm, parse_query
from gateway.query.validate import group_keys, validate_against_policy


def query(*measures: query_pb2.Measure, group_by: tuple[str, ...] = ()) -> QueryForm:
    return parse_query(
        query_pb2.Query(purpose="p", measures=list(measures), group_by=list(group_by))
    )


def violations(form: QueryForm, bundle: Bundle) -> tuple[str, list[tuple[str, str]]]:
    with pytest.raises(InvalidQuery) as info:
        validate_against_policy(form, bundle)
    err = info.value
    assert err.metadata["violations"] == str(len(err.violations))
    assert err.message == f"{err.violations[0].field}: {err.violations[0].description}"
    return err.reason, [(v.field, v.description) for v in err.violations]


def test_a_valid_query_passes(demo_bundle: Bundle) -> None:
    form = query(
        count(
            "a",
            "civil.residents",
            where("sex", "in", "F", "M"),
            where("birth_year", "between", 1940, 1966),
            where("low_income", "=", True),
            epsilon="1",
        ),
        count_persons("b", "org.members", where("floating_member", "=", False), epsilon="1"),
        group_by=("community",),
    )
    assert validate_against_policy(form, demo_bundle) is None


def test_unknown_dataset(demo_bundle: Bundle) -> None:
    form = query(
        count("a", "civil.residents", epsilon="1"), count("b", "civil.people", epsilon="1")
    )
    with pytest.raises(InvalidQuery) as info:
        validate_against_policy(form, demo_bundle)
    assert info.value.reason == "UNKNOWN_DATASET"
    assert info.value.metadata == {"violations": "1", "dataset": "civil.people"}
    assert [(v.field, v.description) for v in info.value.violations] == [
        ("query.measures[1].dataset", "unknown dataset 'civil.people'")
    ]


@pytest.mark.parametrize(
    ("column", "value", "column_type"),
    [
        ("birth_year", "1950", "int"),
        ("birth_year", True, "int"),  # a bool is not an int, although Python says it is
        ("birth_year", Decimal("1950.5"), "int"),
        ("low_income", 1, "bool"),
        ("low_income", "true", "bool"),
        ("sex", 1, "category"),
        ("sex", True, "category"),
    ],
)
def test_literal_of_the_wrong_type(
    demo_bundle: Bundle, column: str, value: object, column_type: str
) -> None:
    form = query(count("a", "civil.residents", where(column, "=", value), epsilon="1"))
    assert violations(form, demo_bundle) == (
        "INVALID_QUERY",
        [
            (
                "query.measures[0].filters[0].values[0]",
                f"column '{column}' is {column_type}; the literal does not fit",
            )
        ],
    )


def test_literal_types_that_fit(demo_bundle: Bundle) -> None:
    form = query(
        count(
            "a",
            "events.cases",
            where("opened", ">=", dt.date(2025, 1, 1)),
            where("days_to_close", "<", 30),
            epsilon="1",
        ),
        count("b", "org.activities", where("hours", ">=", 2), epsilon="1"),  # int fits decimal
        count("c", "org.activities", where("hours", "<", Decimal("2.5")), epsilon="1"),
    )
    assert validate_against_policy(form, demo_bundle) is None


def test_date_column_refuses_a_string(demo_bundle: Bundle) -> None:
    form = query(count("a", "events.cases", where("opened", ">=", "2025-01-01x"), epsilon="1"))
    assert violations(form, demo_bundle)[1] == [
        (
            "query.measures[0].filters[0].values[0]",
            "column 'opened' is date; the literal does not fit",
        )
    ]


def test_category_literal_not_in_the_key_set(demo_bundle: Bundle) -> None:
    form = query(
        count("a", "civil.residents", where("community", "in", "C001", "C999", "c002"), epsilon="1")
    )
    assert violations(form, demo_bundle) == (
        "INVALID_QUERY",
        [
            (
                "query.measures[0].filters[0].values[1]",
                "'C999' is not a key of key set 'communities'",
            ),
            (
                "query.measures[0].filters[0].values[2]",
                "'c002' is not a key of key set 'communities'",
            ),
        ],
    )


def test_filter_on_an_undeclared_column(demo_bundle: Bundle) -> None:
    form = query(count("a", "civil.residents", where("salary", ">", 1), epsilon="1"))
    assert violations(form, demo_bundle)[1] == [
        ("query.measures[0].filters[0].column", "'civil.residents' has no column 'salary'")
    ]


@pytest.mark.parametrize("column", ["birth_year", "low_income", "no_such_column"])
def test_group_by_column_that_is_not_a_category(demo_bundle: Bundle, column: str) -> None:
    form = query(count("a", "civil.residents", epsilon="1"), group_by=(column,))
    assert violations(form, demo_bundle) == (
        "INVALID_QUERY",
        [("query.group_by", f"'{column}' is not a category column of 'civil.residents'")],
    )


def test_group_by_must_exist_in_every_measured_dataset(demo_bundle: Bundle) -> None:
    form = query(
        count("a", "civil.residents", epsilon="1"),
        count("b", "org.members", epsilon="1"),
        group_by=("street",),  # civil.residents has it, org.members does not
    )
    assert violations(form, demo_bundle)[1] == [
        ("query.group_by", "'street' is not a category column of 'org.members'")
    ]


def test_group_by_bound_to_different_key_sets_cannot_be_merged(demo_bundle: Bundle) -> None:
    other = Dataset(
        silo="civil",
        table="other",
        population="city-residents",
        columns={"community": Column(type="category", key_set="streets")},
    )
    bundle = dataclasses.replace(
        demo_bundle, datasets={**demo_bundle.datasets, "civil.other": other}
    )
    form = query(
        count("a", "civil.residents", epsilon="1"),
        count("b", "civil.other", epsilon="1"),
        group_by=("community",),
    )
    assert violations(form, bundle)[1] == [
        (
            "query.group_by",
            "'community' takes its keys from key set 'communities' in one dataset and from key "
            "set 'streets' in 'civil.other'; measures cannot be merged",
        )
    ]


def test_every_violation_is_reported_and_unknown_dataset_wins_the_reason(
    demo_bundle: Bundle,
) -> None:
    form = query(
        count("a", "civil.residents", where("sex", "=", "X"), where("age", "<", 3), epsilon="1"),
        count("b", "nowhere.table", epsilon="1"),
        group_by=("sex",),
    )
    reason, found = violations(form, demo_bundle)
    assert reason == "UNKNOWN_DATASET"
    assert found == [
        ("query.measures[0].filters[0].values[0]", "'X' is not a key of key set 'sexes'"),
        ("query.measures[0].filters[1].column", "'civil.residents' has no column 'age'"),
        ("query.measures[1].dataset", "unknown dataset 'nowhere.table'"),
    ]


def test_group_keys_are_every_combination_in_key_set_order(demo_bundle: Bundle) -> None:
    form = query(count("a", "civil.residents", epsilon="1"), group_by=("district", "sex"))
    keys = group_keys(form, demo_bundle)
    assert keys == [(d, s) for d in ("D01", "D02", "D03", "D04") for s in ("F", "M")]
    assert group_keys(query(count("a", "civil.residents", epsilon="1")), demo_bundle) == [()]
    by_community = group_keys(
        query(count("a", "civil.residents", epsilon="1"), group_by=("community",)), demo_bundle
    )
    assert by_community == [(k,) for k in demo_bundle.key_sets["communities"]]
