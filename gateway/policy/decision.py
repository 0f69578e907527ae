"""The decision engine: a pure function of (bundle, consumer, query). No I/O.

Default deny. Every measure needs a ``permit`` rule that covers it (consumer, dataset, purpose,
measure, group-by, filter columns and, when the spend is an explicit epsilon or rho, the rule's
per-query cap); any matching ``forbid`` rule overrides every permit. A forbid rule matches on
consumer and dataset, and on its measures and purposes when it lists them; when it lists
``group_by`` or ``filterable`` columns it matches only queries that group by or filter on one of
them (so a forbid can take one column away from whatever a permit grants).

The decision names the rules that determined it, keeps a trace of every clause of every rule for
every measure (what ``silogate policy explain`` prints) and, on denial, gives the first unmet
clause per candidate permit rule, so an author can answer "why was I denied?". A cap stated as a
target error needs the planned noise and is checked by the planner; budgets are checked by the
ledger with the scopes returned here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from gateway.policy.model import Bundle, Rule
from gateway.query.form import MeasureForm, QueryForm

ClauseName = Literal[
    "consumer", "dataset", "purpose", "measure", "group_by", "filters", "columns", "per_query_cap"
]


@dataclass(frozen=True)
class BudgetScope:
    """A budget that a release is charged to; ``key`` is stable across restarts."""

    key: str
    total_rho: Fraction
    period: str
    delta: Fraction
    # The delta data-dependent group keys may spend here in the period (``budget.key_delta``).
    key_delta: Fraction = Fraction(0)

    @property
    def delta_key(self) -> str:
        """The ledger scope that counts this scope's key delta (a second, parallel budget)."""
        return f"{self.key}#key_delta"


@dataclass(frozen=True)
class Grant:
    """The permit rule that covers one measure, and the scopes its cost is charged to."""

    measure_id: str
    rule_id: str
    rule: Rule
    scopes: tuple[BudgetScope, ...]


@dataclass(frozen=True)
class ClauseCheck:
    """One clause of a rule checked against one measure.

    For a permit, ``passed`` means the requirement is met; for a forbid, that the condition
    matches the query (a forbid applies when all its clauses pass).
    """

    clause: ClauseName
    passed: bool
    message: str


@dataclass(frozen=True)
class RuleCheck:
    """How one rule was evaluated for one measure of the query."""

    measure_id: str
    rule_id: str
    effect: Literal["permit", "forbid"]
    clauses: tuple[ClauseCheck, ...]

    @property
    def applies(self) -> bool:
        """Whether the rule is about this consumer and dataset at all (a candidate)."""
        return all(c.passed for c in self.clauses if c.clause in ("consumer", "dataset"))

    @property
    def matches(self) -> bool:
        """Every clause passed: a permit grants the measure, a forbid forbids it."""
        return all(c.passed for c in self.clauses)

    @property
    def first_failure(self) -> ClauseCheck | None:
        return next((c for c in self.clauses if not c.passed), None)


@dataclass(frozen=True)
class Decision:
    permitted: bool
    deciding_rules: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    reason_code: str = "POLICY_DENIED"
    grants: dict[str, Grant] = field(default_factory=dict)
    # Every rule against every measure, sorted by (measure id, rule id) so that the decision is
    # independent of the order of rules in the files and of measures in the query.
    trace: tuple[RuleCheck, ...] = ()

    @property
    def scopes(self) -> tuple[BudgetScope, ...]:
        """Every scope charged by the query, each once."""
        seen: dict[str, BudgetScope] = {}
        for grant in self.grants.values():
            for scope in grant.scopes:
                seen.setdefault(scope.key, scope)
        return tuple(seen.values())


def _names(items: Iterable[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _scope_checks(rule: Rule, consumer: str, measure: MeasureForm) -> list[ClauseCheck]:
    matches_consumer = rule.applies_to_consumer(consumer)
    matches_dataset = rule.applies_to_dataset(measure.dataset)
    return [
        ClauseCheck(
            "consumer",
            matches_consumer,
            f"consumer '{consumer}' "
            f"{'matches' if matches_consumer else 'is not among'} {_names(rule.consumers)}",
        ),
        ClauseCheck(
            "dataset",
            matches_dataset,
            f"dataset '{measure.dataset}' "
            f"{'matches' if matches_dataset else 'is not among'} {_names(rule.datasets)}",
        ),
    ]


def amount_text(value: Fraction) -> str:
    """An exact amount as written by authors: a decimal when it has one (``1.5``), else ``a/b``."""
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator != 1:
        return str(value)
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    sign = "-" if value < 0 else ""
    text = str(abs(value.numerator) * 10**digits // value.denominator).rjust(digits + 1, "0")
    return f"{sign}{text[:-digits]}.{text[-digits:]}" if digits else f"{sign}{text}"


def _cap_check(rule: Rule, measure: MeasureForm) -> ClauseCheck | None:
    """The per-query cap against an explicit spend; None when only the planner can tell."""
    cap = rule.max_epsilon_per_query
    if cap is None:
        return ClauseCheck("per_query_cap", True, "the rule sets no per-query cap")
    spend = measure.spend
    if spend.epsilon is not None:
        within = spend.epsilon <= Fraction(cap)
        amount = f"epsilon {amount_text(spend.epsilon)}"
    elif spend.rho is not None:
        # Caps are written in epsilon; epsilon-DP costs epsilon^2 / 2 in rho.
        within = spend.rho <= Fraction(cap) ** 2 / 2
        amount = f"rho {amount_text(spend.rho)}"
    else:
        return None
    if within:
        return ClauseCheck(
            "per_query_cap", True, f"{amount} is within the per-query cap (epsilon {cap})"
        )
    return ClauseCheck(
        "per_query_cap",
        False,
        f"{amount} is more than the rule allows per query (epsilon {cap})",
    )


def _permit_checks(
    rule: Rule, measure: MeasureForm, query: QueryForm, open_groups: tuple[str, ...]
) -> list[ClauseCheck]:
    """The requirements of a permit rule, in the order their failures are reported."""
    checks: list[ClauseCheck] = []
    if not rule.purposes:
        checks.append(ClauseCheck("purpose", True, "the rule allows every purpose"))
    elif query.purpose in rule.purposes:
        checks.append(
            ClauseCheck("purpose", True, f"purpose '{query.purpose}' is among the rule's purposes")
        )
    else:
        checks.append(
            ClauseCheck(
                "purpose", False, f"purpose '{query.purpose}' is not among the rule's purposes"
            )
        )
    granted = measure.kind in rule.measures
    checks.append(
        ClauseCheck(
            "measure",
            granted,
            f"measure '{measure.kind}' is {'granted' if granted else 'not granted'}",
        )
    )
    if measure.column:
        aggregated = measure.column in rule.measurable
        checks.append(
            ClauseCheck(
                "columns",
                aggregated,
                f"aggregating column '{measure.column}' is "
                + ("granted" if aggregated else "not granted (not in the rule's measurable)"),
            )
        )
    extra_groups = [g for g in query.group_by if g not in rule.group_by]
    if extra_groups:
        checks.append(ClauseCheck("group_by", False, f"group-by on {extra_groups} is not granted"))
    elif open_groups and not rule.allow_data_dependent_keys:
        checks.append(
            ClauseCheck(
                "group_by",
                False,
                f"group-by on {list(open_groups)} takes its keys from the data, which the rule "
                "does not allow (allow_data_dependent_keys)",
            )
        )
    elif open_groups:
        checks.append(
            ClauseCheck(
                "group_by",
                True,
                f"group-by on {list(query.group_by)} is granted, keys from the data above a "
                f"threshold (key_delta {rule.key_delta})",
            )
        )
    elif query.group_by:
        checks.append(
            ClauseCheck("group_by", True, f"group-by on {list(query.group_by)} is granted")
        )
    else:
        checks.append(ClauseCheck("group_by", True, "no group-by"))
    filtered = sorted({f.column for f in measure.filters})
    extra_filters = sorted(set(filtered) - set(rule.filterable))
    if extra_filters:
        checks.append(ClauseCheck("filters", False, f"filtering on {extra_filters} is not granted"))
    elif filtered:
        checks.append(ClauseCheck("filters", True, f"filtering on {filtered} is granted"))
    else:
        checks.append(ClauseCheck("filters", True, "no filters"))
    cap = _cap_check(rule, measure)
    if cap is not None:
        checks.append(cap)
    return checks


def _forbid_checks(rule: Rule, measure: MeasureForm, query: QueryForm) -> list[ClauseCheck]:
    """The conditions of a forbid rule; an empty list in the rule matches everything."""
    checks: list[ClauseCheck] = []
    if not rule.purposes:
        checks.append(ClauseCheck("purpose", True, "the rule forbids every purpose"))
    else:
        hit = query.purpose in rule.purposes
        checks.append(
            ClauseCheck(
                "purpose",
                hit,
                f"purpose '{query.purpose}' is {'' if hit else 'not '}among the rule's purposes",
            )
        )
    if not rule.measures:
        checks.append(ClauseCheck("measure", True, "the rule forbids every measure"))
    else:
        hit = measure.kind in rule.measures
        checks.append(
            ClauseCheck(
                "measure",
                hit,
                f"measure '{measure.kind}' is {'' if hit else 'not '}among the forbidden measures",
            )
        )
    if rule.group_by or rule.filterable or rule.measurable:
        grouped = [g for g in query.group_by if g in rule.group_by]
        filtered = sorted({f.column for f in measure.filters} & set(rule.filterable))
        aggregated = measure.column if measure.column in rule.measurable else ""
        uses = [
            *([f"groups by {grouped}"] if grouped else []),
            *([f"filters on {filtered}"] if filtered else []),
            *([f"aggregates '{aggregated}'"] if aggregated else []),
        ]
        forbidden = sorted({*rule.group_by, *rule.filterable, *rule.measurable})
        checks.append(
            ClauseCheck(
                "columns",
                bool(uses),
                f"the query {' and '.join(uses)}, which the rule forbids"
                if uses
                else f"the query uses none of the forbidden columns {forbidden}",
            )
        )
    return checks


def check_rule(
    rule_id: str,
    rule: Rule,
    consumer: str,
    query: QueryForm,
    measure: MeasureForm,
    open_groups: tuple[str, ...] = (),
) -> RuleCheck:
    """Every clause of one rule for one measure (all clauses, not only up to the first failure).

    ``open_groups``: the group-by columns whose keys come from the data in the measure's dataset.
    """
    body = (
        _permit_checks(rule, measure, query, open_groups)
        if rule.effect == "permit"
        else _forbid_checks(rule, measure, query)
    )
    return RuleCheck(
        measure.id, rule_id, rule.effect, (*_scope_checks(rule, consumer, measure), *body)
    )


def scope_keys(
    bundle: Bundle, consumer: str, rule_id: str, dataset: str
) -> tuple[BudgetScope, ...]:
    rule = bundle.rules[rule_id]
    assert rule.budget is not None
    population_name = bundle.datasets[dataset].population
    population = bundle.populations[population_name]
    silo_cap = dataset_scope(bundle, dataset)
    return (
        BudgetScope(
            key=f"consumer:{consumer}/rule:{rule_id}/{rule.budget.period}",
            total_rho=rule.budget.rho_total,
            period=rule.budget.period,
            delta=Fraction(rule.budget.delta),
            key_delta=Fraction(rule.budget.key_delta),
        ),
        BudgetScope(
            key=f"population:{population_name}/{population.budget.period}",
            total_rho=population.budget.rho_total,
            period=population.budget.period,
            delta=Fraction(population.budget.delta),
            key_delta=Fraction(population.budget.key_delta),
        ),
        *((silo_cap,) if silo_cap is not None else ()),
    )


def dataset_scope(bundle: Bundle, dataset: str) -> BudgetScope | None:
    """The silo's own cap on a dataset (``silo_budget``), over every consumer.

    The silo enforces it with its own ledger under this same key; the gateway mirrors it so that a
    query the silo would refuse is refused before any silo runs and nothing is reserved for it.
    """
    budget = bundle.datasets[dataset].silo_budget
    if budget is None:
        return None
    return BudgetScope(
        key=f"dataset:{dataset}/{budget.period}",
        total_rho=budget.rho_total,
        period=budget.period,
        delta=Fraction(budget.delta),
        key_delta=Fraction(budget.key_delta),
    )


def open_groups(bundle: Bundle, query: QueryForm, measure: MeasureForm) -> tuple[str, ...]:
    """The query's group-by columns whose keys come from the data in ``measure``'s dataset."""
    dataset = bundle.datasets.get(measure.dataset)
    if dataset is None:
        return ()
    return tuple(g for g in query.group_by if g in dataset.columns and dataset.columns[g].open_keys)


def _only_cap_failed(check: RuleCheck) -> bool:
    failed = [c for c in check.clauses if not c.passed]
    return len(failed) == 1 and failed[0].clause == "per_query_cap"


def decide(bundle: Bundle, consumer: str, query: QueryForm) -> Decision:
    """Decide a (policy-validated) query for a known consumer."""
    measures = sorted(query.measures, key=lambda m: m.id)
    trace = tuple(
        check_rule(rule_id, rule, consumer, query, measure, open_groups(bundle, query, measure))
        for measure in measures
        for rule_id, rule in sorted(bundle.rules.items())
    )
    profile = bundle.consumers[consumer]
    if query.purpose not in profile.purposes:
        return Decision(
            permitted=False,
            deciding_rules=(),
            reasons=(f"purpose '{query.purpose}' is not allowed for consumer '{consumer}'",),
            reason_code="PURPOSE_NOT_ALLOWED",
            trace=trace,
        )
    grants: dict[str, Grant] = {}
    forbids: set[str] = set()
    reasons: list[str] = []
    capping: set[str] = set()
    # Whether every denied measure would have been granted but for a per-query cap.
    only_caps = True
    for measure in measures:
        checks = [c for c in trace if c.measure_id == measure.id and c.applies]
        forbids |= {c.rule_id for c in checks if c.effect == "forbid" and c.matches}
        permits = [c for c in checks if c.effect == "permit"]
        granting = next((c for c in permits if c.matches), None)
        if granting is not None:
            grants[measure.id] = Grant(
                measure.id,
                granting.rule_id,
                bundle.rules[granting.rule_id],
                scope_keys(bundle, consumer, granting.rule_id, measure.dataset),
            )
            continue
        if not permits:
            reasons.append(f"measure '{measure.id}': no rule grants '{measure.dataset}'")
            only_caps = False
            continue
        for check in permits:
            failure = check.first_failure
            assert failure is not None
            reasons.append(f"measure '{measure.id}': rule '{check.rule_id}': {failure.message}")
        capped = [c.rule_id for c in permits if _only_cap_failed(c)]
        capping.update(capped)
        only_caps = only_caps and bool(capped)
    if forbids:
        unique = tuple(sorted(forbids))
        return Decision(
            permitted=False,
            deciding_rules=unique,
            reasons=tuple(f"forbidden by rule '{r}'" for r in unique),
            trace=trace,
        )
    if len(grants) < len(measures):
        if only_caps:
            # Only the caps stood in the way: those rules decided, as the planner would say.
            return Decision(
                permitted=False,
                deciding_rules=tuple(sorted(capping)),
                reasons=tuple(reasons),
                reason_code="EPSILON_CAP_EXCEEDED",
                trace=trace,
            )
        return Decision(permitted=False, deciding_rules=(), reasons=tuple(reasons), trace=trace)
    deciding = tuple(sorted({g.rule_id for g in grants.values()}))
    return Decision(permitted=True, deciding_rules=deciding, grants=grants, trace=trace)
