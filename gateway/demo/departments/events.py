"""The grid event centre: cases that residents report (sanitation, noise, disputes, repairs, ...).

A minority of adults report one or a few cases, in their own community. Cases close after a skewed
number of days (most within a week or two, some after months); about one in ten is still open when
the data is extracted, and an open case has neither a closing date nor a duration.

Each case has a ``handler``: the street's grid worker, or, for enforcement categories (illegal
construction, public safety), the district's enforcement team. The city publishes no list of
handlers, so the policy declares the column without a key set: its keys come from the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.demo._population import EPOCH_DAY_END, Population, categorical, uniform_days
from gateway.demo._tables import Department, TableSchema, dates, expand, integers, labels, take
from gateway.demo.geography import CASE_CATEGORIES, COMMUNITY_CODES, STREETS, STREETS_PER_DISTRICT

CASES = TableSchema.of(
    "cases",
    ("person_key", "VARCHAR"),
    ("community", "VARCHAR"),
    ("street", "VARCHAR"),
    ("category", "VARCHAR"),
    ("opened", "DATE"),
    ("closed", "DATE"),
    ("days_to_close", "INTEGER"),
    ("handler", "VARCHAR"),
)

REPORTER_MIN_AGE = 16
MAX_CASES = 10
MAX_DAYS_TO_CLOSE = 90
# Cases left open for reasons other than being recent (waiting on another office, disputed, ...).
STALLED_SHARE = 0.09
# Per CASE_CATEGORIES entry: how common it is and the typical days to close.
_CATEGORY_WEIGHTS = np.array([0.22, 0.16, 0.12, 0.18, 0.10, 0.08, 0.06, 0.08])
_CATEGORY_DAYS = np.array([3.0, 4.0, 12.0, 10.0, 14.0, 5.0, 2.0, 30.0])
_ENFORCEMENT = (
    CASE_CATEGORIES.index("illegal_construction"),
    CASE_CATEGORIES.index("public_safety"),
)


# Handlers: one grid worker per street, then one enforcement team per district.
_HANDLERS = tuple(f"worker-{s + 1:03d}" for s in range(len(STREETS))) + tuple(
    f"enforcement-{d + 1:02d}" for d in range(len(STREETS) // STREETS_PER_DISTRICT)
)


def _handlers(street: npt.NDArray[np.int64], category: npt.NDArray[np.int64]) -> Any:
    """The street's grid worker, or the district's enforcement team (no random draws, so the
    other columns stay as they were before this one existed)."""
    team = len(STREETS) + street // STREETS_PER_DISTRICT
    return labels(_HANDLERS, np.where(np.isin(category, _ENFORCEMENT), team, street))


def build_events_tables(people: Population, rng: np.random.Generator) -> dict[str, Any]:
    """The cases reported by ``people``."""
    chance = np.where(people.age >= REPORTER_MIN_AGE, 0.12, 0.0) + 0.06 * people.lives_alone_elderly
    reporter = np.flatnonzero(rng.random(people.size) < chance)
    per_reporter = 1 + np.minimum(rng.poisson(0.6, len(reporter)), MAX_CASES - 1)
    reported, _ = expand(per_reporter)
    owner = reporter[reported]
    rows = len(owner)
    category = categorical(rng, _CATEGORY_WEIGHTS, rows)
    opened = uniform_days(rng, rows)
    # Gamma with shape below 1 is strongly right-skewed: many same-week closures, a long tail.
    days = np.minimum(
        np.floor(rng.gamma(0.8, _CATEGORY_DAYS[category] / 0.8)), MAX_DAYS_TO_CLOSE
    ).astype(np.int64)
    still_open = (rng.random(rows) < STALLED_SHARE) | (opened + days > EPOCH_DAY_END)
    cases = CASES.arrow_table(
        {
            "person_key": take(people.person_key, owner),
            "community": labels(COMMUNITY_CODES, people.community[owner]),
            "street": labels(STREETS, people.street[owner]),
            "category": labels(CASE_CATEGORIES, category),
            "opened": dates(opened),
            "closed": dates(opened + days, missing=still_open),
            "days_to_close": integers(days, missing=still_open),
            "handler": _handlers(people.street[owner], category),
        }
    )
    return {CASES.name: cases}


DEPARTMENT = Department(silo="events", tables=(CASES,), build=build_events_tables)
