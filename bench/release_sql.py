"""Cost of the silo's contribution-bounded SQL against the plain aggregate on the same DuckDB file.

Baseline: ``SELECT community, count(*) ... GROUP BY community`` (no bounding, no privacy). The
release SQL adds per-person bounding; issue 4 asks to bring its ratio down from the 6x-24x that a
plain ROW_NUMBER window costs. Reports the median of several runs per query.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from gateway.api.v1 import query_pb2
from gateway.client import count
from gateway.demo.synthetic import generate_departments
from gateway.policy.loader import load_bundle
from gateway.query.form import parse_query
from gateway.silo.sql import compile_release_sql

REPO = Path(__file__).resolve().parents[1]
RUNS = 5


def _median_seconds(
    db: duckdb.DuckDBPyConnection, sql: str, parameters: tuple[object, ...]
) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        db.execute(sql, parameters).fetchall()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(people: int) -> None:
    bundle = load_bundle(REPO / "policies")
    with tempfile.TemporaryDirectory() as tmp:
        sys.stdout.write(f"release_sql: generating {people:,} people ...\n")
        files = generate_departments(Path(tmp), people, seed=1)
        cases = [("civil", "residents", "civil.residents"), ("org", "activities", "org.activities")]
        for silo, table, dataset_name in cases:
            dataset = bundle.datasets[dataset_name]
            group = "community" if "community" in dataset.columns else "branch"
            with duckdb.connect(str(files[silo]), read_only=True) as db:
                rows = db.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                baseline_sql = f'SELECT "{group}", count(*) FROM "{table}" GROUP BY "{group}"'
                baseline = _median_seconds(db, baseline_sql, ())
                measure = parse_query(
                    query_pb2.Query(
                        purpose="bench",
                        measures=[count("m", dataset_name, epsilon="1")],
                        group_by=[group],
                    )
                ).measures[0]
                compiled = compile_release_sql(measure, dataset, (group,))
                bounded = _median_seconds(db, compiled.sql, compiled.parameters)
            sys.stdout.write(
                f"release_sql {dataset_name:<16} rows={rows[0] if rows else 0:>11,} "
                f"plain={baseline * 1000:8.1f} ms bounded={bounded * 1000:8.1f} ms "
                f"ratio={bounded / baseline:6.2f}x (max_rows_per_person={dataset.max_rows_per_person})\n"
            )
