"""The health commission: the chronic-condition registry and home-care visits to older patients.

Chronic conditions are rare before 40 and common after 70 (about 60% have at least one); patients
may have several. Home care goes to part of the chronic patients aged 60 or more, more often to the
oldest, to those living alone and to the disabled, who then get several visits each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.demo._population import (
    REFERENCE_YEAR,
    Floats,
    Ints,
    Population,
    categorical,
    uniform_days,
)
from gateway.demo._tables import Department, TableSchema, dates, expand, labels, take
from gateway.demo.geography import COMMUNITY_CODES, CONDITIONS, VISIT_TYPES

CHRONIC = TableSchema.of(
    "chronic",
    ("person_key", "VARCHAR"),
    ("community", "VARCHAR"),
    ("condition", "VARCHAR"),
    ("diagnosed_year", "INTEGER"),
    ("birth_year", "INTEGER"),
)
VISITS = TableSchema.of(
    "visits",
    ("person_key", "VARCHAR"),
    ("community", "VARCHAR"),
    ("visit_date", "DATE"),
    ("visit_type", "VARCHAR"),
    ("minutes", "INTEGER"),
)

HOME_CARE_MIN_AGE = 60
MAX_CONDITIONS = 5
MAX_VISITS = 60
# How common each condition is among patients (CONDITIONS order); dementia only from 65.
_CONDITION_WEIGHTS = np.array([0.35, 0.18, 0.12, 0.06, 0.08, 0.05, 0.07, 0.04])
_DEMENTIA = CONDITIONS.index("dementia")
_DEMENTIA_MIN_AGE = 65
_MEAN_YEARS_SINCE_DIAGNOSIS = 7.0
# Visit types (VISIT_TYPES order): how common each is and its mean length in minutes.
_VISIT_WEIGHTS = np.array([0.35, 0.20, 0.25, 0.12, 0.08])
_VISIT_MINUTES = np.array([25.0, 20.0, 45.0, 50.0, 30.0])


def _chronic_chance(age: Ints) -> Floats:
    """Chance of at least one chronic condition: a logistic rise centred on 58, from ~4% to ~70%."""
    return np.asarray(0.04 + 0.66 / (1.0 + np.exp(-(age - 58.0) / 7.0)), dtype=np.float64)


def _conditions_of(rng: np.random.Generator, age: Ints, count: Ints) -> tuple[Ints, Ints]:
    """For patients of ``age`` with ``count`` conditions: ``(patient, condition)`` per registry row.

    Distinct conditions per patient, weighted, via exponential races: the ``count`` smallest of
    ``Exp(1) / weight`` are a weighted sample without replacement.
    """
    weights = np.broadcast_to(_CONDITION_WEIGHTS, (len(age), len(CONDITIONS))).copy()
    weights[age < _DEMENTIA_MIN_AGE, _DEMENTIA] = 0.0
    with np.errstate(divide="ignore"):
        race = rng.exponential(size=weights.shape) / weights
    order = np.argsort(race, axis=1, kind="stable")
    patient, rank = np.nonzero(np.arange(len(CONDITIONS)) < count[:, None])
    return patient, order[patient, rank]


def build_health_tables(people: Population, rng: np.random.Generator) -> dict[str, Any]:
    """The chronic-condition registry for ``people`` and the home-care visits of older patients."""
    patient = np.flatnonzero(rng.random(people.size) < _chronic_chance(people.age))
    age = people.age[patient]
    extra = 0.1 + 1.2 * np.clip((age - 40.0) / 50.0, 0.0, 1.0)
    count = 1 + np.minimum(rng.poisson(extra), MAX_CONDITIONS - 1)
    row_patient, condition = _conditions_of(rng, age, count)
    owner = patient[row_patient]
    years_ago = np.minimum(
        np.floor(rng.exponential(_MEAN_YEARS_SINCE_DIAGNOSIS, len(owner))).astype(np.int64),
        people.age[owner],
    )
    chronic = CHRONIC.arrow_table(
        {
            "person_key": take(people.person_key, owner),
            "community": labels(COMMUNITY_CODES, people.community[owner]),
            "condition": labels(CONDITIONS, condition),
            "diagnosed_year": REFERENCE_YEAR - years_ago,
            "birth_year": people.birth_year[owner],
        }
    )

    older = patient[age >= HOME_CARE_MIN_AGE]
    home_care_chance = (
        0.20
        + 0.15 * (people.age[older] >= 80)
        + 0.15 * people.lives_alone_elderly[older]
        + 0.10 * people.disability[older]
    )
    cared = older[rng.random(len(older)) < home_care_chance]
    per_patient = 1 + np.minimum(rng.negative_binomial(2, 2.0 / 9.0, len(cared)), MAX_VISITS - 1)
    visited, _ = expand(per_patient)
    owner = cared[visited]
    rows = len(owner)
    visit_type = categorical(rng, _VISIT_WEIGHTS, rows)
    # Gamma with shape 4 gives a right-skewed length around each type's mean.
    minutes = np.clip(np.rint(rng.gamma(4.0, _VISIT_MINUTES[visit_type] / 4.0)), 10, 120)
    visits = VISITS.arrow_table(
        {
            "person_key": take(people.person_key, owner),
            "community": labels(COMMUNITY_CODES, people.community[owner]),
            "visit_date": dates(uniform_days(rng, rows)),
            "visit_type": labels(VISIT_TYPES, visit_type),
            "minutes": minutes.astype(np.int64),
        }
    )
    return {CHRONIC.name: chronic, VISITS.name: visits}


DEPARTMENT = Department(silo="health", tables=(CHRONIC, VISITS), build=build_health_tables)
