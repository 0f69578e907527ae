"""Cost of the silo's contribution-bounded release SQL against the plain aggregate on the same engine.

Baseline: ``SELECT g, count(*)`` and ``SELECT g, sum(column)`` ``... GROUP BY g`` on the silo's own
DuckDB engine (same memory limit and threads), no bounding, no clamping. Release SQL: what the
silo runs, under the plan it would choose:

- ``civil.residents`` (one row per person, verified at start-up): the one-row plan;
- ``civil.subsidies`` and ``org.activities`` (many rows per person): the excess plan, whose
  start-up preparation is timed separately, and the same plan with the excess rows computed in the
  query (``inline``: what the silo runs when none were prepared).

Every case runs in a fresh child process, like a silo, and reports that process's peak RSS (the
target is 1 GB at 10 million rows). Reports the median of several runs per query and the ratio to
the baseline of the same run. Issue 4's targets: <= 1.5x one-row, <= 3x multi-row.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from gateway.demo.synthetic import generate_departments
from gateway.policy.loader import load_bundle
from gateway.query.form import MeasureForm, MeasureKind, Spend
from gateway.silo.engine import DuckDbEngine
from gateway.silo.sql import CompiledSql, compile_release_sql, quote

REPO = Path(__file__).resolve().parents[1]
RUNS = 5
INLINE_RUNS = 3  # ranks the excess persons in every query: seconds at 10 million rows


@dataclass(frozen=True)
class Case:
    silo: str
    dataset: str
    group: str
    column: str  # summed


CASES = (
    Case("civil", "civil.residents", "community", "household_size"),
    Case("civil", "civil.subsidies", "community", "amount"),
    Case("org", "org.activities", "branch", "hours"),
)


def _median_ms(engine: DuckDbEngine, compiled: CompiledSql, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        asyncio.run(engine.fetch(compiled))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _peak_rss_mb() -> float:
    """This process's peak RSS since it started (``VmHWM``). Not ``ru_maxrss``: Linux keeps in it
    the peak of the forked copy of the parent before ``exec``, here the 1 GB data generator."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def _measure(case: Case, database: Path, out: multiprocessing.SimpleQueue[str]) -> None:
    """One silo-like process: open the engine, prepare what the silo prepares, time the SQL."""
    bundle = load_bundle(REPO / "policies")
    dataset = bundle.datasets[case.dataset]
    # No exact-result cache: every timed run must execute its SQL (the silo's cache would answer
    # the second run of the same SQL from memory, for the release and the baseline alike).
    engine = DuckDbEngine(database, result_cache_entries=0)
    lines: list[str] = []
    try:
        table, group = quote(dataset.table), quote(case.group)
        [(rows,)] = asyncio.run(engine.fetch(CompiledSql(f"SELECT count(*) FROM {table}", ())))
        one_row = dataset.max_rows_per_person == 1 and engine.is_unique(
            dataset.table, dataset.privacy_unit
        )
        excess: tuple[str, str] | None = None
        if not one_row:
            started = time.perf_counter()
            excess = engine.prepare_excess_rows(dataset)
            prepared = time.perf_counter() - started
            [(excess_rows,)] = asyncio.run(
                engine.fetch(
                    CompiledSql(f"SELECT count(*) FROM {'.'.join(map(quote, excess))}", ())
                )
            )
            lines.append(
                f"release_sql {case.dataset:<16} excess rows prepared at start-up: "
                f"{excess_rows:,} in {prepared:.2f} s"
            )
        kinds: tuple[tuple[MeasureKind, str, str], ...] = (
            ("count", "", "count(*)"),
            ("sum", case.column, f"sum({quote(case.column)})"),
        )
        for kind, column, plain in kinds:
            baseline = CompiledSql(f"SELECT {group}, {plain} FROM {table} GROUP BY {group}", ())
            measure = MeasureForm("m", case.dataset, kind, column, (), Spend(epsilon=Fraction(1)))
            plans = {
                "one-row" if one_row else "excess": (
                    RUNS,
                    {"one_row_per_person": one_row, "excess_table": excess},
                )
            }
            if not one_row:
                plans["inline"] = (INLINE_RUNS, {})
            base_ms = _median_ms(engine, baseline, RUNS)
            for plan, (runs, options) in plans.items():
                compiled = compile_release_sql(measure, dataset, (case.group,), **options)  # type: ignore[arg-type]
                release_ms = _median_ms(engine, compiled, runs)
                lines.append(
                    f"release_sql {case.dataset:<16} rows={rows:>11,} {kind:<5} plan={plan:<7} "
                    f"plain={base_ms:8.1f} ms release={release_ms:8.1f} ms "
                    f"ratio={release_ms / base_ms:5.2f}x"
                )
    finally:
        engine.close()
    peak_mb = _peak_rss_mb()
    lines.append(f"release_sql {case.dataset:<16} peak RSS of the silo process: {peak_mb:,.0f} MB")
    out.put("\n".join(lines))


def run(people: int, data: Path | None = None) -> None:
    """Generate ``people`` residents (or use the databases in ``data``) and time every case."""
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            sys.stdout.write(f"release_sql: generating {people:,} people ...\n")
            files = generate_departments(Path(tmp), people, seed=1)
        else:
            files = {case.silo: data / f"{case.silo}.duckdb" for case in CASES}
        context = multiprocessing.get_context("spawn")
        for case in CASES:
            out: multiprocessing.SimpleQueue[str] = context.SimpleQueue()
            child = context.Process(target=_measure, args=(case, files[case.silo], out))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"release_sql: {case.dataset} failed (exit {child.exitcode})")
            sys.stdout.write(out.get() + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    # python -m bench.release_sql PEOPLE [DATA_DIR]
    run(int(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
