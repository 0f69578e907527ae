"""Budget periods: which calendar window an instant falls in, in the configured time zone.

A scope with a refreshing period (day, month, quarter, year) is charged in the window that holds
the query's single reservation instant, so one query never charges two periods. ``lifetime`` has
one window that never ends.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

PERIODS = ("lifetime", "day", "month", "quarter", "year")


@dataclass(frozen=True)
class Window:
    """One period window: a stable label (part of the ledger key) and its end (None: lifetime)."""

    label: str
    end: dt.datetime | None


def _month_start(year: int, month: int, zone: ZoneInfo) -> dt.datetime:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return dt.datetime(year, month, 1, tzinfo=zone)


def window(period: str, instant: dt.datetime, zone: ZoneInfo) -> Window:
    """The window of ``period`` that holds ``instant`` (an aware datetime)."""
    if instant.tzinfo is None:
        raise ValueError("instant must be timezone-aware")
    local = instant.astimezone(zone)
    if period == "lifetime":
        return Window("lifetime", None)
    if period == "day":
        start = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
        # Adding a calendar day in local time keeps DST days 23 or 25 hours long.
        next_day = (start + dt.timedelta(days=1)).date()
        end = dt.datetime(next_day.year, next_day.month, next_day.day, tzinfo=zone)
        return Window(f"day:{start.date().isoformat()}", end)
    if period == "month":
        return Window(
            f"month:{local.year:04d}-{local.month:02d}",
            _month_start(local.year, local.month + 1, zone),
        )
    if period == "quarter":
        quarter = (local.month - 1) // 3
        return Window(
            f"quarter:{local.year:04d}-Q{quarter + 1}",
            _month_start(local.year, quarter * 3 + 4, zone),
        )
    if period == "year":
        return Window(f"year:{local.year:04d}", dt.datetime(local.year + 1, 1, 1, tzinfo=zone))
    raise ValueError(f"unknown budget period {period!r}; expected one of {', '.join(PERIODS)}")
