"""The civil-affairs department: every resident of the city, and the monthly subsidies it pays.

``civil.residents`` is the population register, one row per person, carrying the household facts
that other departments plan around (household size, living alone in old age, low income,
disability). ``civil.subsidies`` has one row per recipient, type and month paid: minimum-living
payments to every low-income resident, and, for part of those eligible, disability, elderly-care and
senior allowances.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.demo._population import PERIOD_END, PERIOD_START, Bools, Ints, Population
from gateway.demo._tables import Department, TableSchema, dates, expand, labels, take
from gateway.demo.geography import COMMUNITY_CODES, DISTRICTS, SEXES, STREETS, SUBSIDY_TYPES

RESIDENTS = TableSchema.of(
    "residents",
    ("person_key", "VARCHAR"),
    ("community", "VARCHAR"),
    ("street", "VARCHAR"),
    ("district", "VARCHAR"),
    ("birth_year", "INTEGER"),
    ("sex", "VARCHAR"),
    ("household_size", "INTEGER"),
    ("low_income", "BOOLEAN"),
    ("lives_alone_elderly", "BOOLEAN"),
    ("disability", "BOOLEAN"),
)
SUBSIDIES = TableSchema.of(
    "subsidies",
    ("person_key", "VARCHAR"),
    ("community", "VARCHAR"),
    ("month", "DATE"),
    ("subsidy_type", "VARCHAR"),
    ("amount", "DOUBLE"),
)

_FIRST_MONTH = PERIOD_START.astype("datetime64[M]")
MONTHS = int((PERIOD_END.astype("datetime64[M]") - _FIRST_MONTH).astype(np.int64)) + 1
# Paid amounts rise by this factor from January 2026 (annual indexation).
INDEXATION_2026 = 1.035
_MONTHS_BEFORE_2026 = int((np.datetime64("2026-01", "M") - _FIRST_MONTH).astype(np.int64))
# Per SUBSIDY_TYPES entry: share of the eligible who receive it, and the monthly amount range
# (yuan).
_TAKE_UP = (1.0, 0.5, 0.4, 0.7)
_AMOUNT_RANGE = ((600.0, 1600.0), (200.0, 600.0), (300.0, 900.0), (200.0, 500.0))
_ALREADY_PAID_SHARE = 0.7
_PAID_TO_END_SHARE = 0.85


def _eligible(people: Population) -> tuple[Bools, ...]:
    """Who may receive each subsidy type, in ``SUBSIDY_TYPES`` order."""
    return (people.low_income, people.disability, people.lives_alone_elderly, people.age >= 80)


def _first_of_month(month_index: Ints) -> Ints:
    """Days since 1970-01-01 of the first day of the ``month_index``-th month of the period."""
    return np.asarray((_FIRST_MONTH + month_index).astype("datetime64[D]"), dtype=np.int64)


def build_civil_tables(people: Population, rng: np.random.Generator) -> dict[str, Any]:
    """The residents register for ``people`` and their subsidy payments."""
    residents = RESIDENTS.arrow_table(
        {
            "person_key": people.person_key,
            "community": labels(COMMUNITY_CODES, people.community),
            "street": labels(STREETS, people.street),
            "district": labels(DISTRICTS, people.district),
            "birth_year": people.birth_year,
            "sex": labels(SEXES, people.sex),
            "household_size": people.household_size,
            "low_income": people.low_income,
            "lives_alone_elderly": people.lives_alone_elderly,
            "disability": people.disability,
        }
    )

    recipients: list[Ints] = []
    kinds: list[Ints] = []
    for subsidy, eligible in enumerate(_eligible(people)):
        candidates = np.flatnonzero(eligible)
        recipients.append(candidates[rng.random(len(candidates)) < _TAKE_UP[subsidy]])
        kinds.append(np.full(len(recipients[-1]), subsidy, dtype=np.int64))
    recipient = np.concatenate(recipients)
    kind = np.concatenate(kinds)
    grants = len(recipient)
    # Most payments started before the period and are still running; the rest start or stop inside.
    start = np.where(
        rng.random(grants) < _ALREADY_PAID_SHARE, 0, rng.integers(0, MONTHS, size=grants)
    )
    stop = np.where(
        rng.random(grants) < _PAID_TO_END_SHARE,
        MONTHS - 1,
        rng.integers(start, MONTHS, size=grants),
    )
    amount_range = np.array(_AMOUNT_RANGE)[kind]
    base_amount = np.round(rng.uniform(amount_range[:, 0], amount_range[:, 1]), 2)
    grant, month_offset = expand(stop - start + 1)
    month = start[grant] + month_offset
    amount = np.where(
        month >= _MONTHS_BEFORE_2026,
        np.round(base_amount[grant] * INDEXATION_2026, 2),
        base_amount[grant],
    )
    owner = recipient[grant]
    subsidies = SUBSIDIES.arrow_table(
        {
            "person_key": take(people.person_key, owner),
            "community": labels(COMMUNITY_CODES, people.community[owner]),
            "month": dates(_first_of_month(month)),
            "subsidy_type": labels(SUBSIDY_TYPES, kind[grant]),
            "amount": amount,
        }
    )
    return {RESIDENTS.name: residents, SUBSIDIES.name: subsidies}


DEPARTMENT = Department(silo="civil", tables=(RESIDENTS, SUBSIDIES), build=build_civil_tables)
