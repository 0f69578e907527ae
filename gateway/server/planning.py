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
from gateway.errors import BudgetExhausted, PolicyDenied
from gateway.policy.decision import BudgetScope, Decision
from gateway.policy.model import Bundle
from gateway.privacy.noise import NoisePlan, plan_noise, split_spend
from gateway.privacy.sensitivity import Component, components, histogram_bins
from gateway.privacy.thresholds import ThresholdPlan, key_distance, plan_threshold
from gateway.query.form import MeasureForm, QueryForm
from gateway.query.validate import data_dependent_keys


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
    # Group keys from the data: the threshold release, and the delta charged to every scope
    # (the rule's key_delta; OpenDP's map at the threshold is at most that).
    threshold: ThresholdPlan | None = None
    key_delta: Fraction = Fraction(0)

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

    @property
    def from_data(self) -> bool:
        """Whether the group keys come from the data (a threshold release)."""
        return any(m.threshold is not None for m in self.measures)

    @property
    def key_delta(self) -> Fraction:
        """The delta data-dependent keys spend (0 for public key sets)."""
        return sum((m.key_delta for m in self.measures), Fraction(0))

    def limits(self) -> list[ScopeLimit]:
        """The rho scopes (what balances show and answer caching keys on)."""
        return [scope_limit(s) for s in self.scopes]

    def balance_limits(self) -> list[ScopeLimit]:
        """The scopes an answer shows balances of: the rho scopes, and for keys from the data
        their parallel key-delta scopes too."""
        if not self.key_delta:
            return self.limits()
        return self.limits() + [key_delta_limit(s) for s in self.scopes if s.key_delta]

    def charge_of(self, scope: str) -> Fraction:
        """This plan's charge to a rho scope or to a parallel ``#key_delta`` scope."""
        if scope in self.charges:
            return self.charges[scope]
        return self.key_delta if scope.endswith("#key_delta") else Fraction(0)

    def ledger_charges(self) -> list[ScopeCharge]:
        """What the ledger reserves: each scope's rho and, for data-dependent keys, each scope's
        key delta in its parallel ``#key_delta`` scope."""
        charges = [ScopeCharge(scope_limit(s), self.charges[s.key]) for s in self.scopes]
        if self.key_delta:
            charges += [ScopeCharge(key_delta_limit(s), self.key_delta) for s in self.scopes]
        return charges

    def silo_share(self, silo: str) -> dict[str, Fraction]:
        """The part of each scope's charge that pays for ``silo``'s measures (what cancelling
        that silo's share gives back). The shares of all silos add up to ``ledger_charges``."""
        share: dict[str, Fraction] = defaultdict(Fraction)
        delta_keys = {s.key: s.delta_key for s in self.scopes}
        for m in self.measures:
            if m.silo == silo:
                for scope in m.scopes:
                    share[scope] += m.rho
                    if m.key_delta:
                        share[delta_keys[scope]] += m.key_delta
        return dict(share)


def scope_limit(scope: BudgetScope) -> ScopeLimit:
    return ScopeLimit(scope=scope.key, period=scope.period, total=scope.total_rho)


def key_delta_limit(scope: BudgetScope) -> ScopeLimit:
    return ScopeLimit(scope=scope.delta_key, period=scope.period, total=scope.key_delta)


def _plan_components(
    parts: tuple[Component, ...], measure: MeasureForm
) -> tuple[ComponentPlanning, ...]:
    # A measure with several components (a mean's sum and count) splits its spend evenly.
    spend = split_spend(measure.spend, len(parts)) if len(parts) > 1 else measure.spend
    return tuple(
        ComponentPlanning(part.name, part.unit, plan_noise(part.sensitivity, spend))
        for part in parts
    )


def _plan_threshold(
    bundle: Bundle, decision: Decision, measure: MeasureForm, part: Component
) -> tuple[ComponentPlanning, ThresholdPlan, Fraction]:
    """The threshold release of a count whose keys come from the data (validated: one count
    measure with a rho spend), charged the rule's key_delta in every scope."""
    grant = decision.grants[measure.id]
    key_delta = grant.rule.key_delta
    assert key_delta is not None and measure.spend.rho is not None  # policy and validation
    short = [s.key for s in grant.scopes if s.key_delta < Fraction(key_delta)]
    if short:
        # As the ledger would say for a scope whose key delta is spent; nothing is reserved.
        raise BudgetExhausted(
            f"budget scope '{short[0]}' allows less delta for group keys from the data (its "
            f"budget's key_delta) than one release of rule '{grant.rule_id}' spends ({key_delta})",
            metadata={"scope": short[0], "rule": grant.rule_id, "requested_delta": key_delta},
        )
    dataset = bundle.datasets[measure.dataset]
    plan = plan_threshold(
        key_distance(dataset, measure, part.sensitivity), measure.spend.rho, Fraction(key_delta)
    )
    noise = NoisePlan(
        mechanism="discrete_gaussian",
        sensitivity=part.sensitivity,
        scale=plan.scale,
        rho=plan.rho,
        epsilon=0.0,
        error95=plan.error95,
    )
    return ComponentPlanning(part.name, part.unit, noise), plan, Fraction(key_delta)


def plan_query(bundle: Bundle, decision: Decision, query: QueryForm) -> QueryPlan:
    """Noise plans and charges; raises PolicyDenied when a measure exceeds its per-query cap."""
    measures = []
    charges: dict[str, Fraction] = defaultdict(Fraction)
    from_data = data_dependent_keys(query, bundle)
    for measure in query.measures:
        grant = decision.grants[measure.id]
        dataset = bundle.datasets[measure.dataset]
        parts = components(dataset, measure, query.group_by)
        threshold, key_delta = None, Fraction(0)
        if from_data:
            [part] = parts  # a count: validation admits nothing else
            component, threshold, key_delta = _plan_threshold(bundle, decision, measure, part)
            planned: tuple[ComponentPlanning, ...] = (component,)
        else:
            planned = _plan_components(parts, measure)
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
                threshold,
                key_delta,
            )
        )
        for scope in grant.scopes:
            charges[scope.key] += rho
    cacheable = all(grant.rule.cache_answers for grant in decision.grants.values())
    return QueryPlan(tuple(measures), decision.scopes, dict(charges), cacheable)
