"""The privacy budget ledger, embedded in SQLite (WAL, ``synchronous=FULL``).

Amounts are exact rationals stored as ``"p/q"`` text: never floats, never rounded. A query reserves
its cost in every scope in one ``BEGIN IMMEDIATE`` transaction before any silo runs, or is refused
naming the short scope. ``commit`` after the release; ``cancel`` only when no silo released
anything; ``cancel_share`` for the shares of the silos that released nothing when others released
or may have. A charge whose outcome is unknown is never cancelled, so it stays charged: a crash
can over-charge, never under-charge.

Running sums per scope window (``scope_balances``) are updated in the same transactions as the
reservations, so a reservation costs O(number of scopes), not O(history); ``verify()`` recomputes
them from the charges. Refreshing periods are windows of the configured time zone: the window is
chosen once per reservation, from one clock reading, so one query never charges two periods; a
clock that runs backwards (beyond a small tolerance) is refused rather than trusted.

The storage is the only SQLite-specific part (``_connect`` and the SQL); a shared PostgreSQL
ledger for several gateway replicas is meant to replace exactly that.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.budget.periods import window
from gateway.errors import BudgetExhausted, ConfigurationError, LedgerUnavailable, RequestConflict

SCHEMA_VERSION = "2"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    consumer     TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    query_digest TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'cancelled')),
    created_at   TEXT NOT NULL,
    windows      TEXT NOT NULL,
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
CREATE TABLE IF NOT EXISTS scope_balances (
    scope    TEXT PRIMARY KEY,
    spent    TEXT NOT NULL,
    reserved TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    consumer  TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    response  BLOB NOT NULL,
    PRIMARY KEY (consumer, cache_key)
);
"""
_ZERO = Fraction(0)


def _text(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ScopeLimit:
    """A budget scope as the policy declares it: stable name, period and total (rho)."""

    scope: str
    period: str
    total: Fraction


@dataclass(frozen=True)
class ScopeCharge:
    """What one query asks of one scope."""

    limit: ScopeLimit
    cost: Fraction


@dataclass(frozen=True)
class Balance:
    """One scope in its current window."""

    scope: str
    window: str
    total: Fraction
    spent: Fraction
    reserved: Fraction
    period_end: dt.datetime | None

    @property
    def remaining(self) -> Fraction:
        return self.total - self.spent - self.reserved


@dataclass(frozen=True)
class Reservation:
    """The outcome of ``reserve``: new, or an earlier request with the same id and query."""

    request_id: str
    state: str
    stored_response: bytes | None = None
    windows: str = ""
    # An earlier answer to the same query in the same windows: the caller returns it at no cost
    # and commits this (charge-free) reservation with the response it sends.
    cached_answer: bytes | None = None
    # A new charged reservation: each charged scope as this reservation left it (in the order
    # of the charges), read in the reservation's own transaction.
    balances: tuple[Balance, ...] = ()

    @property
    def is_replay(self) -> bool:
        return self.state != "new"


class PrivacyLedger:
    """Budget accounting for one gateway. Thread-safe; every write is one transaction."""

    def __init__(
        self,
        path: Path,
        *,
        time_zone: str = "UTC",
        clock: Callable[[], dt.datetime] = _utc_now,
        clock_tolerance: dt.timedelta = dt.timedelta(seconds=5),
    ) -> None:
        try:
            self.zone = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ConfigurationError(
                f"unknown time zone '{time_zone}'", metadata={"time_zone": time_zone}
            ) from err
        self._clock = clock
        self._tolerance = clock_tolerance
        self._lock = threading.Lock()
        self._db = self._connect(Path(path))
        # Balances are read on a connection of their own: WAL lets a reader see the last commit
        # without waiting for the writer's lock, which every reservation holds through its fsync.
        self._read_lock = threading.Lock()
        try:
            self._reader = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            self._reader.execute("PRAGMA query_only=ON")
        except sqlite3.Error as err:
            self._db.close()
            raise ConfigurationError(
                f"cannot open the budget ledger {path}: {err}", reason="LEDGER_UNAVAILABLE"
            ) from err

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
                raise sqlite3.DatabaseError("integrity check failed")
            db.executescript(_SCHEMA)
            found = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif found[0] != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {found[0]}, expected {SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as err:
            raise ConfigurationError(
                f"cannot open the budget ledger {path}: {err}", reason="LEDGER_UNAVAILABLE"
            ) from err
        return db

    def close(self) -> None:
        # Under the lock: a transaction still running in a worker thread (a request cancelled at
        # shutdown) finishes before the connection goes.
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; storage failures fail closed as LedgerUnavailable.

        ``durable=False`` skips the fsync at commit (WAL with ``synchronous=NORMAL``): the
        transaction survives a crash of the process, and the next durable transaction syncs it,
        but a power loss may undo it. Only transactions whose loss leaves the ledger
        over-charged, never under-charged, may use it: committing or cancelling a reservation
        (undone, the reservation stays charged). Reservations are always durable.
        """
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as err:
                # Locked by another process, disk full, I/O error: nothing was written.
                raise LedgerUnavailable(
                    f"the budget ledger could not record the change ({err}); an open "
                    "reservation stays charged, a new one was not made",
                    metadata={"cause": str(err)},
                ) from err
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _now(self, db: sqlite3.Connection) -> dt.datetime:
        """The clock, checked against the latest instant the ledger has recorded."""
        now = self._clock()
        latest = db.execute("SELECT value FROM meta WHERE key = 'latest'").fetchone()
        if latest is not None:
            seen = dt.datetime.fromisoformat(latest[0])
            if now < seen - self._tolerance:
                raise LedgerUnavailable(
                    "the clock is behind the budget ledger's latest record; refusing to choose "
                    "a budget period from it",
                    reason="LEDGER_CLOCK_BEHIND",
                    metadata={"now": now.isoformat(), "latest": seen.isoformat()},
                )
            if now <= seen:
                return now
        db.execute("INSERT OR REPLACE INTO meta VALUES ('latest', ?)", (now.isoformat(),))
        return now

    def _window_key(self, limit: ScopeLimit, now: dt.datetime) -> tuple[str, dt.datetime | None]:
        current = window(limit.period, now, self.zone)
        key = limit.scope if limit.period == "lifetime" else f"{limit.scope}@{current.label}"
        return key, current.end

    @staticmethod
    def _balance(db: sqlite3.Connection, key: str) -> tuple[Fraction, Fraction]:
        row = db.execute(
            "SELECT spent, reserved FROM scope_balances WHERE scope = ?", (key,)
        ).fetchone()
        return (Fraction(row[0]), Fraction(row[1])) if row else (_ZERO, _ZERO)

    @staticmethod
    def _add(
        db: sqlite3.Connection, key: str, spent: Fraction, reserved: Fraction
    ) -> tuple[Fraction, Fraction]:
        """Add to a scope window's running sums; returns the new (spent, reserved)."""
        old_spent, old_reserved = PrivacyLedger._balance(db, key)
        new = (old_spent + spent, old_reserved + reserved)
        db.execute(
            "INSERT OR REPLACE INTO scope_balances VALUES (?, ?, ?)",
            (key, _text(new[0]), _text(new[1])),
        )
        return new

    @staticmethod
    def _forget(db: sqlite3.Connection, consumer: str, request_id: str) -> None:
        """Remove a cancelled attempt (its charges no longer count in any running sum)."""
        db.execute(
            "DELETE FROM charges WHERE consumer = ? AND request_id = ?", (consumer, request_id)
        )
        db.execute(
            "DELETE FROM reservations WHERE consumer = ? AND request_id = ?", (consumer, request_id)
        )

    # -- protocol --------------------------------------------------------------------------

    def reserve(
        self,
        consumer: str,
        request_id: str,
        query_digest: str,
        charges: Sequence[ScopeCharge],
        *,
        cache_key: str | None = None,
    ) -> Reservation:
        """Reserve every charge atomically in its scope's current window, or refuse.

        With a ``cache_key`` that has a stored answer, nothing is charged: the reservation is
        opened without charges and carries the answer.

        A request id already seen for this consumer returns its earlier state (a replay) when the
        query is the same, and raises RequestConflict when it is not. A cancelled attempt (nothing
        was released) is replaced, so a client may retry a failed query with the same id.
        """
        for charge in charges:
            if charge.cost < 0 or charge.limit.total < 0:
                raise ValueError(f"negative amount for scope {charge.limit.scope}")
        with self._transaction() as db:
            row = db.execute(
                "SELECT query_digest, state, response, windows FROM reservations "
                "WHERE consumer = ? AND request_id = ?",
                (consumer, request_id),
            ).fetchone()
            if row is not None and row[0] != query_digest:
                raise RequestConflict(
                    f"request id '{request_id}' was already used with another query",
                    metadata={"request_id": request_id},
                )
            if row is not None and row[1] != "cancelled":
                return Reservation(request_id, row[1], row[2], row[3])
            if row is not None:  # a cancelled attempt released nothing: start afresh
                self._forget(db, consumer, request_id)
            now = self._now(db)
            if cache_key is not None:
                answer = db.execute(
                    "SELECT response FROM answers WHERE consumer = ? AND cache_key = ?",
                    (consumer, cache_key),
                ).fetchone()
                if answer is not None:
                    db.execute(
                        "INSERT INTO reservations VALUES (?, ?, ?, 'reserved', ?, '', NULL)",
                        (consumer, request_id, query_digest, now.isoformat()),
                    )
                    return Reservation(request_id, "new", cached_answer=bytes(answer[0]))
            keyed = [(*self._window_key(c.limit, now), c) for c in charges]
            current = {key: self._balance(db, key) for key, _, _ in keyed}
            for key, _, charge in keyed:
                spent, reserved = current[key]
                remaining = charge.limit.total - spent - reserved
                if charge.cost > remaining:
                    # A "...#key_delta" scope counts the delta of data-dependent keys, not rho.
                    unit = "delta" if charge.limit.scope.endswith("#key_delta") else "rho"
                    raise BudgetExhausted(
                        f"budget scope '{key}' has {unit} {float(remaining):.6g} left; "
                        f"the query needs {float(charge.cost):.6g}",
                        metadata={
                            "scope": key,
                            f"requested_{unit}": _text(charge.cost),
                            f"remaining_{unit}": _text(max(remaining, _ZERO)),
                        },
                    )
            windows = "|".join(sorted(key for key, _, _ in keyed))
            db.execute(
                "INSERT INTO reservations VALUES (?, ?, ?, 'reserved', ?, ?, NULL)",
                (consumer, request_id, query_digest, now.isoformat(), windows),
            )
            db.executemany(
                "INSERT INTO charges VALUES (?, ?, ?, ?)",
                [(consumer, request_id, key, _text(c.cost)) for key, _, c in keyed],
            )
            db.executemany(
                "INSERT OR REPLACE INTO scope_balances VALUES (?, ?, ?)",
                [
                    (key, _text(current[key][0]), _text(current[key][1] + c.cost))
                    for key, _, c in keyed
                ],
            )
        # What the reservation left in each scope, its own charge counted as reserved.
        balances = tuple(
            Balance(
                c.limit.scope, key, c.limit.total, current[key][0], current[key][1] + c.cost, end
            )
            for key, end, c in keyed
        )
        return Reservation(request_id, "new", None, windows, balances=balances)

    def _finish(
        self,
        consumer: str,
        request_id: str,
        state: str,
        response: bytes | None,
        cache_key: str | None = None,
        balances_of: Sequence[ScopeLimit] = (),
    ) -> list[Balance]:
        # Not durable: if a crash undoes it, the reservation is still charged (over-charge only).
        with self._transaction(durable=False) as db:
            updated = db.execute(
                "UPDATE reservations SET state = ?, response = ? "
                "WHERE consumer = ? AND request_id = ? AND state = 'reserved'",
                (state, response, consumer, request_id),
            ).rowcount
            if updated != 1:
                raise LedgerUnavailable(
                    f"no open reservation for request '{request_id}'",
                    reason="RESERVATION_NOT_OPEN",
                    metadata={"request_id": request_id},
                )
            charges = [
                (scope, Fraction(rho))
                for scope, rho in db.execute(
                    "SELECT scope, rho FROM charges WHERE consumer = ? AND request_id = ?",
                    (consumer, request_id),
                )
            ]
            sums: dict[str, tuple[Fraction, Fraction]] = {}
            for scope, rho in charges:
                sums[scope] = self._add(db, scope, rho if state == "committed" else _ZERO, -rho)
            if cache_key is not None:  # in the same transaction: an answer is cached iff spent
                db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                    (consumer, cache_key, response),
                )
            if not balances_of:
                return []
            # As ``balances`` would read them right after this transaction (current windows).
            now = self._clock()
            out = []
            for limit in balances_of:
                key, end = self._window_key(limit, now)
                spent, reserved = sums[key] if key in sums else self._balance(db, key)
                out.append(Balance(limit.scope, key, limit.total, spent, reserved, end))
            return out

    def commit(
        self,
        consumer: str,
        request_id: str,
        response: bytes,
        *,
        cache_key: str | None = None,
        balances_of: Sequence[ScopeLimit] = (),
    ) -> list[Balance]:
        """Mark the reservation spent, store the response for replays and, with a ``cache_key``,
        as the answer to later identical queries. Returns the balances of ``balances_of`` as this
        commit left them, read in its transaction (what :meth:`balances` would say next)."""
        return self._finish(
            consumer, request_id, "committed", response, cache_key, balances_of=balances_of
        )

    def cancel(self, consumer: str, request_id: str) -> None:
        """Release the reservation. Only when no silo can have released anything."""
        self._finish(consumer, request_id, "cancelled", None)

    def cancel_share(self, consumer: str, request_id: str, shares: Mapping[str, Fraction]) -> None:
        """Release part of an open reservation: ``shares`` maps a scope (``ScopeLimit.scope``)
        to the rho to take off its charge, in the window the reservation charged.

        For a query that spans several silos when some of them definitely released nothing and
        others released or may have: the shares of the former are cancelled, the rest stays
        reserved (charged) until the reservation is committed; if it never is, it stays charged
        for good, as an unfinished reservation does. All shares change in one transaction; a
        share that is negative, names a scope the reservation did not charge, or exceeds what is
        still charged there raises ValueError and changes nothing.
        """
        for scope, share in shares.items():
            if share < 0:
                raise ValueError(f"negative share for scope {scope}")
        # Not durable, as for cancel: undone by a crash, the share simply stays charged.
        with self._transaction(durable=False) as db:
            state = db.execute(
                "SELECT state FROM reservations WHERE consumer = ? AND request_id = ?",
                (consumer, request_id),
            ).fetchone()
            if state is None or state[0] != "reserved":
                raise LedgerUnavailable(
                    f"no open reservation for request '{request_id}'",
                    reason="RESERVATION_NOT_OPEN",
                    metadata={"request_id": request_id},
                )
            charged = {
                key: Fraction(rho)
                for key, rho in db.execute(
                    "SELECT scope, rho FROM charges WHERE consumer = ? AND request_id = ?",
                    (consumer, request_id),
                )
            }
            for scope, share in shares.items():
                # A refreshing scope is charged under its window key "<scope>@<window>"; a
                # reservation charges one window per scope, so the match is unique.
                keys = [k for k in charged if k == scope or k.startswith(f"{scope}@")]
                if len(keys) != 1:
                    raise ValueError(f"request '{request_id}' charged no scope {scope}")
                key = keys[0]
                if share > charged[key]:
                    raise ValueError(
                        f"share {share} of scope {key} exceeds its charge {charged[key]}"
                    )
                charged[key] -= share
                db.execute(
                    "UPDATE charges SET rho = ? WHERE consumer = ? AND request_id = ? AND scope = ?",
                    (_text(charged[key]), consumer, request_id, key),
                )
                self._add(db, key, _ZERO, -share)

    # -- reading ---------------------------------------------------------------------------

    def cache_key(
        self, query_digest: str, policy_version: str, limits: Sequence[ScopeLimit]
    ) -> str:
        """Identity of an answer: the same query under the same policy in the same windows."""
        now = self._clock()
        windows = "|".join(sorted(self._window_key(limit, now)[0] for limit in limits))
        return f"{query_digest}|{policy_version}|{windows}"

    def cached_answer(self, consumer: str, cache_key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response FROM answers WHERE consumer = ? AND cache_key = ?",
                (consumer, cache_key),
            ).fetchone()
        return bytes(row[0]) if row else None

    def balances(self, limits: Sequence[ScopeLimit]) -> list[Balance]:
        """Total, spent and reserved per scope in its current window."""
        now = self._clock()
        out = []
        with self._read_lock:
            try:
                self._reader.execute("BEGIN DEFERRED")  # one snapshot for every scope
                try:
                    for limit in limits:
                        key, end = self._window_key(limit, now)
                        spent, reserved = self._balance(self._reader, key)
                        out.append(Balance(limit.scope, key, limit.total, spent, reserved, end))
                finally:
                    self._reader.execute("COMMIT")
            except sqlite3.Error as err:
                raise LedgerUnavailable(
                    f"the budget ledger could not be read ({err})", metadata={"cause": str(err)}
                ) from err
        return out

    def verify(self) -> dict[str, tuple[Fraction, Fraction]]:
        """Recompute every running sum from the charges; raise if any differs (an audit aid)."""
        recomputed: dict[str, tuple[Fraction, Fraction]] = {}
        with self._lock:
            # One read transaction: both queries see the same snapshot even while another
            # gateway replica writes to the file.
            self._db.execute("BEGIN DEFERRED")
            try:
                rows = self._db.execute(
                    "SELECT c.scope, c.rho, r.state FROM charges c JOIN reservations r "
                    "USING (consumer, request_id) WHERE r.state != 'cancelled'"
                ).fetchall()
                stored = {
                    scope: (Fraction(spent), Fraction(reserved))
                    for scope, spent, reserved in self._db.execute("SELECT * FROM scope_balances")
                }
            finally:
                self._db.execute("COMMIT")
        for scope, rho, state in rows:
            spent, reserved = recomputed.get(scope, (_ZERO, _ZERO))
            amount = Fraction(rho)
            recomputed[scope] = (
                (spent + amount, reserved) if state == "committed" else (spent, reserved + amount)
            )
        for scope in set(stored) | set(recomputed):
            if stored.get(scope, (_ZERO, _ZERO)) != recomputed.get(scope, (_ZERO, _ZERO)):
                raise LedgerUnavailable(
                    f"running sums of scope '{scope}' disagree with its charges",
                    reason="LEDGER_INCONSISTENT",
                    metadata={"scope": scope},
                )
        return recomputed

    def scope_sums(self) -> dict[str, tuple[Fraction, Fraction]]:
        """Spent and reserved of every scope window the ledger has recorded (for metrics)."""
        with self._lock:
            rows = self._db.execute("SELECT scope, spent, reserved FROM scope_balances").fetchall()
        return {scope: (Fraction(spent), Fraction(reserved)) for scope, spent, reserved in rows}
