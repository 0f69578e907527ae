"""The privacy budget ledger, embedded in SQLite (WAL, full sync).

Amounts are exact rationals stored as ``"p/q"`` text: never floats, never rounded. A query reserves
its cost in every scope in one ``BEGIN IMMEDIATE`` transaction before any silo runs, or is refused
naming the short scope. ``commit`` after the release; ``cancel`` only when no silo released
anything. A reservation whose outcome is unknown is never cancelled, so it stays charged: a crash
can over-charge, never under-charge.

The storage is the only SQLite-specific part (``_connect`` and the SQL); a shared PostgreSQL
ledger for several gateway replicas is meant to replace exactly that.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from gateway.errors import BudgetExhausted, ConfigurationError, RequestConflict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    consumer     TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    query_digest TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'cancelled')),
    created_at   REAL NOT NULL,
    response     BLOB,
    PRIMARY KEY (consumer, request_id)
);
CREATE TABLE IF NOT EXISTS charges (
    consumer   TEXT NOT NULL,
    request_id TEXT NOT NULL,
    scope      TEXT NOT NULL,
    rho        TEXT NOT NULL,
    PRIMARY KEY (consumer, request_id, scope),
    FOREIGN KEY (consumer, request_id) REFERENCES reservations (consumer, request_id)
);
CREATE INDEX IF NOT EXISTS charges_by_scope ON charges (scope);
"""


def _text(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


@dataclass(frozen=True)
class Balance:
    scope: str
    total: Fraction
    spent: Fraction
    reserved: Fraction

    @property
    def remaining(self) -> Fraction:
        return self.total - self.spent - self.reserved


@dataclass(frozen=True)
class Reservation:
    """The outcome of ``reserve``: new, or an earlier request with the same id and query."""

    request_id: str
    state: str
    stored_response: bytes | None = None

    @property
    def is_replay(self) -> bool:
        return self.state != "new"


class PrivacyLedger:
    """Budget accounting for one gateway. Thread-safe; every write is one transaction."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as err:
            raise ConfigurationError(
                f"cannot open the budget ledger: {err}", reason="LEDGER_UNAVAILABLE"
            ) from err

    def close(self) -> None:
        self._db.close()

    def _sums(self, scopes: Iterable[str]) -> dict[str, tuple[Fraction, Fraction]]:
        sums = {s: (Fraction(0), Fraction(0)) for s in scopes}
        if not sums:
            return sums
        marks = ",".join("?" * len(sums))
        rows = self._db.execute(
            "SELECT c.scope, c.rho, r.state FROM charges c JOIN reservations r "
            "USING (consumer, request_id) "
            f"WHERE c.scope IN ({marks}) AND r.state != 'cancelled'",
            list(sums),
        )
        for scope, rho, state in rows:
            spent, reserved = sums[scope]
            amount = Fraction(rho)
            sums[scope] = (
                (spent + amount, reserved)
                if state == "committed"
                else (
                    spent,
                    reserved + amount,
                )
            )
        return sums

    def reserve(
        self,
        consumer: str,
        request_id: str,
        query_digest: str,
        charges: Mapping[str, tuple[Fraction, Fraction]],
    ) -> Reservation:
        """Reserve ``cost`` in every scope (scope -> (total, cost)) atomically, or refuse.

        A request id already seen for this consumer returns its earlier state (a replay) when the
        query is the same, and raises RequestConflict when it is not. A cancelled attempt (nothing
        was released) is replaced, so a client may retry a failed query with the same id.
        """
        for scope, (total, cost) in charges.items():
            if cost < 0 or total < 0:
                raise ValueError(f"negative amount for scope {scope}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT query_digest, state, response FROM reservations "
                    "WHERE consumer = ? AND request_id = ?",
                    (consumer, request_id),
                ).fetchone()
                if row is not None and row[0] != query_digest:
                    raise RequestConflict(
                        f"request id '{request_id}' was already used with another query",
                        metadata={"request_id": request_id},
                    )
                if row is not None and row[1] != "cancelled":
                    self._db.execute("ROLLBACK")
                    return Reservation(request_id, row[1], row[2])
                if row is not None:
                    # A cancelled attempt released nothing: a retry of the same query starts afresh.
                    self._db.execute(
                        "DELETE FROM charges WHERE consumer = ? AND request_id = ?",
                        (consumer, request_id),
                    )
                    self._db.execute(
                        "DELETE FROM reservations WHERE consumer = ? AND request_id = ?",
                        (consumer, request_id),
                    )
                sums = self._sums(charges)
                for scope, (total, cost) in charges.items():
                    spent, reserved = sums[scope]
                    remaining = total - spent - reserved
                    if cost > remaining:
                        raise BudgetExhausted(
                            f"budget scope '{scope}' has rho {float(remaining):.6g} left; "
                            f"the query needs {float(cost):.6g}",
                            metadata={
                                "scope": scope,
                                "requested_rho": _text(cost),
                                "remaining_rho": _text(max(remaining, Fraction(0))),
                            },
                        )
                self._db.execute(
                    "INSERT INTO reservations VALUES (?, ?, ?, 'reserved', ?, NULL)",
                    (consumer, request_id, query_digest, time.time()),
                )
                self._db.executemany(
                    "INSERT INTO charges VALUES (?, ?, ?, ?)",
                    [(consumer, request_id, s, _text(c)) for s, (_, c) in charges.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return Reservation(request_id, "new")

    def _finish(self, consumer: str, request_id: str, state: str, response: bytes | None) -> None:
        with self._lock:
            updated = self._db.execute(
                "UPDATE reservations SET state = ?, response = ? "
                "WHERE consumer = ? AND request_id = ? AND state = 'reserved'",
                (state, response, consumer, request_id),
            ).rowcount
        if updated != 1:
            raise RuntimeError(f"no open reservation for request '{request_id}'")

    def commit(self, consumer: str, request_id: str, response: bytes) -> None:
        """Mark the reservation spent and store the response for idempotent replays."""
        self._finish(consumer, request_id, "committed", response)

    def cancel(self, consumer: str, request_id: str) -> None:
        """Release the reservation. Only when no silo can have released anything."""
        self._finish(consumer, request_id, "cancelled", None)

    def balances(self, totals: Mapping[str, Fraction]) -> list[Balance]:
        """Total, spent and reserved per scope (scope -> total from the active policy)."""
        with self._lock:
            sums = self._sums(totals)
        return [Balance(s, totals[s], *sums[s]) for s in totals]
