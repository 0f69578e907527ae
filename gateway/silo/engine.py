"""The silo's database engine adapter: a small interface, and DuckDB (the embedded default) behind it.

An engine runs compiled release SQL (text from :mod:`gateway.silo.sql`, literals as parameters),
describes the tables, and verifies facts the bounding plans rely on. It returns exact aggregates
to the silo servicer only; they never leave the process un-noised. It never runs SQL text that
holds a request string, and it opens the silo's data read-only.

Other engines (PostgreSQL, Spark SQL) implement :class:`Engine` and give the compiler their
:class:`~gateway.silo.sql.Dialect`; the compiler's callers do not change.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import duckdb

from gateway.errors import ConfigurationError
from gateway.policy.model import Dataset
from gateway.silo.sql import DUCKDB, CompiledSql, Dialect, compile_excess_rows, quote

# Measured at 10 million rows (bench/release_sql.py): 512 MB of DuckDB buffers keeps the silo
# process under 1 GB peak RSS; DuckDB spills larger intermediates to its temporary directory.
DEFAULT_MEMORY_LIMIT = "512MB"
DEFAULT_THREADS = 2
_SCRATCH = "silogate_scratch"
# Exact results kept per engine (see ExactResultCache): a few hundred distinct query shapes cover
# a department's recurring questions; a result of more rows than this is not kept.
DEFAULT_RESULT_CACHE_ENTRIES = 256
MAX_CACHED_ROWS = 100_000

Rows = list[tuple[object, ...]]


class Engine(Protocol):
    """What the silo needs from a SQL engine."""

    name: str
    dialect: Dialect

    def tables(self) -> set[str]: ...

    def columns(self, table: str) -> dict[str, str]:
        """Column names of a table and their engine types."""
        ...

    def is_unique(self, table: str, column: str) -> bool:
        """Whether no two rows share a value of ``column`` and none is NULL."""
        ...

    def excess_rows(self, dataset: Dataset) -> tuple[str, str] | None:
        """Where rows of persons beyond the dataset's bounds were stored at start-up for exactly
        this declaration (``compile_release_sql(..., excess_table=...)``); None: compute them in
        the query."""
        ...

    async def fetch(self, compiled: CompiledSql) -> list[tuple[object, ...]]: ...

    def close(self) -> None: ...


def excess_fingerprint(dataset: Dataset) -> str:
    """What the excess rows of a dataset depend on: a policy reload changing any of it (bounds,
    privacy unit, declared columns) must not reuse rows selected under the old declaration."""
    shape = (
        dataset.table,
        dataset.privacy_unit,
        dataset.max_rows_per_person,
        dataset.max_groups_per_person,
        sorted((name, column.type == "category") for name, column in dataset.columns.items()),
    )
    return hashlib.sha256(repr(shape).encode()).hexdigest()[:16]


_Key = tuple[str, tuple[tuple[type, object], ...]]


def _key(compiled: CompiledSql) -> _Key:
    # Each parameter with its type: True, 1 and Decimal("1") are equal (and hash alike) in
    # Python, but need not bind alike in SQL.
    return compiled.sql, tuple((type(p), p) for p in compiled.parameters)


class ExactResultCache:
    """A small bounded (LRU) map from compiled release SQL and its parameters to the exact rows
    that SQL returned: a process-local memo of the engine, never a cache of answers.

    Why it is sound, for a DuckDB file opened read-only (:class:`DuckDbEngine`): DuckDB holds the
    file's lock while the silo runs, so no process can change the tables, and the release SQL is
    deterministic (bounding orders rows by a hash of their own values, sums are integer sums, no
    clock or random function is called; see :mod:`gateway.silo.sql`). The rows of one (SQL text,
    parameters) pair are therefore the same every time the query runs; reusing them is exactly
    re-running it. The SQL text spells out everything the policy decides about the result (table,
    columns, bounds, resolution, rows kept per person, the stored excess-row table, which is named
    by the fingerprint of its declaration), so a result can only be reused by the same bounded
    query. Everything after the engine is unchanged: each release still has its plan checked,
    its silo cap charged, fresh noise drawn from OpenDP, its receipt signed and its release log
    record written; a cached exact aggregate never leaves the process, as before. The exact rows
    stay in the silo's memory, which already holds the data they come from.

    ``invalidate`` (on every policy activation) empties the cache and starts a new generation;
    a query that read the generation before it does not store its rows. The SQL text already
    tells results of different declarations apart: this bounds what is kept to the queries of the
    active bundle.
    """

    def __init__(self, max_entries: int = DEFAULT_RESULT_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._rows: OrderedDict[_Key, Rows] = OrderedDict()
        self._generation = 0
        self.hits = 0
        self.misses = 0

    @property
    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, compiled: CompiledSql) -> Rows | None:
        key = _key(compiled)
        with self._lock:
            rows = self._rows.get(key)
            if rows is None:
                self.misses += 1
                return None
            self._rows.move_to_end(key)
            self.hits += 1
        return list(rows)  # a copy: the caller may not change what is kept

    def put(self, compiled: CompiledSql, rows: Rows, generation: int) -> None:
        """Keep ``rows`` unless the cache was invalidated since ``generation`` was read."""
        if self.max_entries <= 0 or len(rows) > MAX_CACHED_ROWS:
            return
        key = _key(compiled)
        with self._lock:
            if generation != self._generation:
                return
            self._rows[key] = list(rows)
            self._rows.move_to_end(key)
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()


class DuckDbEngine:
    """A DuckDB file opened read-only: DuckDB holds its lock, so while the silo runs no other
    process can write the table. Facts verified at start-up (one row per person, which persons
    exceed a bound) therefore stay true for the life of the process."""

    name = "duckdb"
    dialect = DUCKDB

    def __init__(
        self,
        path: Path,
        *,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        threads: int = DEFAULT_THREADS,
        result_cache_entries: int = DEFAULT_RESULT_CACHE_ENTRIES,
    ) -> None:
        if not Path(path).is_file():
            raise ConfigurationError(f"silo database file not found: {path}", reason="DATA_MISSING")
        self._scratch_dir = Path(tempfile.mkdtemp(prefix="silogate-duckdb-"))
        try:
            # Settings by SET, not connect(config=...): DuckDB refuses a second in-process
            # connection to the same file with another configuration (tests read the silo's file).
            self._db = duckdb.connect(str(path), read_only=True)
            self._db.execute(f"SET memory_limit = '{memory_limit}'")
            self._db.execute(f"SET threads = {int(threads)}")
            self._db.execute(f"SET temp_directory = '{self._scratch_dir / 'spill'}'")
        except duckdb.Error as err:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
            raise ConfigurationError(
                f"cannot open silo database {path}: {err}", reason="DATA_MISSING"
            ) from err
        self._lock = threading.Lock()
        self._excess: dict[str, tuple[str, str]] = {}
        self._scratch_attached = False
        # Unique per engine: connections to one file in one process share a DuckDB instance and
        # its attached databases (tests run several silos on the same file).
        self._scratch_name = f"{_SCRATCH}_{secrets.token_hex(6)}"
        self.results = ExactResultCache(result_cache_entries)

    def tables(self) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_catalog = "
                "current_database()"
            ).fetchall()
        return {str(r[0]) for r in rows}

    def columns(self, table: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_catalog = current_database() AND table_name = ? "
                "ORDER BY ordinal_position",
                [table],
            ).fetchall()
        return {str(name): str(kind) for name, kind in rows}

    def is_unique(self, table: str, column: str) -> bool:
        # A NULL key would be one "person" of several rows to the bounded plan: not unique.
        sql = (
            f"SELECT COUNT(*) = COUNT(DISTINCT {quote(column)}) AND COUNT(*) = COUNT({quote(column)}) "
            f"FROM {quote(table)}"
        )
        with self._lock:
            row = self._db.execute(sql).fetchone()
        return bool(row and row[0])

    def prepare_excess_rows(self, dataset: Dataset) -> tuple[str, str]:
        """Materialise the rows of persons beyond a bound (for the excess plan); returns the
        (catalog, table) to pass as ``compile_release_sql(..., excess_table=...)``.

        Written to a scratch database file in a private temporary directory, not to the silo's
        data: its pages are buffered under the same memory limit and spill to disk.
        """
        key = excess_fingerprint(dataset)
        with self._lock:
            if key in self._excess:
                return self._excess[key]
            if not self._scratch_attached:
                scratch = str(self._scratch_dir / "excess.duckdb").replace("'", "''")
                # A path the silo made itself (never from a request); ATTACH takes no parameter.
                self._db.execute(f"ATTACH '{scratch}' AS {self._scratch_name} (READ_WRITE)")
                self._scratch_attached = True
            table = f"excess_{key}"
            compiled = compile_excess_rows(dataset, self.dialect)
            self._db.execute(
                f"CREATE TABLE {self._scratch_name}.{quote(table)} AS {compiled.sql}",
                compiled.parameters,
            )
            self._excess[key] = (self._scratch_name, table)
            return self._excess[key]

    def excess_rows(self, dataset: Dataset) -> tuple[str, str] | None:
        """The excess rows prepared for exactly this declaration, if any."""
        return self._excess.get(excess_fingerprint(dataset))

    def _run(self, compiled: CompiledSql) -> Rows:
        with self._lock:
            cursor = self._db.cursor()
        try:
            return [
                tuple(row) for row in cursor.execute(compiled.sql, compiled.parameters).fetchall()
            ]
        finally:
            cursor.close()

    async def fetch(self, compiled: CompiledSql) -> Rows:
        """The exact rows of ``compiled``: from :class:`ExactResultCache` when this SQL ran
        before under the current policy, else from DuckDB (in a worker thread)."""
        rows = self.results.get(compiled)
        if rows is not None:
            return rows
        generation = self.results.generation
        rows = await asyncio.to_thread(self._run, compiled)
        self.results.put(compiled, rows, generation)
        return rows

    def forget_results(self) -> None:
        """Drop every cached exact result (called on each policy activation)."""
        self.results.invalidate()

    def close(self) -> None:
        with self._lock:
            if self._scratch_attached:  # the shared instance would keep it attached otherwise
                self._db.execute(f"DETACH {self._scratch_name}")
                self._scratch_attached = False
        self._db.close()
        shutil.rmtree(self._scratch_dir, ignore_errors=True)
