"""The silo's database engine adapter (DuckDB, the embedded default).

Opens the silo's file read-only and runs compiled SQL in a worker thread, one cursor per query.
Returns exact aggregates to the silo servicer only; they never leave the process un-noised.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import duckdb

from gateway.errors import ConfigurationError
from gateway.silo.sql import CompiledSql


class DuckDbEngine:
    name = "duckdb"

    def __init__(self, path: Path) -> None:
        if not Path(path).is_file():
            raise ConfigurationError(f"silo database file not found: {path}", reason="DATA_MISSING")
        try:
            self._db = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as err:
            raise ConfigurationError(
                f"cannot open silo database {path}: {err}", reason="DATA_MISSING"
            ) from err
        self._lock = threading.Lock()

    def tables(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT table_name FROM information_schema.tables").fetchall()
        return {str(r[0]) for r in rows}

    def _run(self, compiled: CompiledSql) -> list[tuple[object, ...]]:
        with self._lock:
            cursor = self._db.cursor()
        try:
            return [
                tuple(row) for row in cursor.execute(compiled.sql, compiled.parameters).fetchall()
            ]
        finally:
            cursor.close()

    async def fetch(self, compiled: CompiledSql) -> list[tuple[object, ...]]:
        return await asyncio.to_thread(self._run, compiled)

    def close(self) -> None:
        self._db.close()
