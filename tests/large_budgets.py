"""A copy of the demo bundle whose budgets do not run out: for tests that send thousands of
queries (the fuzz test) and are about something other than budgets."""

from __future__ import annotations

import shutil
from pathlib import Path

from ruamel.yaml import YAML
from support import POLICY

LARGE_RHO = "1000000"


def _large(budget: dict[str, object], period: str) -> dict[str, object]:
    """A budget of LARGE_RHO over ``period``, keeping its key_delta (data-dependent keys)."""
    kept = {"key_delta": budget["key_delta"]} if "key_delta" in budget else {}
    return {"rho": LARGE_RHO, "period": period, **kept}


def bundle_with_large_budgets(root: Path) -> Path:
    bundle = root / "policies-large-budgets"
    shutil.copytree(POLICY, bundle, ignore=shutil.ignore_patterns("tests"))
    yaml = YAML()
    populations = yaml.load((bundle / "populations.yaml").read_text())
    for population in populations["populations"].values():
        population["budget"] = _large(population["budget"], "lifetime")
    yaml.dump(populations, bundle / "populations.yaml")
    rules = yaml.load((bundle / "rules.yaml").read_text())
    for rule in rules["rules"].values():
        if "budget" in rule:
            rule["budget"] = _large(rule["budget"], rule["budget"].get("period", "lifetime"))
    yaml.dump(rules, bundle / "rules.yaml")
    return bundle
