"""Table schemas of the synthetic silos and the helpers that turn numpy draws into Arrow columns.

A :class:`TableSchema` is the single statement of a table's columns and DuckDB types: the generator
creates the table from it and builds every Arrow chunk against it, so a chunk whose columns or types
drift from the schema fails loudly instead of being cast silently. Identifiers here are constants of
this package; nothing from outside ever reaches the SQL built from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from gateway.demo._population import Ints, Population

_ARROW_TYPES: Mapping[str, Any] = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "DATE": pa.date32(),
    "BOOLEAN": pa.bool_(),
}


@dataclass(frozen=True)
class Column:
    """A column name and its DuckDB type (one of ``VARCHAR INTEGER DOUBLE DATE BOOLEAN``)."""

    name: str
    sql_type: str

    def __post_init__(self) -> None:
        if self.sql_type not in _ARROW_TYPES:
            raise ValueError(f"column {self.name!r} has unsupported type {self.sql_type!r}")


@dataclass(frozen=True)
class TableSchema:
    """A table of one silo: its name inside the silo's database and its ordered columns."""

    name: str
    columns: tuple[Column, ...]

    @classmethod
    def of(cls, name: str, *columns: tuple[str, str]) -> TableSchema:
        """A schema from ``(column, type)`` pairs."""
        return cls(name, tuple(Column(column, sql_type) for column, sql_type in columns))

    def create_sql(self) -> str:
        """The ``CREATE TABLE`` statement for this table."""
        body = ", ".join(f"{column.name} {column.sql_type}" for column in self.columns)
        return f"CREATE TABLE {self.name} ({body})"

    def arrow_table(self, values: Mapping[str, Any]) -> Any:
        """An Arrow table from numpy arrays or Arrow arrays, one per column, in schema order.

        Raises ``ValueError`` when ``values`` names other columns than the schema, so a builder
        cannot silently leave a column out or add one.
        """
        expected = [column.name for column in self.columns]
        if sorted(values) != sorted(expected):
            raise ValueError(f"{self.name}: got columns {sorted(values)}, schema has {expected}")
        arrays = []
        for column in self.columns:
            arrow_type = _ARROW_TYPES[column.sql_type]
            value = values[column.name]
            array = pa.array(value, type=arrow_type) if isinstance(value, np.ndarray) else value
            if array.type != arrow_type:
                raise ValueError(f"{self.name}.{column.name}: {array.type} is not {arrow_type}")
            arrays.append(array)
        names = [column.name for column in self.columns]
        return pa.Table.from_arrays(arrays, names=names)


TableBuilder = Callable[[Population, np.random.Generator], dict[str, Any]]


@dataclass(frozen=True)
class Department:
    """A silo: its name, its tables, and the function that draws a chunk of each table.

    ``build`` gets a chunk of people and a generator of its own, and returns one Arrow table per
    schema in ``tables``, keyed by table name.
    """

    silo: str
    tables: tuple[TableSchema, ...]
    build: TableBuilder


def labels(vocabulary: tuple[str, ...], codes: Ints) -> Any:
    """Arrow ``string`` array of ``vocabulary[code]`` for each code."""
    return pc.take(pa.array(vocabulary, type=pa.string()), pa.array(codes))


def take(array: Any, indices: Ints) -> Any:
    """Rows ``indices`` of an Arrow array (e.g. the person key of each record's owner)."""
    return pc.take(array, pa.array(indices))


def dates(days: Ints, missing: npt.NDArray[np.bool_] | None = None) -> Any:
    """Arrow ``date32`` array from days since 1970-01-01, null where ``missing``."""
    return pa.array(days.astype(np.int32), type=pa.date32(), mask=missing)


def integers(values: Ints, missing: npt.NDArray[np.bool_] | None = None) -> Any:
    """Arrow ``int32`` array, null where ``missing``."""
    return pa.array(values.astype(np.int32), type=pa.int32(), mask=missing)


def expand(counts: Ints) -> tuple[Ints, Ints]:
    """For per-owner record counts, the owner of each record and the record's rank within its owner.

    ``expand([2, 0, 3])`` is ``([0, 0, 2, 2, 2], [0, 1, 0, 1, 2])``.
    """
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first_of_owner = np.cumsum(counts) - counts
    rank = np.arange(len(owner), dtype=np.int64) - first_of_owner[owner]
    return owner, rank
