"""Fixtures of the privacy tests that run the silo's bounding SQL."""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pytest


@pytest.fixture(scope="module")
def db() -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with the ``scratch`` schema, one per test module."""
    connection = duckdb.connect()
    connection.execute("CREATE SCHEMA scratch")
    yield connection
    connection.close()
