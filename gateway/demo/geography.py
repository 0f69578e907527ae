"""The public geography and category vocabularies of the synthetic city.

Everything here is public knowledge and independent of the generator's seed: 4 districts, 40 streets
(10 per district), 200 communities (5 per street), one party branch per street, and the category
values that the synthetic departments record. Policies use these as public key sets (group-by keys
that are released even when their count is zero), so :func:`write_key_set_csvs` writes them as CSV
files. This module must never depend on generated data: a key set that leaked the data would not be
public.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

STREETS_PER_DISTRICT = 10
COMMUNITIES_PER_STREET = 5
DISTRICT_COUNT = 4


@dataclass(frozen=True, slots=True)
class Community:
    """One community (the smallest geographic unit) with the street and district it belongs to."""

    code: str
    street: str
    district: str


DISTRICTS: tuple[str, ...] = tuple(f"D{number:02d}" for number in range(1, DISTRICT_COUNT + 1))
STREETS: tuple[str, ...] = tuple(
    f"S{number:02d}" for number in range(1, DISTRICT_COUNT * STREETS_PER_DISTRICT + 1)
)
COMMUNITIES: tuple[Community, ...] = tuple(
    Community(
        code=f"C{number + 1:03d}",
        street=STREETS[number // COMMUNITIES_PER_STREET],
        district=DISTRICTS[number // (COMMUNITIES_PER_STREET * STREETS_PER_DISTRICT)],
    )
    for number in range(len(STREETS) * COMMUNITIES_PER_STREET)
)
COMMUNITY_CODES: tuple[str, ...] = tuple(community.code for community in COMMUNITIES)
# One party branch per street, numbered like the street it serves.
BRANCHES: tuple[str, ...] = tuple(f"B{street[1:]}" for street in STREETS)
BRANCH_OF_STREET: Mapping[str, str] = MappingProxyType(dict(zip(STREETS, BRANCHES, strict=True)))
DISTRICT_OF_STREET: Mapping[str, str] = MappingProxyType(
    {community.street: community.district for community in COMMUNITIES}
)

SEXES: tuple[str, ...] = ("F", "M")
# Highest completed level, ordered from lowest to highest (the generator relies on the order).
EDUCATION_LEVELS: tuple[str, ...] = (
    "none",
    "primary",
    "lower_secondary",
    "upper_secondary",
    "junior_college",
    "bachelor",
    "postgraduate",
)
ACTIVITY_TYPES: tuple[str, ...] = (
    "branch_meeting",
    "theory_study",
    "volunteer_service",
    "elderly_visit",
    "community_patrol",
    "environment_cleanup",
    "policy_outreach",
)
SUBSIDY_TYPES: tuple[str, ...] = (
    "minimum_living",
    "disability",
    "elderly_care",
    "senior_allowance",
)
CONDITIONS: tuple[str, ...] = (
    "hypertension",
    "diabetes",
    "coronary_heart_disease",
    "stroke",
    "copd",
    "chronic_kidney_disease",
    "cancer",
    "dementia",
)
VISIT_TYPES: tuple[str, ...] = (
    "follow_up",
    "medication_review",
    "nursing_care",
    "rehabilitation",
    "health_education",
)
CASE_CATEGORIES: tuple[str, ...] = (
    "sanitation",
    "noise",
    "neighbour_dispute",
    "property_repair",
    "road_facility",
    "public_safety",
    "elderly_assistance",
    "illegal_construction",
)

# Single-column key sets by the name of their CSV file; communities have their own layout.
KEY_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "streets": STREETS,
        "districts": DISTRICTS,
        "sexes": SEXES,
        "education_levels": EDUCATION_LEVELS,
        "branches": BRANCHES,
        "activity_types": ACTIVITY_TYPES,
        "subsidy_types": SUBSIDY_TYPES,
        "conditions": CONDITIONS,
        "visit_types": VISIT_TYPES,
        "case_categories": CASE_CATEGORIES,
    }
)


def write_key_set_csvs(directory: Path) -> list[Path]:
    """Write one ``<keyset>.csv`` per public key set into ``directory`` and return the paths.

    Every file has a ``key`` header; ``communities.csv`` also carries ``street`` and ``district`` so
    a policy can roll communities up. Existing files are overwritten.
    """
    directory.mkdir(parents=True, exist_ok=True)
    communities = directory / "communities.csv"
    with communities.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("key", "street", "district"))
        writer.writerows((c.code, c.street, c.district) for c in COMMUNITIES)
    written = [communities]
    for name, keys in KEY_SETS.items():
        path = directory / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("key",))
            writer.writerows((key,) for key in keys)
        written.append(path)
    return written
