"""The decision engine: a pure function of (bundle, consumer, query). No I/O.

Default deny. Every measure needs a ``permit`` rule that covers it (consumer, dataset, purpose,
measure, group-by, filter columns); any matching ``forbid`` rule overrides every permit. The
decision names the rules that determined it and, on denial, the first unmet requirement per
candidate rule, so an author can answer "why was I denied?". Amount checks (per-query caps,
budgets) need the planned cost and are made by the planner and the ledger with the scopes
returned here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from gateway.policy.model import Bundle, Rule
from gateway.query.form import MeasureForm, QueryForm


@dataclass(frozen=True)
class BudgetScope:
    """A budget that a release is charged to; ``key`` is stable across restarts."""

    key: str
    total_rho: Fraction
    period: str
    delta: Fraction


@dataclass(frozen=True)
class Grant:
    """The permit rule that covers one measure, and the scopes its cost is charged to."""

    measure_id: str
    rule_id: str
    rule: Rule
    scopes: tuple[BudgetScope, ...]


@dataclass(frozen=True)
class Decision:
    permitted: bool
    deciding_rules: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    reason_code: str = "POLICY_DENIED"
    grants: dict[str, Grant] = field(default_factory=dict)

    @property
    def scopes(self) -> tuple[BudgetScope, ...]:
        """Every scope charged by the query, each once."""
        seen: dict[str, BudgetScope] = {}
        for grant in self.grants.values():
            for scope in grant.scopes:
                seen.setdefault(scope.key, scope)
        return tuple(seen.values())


def _unmet_requirement(rule: Rule, measure: MeasureForm, query: QueryForm) -> str | None:
    """The first requirement of ``rule`` that the measure does not meet, or None."""
    if rule.purposes and query.purpose not in rule.purposes:
        return f"purpose '{query.purpose}' is not among the rule's purposes"
    if measure.kind not in rule.measures:
        return f"measure '{measure.kind}' is not granted"
    extra_groups = [g for g in query.group_by if g not in rule.group_by]
    if extra_groups:
        return f"group-by on {extra_groups} is not granted"
    extra_filters = sorted({f.column for f in measure.filters} - set(rule.filterable))
    if extra_filters:
        return f"filtering on {extra_filters} is not granted"
    return None


def _forbid_matches(rule: Rule, measure: MeasureForm, query: QueryForm) -> bool:
    return (not rule.measures or measure.kind in rule.measures) and (
        not rule.purposes or query.purpose in rule.purposes
    )


def scope_keys(
    bundle: Bundle, consumer: str, rule_id: str, dataset: str
) -> tuple[BudgetScope, ...]:
    rule = bundle.rules[rule_id]
    assert rule.budget is not None
    population_name = bundle.datasets[dataset].population
    population = bundle.populations[population_name]
    return (
        BudgetScope(
            key=f"consumer:{consumer}/rule:{rule_id}/{rule.budget.period}",
            total_rho=rule.budget.rho_total,
            period=rule.budget.period,
            delta=Fraction(rule.budget.delta),
        ),
        BudgetScope(
            key=f"population:{population_name}/{population.budget.period}",
            total_rho=population.budget.rho_total,
            period=population.budget.period,
            delta=Fraction(population.budget.delta),
        ),
    )


def decide(bundle: Bundle, consumer: str, query: QueryForm) -> Decision:
    """Decide a (policy-validated) query for a known consumer."""
    profile = bundle.consumers[consumer]
    if query.purpose not in profile.purposes:
        return Decision(
            permitted=False,
            deciding_rules=(),
            reasons=(f"purpose '{query.purpose}' is not allowed for consumer '{consumer}'",),
            reason_code="PURPOSE_NOT_ALLOWED",
        )
    grants: dict[str, Grant] = {}
    forbids: list[str] = []
    reasons: list[str] = []
    for measure in query.measures:
        candidates = [
            (rule_id, rule)
            for rule_id, rule in sorted(bundle.rules.items())
            if rule.applies_to_consumer(consumer) and rule.applies_to_dataset(measure.dataset)
        ]
        forbids += [
            rule_id
            for rule_id, rule in candidates
            if rule.effect == "forbid" and _forbid_matches(rule, measure, query)
        ]
        permits = [(rule_id, rule) for rule_id, rule in candidates if rule.effect == "permit"]
        if not permits:
            reasons.append(f"measure '{measure.id}': no rule grants '{measure.dataset}'")
            continue
        for rule_id, rule in permits:
            unmet = _unmet_requirement(rule, measure, query)
            if unmet is None:
                grants[measure.id] = Grant(
                    measure.id,
                    rule_id,
                    rule,
                    scope_keys(bundle, consumer, rule_id, measure.dataset),
                )
                break
            reasons.append(f"measure '{measure.id}': rule '{rule_id}': {unmet}")
    if forbids:
        unique = tuple(dict.fromkeys(forbids))
        return Decision(
            permitted=False,
            deciding_rules=unique,
            reasons=tuple(f"forbidden by rule '{r}'" for r in unique),
        )
    if len(grants) < len(query.measures):
        return Decision(permitted=False, deciding_rules=(), reasons=tuple(reasons))
    deciding = tuple(dict.fromkeys(g.rule_id for g in grants.values()))
    return Decision(permitted=True, deciding_rules=deciding, grants=grants)
