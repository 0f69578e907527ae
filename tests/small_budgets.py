"""A copy of the demo bundle whose population budget admits exactly ``ADMITTED`` queries."""

from __future__ import annotations

import shutil
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from ruamel.yaml import YAML
from support import POLICY

ADMITTED = 50
EPSILON = Fraction(1, 10)
COST = EPSILON**2 / 2  # rho per query


def _decimal(x: Fraction) -> str:
    exact = Decimal(x.numerator) / Decimal(x.denominator)
    assert Fraction(exact) == x
    return str(exact)


def bundle_with_small_budgets(root: Path, admitted: int = ADMITTED) -> Path:
    bundle = root / "policies"
    shutil.copytree(POLICY, bundle, ignore=shutil.ignore_patterns("tests"))
    yaml = YAML()
    populations = yaml.load((bundle / "populations.yaml").read_text())
    populations["populations"]["city-residents"]["budget"] = {"rho": _decimal(admitted * COST)}
    yaml.dump(populations, bundle / "populations.yaml")
    rules = yaml.load((bundle / "rules.yaml").read_text())
    # Each consumer alone could spend more than the population allows: the population decides.
    for rule in ("civil-elderly-care", "grid-casework"):
        rules["rules"][rule]["budget"] = {"rho": _decimal(admitted * 4 // 5 * COST)}
    yaml.dump(rules, bundle / "rules.yaml")
    return bundle
