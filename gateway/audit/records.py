"""What a query record says about its plan and the budgets it leaves (DESIGN.md, "Audit log").

The servicer builds its records with these helpers, so the field names auditors read live in one
place: ``rho`` (total, exact fraction as text), ``scales`` and ``mechanisms`` per measure,
``cost`` per budget scope (rho, epsilon at the scope's delta, delta) and ``budget_left`` per
scope (remaining rho and epsilon). These functions only shape values; they never read the
ledger or write the log themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gateway.privacy.conversions import epsilon_at_delta

if TYPE_CHECKING:
    from gateway.api.v1 import query_service_pb2
    from gateway.server.planning import QueryPlan


def plan_fields(plan: QueryPlan) -> dict[str, Any]:
    """Noise and cost of a planned release, as recorded before the silos are asked."""
    return {
        "rho": str(plan.total_rho),
        "scales": {m.measure.id: m.noise.scale for m in plan.measures},
        "mechanisms": {m.measure.id: m.noise.mechanism for m in plan.measures},
        # Every noise component (a mean has two: its sum and its count).
        "components": {
            m.measure.id: [
                {
                    "name": c.name,
                    "mechanism": c.noise.mechanism,
                    "scale": c.noise.scale,
                    "rho": str(c.noise.rho),
                }
                for c in m.components
            ]
            for m in plan.measures
        },
        "cost": {
            scope.key: {
                "rho": str(plan.charges[scope.key]),
                "epsilon": epsilon_at_delta(plan.charges[scope.key], scope.delta),
                "delta": str(scope.delta),
            }
            for scope in plan.scopes
        },
        # Data-dependent group keys: the delta charged to every scope and each measure's
        # threshold (a key is released when its noisy count is above it).
        **(
            {
                "key_delta": str(plan.key_delta),
                "key_thresholds": {
                    m.measure.id: m.threshold.threshold for m in plan.measures if m.threshold
                },
            }
            if plan.from_data
            else {}
        ),
    }


def budget_left_fields(
    balances: Iterable[query_service_pb2.BudgetBalance],
) -> dict[str, dict[str, Any]]:
    """What each scope has left once this request's charge counts (reserved or spent)."""
    return {
        balance.scope: {"rho": balance.remaining.rho, "epsilon": balance.remaining.epsilon}
        for balance in balances
    }
