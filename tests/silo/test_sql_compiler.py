"""The silo's SQL compiler: golden SQL, literals only as parameters, quoted identifiers.

Golden cases (input and expected SQL + parameters) live in ``golden/release_sql.yaml``, sqlglot
style: every measure kind under each bounding plan (excess rows computed in the query, stored at
start-up, one row per person). Refresh them with ``SILOGATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/silo`` and review the
diff. Every golden SQL also runs on a real in-memory DuckDB table, so a golden file can never
hold SQL that the engine rejects.
"""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from gateway.policy.model import Dataset
from gateway.privacy.sensitivity import components
from gateway.query.form import FilterForm, LiteralValue, MeasureForm, Spend
from gateway.silo.sql import CompiledSql, compile_excess_rows, compile_release_sql, quote

GOLDEN = Path(__file__).resolve().parent / "golden" / "release_sql.yaml"
UPDATE_GOLDEN = os.environ.get("SILOGATE_UPDATE_GOLDEN") == "1"
SQL_TYPES = {
    "category": "VARCHAR",
    "int": "BIGINT",
    "decimal": "DECIMAL(18, 3)",
    "bool": "BOOLEAN",
    "date": "DATE",
}


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.width = 4096  # one SQL statement per line, never folded
    yaml.indent(mapping=2, sequence=2, offset=0)
    return yaml


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    return str(node) if isinstance(node, str) else node


def literal_from_yaml(value: Any) -> LiteralValue:
    if isinstance(value, dict):
        [(tag, text)] = value.items()
        return Decimal(text) if tag == "decimal" else dt.date.fromisoformat(text)
    assert isinstance(value, str | int | bool)
    return value


def literal_to_yaml(value: object) -> object:
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, dt.date):
        return {"date": value.isoformat()}
    return value


def load_golden() -> dict[str, Any]:
    document: dict[str, Any] = _plain(_yaml().load(GOLDEN.read_text(encoding="utf-8")))
    return document


GOLDEN_DOC = load_golden()
DATASETS = {
    name: Dataset(silo="silo", population="people", **spec)
    for name, spec in GOLDEN_DOC["datasets"].items()
}


PLANS = ("inline", "excess", "one_row")


def measure_of(case_input: dict[str, Any]) -> MeasureForm:
    filters = tuple(
        FilterForm(column, op, tuple(literal_from_yaml(v) for v in values))
        for column, op, *values in case_input.get("filters", [])
    )
    return MeasureForm(
        id="m",
        dataset="silo." + DATASETS[case_input["dataset"]].table,
        kind=case_input["kind"],
        column=case_input.get("column", ""),
        filters=filters,
        spend=Spend(epsilon=Fraction(1)),
        bins=tuple(Decimal(str(edge)) for edge in case_input.get("bins", [])),
    )


def compile_case(case_input: dict[str, Any]) -> CompiledSql:
    dataset = DATASETS[case_input["dataset"]]
    plan = case_input.get("plan", "inline")
    assert plan in PLANS
    return compile_release_sql(
        measure_of(case_input),
        dataset,
        tuple(case_input.get("group_by", [])),
        one_row_per_person=plan == "one_row",
        excess_table=("scratch", dataset.table) if plan == "excess" else None,
    )


def duckdb_with_empty_tables() -> duckdb.DuckDBPyConnection:
    db = duckdb.connect()
    for dataset in DATASETS.values():
        columns = [f"{quote(dataset.privacy_unit)} VARCHAR"] + [
            f"{quote(name)} {SQL_TYPES[column.type]}" for name, column in dataset.columns.items()
        ]
        db.execute(f"CREATE TABLE {quote(dataset.table)} ({', '.join(columns)})")
    db.execute("CREATE SCHEMA scratch")
    return db


def store_excess_rows(db: duckdb.DuckDBPyConnection) -> None:
    """What the silo does at start-up for the excess plan."""
    for dataset in DATASETS.values():
        excess = compile_excess_rows(dataset)
        db.execute(
            f"CREATE OR REPLACE TABLE scratch.{quote(dataset.table)} AS {excess.sql}",
            excess.parameters,
        )


def rewrite_expected(name: str, expected: dict[str, Any]) -> None:
    yaml = _yaml()
    document = yaml.load(GOLDEN.read_text(encoding="utf-8"))
    [case] = [c for c in document["cases"] if c["name"] == name]
    case["expected"] = expected
    with GOLDEN.open("w", encoding="utf-8") as handle:
        yaml.dump(document, handle)


@pytest.mark.parametrize("case", GOLDEN_DOC["cases"], ids=lambda case: case["name"])
def test_compiled_sql_matches_golden_file(case: dict[str, Any]) -> None:
    compiled = compile_case(case["input"])
    actual = {
        "sql": compiled.sql,
        "parameters": [literal_to_yaml(p) for p in compiled.parameters],
    }
    if UPDATE_GOLDEN:
        rewrite_expected(case["name"], actual)
        case = {**case, "expected": actual}
    assert "expected" in case, "no expected output; run with SILOGATE_UPDATE_GOLDEN=1"
    assert actual == case["expected"]
    # Golden parameters keep their types (a date stays a date, 1 never becomes True).
    assert [type(p) for p in compiled.parameters] == [
        type(literal_from_yaml(p)) for p in case["expected"]["parameters"]
    ]


@pytest.mark.parametrize("case", GOLDEN_DOC["cases"], ids=lambda case: case["name"])
def test_golden_sql_runs_on_duckdb(case: dict[str, Any]) -> None:
    compiled = compile_case(case["input"])
    db = duckdb_with_empty_tables()
    store_excess_rows(db)
    rows = db.execute(compiled.sql, compiled.parameters).fetchall()
    case_input = case["input"]
    width = len(
        components(
            DATASETS[case_input["dataset"]],
            measure_of(case_input),
            tuple(case_input.get("group_by", [])),
        )
    )
    # An empty table: no groups (or bins), or the one global row of zeros.
    grouped = bool(case_input.get("group_by")) or case_input["kind"] == "histogram"
    assert rows == ([] if grouped else [(0,) * width])


def test_golden_cases_cover_every_operator_measure_and_plan() -> None:
    ops = {f[1] for case in GOLDEN_DOC["cases"] for f in case["input"].get("filters", [])}
    assert ops == {"=", "!=", "<", "<=", ">", ">=", "in", "between", "is null"}
    covered = {
        (case["input"]["kind"], case["input"].get("plan", "inline")) for case in GOLDEN_DOC["cases"]
    }
    kinds = ("count", "count_persons", "sum", "mean", "histogram")
    assert covered == {(kind, plan) for kind in kinds for plan in PLANS}


def test_identifiers_are_quoted() -> None:
    compiled = compile_case(
        {
            "dataset": "activities",
            "kind": "count_persons",
            "group_by": ["branch"],
            "filters": [["hours", ">", 1]],
        }
    )
    for identifier in ("activities", "member_key", "branch", "hours"):
        assert f'"{identifier}"' in compiled.sql
        bare = compiled.sql.replace(f'"{identifier}"', "")
        assert identifier not in bare, f"{identifier} appears unquoted"
    assert quote('we"ird') == '"we""ird"'
    assert quote("select") == '"select"'


def test_bounds_and_bin_edges_are_parameters_not_text() -> None:
    compiled = compile_case({"dataset": "activities", "kind": "count"})
    # Persons beyond 20 rows or 3 category tuples; rows ranked 20 or less in tuples ranked 3 or less.
    assert compiled.parameters == (20, 3, 20, 3)
    assert "20" not in compiled.sql
    histogram = compile_case(
        {"dataset": "activities", "kind": "histogram", "column": "hours", "bins": ["0.25", "7.75"]}
    )
    assert Decimal("0.25") in histogram.parameters and Decimal("7.75") in histogram.parameters
    assert "0.25" not in histogram.sql and "7.75" not in histogram.sql


# --- request strings never reach the SQL text -----------------------------------------------------

# Strings that would break out of a quoted SQL literal or identifier, if they were interpolated.
NASTY = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "'",
            '"',
            "';--",
            "C001'; DROP TABLE residents; --",
            '" OR 1=1 --',
            "\\'",
            "?",
            "$1",
            "%s",
            "\x00",
            "); SELECT * FROM residents; --",
        ]
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    strings=st.lists(NASTY, min_size=1, max_size=4),
    op=st.sampled_from(["=", "!=", "<", ">=", "in", "between"]),
    kind=st.sampled_from(["count", "count_persons", "sum", "mean", "histogram"]),
    plan=st.sampled_from(PLANS),
)
def test_string_literals_only_ever_become_parameters(
    strings: list[str], op: str, kind: str, plan: str
) -> None:
    values = strings[:2] if op == "between" else strings if op == "in" else strings[:1]
    if op == "between" and len(values) < 2:
        values = [*values, *values]
    case = {"dataset": "residents", "kind": kind, "group_by": ["community"], "plan": plan}
    if kind not in {"count", "count_persons"}:
        case["column"] = "birth_year"
    compiled = compile_case({**case, "filters": [["sex", op, *values]]})
    # The SQL text is the same as for harmless literals: it depends on the query's shape only.
    harmless = compile_case({**case, "filters": [["sex", op, *(["x"] * len(values))]]})
    assert compiled.sql == harmless.sql
    # Each value is bound wherever the filter applies (the table and the excess rows).
    substituted = iter(values * (len(compiled.parameters) // len(values)))
    assert compiled.parameters == tuple(
        next(substituted) if p == "x" else p for p in harmless.parameters
    )
    # The compiled text holds no string quote and no statement separator at all, so no literal
    # holding one can be in it.
    assert "'" not in compiled.sql
    assert ";" not in compiled.sql
    for value in values:
        if "'" in value or ";" in value:
            assert value not in compiled.sql


@settings(max_examples=100, deadline=None)
@given(value=NASTY, others=st.lists(NASTY, max_size=3))
def test_string_literals_are_matched_as_data_by_duckdb(value: str, others: list[str]) -> None:
    """End to end: a hostile literal filters rows exactly like any other string."""
    db = duckdb_with_empty_tables()
    rows = [(f"p{i}", value) for i in range(3)] + [
        (f"q{i}", other) for i, other in enumerate(others)
    ]
    db.executemany(
        "INSERT INTO residents (person_key, community) VALUES (?, ?)", [list(r) for r in rows]
    )
    compiled = compile_case(
        {"dataset": "residents", "kind": "count", "filters": [["community", "=", value]]}
    )
    [(matched,)] = db.execute(compiled.sql, compiled.parameters).fetchall()
    assert matched == sum(1 for _, community in rows if community == value)
    [(total,)] = db.execute("SELECT COUNT(*) FROM residents").fetchall()
    assert total == len(rows)  # nothing was dropped or altered


def test_max_rows_per_person_bounds_each_persons_rows() -> None:
    db = duckdb_with_empty_tables()
    db.executemany(
        "INSERT INTO activities (member_key, branch) VALUES (?, ?)",
        [["a", "B01"]] * 30 + [["b", "B02"]] * 5,
    )
    compiled = compile_case({"dataset": "activities", "kind": "count", "group_by": ["branch"]})
    rows = sorted(db.execute(compiled.sql, compiled.parameters).fetchall())
    assert rows == [("B01", 20), ("B02", 5)]
    persons = compile_case(
        {"dataset": "activities", "kind": "count_persons", "group_by": ["branch"]}
    )
    assert sorted(db.execute(persons.sql, persons.parameters).fetchall()) == [
        ("B01", 1),
        ("B02", 1),
    ]
