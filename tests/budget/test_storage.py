"""The ledger's storage failing: a locked file, a full database, a corrupt or foreign file, and
tampered running sums. Each fails closed (nothing reserved, nothing lost) with a clear error."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.errors import ConfigurationError, LedgerUnavailable

CONSUMER = "civil-affairs"
GRANT = ScopeLimit("consumer:civil-affairs/rule:civil-elderly-care", "lifetime", Fraction(1))
BUSY_TIMEOUT = 5.0  # seconds the ledger waits for a lock (``sqlite3.connect(timeout=...)``)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[PrivacyLedger]:
    opened = PrivacyLedger(ledger_path)
    yield opened
    opened.close()


def quarter() -> list[ScopeCharge]:
    return [ScopeCharge(GRANT, Fraction(1, 4))]


def lock_exclusively(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_a_file_locked_past_the_busy_timeout_fails_closed(ledger_path: Path) -> None:
    """Another process holds the write lock for longer than the ledger waits: a new reservation
    and a commit (through a second ledger object, concurrently) both fail as LEDGER_UNAVAILABLE.
    The open reservation stays charged and the refused request id is not recorded."""
    ledger, replica = PrivacyLedger(ledger_path), PrivacyLedger(ledger_path)
    try:
        ledger.reserve(CONSUMER, "in-flight", "d1", quarter())
        errors: dict[str, LedgerUnavailable] = {}

        def attempt(name: str, call: Callable[[], object]) -> None:
            try:
                call()
            except LedgerUnavailable as err:
                errors[name] = err

        calls = {
            "reserve": lambda: ledger.reserve(CONSUMER, "blocked", "d2", quarter()),
            "commit": lambda: replica.commit(CONSUMER, "in-flight", b"answer"),
        }
        threads = [threading.Thread(target=attempt, args=item) for item in calls.items()]
        holder = lock_exclusively(ledger_path)
        started = time.monotonic()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(3 * BUSY_TIMEOUT)
            waited = time.monotonic() - started
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        assert sorted(errors) == ["commit", "reserve"]
        for err in errors.values():
            assert err.reason == "LEDGER_UNAVAILABLE"
            assert "locked" in err.metadata["cause"]
        assert waited >= BUSY_TIMEOUT * 0.9  # it waited for the lock before giving up

        [found] = ledger.balances([GRANT])
        assert (found.spent, found.reserved) == (Fraction(0), Fraction(1, 4))
        assert ledger.reserve(CONSUMER, "in-flight", "d1", []).state == "reserved"
        assert not ledger.reserve(CONSUMER, "blocked", "d2", quarter()).is_replay
        replica.commit(CONSUMER, "in-flight", b"answer")
        assert ledger.verify() == {GRANT.scope: (Fraction(1, 4), Fraction(1, 4))}
    finally:
        ledger.close()
        replica.close()


def test_a_lock_shorter_than_the_busy_timeout_only_delays_the_reservation(
    ledger: PrivacyLedger, ledger_path: Path
) -> None:
    holder = lock_exclusively(ledger_path)
    release = threading.Timer(0.3, lambda: holder.execute("ROLLBACK"))
    release.start()
    started = time.monotonic()
    try:
        reservation = ledger.reserve(CONSUMER, "r", "d", quarter())
    finally:
        release.join()
        holder.close()
    assert time.monotonic() - started >= 0.25
    assert not reservation.is_replay
    assert ledger.balances([GRANT])[0].reserved == Fraction(1, 4)


def test_a_full_database_refuses_the_write_and_keeps_what_was_recorded(
    ledger: PrivacyLedger,
) -> None:
    """A full disk, simulated with SQLite's page limit on the ledger's own connection (the only
    way to make SQLite report SQLITE_FULL without a small file system)."""
    budget = ScopeLimit("population:city-residents", "lifetime", Fraction(10**6))
    ledger._db.execute("PRAGMA max_page_count = 12")
    reserved = 0
    with pytest.raises(LedgerUnavailable) as info:
        for i in range(10_000):
            ledger.reserve(CONSUMER, f"r{i}", "d" * 200, [ScopeCharge(budget, Fraction(1))])
            reserved += 1
    assert info.value.reason == "LEDGER_UNAVAILABLE"
    assert "full" in info.value.metadata["cause"]
    assert reserved > 0
    # The refused reservation left no trace; the earlier ones are all still charged.
    assert ledger.balances([budget])[0].reserved == reserved
    assert ledger.verify() == {budget.scope: (Fraction(0), Fraction(reserved))}
    with pytest.raises(LedgerUnavailable):
        ledger.commit(CONSUMER, "r0", b"x" * 100_000)
    assert ledger.reserve(CONSUMER, "r0", "d" * 200, []).state == "reserved"  # still charged


def test_a_file_of_random_bytes_is_refused_and_left_untouched(ledger_path: Path) -> None:
    garbage = random.Random(5).randbytes(16_384)
    ledger_path.write_bytes(garbage)
    with pytest.raises(ConfigurationError) as info:
        PrivacyLedger(ledger_path)
    assert info.value.reason == "LEDGER_UNAVAILABLE"
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert ledger_path.read_bytes() == garbage  # the evidence is kept for an operator


def test_a_directory_in_place_of_the_file_is_refused(ledger_path: Path) -> None:
    ledger_path.mkdir()
    with pytest.raises(ConfigurationError) as info:
        PrivacyLedger(ledger_path)
    assert info.value.reason == "LEDGER_UNAVAILABLE"


def test_a_truncated_ledger_is_refused(ledger_path: Path, tmp_path: Path) -> None:
    ledger = PrivacyLedger(ledger_path)
    limit = ScopeLimit("population:city-residents", "lifetime", Fraction(10**6))
    for i in range(200):
        ledger.reserve(CONSUMER, f"r{i}", "d" * 64, [ScopeCharge(limit, Fraction(1))])
    ledger.close()  # the last connection checkpoints the WAL into the main file
    whole = ledger_path.read_bytes()
    assert len(whole) > 16 * 4096
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigurationError) as info:
        PrivacyLedger(truncated)
    assert info.value.reason == "LEDGER_UNAVAILABLE"


def test_a_ledger_of_another_schema_version_is_refused(ledger_path: Path) -> None:
    PrivacyLedger(ledger_path).close()
    with sqlite3.connect(ledger_path) as db:
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.close()
    with pytest.raises(ConfigurationError, match="schema version 1") as info:
        PrivacyLedger(ledger_path)
    assert info.value.reason == "LEDGER_UNAVAILABLE"


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE scope_balances SET spent = '0/1'",
        "UPDATE scope_balances SET reserved = '1/8'",
        "DELETE FROM scope_balances",
        "UPDATE charges SET rho = '1/100' WHERE request_id = 'spent'",
        "DELETE FROM charges WHERE request_id = 'open'",
        "UPDATE reservations SET state = 'cancelled' WHERE request_id = 'spent'",
    ],
)
def test_verify_detects_running_sums_that_disagree_with_the_charges(
    ledger: PrivacyLedger, ledger_path: Path, tamper: str
) -> None:
    ledger.reserve(CONSUMER, "spent", "d1", quarter())
    ledger.commit(CONSUMER, "spent", b"")
    ledger.reserve(CONSUMER, "open", "d2", quarter())
    assert ledger.verify() == {GRANT.scope: (Fraction(1, 4), Fraction(1, 4))}
    with sqlite3.connect(ledger_path) as db:
        db.execute(tamper)
    db.close()
    with pytest.raises(LedgerUnavailable) as info:
        ledger.verify()
    assert info.value.reason == "LEDGER_INCONSISTENT"
    assert info.value.metadata == {"scope": GRANT.scope}


def test_verify_detects_a_running_sum_with_no_charges(
    ledger: PrivacyLedger, ledger_path: Path
) -> None:
    with sqlite3.connect(ledger_path) as db:
        db.execute("INSERT INTO scope_balances VALUES ('phantom', '1/2', '0/1')")
    db.close()
    with pytest.raises(LedgerUnavailable) as info:
        ledger.verify()
    assert info.value.metadata == {"scope": "phantom"}
