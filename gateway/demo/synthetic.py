"""Generate the synthetic department databases: one DuckDB file per silo, deterministic for a seed.

A city of ``people`` residents is drawn chunk by chunk (``CHUNK_PEOPLE`` at a time) so that ten
million people fit in a few GB. Randomness comes only from ``SeedSequence(seed)``: one child stream
draws the city-wide profile, and every chunk gets its own child, split again into one stream for the
people and one per department. A chunk's rows therefore depend only on the seed and the chunk's
position, never on the order in which chunks are processed, and one department's tables never shift
another's.

Files are written under temporary names and moved into place only when all four are complete, so a
failed or interrupted run leaves the previous databases intact. This module writes synthetic data
only; it must never read real records.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gateway.demo._population import make_city_profile, make_population
from gateway.demo._tables import Department
from gateway.demo.departments import DEPARTMENTS
from gateway.demo.geography import COMMUNITIES

# Chunks of a million people keep the peak near 1 GB (measured for ten million people).
CHUNK_PEOPLE = 1_000_000
MIN_PEOPLE = len(COMMUNITIES)
_SEED_LIMIT = 2**64


def generate_departments(
    out_dir: Path, people: int, seed: int, *, progress: bool = False
) -> dict[str, Path]:
    """Write ``org.duckdb``, ``civil.duckdb``, ``health.duckdb``, ``events.duckdb`` in ``out_dir``.

    ``people`` residents (at least one per community, so at least ``MIN_PEOPLE``) are generated from
    ``seed`` (0 <= seed < 2**64); the same ``(people, seed)`` always gives the same rows in the same
    order. Existing files of the same names are replaced. ``progress`` shows a progress bar on the
    terminal. Returns the path of each silo's database by silo name.
    """
    if people < MIN_PEOPLE:
        raise ValueError(f"people must be at least {MIN_PEOPLE} (one per community), got {people}")
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    out_dir.mkdir(parents=True, exist_ok=True)
    city_seed, chunks_seed = np.random.SeedSequence(seed).spawn(2)
    city = make_city_profile(_generator(city_seed))
    chunk_seeds = chunks_seed.spawn(math.ceil(people / CHUNK_PEOPLE))

    paths = {department.silo: out_dir / f"{department.silo}.duckdb" for department in DEPARTMENTS}
    pending = {silo: path.with_name(f"{path.name}.partial") for silo, path in paths.items()}
    connections: dict[str, Any] = {}
    try:
        for department in DEPARTMENTS:
            connections[department.silo] = _create_database(pending[department.silo], department)
        with _progress_bar(enabled=progress) as bar:
            task = bar.add_task("generating people", total=people)
            for position, chunk_seed in enumerate(chunk_seeds):
                first = position * CHUNK_PEOPLE
                count = min(CHUNK_PEOPLE, people - first)
                population_seed, *department_seeds = chunk_seed.spawn(1 + len(DEPARTMENTS))
                population = make_population(
                    city,
                    _generator(population_seed),
                    seed=seed,
                    first_index=first,
                    count=count,
                    one_per_community=position == 0,
                )
                for department, department_seed in zip(DEPARTMENTS, department_seeds, strict=True):
                    tables = department.build(population, _generator(department_seed))
                    _insert(connections[department.silo], tables)
                bar.advance(task, count)
            bar.update(task, description="writing databases")
            for silo in list(connections):
                connections.pop(silo).close()
    except BaseException:
        for connection in connections.values():
            connection.close()
        for path in pending.values():
            _remove(path)
            _remove(path.with_name(f"{path.name}.wal"))
        raise
    for silo, path in paths.items():
        # A write-ahead log left by the old database would be replayed onto the new file.
        _remove(path.with_name(f"{path.name}.wal"))
        os.replace(pending[silo], path)
    return paths


def _generator(seed_sequence: np.random.SeedSequence) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence))


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _create_database(path: Path, department: Department) -> Any:
    """A fresh database at ``path`` (leftovers of an interrupted run removed) with empty tables."""
    _remove(path)
    _remove(path.with_name(f"{path.name}.wal"))
    connection = duckdb.connect(str(path))
    for table in department.tables:
        connection.execute(table.create_sql())
    return connection


def _insert(connection: Any, tables: dict[str, Any]) -> None:
    """Append Arrow ``tables`` (by table name) to the database, all or nothing."""
    connection.execute("BEGIN TRANSACTION")
    for name, table in tables.items():
        connection.register("chunk_rows", table)
        connection.execute(f"INSERT INTO {name} BY NAME SELECT * FROM chunk_rows")
        connection.unregister("chunk_rows")
    connection.execute("COMMIT")


def _progress_bar(*, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
