"""``budget_period`` records: one per scope and rollover, with the closed window's spending, never
two for the same window across restarts and crashes (a controllable clock, a real ledger and log)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.errors import AuditUnavailable
from gateway.audit.log import AuditLog
from gateway.audit.store import iter_records
from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.server.budget_periods import BudgetPeriodWatcher, declared_scopes

MONTHLY = ScopeLimit("consumer:civil-affairs/rule:r/month", "month", Fraction(2))
DAILY = ScopeLimit("population:residents/day", "day", Fraction(1))
FOREVER = ScopeLimit("population:patients/lifetime", "lifetime", Fraction(5))
SCOPES = [MONTHLY, DAILY, FOREVER]


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(dt.datetime(2026, 10, 31, 23, 0, tzinfo=dt.UTC))


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[PrivacyLedger]:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", clock=clock)
    yield ledger
    ledger.close()


class Gateway:
    """The parts of a gateway the watcher uses, reopened as after a restart."""

    def __init__(self, root: Path, ledger: PrivacyLedger, clock: Clock) -> None:
        self.root, self.ledger, self.clock = root, ledger, clock
        self.audit = AuditLog(root / "audit")
        self.watcher = BudgetPeriodWatcher(
            root / "ledger.sqlite", ledger, self.audit, lambda: SCOPES, clock=clock
        )

    def restart(self) -> Gateway:
        self.watcher.stop()
        self.audit.close()
        return Gateway(self.root, self.ledger, self.clock)

    def records(self) -> list[dict[str, Any]]:
        return [r for r in iter_records(self.root / "audit") if r["kind"] == "budget_period"]


@pytest.fixture
def gateway(tmp_path: Path, ledger: PrivacyLedger, clock: Clock) -> Iterator[Gateway]:
    running = Gateway(tmp_path, ledger, clock)
    yield running
    running.watcher.stop()
    running.audit.close()


def _spend(ledger: PrivacyLedger, request_id: str, cost: Fraction, *limits: ScopeLimit) -> None:
    charges = [ScopeCharge(limit, cost) for limit in limits]
    ledger.reserve("civil-affairs", request_id, f"digest-{request_id}", charges)
    ledger.commit("civil-affairs", request_id, b"answer")


def test_a_rollover_is_recorded_once_per_scope(
    gateway: Gateway, ledger: PrivacyLedger, clock: Clock
) -> None:
    assert gateway.watcher.check() == []  # first sight: remembered, nothing to close
    _spend(ledger, "a", Fraction(1, 8), MONTHLY, DAILY)
    _spend(ledger, "b", Fraction(1, 4), MONTHLY)
    ledger.reserve("civil-affairs", "open", "d", [ScopeCharge(DAILY, Fraction(1, 16))])
    clock.now += dt.timedelta(minutes=59)  # 23:59, still October 31
    assert gateway.watcher.check() == []
    clock.now += dt.timedelta(minutes=2)  # November 1st: a new day and a new month
    sequences = gateway.watcher.check()
    assert len(sequences) == 2
    records = gateway.records()
    assert [r["seq"] for r in records] == sequences
    by_scope = {r["scope"]: r for r in records}
    assert set(by_scope) == {MONTHLY.scope, DAILY.scope}  # never the lifetime scope
    month = by_scope[MONTHLY.scope]
    assert month["period"] == "month" and month["total_rho"] == "2"
    assert month["time_zone"] == "UTC"
    assert month["closed"] == {"window": "month:2026-10", "spent_rho": "3/8", "reserved_rho": "0"}
    assert month["opened"] == {
        "window": "month:2026-11",
        "ends_at": "2026-12-01T00:00:00+00:00",
    }
    day = by_scope[DAILY.scope]
    assert day["closed"] == {
        "window": "day:2026-10-31",
        "spent_rho": "1/8",
        "reserved_rho": "1/16",  # still open when the window closed
    }
    assert day["opened"]["window"] == "day:2026-11-01"
    assert gateway.watcher.check() == []  # the same windows: nothing more


def test_a_restart_never_records_a_window_twice(
    gateway: Gateway, ledger: PrivacyLedger, clock: Clock
) -> None:
    gateway.watcher.check()
    clock.now += dt.timedelta(hours=2)
    assert len(gateway.watcher.check()) == 2
    gateway = gateway.restart()
    assert gateway.watcher.check() == []
    # Down for three days: one record closes the last known day and opens today.
    gateway = gateway.restart()
    clock.now += dt.timedelta(days=3)
    assert len(gateway.watcher.check()) == 1
    [*_, last] = gateway.records()
    assert (last["closed"]["window"], last["opened"]["window"]) == (
        "day:2026-11-01",
        "day:2026-11-04",
    )
    assert last["closed"]["spent_rho"] == "0"
    assert len(gateway.records()) == 3
    gateway.watcher.stop()
    gateway.audit.close()


def test_a_crash_after_the_record_is_written_does_not_repeat_it(
    gateway: Gateway, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.watcher.check()
    clock.now += dt.timedelta(hours=2)

    def crash(*_: object) -> None:
        raise KeyboardInterrupt  # the process dies between the append and the bookkeeping

    monkeypatch.setattr(gateway.watcher, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        gateway.watcher.check()
    assert len(gateway.records()) == 1  # the first change's record is durable
    monkeypatch.undo()
    gateway = gateway.restart()
    assert len(gateway.watcher.check()) == 1  # only the change that had no record yet
    records = gateway.records()
    assert sorted(r["scope"] for r in records) == sorted([MONTHLY.scope, DAILY.scope])
    assert gateway.watcher.check() == []
    gateway.watcher.stop()
    gateway.audit.close()


def test_a_failed_append_is_retried_later(
    gateway: Gateway, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.watcher.check()
    clock.now += dt.timedelta(hours=2)

    def unavailable(*_: object) -> int:
        raise AuditUnavailable("disk full")

    monkeypatch.setattr(gateway.audit, "append", unavailable)
    with pytest.raises(AuditUnavailable):
        gateway.watcher.check()
    monkeypatch.undo()
    assert gateway.records() == []
    assert len(gateway.watcher.check()) == 2  # pending changes without a record: written now
    assert gateway.watcher.check() == []


def test_the_background_check_runs_at_start(gateway: Gateway, clock: Clock) -> None:
    gateway.watcher.check()
    clock.now += dt.timedelta(hours=2)
    gateway.watcher.start(interval_seconds=3600)
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while len(gateway.records()) < 2 and dt.datetime.now() < deadline:
        time.sleep(0.05)
    gateway.watcher.stop()
    assert len(gateway.records()) == 2


def test_declared_scopes_are_the_refreshing_scopes_of_the_policy() -> None:
    from gateway.policy.loader import load_bundle

    bundle = load_bundle(Path(__file__).resolve().parents[2] / "policies")
    scopes = declared_scopes(bundle)
    assert scopes and all(s.period != "lifetime" for s in scopes)
    assert len({s.scope for s in scopes}) == len(scopes)
    assert all(s.scope.endswith(f"/{s.period}") for s in scopes)
    assert {s.period for s in scopes} <= {"day", "month", "quarter", "year"}
