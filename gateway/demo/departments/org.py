"""The organization department: party members (about 8% of adults) and the activities they attend.

Membership is more likely at older ages and with more education; each member belongs to the branch
of the street they live on. How busy a branch is varies by street, and floating members (registered
elsewhere in practice) attend far fewer activities.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.demo._population import (
    REFERENCE_YEAR,
    CityProfile,
    Floats,
    Ints,
    Population,
    categorical,
    categorical_by_group,
    cumulative,
    uniform_days,
)
from gateway.demo._tables import Department, TableSchema, dates, expand, labels, take
from gateway.demo.geography import (
    ACTIVITY_TYPES,
    BRANCHES,
    COMMUNITY_CODES,
    EDUCATION_LEVELS,
    SEXES,
)

MEMBERS = TableSchema.of(
    "members",
    ("person_key", "VARCHAR"),
    ("branch", "VARCHAR"),
    ("community", "VARCHAR"),
    ("join_year", "INTEGER"),
    ("birth_year", "INTEGER"),
    ("sex", "VARCHAR"),
    ("education", "VARCHAR"),
    ("floating_member", "BOOLEAN"),
)
ACTIVITIES = TableSchema.of(
    "activities",
    ("person_key", "VARCHAR"),
    ("branch", "VARCHAR"),
    ("activity_type", "VARCHAR"),
    ("activity_date", "DATE"),
    ("hours", "DOUBLE"),
)

ADULT_AGE = 18
MEMBER_SHARE_OF_ADULTS = 0.08
FLOATING_SHARE = 0.05
MEAN_ACTIVITIES = 6.0
MAX_ACTIVITIES = 30

# Education (columns follow EDUCATION_LEVELS) by birth cohort: younger cohorts studied longer.
_COHORT_LOWER_AGES = np.array([18, 30, 45, 60, 75])
_EDUCATION_BY_COHORT = np.array(
    [
        [0.00, 0.01, 0.12, 0.22, 0.25, 0.32, 0.08],
        [0.00, 0.03, 0.20, 0.22, 0.20, 0.28, 0.07],
        [0.01, 0.10, 0.35, 0.27, 0.13, 0.12, 0.02],
        [0.04, 0.25, 0.38, 0.20, 0.07, 0.05, 0.01],
        [0.15, 0.38, 0.27, 0.12, 0.04, 0.035, 0.005],
    ]
)
_MEMBERSHIP_BY_EDUCATION = np.array([0.5, 0.6, 0.8, 1.0, 1.5, 2.2, 3.0])
# Activity types (ACTIVITY_TYPES order): how common each is and its mean length in half hours.
_ACTIVITY_WEIGHTS = np.array([0.22, 0.20, 0.20, 0.12, 0.10, 0.10, 0.06])
_ACTIVITY_HALF_HOURS = np.array([3.0, 3.0, 5.0, 2.0, 4.0, 4.0, 3.0])


def _cohort(age: Ints) -> Ints:
    return np.searchsorted(_COHORT_LOWER_AGES, age, side="right") - 1


def _membership_by_age(age: Ints) -> Floats:
    """Relative chance of membership by age: rises steadily, flat beyond 85."""
    return 0.5 + (np.minimum(age, 85) - ADULT_AGE) / 20.0


def _membership_scale(city: CityProfile) -> float:
    """The factor that makes the expected member share of adults exactly ``MEMBER_SHARE_OF_ADULTS``.

    Computed from the city's expected age distribution rather than from the drawn people, so that
    every chunk uses the same factor and the share does not depend on how the city is chunked.
    """
    ages = np.arange(ADULT_AGE, len(city.age_distribution))
    share = city.age_distribution[ADULT_AGE:]
    expected_education = (_EDUCATION_BY_COHORT @ _MEMBERSHIP_BY_EDUCATION) / (
        _EDUCATION_BY_COHORT.sum(axis=1)
    )
    weight = _membership_by_age(ages) * expected_education[_cohort(ages)]
    return MEMBER_SHARE_OF_ADULTS * float(share.sum()) / float((share * weight).sum())


def build_org_tables(people: Population, rng: np.random.Generator) -> dict[str, Any]:
    """Draw the members among ``people`` and their activities."""
    adult = np.flatnonzero(people.age >= ADULT_AGE)
    age = people.age[adult]
    education = categorical_by_group(
        _cohort(age), cumulative(_EDUCATION_BY_COHORT), rng.random(len(adult))
    )
    chance = (
        _membership_scale(people.city)
        * _membership_by_age(age)
        * _MEMBERSHIP_BY_EDUCATION[education]
    )
    joined = rng.random(len(adult)) < chance
    member = adult[joined]
    education = education[joined]
    count = len(member)
    birth_year = people.birth_year[member]
    street = people.street[member]
    # Squaring the uniform favours joining young: most members joined in their twenties or thirties.
    years_since_eligible = REFERENCE_YEAR - (birth_year + ADULT_AGE)
    join_year = (
        birth_year + ADULT_AGE + np.floor((years_since_eligible + 1) * rng.random(count) ** 2)
    ).astype(np.int64)
    floating = rng.random(count) < FLOATING_SHARE
    member_keys = take(people.person_key, member)
    members = MEMBERS.arrow_table(
        {
            "person_key": member_keys,
            "branch": labels(BRANCHES, street),
            "community": labels(COMMUNITY_CODES, people.community[member]),
            "join_year": join_year,
            "birth_year": birth_year,
            "sex": labels(SEXES, people.sex[member]),
            "education": labels(EDUCATION_LEVELS, education),
            "floating_member": floating,
        }
    )

    mean = MEAN_ACTIVITIES * people.city.street_activity[street] * np.where(floating, 0.3, 1.04)
    # Negative binomial with 2 successes: overdispersed, so a few members attend very often.
    per_member = np.minimum(rng.negative_binomial(2, 2.0 / (2.0 + mean)), MAX_ACTIVITIES)
    owner, _ = expand(per_member)
    rows = len(owner)
    activity_type = categorical(rng, _ACTIVITY_WEIGHTS, rows)
    half_hours = 1 + np.minimum(rng.poisson(_ACTIVITY_HALF_HOURS[activity_type] - 1.0), 15)
    activities = ACTIVITIES.arrow_table(
        {
            "person_key": take(member_keys, owner),
            "branch": labels(BRANCHES, street[owner]),
            "activity_type": labels(ACTIVITY_TYPES, activity_type),
            "activity_date": dates(uniform_days(rng, rows)),
            "hours": half_hours / 2.0,
        }
    )
    return {MEMBERS.name: members, ACTIVITIES.name: activities}


DEPARTMENT = Department(silo="org", tables=(MEMBERS, ACTIVITIES), build=build_org_tables)
