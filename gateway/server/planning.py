"""Plans a permitted query: noise per measure, per-query caps, charges per budget scope.

Pure computation on (bundle, decision, query); used both by RunQuery and ExplainQuery so that a
preview always matches what a run would charge.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from gateway.budget.ledger import ScopeCharge, ScopeLimit
from gateway.errors import PolicyDenied
from gateway.policy.decision import BudgetScope, Decision
from gateway.policy.model import Bundle
from gateway.privacy.noise import NoisePlan, plan_noise, split_spend
from gateway.privacy.sensitivity import components, histogram_bins
from gateway.query.form import MeasureForm, QueryForm


@dataclass(frozen=True)
class ComponentPlanning:
    """The noise of one released integer vector of a measure (see ``sensitivity.components``)."""

    name: str
    # What one integer step of the vector is worth in the measure's unit (resolution for sums).
    unit: Decimal
    noise: NoisePlan

    @property
    def sensitivity(self) -> float:
        """The sensitivity in the mechanism's norm (L1 for Laplace, L2 for Gaussian)."""
        s = self.noise.sensitivity
        return (
            float(s.l1) if self.noise.mechanism == "discrete_laplace" else math.sqrt(s.l2_squared)
        )

    @property
    def error95(self) -> float:
        """95% error half-width of each released value, in the measure's unit."""
        return self.noise.error95 * float(self.unit)


@dataclass(frozen=True)
class MeasurePlanning:
    measure: MeasureForm
    silo: str
    components: tuple[ComponentPlanning, ...]
    rule_id: str
    min_group_size: int
    # The budget scopes this measure is charged to (each gets its rho).
    scopes: tuple[str, ...] = ()
    # HISTOGRAM bin edges (the caller's or the policy's); empty for other measures.
    bins: tuple[Decimal, ...] = ()

    @property
    def noise(self) -> NoisePlan:
        """The first component's noise: the measure's own for every kind but MEAN (its sum)."""
        return self.components[0].noise

    @property
    def rho(self) -> Fraction:
        return sum((c.noise.rho for c in self.components), Fraction(0))

    @property
    def cells_per_key(self) -> int:
        """Released values per group key: one, or one per bin for a histogram."""
        return len(self.bins) - 1 if self.bins else 1


@dataclass(frozen=True)
class QueryPlan:
    measures: tuple[MeasurePlanning, ...]
    scopes: tuple[BudgetScope, ...]
    charges: dict[str, Fraction]
    # Every rule that granted a measure allows answering a repeat from the cache.
    cacheable: bool = True

    @property
    def total_rho(self) -> Fraction:
        return sum((m.rho for m in self.measures), Fraction(0))

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
                    share[scope] += m.rho
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
        parts = components(dataset, measure, query.group_by)
        # A measure with several components (a mean's sum and count) splits its spend evenly.
        spend = split_spend(measure.spend, len(parts)) if len(parts) > 1 else measure.spend
        planned = tuple(
            ComponentPlanning(part.name, part.unit, plan_noise(part.sensitivity, spend))
            for part in parts
        )
        rho = sum((c.noise.rho for c in planned), Fraction(0))
        cap = grant.rule.max_epsilon_per_query
        # In rho, and for an epsilon spend in epsilon too: a mean's two halves cost less rho than
        # its whole epsilon would alone, but the release is still epsilon-DP at the whole spend.
        if cap is not None and (
            rho > Fraction(cap) ** 2 / 2
            or (measure.spend.epsilon is not None and measure.spend.epsilon > Fraction(cap))
        ):
            raise PolicyDenied(
                f"measure '{measure.id}' would spend more than rule '{grant.rule_id}' allows per "
                f"query (epsilon {cap})",
                reason="EPSILON_CAP_EXCEEDED",
                metadata={
                    "measure": measure.id,
                    "rule": grant.rule_id,
                    "max_epsilon_per_query": cap,
                    "requested_rho": rho,
                },
            )
        measures.append(
            MeasurePlanning(
                measure,
                dataset.silo,
                planned,
                grant.rule_id,
                grant.rule.min_group_size,
                tuple(scope.key for scope in grant.scopes),
                histogram_bins(dataset, measure) if measure.kind == "histogram" else (),
            )
        )
        for scope in grant.scopes:
            charges[scope.key] += rho
    cacheable = all(grant.rule.cache_answers for grant in decision.grants.values())
    return QueryPlan(tuple(measures), decision.scopes, dict(charges), cacheable)
