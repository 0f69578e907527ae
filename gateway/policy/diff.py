"""``silogate policy diff``: what two bundle versions let each consumer do, side by side.

For each consumer and dataset the *access* is what some query may use: the purposes, measures,
group-by columns and filter columns that a permit rule grants and no forbid rule takes away. It
is computed per (purpose, measure) pair, so a forbid limited to one purpose or measure removes
only that pair; columns are the union over the permits of a pair, an upper bound of what one
query may combine (one rule must cover a whole measure). Budgets, per-query caps, minimum group
sizes, consumers' identities and datasets' contribution bounds are compared too, since each
changes what can be learnt. The diff reads only the two loaded bundles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from gateway.policy.model import BudgetSpec, Bundle, MeasureName, Rule

_MEASURES: tuple[str, ...] = get_args(MeasureName)


@dataclass(frozen=True)
class Access:
    purposes: frozenset[str] = frozenset()
    measures: frozenset[str] = frozenset()
    group_by: frozenset[str] = frozenset()
    filterable: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.measures)

    def describe(self) -> str:
        parts = [
            ("purposes", self.purposes),
            ("measures", self.measures),
            ("group-by", self.group_by),
            ("filter", self.filterable),
        ]
        return "; ".join(f"{label}: {', '.join(sorted(v)) or '-'}" for label, v in parts)


def _applies(rule: Rule, consumer: str, dataset: str) -> bool:
    return rule.applies_to_consumer(consumer) and rule.applies_to_dataset(dataset)


def access(bundle: Bundle, consumer: str, dataset: str) -> Access:
    """What ``consumer`` may use of ``dataset`` under ``bundle`` (see the module docstring)."""
    columns = set(bundle.datasets[dataset].columns)
    rules = [r for r in bundle.rules.values() if _applies(r, consumer, dataset)]
    purposes, measures, group_by, filterable = set(), set(), set(), set()
    for purpose in bundle.consumers[consumer].purposes:
        for measure in _MEASURES:
            permits = [
                r
                for r in rules
                if r.effect == "permit"
                and (not r.purposes or purpose in r.purposes)
                and measure in r.measures
            ]
            forbids = [
                r
                for r in rules
                if r.effect == "forbid"
                and (not r.purposes or purpose in r.purposes)
                and (not r.measures or measure in r.measures)
            ]
            if not permits or any(
                not f.group_by and not f.filterable and not f.measurable for f in forbids
            ):
                continue
            purposes.add(purpose)
            measures.add(measure)
            group_by |= {g for r in permits for g in r.group_by} & columns
            group_by -= {g for f in forbids for g in f.group_by}
            filterable |= {c for r in permits for c in r.filterable} & columns
            filterable -= {c for f in forbids for c in f.filterable}
    return Access(
        frozenset(purposes), frozenset(measures), frozenset(group_by), frozenset(filterable)
    )


def budget_text(budget: BudgetSpec | None) -> str:
    if budget is None:
        return "none"
    amount = f"epsilon {budget.epsilon}" if budget.epsilon is not None else f"rho {budget.rho}"
    delta = f", delta {budget.delta}" if budget.delta else ""
    period = "lifetime" if budget.period == "lifetime" else f"per {budget.period}"
    return f"{amount} {period}{delta}"


def _changed(label: str, old: object, new: object) -> list[str]:
    return [f"{label}: {old} -> {new}"] if old != new else []


def _access_changes(old: Bundle, new: Bundle) -> list[str]:
    lines: list[str] = []
    pairs = sorted(
        {(c, d) for b in (old, new) for c in b.consumers for d in b.datasets},
    )
    for consumer, dataset in pairs:
        before = (
            access(old, consumer, dataset)
            if consumer in old.consumers and dataset in old.datasets
            else Access()
        )
        after = (
            access(new, consumer, dataset)
            if consumer in new.consumers and dataset in new.datasets
            else Access()
        )
        if before == after:
            continue
        head = f"  {consumer} / {dataset}"
        if not before:
            lines += [f"{head}: now allowed", f"    + {after.describe()}"]
            continue
        if not after:
            lines += [f"{head}: now denied", f"    - {before.describe()}"]
            continue
        lines.append(f"{head}:")
        for label, was, now in (
            ("purposes", before.purposes, after.purposes),
            ("measures", before.measures, after.measures),
            ("group-by", before.group_by, after.group_by),
            ("filter", before.filterable, after.filterable),
        ):
            if now - was:
                lines.append(f"    + {label}: {', '.join(sorted(now - was))}")
            if was - now:
                lines.append(f"    - {label}: {', '.join(sorted(was - now))}")
    return lines


def _rule_changes(old: Bundle, new: Bundle) -> list[str]:
    lines: list[str] = []
    for rule_id in sorted({*old.rules, *new.rules}):
        was, now = old.rules.get(rule_id), new.rules.get(rule_id)
        if was is None and now is not None:
            lines.append(
                f"  rule '{rule_id}': added ({now.effect}, budget {budget_text(now.budget)})"
            )
            continue
        if now is None and was is not None:
            lines.append(f"  rule '{rule_id}': removed ({was.effect})")
            continue
        assert was is not None and now is not None
        changes = [
            *_changed("budget", budget_text(was.budget), budget_text(now.budget)),
            *_changed(
                "max_epsilon_per_query",
                was.max_epsilon_per_query or "none",
                now.max_epsilon_per_query or "none",
            ),
            *_changed("min_group_size", was.min_group_size, now.min_group_size),
            *_changed("effect", was.effect, now.effect),
        ]
        lines += [f"  rule '{rule_id}': {change}" for change in changes]
    for name in sorted({*old.populations, *new.populations}):
        p_old, p_new = old.populations.get(name), new.populations.get(name)
        lines += [
            f"  population '{name}': {change}"
            for change in _changed(
                "budget",
                budget_text(p_old.budget) if p_old else "none",
                budget_text(p_new.budget) if p_new else "none",
            )
        ]
    return lines


def _declaration_changes(old: Bundle, new: Bundle) -> list[str]:
    lines: list[str] = []
    for name in sorted({*old.consumers, *new.consumers}):
        c_old, c_new = old.consumers.get(name), new.consumers.get(name)
        if c_old is None and c_new is not None:
            lines.append(f"  + consumer '{name}' ({c_new.identity})")
        elif c_new is None and c_old is not None:
            lines.append(f"  - consumer '{name}' ({c_old.identity})")
        elif c_old is not None and c_new is not None:
            lines += [
                f"  consumer '{name}': {change}"
                for change in _changed("identity", c_old.identity, c_new.identity)
            ]
    for name in sorted({*old.datasets, *new.datasets}):
        d_old, d_new = old.datasets.get(name), new.datasets.get(name)
        if d_old is None:
            lines.append(f"  + dataset '{name}'")
        elif d_new is None:
            lines.append(f"  - dataset '{name}'")
        else:
            for label in ("max_rows_per_person", "max_groups_per_person"):
                lines += [
                    f"  dataset '{name}': {change} (changes sensitivity and cost)"
                    for change in _changed(label, getattr(d_old, label), getattr(d_new, label))
                ]
    return lines


def diff_bundles(old: Bundle, new: Bundle) -> list[str]:
    """The differences as report lines (empty when nothing that matters changed)."""
    sections = [
        ("access (per consumer / dataset):", _access_changes(old, new)),
        ("budgets and limits:", _rule_changes(old, new)),
        ("declarations:", _declaration_changes(old, new)),
    ]
    lines: list[str] = []
    for title, body in sections:
        if body:
            lines += [title, *body]
    return lines


def report_diff(old: Bundle, new: Bundle, write: Callable[[str], object]) -> bool:
    """Print the diff; return whether anything that matters changed."""
    write(f"old policy version {old.version}\nnew policy version {new.version}\n")
    lines = diff_bundles(old, new)
    if not lines:
        write("no change in access, budgets, limits, consumers or datasets\n")
    for line in lines:
        write(f"{line}\n")
    return bool(lines)
