"""Budget period changes in the audit log: one ``budget_period`` record per scope and rollover.

A budget scope with a refreshing period (day, month, quarter, year; :mod:`gateway.budget.periods`)
starts afresh when its calendar window ends. :class:`BudgetPeriodWatcher` notices it, at start-up
(a rollover while the gateway was down) and every few seconds after, and appends one record::

    {"kind": "budget_period", "scope": "consumer:civil-affairs/rule:r/month", "period": "month",
     "total_rho": "2", "time_zone": "UTC",
     "closed": {"window": "month:2026-10", "spent_rho": "1/8", "reserved_rho": "0"},
     "opened": {"window": "month:2026-11", "ends_at": "2026-12-01T00:00:00+00:00"}}

``spent_rho`` and ``reserved_rho`` are the ledger's running sums of the closed window when the
record is written (a reservation still open then is committed or cancelled in that window later;
it never moves to the new one). When the gateway was down for several windows, one record closes
the last window it knew and opens the current one.

The windows already announced are kept in the ledger's SQLite file (table ``budget_periods``),
so a restart never writes a second record for the same scope and window: before appending, the
watcher marks the change as pending with the log's size; a restart that finds a pending change
looks for its record among the records appended since (a few at most) and finishes it or
writes it. A scope seen for the first time (first start, new policy) is remembered without a
record: there is no earlier window the log knew of. This module never changes the ledger's own
tables and never decides a charge; it only reads the running sums.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from gateway.audit.log import AuditLog
from gateway.audit.store import list_segments, parse_record, scan_lines
from gateway.budget.ledger import PrivacyLedger, ScopeLimit
from gateway.budget.periods import window
from gateway.errors import ConfigurationError, SilogateError
from gateway.policy.decision import scope_keys
from gateway.policy.model import Bundle

RECORD_KIND = "budget_period"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_periods (
    scope          TEXT PRIMARY KEY,
    window         TEXT NOT NULL,
    pending_window TEXT,
    pending_from   INTEGER
);
"""
log = logging.getLogger("silogate.budget")


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def declared_scopes(bundle: Bundle) -> list[ScopeLimit]:
    """Every budget scope with a refreshing period that the bundle can charge: per consumer and
    permit rule, per population, per dataset cap (the same keys the ledger charges)."""
    scopes: dict[str, ScopeLimit] = {}
    for consumer in sorted(bundle.consumers):
        for rule_id, rule in sorted(bundle.rules.items()):
            if rule.effect != "permit" or not rule.applies_to_consumer(consumer):
                continue
            for dataset in sorted(bundle.datasets):
                if rule.applies_to_dataset(dataset):
                    for scope in scope_keys(bundle, consumer, rule_id, dataset):
                        scopes[scope.key] = ScopeLimit(scope.key, scope.period, scope.total_rho)
    return [limit for limit in scopes.values() if limit.period != "lifetime"]


@dataclass(frozen=True)
class _Change:
    limit: ScopeLimit
    closed: str
    opened: str
    ends_at: dt.datetime | None


class BudgetPeriodWatcher:
    """Writes a ``budget_period`` record when a scope's window rolls over (see the module)."""

    def __init__(
        self,
        ledger_path: Path,
        ledger: PrivacyLedger,
        audit: AuditLog,
        scopes: Callable[[], Sequence[ScopeLimit]],
        *,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        self.ledger = ledger
        self.audit = audit
        self.scopes = scopes
        self.clock = clock
        self._lock = threading.Lock()  # one check at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._db = sqlite3.connect(
                ledger_path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as err:
            raise ConfigurationError(
                f"cannot keep budget periods in the ledger {ledger_path}: {err}",
                reason="LEDGER_UNAVAILABLE",
            ) from err

    # -- one check ----------------------------------------------------------------------------

    def check(self) -> list[int]:
        """Record every rollover since the last check; return the new records' sequence numbers."""
        with self._lock:
            self._recover()
            now = self.clock()
            known = {
                scope: current
                for scope, current in self._db.execute("SELECT scope, window FROM budget_periods")
            }
            changes: list[_Change] = []
            first_seen: list[tuple[str, str]] = []
            for limit in {limit.scope: limit for limit in self.scopes()}.values():
                if limit.period == "lifetime":
                    continue
                current = window(limit.period, now, self.ledger.zone)
                if limit.scope not in known:
                    first_seen.append((limit.scope, current.label))
                elif known[limit.scope] != current.label:
                    changes.append(_Change(limit, known[limit.scope], current.label, current.end))
            with self._transaction():
                self._db.executemany(
                    "INSERT OR IGNORE INTO budget_periods (scope, window) VALUES (?, ?)",
                    first_seen,
                )
                self._db.executemany(
                    "UPDATE budget_periods SET pending_window = ?, pending_from = ? "
                    "WHERE scope = ?",
                    [(c.opened, self.audit.size, c.limit.scope) for c in changes],
                )
            if not changes:
                return []
            sums = self.ledger.scope_sums()
            sequences = []
            for change in sorted(changes, key=lambda c: c.limit.scope):
                spent, reserved = sums.get(
                    f"{change.limit.scope}@{change.closed}", (Fraction(0), Fraction(0))
                )
                fields = _fields(change, spent, reserved, str(self.ledger.zone))
                sequences.append(self.audit.append(RECORD_KIND, fields))
                self._finish(change.limit.scope, change.opened)
            return sequences

    def _finish(self, scope: str, opened: str) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE budget_periods SET window = ?, pending_window = NULL, "
                "pending_from = NULL WHERE scope = ?",
                (opened, scope),
            )

    def _recover(self) -> None:
        """Settle changes marked pending by a run that stopped before it could finish them: done
        if their record is in the log, else forgotten (the check writes them again)."""
        pending = self._db.execute(
            "SELECT scope, pending_window, pending_from FROM budget_periods "
            "WHERE pending_window IS NOT NULL"
        ).fetchall()
        if not pending:
            return
        wanted = {(scope, opened) for scope, opened, _ in pending}
        written = {
            (record.get("scope"), (record.get("opened") or {}).get("window"))
            for record in _records_from(self.audit.directory, min(p[2] for p in pending))
            if record.get("kind") == RECORD_KIND and isinstance(record.get("opened"), dict)
        }
        for scope, opened in wanted:
            if (scope, opened) in written:
                self._finish(scope, opened)
            else:
                with self._transaction():
                    self._db.execute(
                        "UPDATE budget_periods SET pending_window = NULL, pending_from = NULL "
                        "WHERE scope = ?",
                        (scope,),
                    )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # -- in the background --------------------------------------------------------------------

    def start(self, interval_seconds: float = 30.0) -> None:
        """Check now and then every ``interval_seconds`` in a background thread until
        :meth:`stop`; a failed check is logged and retried at the next interval."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._loop, args=(interval_seconds,), name="budget-periods", daemon=True
        )
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except (SilogateError, sqlite3.Error, OSError) as err:
                log.error("budget period check failed", extra={"error": str(err)})
            self._stop.wait(interval)

    def stop(self) -> None:
        """Stop the background checks (before the audit log and ledger close). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _fields(change: _Change, spent: Fraction, reserved: Fraction, zone: str) -> dict[str, Any]:
    return {
        "scope": change.limit.scope,
        "period": change.limit.period,
        "total_rho": str(change.limit.total),
        "time_zone": zone,
        "closed": {
            "window": change.closed,
            "spent_rho": str(spent),
            "reserved_rho": str(reserved),
        },
        "opened": {
            "window": change.opened,
            "ends_at": change.ends_at.isoformat() if change.ends_at else None,
        },
    }


def _records_from(directory: Path, first: int) -> Iterator[dict[str, Any]]:
    """The complete records with sequence number ``first`` or later (reads only the segments
    that can hold them; a torn last line is skipped)."""
    segments = list_segments(directory)
    for index, segment in enumerate(segments):
        following = segments[index + 1].first if index + 1 < len(segments) else None
        if following is not None and following <= first:
            continue
        for line in scan_lines(segment.path):
            if not line.terminated:
                return
            record = parse_record(segment.name, line)
            seq = record.get("seq")
            if isinstance(seq, int) and seq >= first:
                yield record


__all__ = ["RECORD_KIND", "BudgetPeriodWatcher", "declared_scopes"]
