"""Plans a permitted query: noise per measure, per-query caps, charges per budget scope.

Pure computation on (bundle, decision, query); used both by RunQuery and ExplainQuery so that a
preview always matches what a run would charge.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

from gateway.budget.ledger import ScopeCharge, ScopeLimit
from gateway.errors import PolicyDenied
from gateway.policy.decision import BudgetScope, Decision
from gateway.policy.model import Bundle
from gateway.privacy.noise import NoisePlan, plan_noise
from gateway.privacy.sensitivity import l1_sensitivity
from gateway.query.form import MeasureForm, QueryForm


@dataclass(frozen=True)
class MeasurePlanning:
    measure: MeasureForm
    silo: str
    noise: NoisePlan
    rule_id: str
    min_group_size: int
    # The budget scopes this measure is charged to (each gets its rho).
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryPlan:
    measures: tuple[MeasurePlanning, ...]
    scopes: tuple[BudgetScope, ...]
    charges: dict[str, Fraction]
    # Every rule that granted a measure allows answering a repeat from the cache.
    cacheable: bool = True

    @property
    def total_rho(self) -> Fraction:
        return sum((m.noise.rho for m in self.measures), Fraction(0))

    @property
    def silos(self) -> tuple[str, ...]:
        return tuple(sorted({m.silo for m in self.measures}))

    def limits(self) -> list[ScopeLimit]:
        return [scope_limit(s) for s in self.scopes]

    def ledger_charges(self) -> list[ScopeCharge]:
        """What the ledger reserves: each scope's cost for this query."""
        return [ScopeCharge(scope_limit(s), self.charges[s.key]) for s in self.scopes]

    def silo_share(self, silo: str) -> dict[str, Fraction]:
        """The part of each scope's charge that pays for ``silo``'s measures (what cancelling
        that silo's share gives back). The shares of all silos add up to ``charges``."""
        share: dict[str, Fraction] = defaultdict(Fraction)
        for m in self.measures:
            if m.silo == silo:
                for scope in m.scopes:
                    share[scope] += m.noise.rho
        return dict(share)


def scope_limit(scope: BudgetScope) -> ScopeLimit:
    return ScopeLimit(scope=scope.key, period=scope.period, total=scope.total_rho)


def plan_query(bundle: Bundle, decision: Decision, query: QueryForm) -> QueryPlan:
    """Noise plans and charges; raises PolicyDenied when a measure exceeds its per-query cap."""
    measures = []
    charges: dict[str, Fraction] = defaultdict(Fraction)
    for measure in query.measures:
        grant = decision.grants[measure.id]
        dataset = bundle.datasets[measure.dataset]
        noise = plan_noise(l1_sensitivity(dataset, measure.kind), measure.spend)
        cap = grant.rule.max_epsilon_per_query
        if cap is not None and noise.rho > Fraction(cap) ** 2 / 2:
            raise PolicyDenied(
                f"measure '{measure.id}' would spend more than rule '{grant.rule_id}' allows per "
                f"query (epsilon {cap})",
                reason="EPSILON_CAP_EXCEEDED",
                metadata={
                    "measure": measure.id,
                    "rule": grant.rule_id,
                    "max_epsilon_per_query": cap,
                    "requested_rho": noise.rho,
                },
            )
        measures.append(
            MeasurePlanning(
                measure,
                dataset.silo,
                noise,
                grant.rule_id,
                grant.rule.min_group_size,
                tuple(scope.key for scope in grant.scopes),
            )
        )
        for scope in grant.scopes:
            charges[scope.key] += noise.rho
    cacheable = all(grant.rule.cache_answers for grant in decision.grants.values())
    return QueryPlan(tuple(measures), decision.scopes, dict(charges), cacheable)
