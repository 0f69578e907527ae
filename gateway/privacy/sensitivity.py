"""Sensitivity of the aggregate vectors the silo computes, from the dataset's declared bounds.

Neighbouring datasets differ by one *person* with all of their rows (add/remove). The silo
enforces the bounds in SQL (rows beyond ``max_rows_per_person`` are dropped per person), so the
derivations below hold whatever the database contains.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import InvalidQuery
from gateway.policy.model import Dataset


@dataclass(frozen=True)
class Sensitivity:
    l1: int  # L1 sensitivity of the integer vector
    l2_squared: int  # squared L2 sensitivity, exact


def l1_sensitivity(dataset: Dataset, kind: str) -> int:
    """L1 sensitivity of the vector of per-group integer aggregates.

    - ``count``: a person keeps at most ``max_rows_per_person`` rows, each counted in exactly one
      group, so adding or removing them changes the vector's L1 norm by at most that number.
    - ``count_persons``: a person adds 1 to each group they appear in; their kept rows (at most
      ``max_rows_per_person``) fall in at most ``max_groups_per_person`` groups, since the silo's
      SQL drops rows beyond both caps, so they appear in at most the smaller of the two.
    """
    rows = dataset.max_rows_per_person
    if kind == "count":
        return rows
    if kind == "count_persons":
        groups = dataset.max_groups_per_person
        return min(rows, groups) if groups is not None else rows
    raise InvalidQuery(
        f"measure '{kind}' is not supported by this release engine yet",
        reason="MEASURE_NOT_SUPPORTED",
        metadata={"measure": kind},
    )
