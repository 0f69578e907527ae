"""Budget periods: calendar windows in a time zone, and the ledger charging them by its clock.

Instants are written in UTC and the expected window ends too, so each case states exactly which
moment it means; the zone decides which local day, month, quarter or year that moment is in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.budget.periods import PERIODS, window
from gateway.errors import BudgetExhausted, ConfigurationError, LedgerUnavailable

UTC = dt.UTC
SHANGHAI = ZoneInfo("Asia/Shanghai")  # UTC+8 all year
BERLIN = ZoneInfo("Europe/Berlin")  # CET/CEST; 2026: summer time 29 March to 25 October
CONSUMER = "civil-affairs"


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# --- windows ------------------------------------------------------------------------------------

LAST_MS_OF_2026_SHANGHAI = utc(2026, 12, 31, 15, 59, 59, 999_000)  # 23:59:59.999 local
FIRST_INSTANT_OF_2027_SHANGHAI = utc(2026, 12, 31, 16)  # 00:00 local


@pytest.mark.parametrize(
    ("zone", "period", "instant", "label", "end"),
    [
        # The last millisecond of a year in Shanghai: every period ends at local midnight.
        (SHANGHAI, "day", LAST_MS_OF_2026_SHANGHAI, "day:2026-12-31", utc(2026, 12, 31, 16)),
        (SHANGHAI, "month", LAST_MS_OF_2026_SHANGHAI, "month:2026-12", utc(2026, 12, 31, 16)),
        (SHANGHAI, "quarter", LAST_MS_OF_2026_SHANGHAI, "quarter:2026-Q4", utc(2026, 12, 31, 16)),
        (SHANGHAI, "year", LAST_MS_OF_2026_SHANGHAI, "year:2026", utc(2026, 12, 31, 16)),
        # ... and its first instant of the next year, while UTC is still in 2026.
        (SHANGHAI, "day", FIRST_INSTANT_OF_2027_SHANGHAI, "day:2027-01-01", utc(2027, 1, 1, 16)),
        (SHANGHAI, "month", FIRST_INSTANT_OF_2027_SHANGHAI, "month:2027-01", utc(2027, 1, 31, 16)),
        (
            SHANGHAI,
            "quarter",
            FIRST_INSTANT_OF_2027_SHANGHAI,
            "quarter:2027-Q1",
            utc(2027, 3, 31, 16),
        ),
        (SHANGHAI, "year", FIRST_INSTANT_OF_2027_SHANGHAI, "year:2027", utc(2027, 12, 31, 16)),
        (ZoneInfo("UTC"), "year", FIRST_INSTANT_OF_2027_SHANGHAI, "year:2026", utc(2027, 1, 1)),
        # Quarter boundaries inside a year.
        (
            SHANGHAI,
            "quarter",
            utc(2026, 3, 31, 15, 59, 59),
            "quarter:2026-Q1",
            utc(2026, 3, 31, 16),
        ),
        (SHANGHAI, "quarter", utc(2026, 3, 31, 16), "quarter:2026-Q2", utc(2026, 6, 30, 16)),
        (SHANGHAI, "quarter", utc(2026, 8, 15), "quarter:2026-Q3", utc(2026, 9, 30, 16)),
        (SHANGHAI, "month", utc(2028, 2, 10), "month:2028-02", utc(2028, 2, 29, 16)),  # leap year
        # Berlin: the day summer time starts has 23 hours and ends at midnight CEST (UTC+2).
        (BERLIN, "day", utc(2026, 3, 28, 12), "day:2026-03-28", utc(2026, 3, 28, 23)),
        (BERLIN, "day", utc(2026, 3, 29, 10), "day:2026-03-29", utc(2026, 3, 29, 22)),
        (BERLIN, "month", utc(2026, 3, 1), "month:2026-03", utc(2026, 3, 31, 22)),
        (BERLIN, "quarter", utc(2026, 2, 1), "quarter:2026-Q1", utc(2026, 3, 31, 22)),
        # The day summer time ends has 25 hours; 02:30 happens twice and both are that day.
        (BERLIN, "day", utc(2026, 10, 25, 0, 30), "day:2026-10-25", utc(2026, 10, 25, 23)),
        (BERLIN, "day", utc(2026, 10, 25, 1, 30), "day:2026-10-25", utc(2026, 10, 25, 23)),
        (BERLIN, "month", utc(2026, 10, 25, 1, 30), "month:2026-10", utc(2026, 10, 31, 23)),
        (BERLIN, "year", utc(2026, 12, 31, 22, 59, 59), "year:2026", utc(2026, 12, 31, 23)),
        (BERLIN, "year", utc(2026, 12, 31, 23), "year:2027", utc(2027, 12, 31, 23)),
    ],
)
def test_window_label_and_end(
    zone: ZoneInfo, period: str, instant: dt.datetime, label: str, end: dt.datetime
) -> None:
    found = window(period, instant, zone)
    assert found.label == label
    assert found.end is not None
    assert found.end.astimezone(UTC) == end
    # The end is written in the configured zone, so a report shows local midnight.
    local_end = found.end.astimezone(zone)
    assert (local_end.hour, local_end.minute, local_end.second, local_end.microsecond) == (
        0,
        0,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("day", "hours"),
    [
        (utc(2026, 3, 29, 10), 23),  # summer time starts
        (utc(2026, 7, 1, 10), 24),
        (utc(2026, 10, 25, 10), 25),  # summer time ends
    ],
)
def test_days_across_a_daylight_saving_change_are_23_or_25_hours(
    day: dt.datetime, hours: int
) -> None:
    end = window("day", day, BERLIN).end
    before = window("day", day - dt.timedelta(days=1), BERLIN).end
    assert end is not None
    assert before is not None
    # Subtracting in UTC: datetimes sharing a tzinfo subtract as wall-clock times.
    assert end.astimezone(UTC) - before.astimezone(UTC) == dt.timedelta(hours=hours)


def test_lifetime_has_one_window_that_never_ends() -> None:
    for instant in (utc(1999, 1, 1), utc(2026, 11, 5), utc(2099, 12, 31, 23, 59, 59)):
        assert window("lifetime", instant, SHANGHAI).label == "lifetime"
        assert window("lifetime", instant, SHANGHAI).end is None


def test_window_refuses_a_naive_instant_and_an_unknown_period() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window("day", dt.datetime(2026, 11, 5, 12), BERLIN)
    with pytest.raises(ValueError, match="unknown budget period 'week'"):
        window("week", utc(2026, 11, 5), BERLIN)


# Zones with unusual calendars: no DST, DST at 02:00, DST at midnight (Sao Paulo until 2019,
# Havana), half-hour DST (Lord Howe), a 5:45 offset, and Samoa, which skipped 30 December 2011.
ZONES = [
    "UTC",
    "Asia/Shanghai",
    "Europe/Berlin",
    "America/Sao_Paulo",
    "America/Havana",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Apia",
]
REFRESHING = [p for p in PERIODS if p != "lifetime"]


@settings(max_examples=300, deadline=None)
@given(
    zone_name=st.sampled_from(ZONES),
    period=st.sampled_from(REFRESHING),
    naive=st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2060, 1, 1)),
)
@example(zone_name="Pacific/Apia", period="day", naive=dt.datetime(2011, 12, 29, 20))
@example(zone_name="America/Sao_Paulo", period="day", naive=dt.datetime(2018, 11, 3, 12))
@example(zone_name="America/Havana", period="month", naive=dt.datetime(2026, 10, 31, 12))
def test_every_window_is_exactly_the_instants_up_to_its_end(
    zone_name: str, period: str, naive: dt.datetime
) -> None:
    """The window holding an instant names the instant's local calendar unit, and its end is the
    first instant of the next window: one microsecond earlier is still this window."""
    zone = ZoneInfo(zone_name)
    instant = naive.replace(tzinfo=UTC)
    local = instant.astimezone(zone)
    found = window(period, instant, zone)
    expected = {
        "day": f"day:{local:%Y-%m-%d}",
        "month": f"month:{local:%Y-%m}",
        "quarter": f"quarter:{local.year:04d}-Q{(local.month - 1) // 3 + 1}",
        "year": f"year:{local.year:04d}",
    }[period]
    assert found.label == expected
    assert found.end is not None
    end = found.end.astimezone(UTC)
    assert instant < end
    assert window(period, end - dt.timedelta(microseconds=1), zone).label == found.label
    following = window(period, end, zone)
    assert following.label > found.label  # ISO labels sort in time order
    assert following.end is not None
    assert following.end.astimezone(UTC) > end


# --- the ledger's clock ---------------------------------------------------------------------------


class ManualClock:
    """A clock the test sets; ``tick`` is added after every reading."""

    def __init__(self, now: dt.datetime, tick: dt.timedelta = dt.timedelta(0)) -> None:
        self.now = now
        self.tick = tick
        self.readings = 0

    def __call__(self) -> dt.datetime:
        reading = self.now
        self.now += self.tick
        self.readings += 1
        return reading


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(utc(2026, 11, 10, 9))


@pytest.fixture
def ledger(ledger_path: Path, clock: ManualClock) -> Iterator[PrivacyLedger]:
    opened = PrivacyLedger(ledger_path, time_zone="Europe/Berlin", clock=clock)
    yield opened
    opened.close()


MONTHLY = ScopeLimit("consumer:civil-affairs/rule:monthly", "month", Fraction(1))
FOREVER = ScopeLimit("population:city-residents", "lifetime", Fraction(3))


def test_a_query_at_the_last_instant_of_a_year_is_charged_wholly_in_that_year(
    ledger_path: Path,
) -> None:
    """The clock moves on by a millisecond at every reading, so a second reading inside
    ``reserve`` would already be in 2027: every window charged must still be 2026's."""
    clock = ManualClock(LAST_MS_OF_2026_SHANGHAI, tick=dt.timedelta(milliseconds=1))
    ledger = PrivacyLedger(ledger_path, time_zone="Asia/Shanghai", clock=clock)
    try:
        limits = [ScopeLimit(f"s-{period}", period, Fraction(1)) for period in PERIODS]
        reservation = ledger.reserve(
            CONSUMER, "r", "d", [ScopeCharge(limit, Fraction(1, 4)) for limit in limits]
        )
        charged = {
            "s-lifetime",
            "s-day@day:2026-12-31",
            "s-month@month:2026-12",
            "s-quarter@quarter:2026-Q4",
            "s-year@year:2026",
        }
        assert reservation.windows == "|".join(sorted(charged))
        ledger.commit(CONSUMER, "r", b"answer")
        assert ledger.verify() == dict.fromkeys(charged, (Fraction(1, 4), Fraction(0)))
        # It is 2027 now: every refreshing scope is full again, and ends a period later.
        after = {b.scope: b for b in ledger.balances(limits)}
        assert after["s-year"].window == "s-year@year:2027"
        assert after["s-year"].remaining == 1
        assert after["s-day"].remaining == 1
        assert after["s-lifetime"].remaining == Fraction(3, 4)
    finally:
        ledger.close()


def test_a_commit_after_the_month_ends_is_spent_in_the_month_it_was_reserved_in(
    ledger: PrivacyLedger, clock: ManualClock
) -> None:
    clock.now = utc(2026, 11, 30, 22, 59, 59, 999_000)  # 23:59:59.999 in Berlin
    ledger.reserve(CONSUMER, "late", "d", [ScopeCharge(MONTHLY, Fraction(1, 2))])
    clock.now = utc(2026, 12, 1, 8)
    ledger.commit(CONSUMER, "late", b"answer")
    assert ledger.verify() == {f"{MONTHLY.scope}@month:2026-11": (Fraction(1, 2), Fraction(0))}
    [december] = ledger.balances([MONTHLY])
    assert (december.window, december.remaining) == (f"{MONTHLY.scope}@month:2026-12", Fraction(1))


def test_spending_in_one_month_leaves_the_next_month_whole(
    ledger: PrivacyLedger, clock: ManualClock
) -> None:
    charges = [ScopeCharge(MONTHLY, Fraction(1)), ScopeCharge(FOREVER, Fraction(1))]
    ledger.reserve(CONSUMER, "november", "d1", charges)
    ledger.commit(CONSUMER, "november", b"")
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(CONSUMER, "november-2", "d2", [ScopeCharge(MONTHLY, Fraction(1, 100))])
    assert info.value.metadata["scope"] == f"{MONTHLY.scope}@month:2026-11"
    assert info.value.metadata["remaining_rho"] == "0/1"
    monthly, forever = ledger.balances([MONTHLY, FOREVER])
    assert monthly.window == f"{MONTHLY.scope}@month:2026-11"
    assert (monthly.spent, monthly.remaining) == (Fraction(1), Fraction(0))
    assert monthly.period_end is not None
    assert monthly.period_end.astimezone(UTC) == utc(2026, 11, 30, 23)  # Berlin midnight, CET
    assert (forever.window, forever.spent, forever.period_end) == (FOREVER.scope, Fraction(1), None)

    clock.now = utc(2026, 11, 30, 23)  # midnight in Berlin: December
    monthly, forever = ledger.balances([MONTHLY, FOREVER])
    assert monthly.window == f"{MONTHLY.scope}@month:2026-12"
    assert (monthly.spent, monthly.reserved) == (Fraction(0), Fraction(0))
    assert monthly.period_end is not None
    assert monthly.period_end.astimezone(UTC) == utc(2026, 12, 31, 23)
    assert forever.spent == 1  # lifetime spending carries over
    ledger.reserve(CONSUMER, "december", "d3", charges)
    ledger.commit(CONSUMER, "december", b"")

    clock.now = utc(2027, 1, 15)
    ledger.reserve(CONSUMER, "january", "d4", charges)
    ledger.commit(CONSUMER, "january", b"")
    assert ledger.balances([FOREVER])[0].remaining == 0

    # February's month has room; the lifetime scope does not, and is the one named.
    clock.now = utc(2027, 2, 15)
    assert ledger.balances([MONTHLY])[0].remaining == 1
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(CONSUMER, "february", "d5", charges)
    assert info.value.metadata["scope"] == FOREVER.scope
    assert ledger.verify() == {
        f"{MONTHLY.scope}@month:2026-11": (Fraction(1), Fraction(0)),
        f"{MONTHLY.scope}@month:2026-12": (Fraction(1), Fraction(0)),
        f"{MONTHLY.scope}@month:2027-01": (Fraction(1), Fraction(0)),
        FOREVER.scope: (Fraction(3), Fraction(0)),
    }


def test_a_clock_behind_the_ledger_is_refused_and_nothing_is_reserved(
    ledger_path: Path, ledger: PrivacyLedger, clock: ManualClock
) -> None:
    ledger.reserve(CONSUMER, "first", "d1", [ScopeCharge(MONTHLY, Fraction(1, 4))])
    recorded = clock.now
    clock.now = recorded - dt.timedelta(seconds=5, microseconds=1)
    with pytest.raises(LedgerUnavailable) as info:
        ledger.reserve(CONSUMER, "second", "d2", [ScopeCharge(MONTHLY, Fraction(1, 4))])
    assert info.value.reason == "LEDGER_CLOCK_BEHIND"
    assert info.value.metadata == {
        "now": clock.now.isoformat(),
        "latest": recorded.isoformat(),
    }
    assert ledger.balances([MONTHLY])[0].reserved == Fraction(1, 4)
    # A cached answer is not handed out from a clock that is behind either.
    with pytest.raises(LedgerUnavailable, match="clock is behind"):
        ledger.reserve(CONSUMER, "free", "d3", [], cache_key="any")
    # A replay needs no clock: the client still gets its answer.
    assert ledger.reserve(CONSUMER, "first", "d1", []).state == "reserved"

    # The latest instant is in the file: a restarted gateway with the same clock refuses too.
    reopened = PrivacyLedger(ledger_path, time_zone="Europe/Berlin", clock=clock)
    try:
        with pytest.raises(LedgerUnavailable) as info:
            reopened.reserve(CONSUMER, "second", "d2", [ScopeCharge(MONTHLY, Fraction(1, 4))])
        assert info.value.reason == "LEDGER_CLOCK_BEHIND"
    finally:
        reopened.close()

    clock.now = recorded + dt.timedelta(seconds=1)
    assert not ledger.reserve(
        CONSUMER, "second", "d2", [ScopeCharge(MONTHLY, Fraction(1, 4))]
    ).is_replay
    assert not ledger.reserve(CONSUMER, "free", "d3", []).is_replay
    assert ledger.verify() == {f"{MONTHLY.scope}@month:2026-11": (Fraction(0), Fraction(1, 2))}


@pytest.mark.parametrize(
    "back",
    [dt.timedelta(seconds=5), dt.timedelta(seconds=4, microseconds=999_999), dt.timedelta(0)],
)
def test_a_clock_behind_by_at_most_the_tolerance_is_accepted(
    ledger: PrivacyLedger, clock: ManualClock, back: dt.timedelta
) -> None:
    ledger.reserve(CONSUMER, "first", "d1", [ScopeCharge(MONTHLY, Fraction(1, 4))])
    clock.now -= back
    assert not ledger.reserve(
        CONSUMER, "second", "d2", [ScopeCharge(MONTHLY, Fraction(1, 4))]
    ).is_replay
    assert ledger.balances([MONTHLY])[0].reserved == Fraction(1, 2)


def test_a_zero_tolerance_refuses_any_step_back(ledger_path: Path, clock: ManualClock) -> None:
    ledger = PrivacyLedger(ledger_path, clock=clock, clock_tolerance=dt.timedelta(0))
    try:
        ledger.reserve(CONSUMER, "first", "d1", [ScopeCharge(FOREVER, Fraction(1))])
        clock.now -= dt.timedelta(microseconds=1)
        with pytest.raises(LedgerUnavailable) as info:
            ledger.reserve(CONSUMER, "second", "d2", [ScopeCharge(FOREVER, Fraction(1))])
        assert info.value.reason == "LEDGER_CLOCK_BEHIND"
        assert ledger.balances([FOREVER])[0].reserved == 1
    finally:
        ledger.close()


def test_an_unknown_time_zone_is_a_configuration_error(ledger_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        PrivacyLedger(ledger_path, time_zone="Mars/Olympus_Mons")
    assert info.value.reason == "CONFIG_INVALID"
    assert info.value.metadata == {"time_zone": "Mars/Olympus_Mons"}
    assert not ledger_path.exists()
