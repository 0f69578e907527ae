"""Warnings about risky settings in a valid bundle, for ``silogate policy check``.

A warning is not an error: the bundle loads and the gateway runs with it. Warnings point at the
setting (or, when the risk is a setting left out, at the rule that should have it):

- a permit rule whose budget refreshes (day, month, quarter, year) while the population of one of
  its datasets has no lifetime budget either: no scope charged by the rule ever runs out for
  good, so repeated queries can leak without bound;
- ``min_group_size`` 0 on a rule granting counts: tiny groups are released unsuppressed;
- ``max_epsilon_per_query`` above 1, or not set: one query may spend most of a budget, and a
  large epsilon gives little protection to anyone in that query.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway.errors import SourcePosition
from gateway.policy.model import Bundle, Rule
from gateway.policy.sourcemap import position_in, read_yaml

# Above this per-query epsilon a release protects individuals little (e^1 ~ 2.7 odds ratio).
EPSILON_PER_QUERY_WARNING = Decimal(1)
_COUNT_MEASURES = ("count", "count_persons")


@dataclass(frozen=True)
class PolicyWarning:
    """A risky but valid setting, printed as ``file:line:col: warning: message``."""

    position: SourcePosition
    message: str

    def __str__(self) -> str:
        return f"{self.position}: warning: {self.message}"


class _Locator:
    """Positions of settings inside declarations, reading each file once."""

    def __init__(self, root: Path, bundle: Bundle) -> None:
        self.root = root
        self.bundle = bundle
        self.documents: dict[str, Any] = {}

    def __call__(self, section: str, name: str, *keys: str, at_key: bool = False) -> SourcePosition:
        start = self.bundle.sources.get(f"{section}/{name}")
        if start is None:  # a bundle built in code: no files to point into
            return SourcePosition("<bundle>", 0, 0)
        if start.file not in self.documents:
            self.documents[start.file] = read_yaml(self.root / start.file)
        document = self.documents[start.file]
        if not keys:
            return start
        return position_in(start.file, document, (section, name, *keys), at_key=at_key)


def _grants_counts(rule: Rule) -> bool:
    return any(m in rule.measures for m in _COUNT_MEASURES)


def lint_bundle(root: Path, bundle: Bundle) -> list[PolicyWarning]:
    """Every warning for a loaded bundle, in file and position order."""
    where = _Locator(Path(root), bundle)
    warnings: list[PolicyWarning] = []
    for rule_id, rule in sorted(bundle.rules.items()):
        if rule.effect != "permit":
            continue
        budget = rule.budget
        if budget is not None and budget.period != "lifetime":
            populations = sorted(
                {d.population for n, d in bundle.datasets.items() if rule.applies_to_dataset(n)}
            )
            for population in populations:
                declared = bundle.populations.get(population)
                if declared is not None and declared.budget.period != "lifetime":
                    warnings.append(
                        PolicyWarning(
                            where("rules", rule_id, "budget", "period"),
                            f"rule '{rule_id}': budget period '{budget.period}' refreshes and "
                            f"population '{population}' has no lifetime budget either; "
                            "repeated queries can leak without bound",
                        )
                    )
        if _grants_counts(rule) and rule.min_group_size == 0:
            warnings.append(
                PolicyWarning(
                    where("rules", rule_id, "min_group_size"),
                    f"rule '{rule_id}' grants counts with min_group_size 0; "
                    "small groups are released unsuppressed",
                )
            )
        cap = rule.max_epsilon_per_query
        if cap is None:
            warnings.append(
                PolicyWarning(
                    where("rules", rule_id),
                    f"rule '{rule_id}' sets no max_epsilon_per_query; "
                    "one query may spend the whole budget",
                )
            )
        elif cap > EPSILON_PER_QUERY_WARNING:
            warnings.append(
                PolicyWarning(
                    where("rules", rule_id, "max_epsilon_per_query"),
                    f"rule '{rule_id}': max_epsilon_per_query {cap} is above "
                    f"{EPSILON_PER_QUERY_WARNING}; one query may reveal much about a person",
                )
            )
    return sorted(
        warnings, key=lambda w: (w.position.file, w.position.line, w.position.column, w.message)
    )
