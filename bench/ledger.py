"""Reserve+commit throughput of the privacy ledger with durability on (WAL, ``synchronous=FULL``).

Each query reserves in two scopes (a monthly grant and a lifetime population) and commits, as
the gateway does: two transactions per query, the reservation fsynced, the commit not (a lost
commit leaves the reservation charged, see ``gateway/budget/ledger.py``). Baseline, measured in the same run on
another file with the same settings: plain single-row ``INSERT`` + ``COMMIT`` transactions, one
per query, so the ratio shows what the ledger costs beyond the fsyncs SQLite needs anyway. A
second measurement on top of a history of earlier reservations shows that a reservation costs
O(scopes), not O(history). Issue 5's target: >= 2,000 reserve+commit per second.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit

QUERIES = 5_000
HISTORY = 50_000
ROUNDS = 3
TARGET = 2_000  # reserve+commit per second (issue 5)
CONSUMER = "civil-affairs"
CHARGES = [
    ScopeCharge(
        ScopeLimit("consumer:civil-affairs/rule:civil-elderly-care", "month", Fraction(10**9)),
        Fraction(1, 800),
    ),
    ScopeCharge(
        ScopeLimit("population:city-residents", "lifetime", Fraction(10**9)), Fraction(1, 800)
    ),
]
RESPONSE = b"\x08\x01" * 256  # about the size of a small serialised RunQueryResponse


def _ledger_queries(ledger: PrivacyLedger, prefix: str, count: int) -> float:
    """Seconds for ``count`` reserve+commit pairs."""
    started = time.perf_counter()
    for i in range(count):
        request_id = f"{prefix}-{i}"
        ledger.reserve(CONSUMER, request_id, f"digest-{request_id}", CHARGES)
        ledger.commit(CONSUMER, request_id, RESPONSE)
    return time.perf_counter() - started


def _plain_transactions(path: Path, count: int) -> float:
    """Seconds for ``count`` single-row INSERT + COMMIT transactions, durable as the ledger is."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE rows (id TEXT PRIMARY KEY, body BLOB NOT NULL)")
        started = time.perf_counter()
        for i in range(count):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO rows VALUES (?, ?)", (f"row-{i}", RESPONSE))
            db.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        db.close()


def run(queries: int = QUERIES, history: int = HISTORY) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Interleaved rounds on fresh files, so that a noisy disk affects both arms alike.
        plain_rates, fresh_rates = [], []
        for round_ in range(ROUNDS):
            seconds = _plain_transactions(folder / f"plain-{round_}.sqlite", queries)
            plain_rates.append(queries / seconds)
            ledger = PrivacyLedger(folder / f"ledger-{round_}.sqlite")
            try:
                fresh_rates.append(queries / _ledger_queries(ledger, "fresh", queries))
            finally:
                ledger.close()
        ledger = PrivacyLedger(folder / f"ledger-{ROUNDS - 1}.sqlite")
        try:
            filled = history / _ledger_queries(ledger, "history", history)
            aged_rates = [
                queries / _ledger_queries(ledger, f"aged-{round_}", queries)
                for round_ in range(ROUNDS)
            ]
        finally:
            ledger.close()
    plain = statistics.median(plain_rates)
    fresh = statistics.median(fresh_rates)
    aged = statistics.median(aged_rates)
    prior = queries + history
    sys.stdout.write(
        f"ledger   plain INSERT+COMMIT (baseline)    {plain:7,.0f} transactions/s\n"
        f"ledger   reserve+commit, fresh file        {fresh:7,.0f} queries/s "
        f"({2 * fresh:,.0f} transactions/s) ratio={fresh / plain:4.2f} "
        f"target >= {TARGET:,}/s {'met' if fresh >= TARGET else 'NOT met'}\n"
        f"ledger   reserve+commit, after {prior:,} {aged:7,.0f} queries/s "
        f"ratio={aged / plain:4.2f}, {aged / fresh:4.2f} of fresh "
        f"(history written at {filled:,.0f}/s)\n"
        f"ledger   medians of {ROUNDS} rounds of {queries:,}; 2 scopes per query; "
        f"WAL; reservations synchronous=FULL, commits without their own fsync\n"
    )
