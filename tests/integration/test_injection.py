"""Classic SQL-injection payloads in every string field of a query change nothing.

Each payload goes into one field at a time (a filter value, a column name, the measured column, a
dataset name, a purpose, a group-by column, a measure id, a bin edge, the request id) through the
real gateway and silos. Every request must be refused as invalid or denied, or answered as an
ordinary query; afterwards every silo database holds the same tables with the same row counts, no
error message echoes SQL, and no budget was spent on a refused request.
"""

from __future__ import annotations

import uuid

import duckdb
import grpc
import pytest

from gateway.api.v1 import query_pb2
from gateway.client import ClientError, count, histogram, where

ELDERLY = "elderly-care-planning"
PAYLOADS = [
    "' OR '1'='1",
    "'; DROP TABLE residents; --",
    '" OR 1=1 --',
    'community"; DROP TABLE residents; --',
    "1; SELECT * FROM residents",
    "C001' UNION SELECT person_key, 1 FROM residents --",
    "') OR ('a'='a",
    "residents WHERE 1=1 --",
    "\\'; ATTACH '/tmp/x.db' AS x; --",
    "C001\x00' OR 1=1",
    "%' OR community LIKE '%",
    "$1; COPY residents TO '/tmp/leak.csv'",
]
ALLOWED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def _snapshot(system) -> dict[str, dict[str, int]]:
    out = {}
    for silo in ("civil", "org", "health", "events"):
        with duckdb.connect(str(system.data / f"{silo}.duckdb"), read_only=True) as db:
            tables = [
                str(t[0])
                for t in db.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_catalog = current_database()"
                ).fetchall()
            ]
            out[silo] = {
                t: int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])  # type: ignore[index]
                for t in tables
            }
    return out


def _variants(payload: str) -> list[tuple[str, dict[str, object]]]:
    base = {
        "purpose": ELDERLY,
        "group_by": ["district"],
        "measures": [count("n", "civil.residents", epsilon="0.1")],
    }
    return [
        ("filter value", {**base, "measures": [count("n", "civil.residents", where("community", "=", payload), epsilon="0.1")]}),
        ("filter column", {**base, "measures": [count("n", "civil.residents", where(payload, "=", "C001"), epsilon="0.1")]}),
        ("in values", {**base, "measures": [count("n", "civil.residents", where("community", "in", "C001", payload), epsilon="0.1")]}),
        ("measured column", {**base, "measures": [histogram("n", "civil.residents", payload, epsilon="0.1")]}),
        ("bin edge", {**base, "measures": [histogram("n", "civil.residents", "birth_year", bins=["1920", payload], epsilon="0.1")]}),
        ("dataset", {**base, "measures": [count("n", payload, epsilon="0.1")]}),
        ("purpose", {**base, "purpose": payload}),
        ("group-by", {**base, "group_by": [payload]}),
        ("measure id", {**base, "measures": [query_pb2.Measure(id=payload, dataset="civil.residents", kind=query_pb2.MEASURE_KIND_COUNT, spend=query_pb2.PrivacySpend(epsilon="0.1"))]}),
        ("spend", {**base, "measures": [query_pb2.Measure(id="n", dataset="civil.residents", kind=query_pb2.MEASURE_KIND_COUNT, spend=query_pb2.PrivacySpend(epsilon=payload))]}),
    ]  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_payloads_change_nothing_and_leak_nothing(system, payload) -> None:
    before = _snapshot(system)
    with system.client("civil-affairs", retries=0) as client:
        spent = {b.scope: b.spent.rho for b in client.budget()}
        for field, query in _variants(payload):
            with pytest.raises(ClientError) as caught:
                client.query(**query)  # type: ignore[arg-type]
            error = caught.value
            assert error.code in ALLOWED_CODES, (field, error.code, error.message)
            assert error.reason, field
            # Refused before SQL: no engine error (DuckDB's start with their kind) reaches anyone.
            text = error.message.upper()
            assert not any(
                marker in text
                for marker in ("DUCKDB", "PARSER ERROR", "BINDER ERROR", "CATALOG ERROR")
            ), (field, error.message)
        # The request id is the caller's own string: stored and echoed, never executed.
        rid = f"{payload}-{uuid.uuid4()}"
        result = client.query(
            purpose=ELDERLY,
            measures=[count(f"n_{uuid.uuid4().hex[:8]}", "civil.residents", epsilon="0.1")],
            group_by=["district"],
            request_id=rid,
        )
        assert result.request_id == rid and len(result.rows) == 4
        after_spent = {b.scope: b.spent.rho for b in client.budget()}
    assert _snapshot(system) == before
    # Only the one ordinary query spent anything.
    changed = {k for k in after_spent if after_spent[k] != spent.get(k)}
    assert changed and all(k.startswith(("consumer:civil-affairs", "population:")) for k in changed)
