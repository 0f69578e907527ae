"""Our noise plans against OpenDP's own query planner (the polars ``Context``) for the same query.

The query: per group of a public key set, the count of rows and the sum of an integer column
clamped to [-4, 10]; a person (the privacy unit) contributes at most R = 3 rows, which the silo
enforces in SQL and OpenDP takes as ``unit_of(contributions=3)``. Both libraries derive the same
sensitivities: count L1 = L2 = R (all of a person's rows may fall in one group), sum
L1 = L2 = R * max(|-4|, |10|) = 30. The silo's sums are over integers of the declared resolution,
so the OpenDP side sums an integer column too (a float column would add OpenDP's float-rounding
term to the sum's sensitivity, which our integer sums do not have).

What must match, case by case (epsilon or rho, one part or a spend split over two like a mean):

- mechanism: "Integer Laplace" for epsilon, "Integer Gaussian" for rho;
- scale: equal to the last bit where the budget is a float exactly (epsilon 1, rho 1/2); else
  both are at least the exact requirement and at most 4 floats apart. Both libraries take the
  smallest float scale their check accepts, but round on different sides: OpenDP compares its
  map with the float nearest the budget (0.3 is 0.29999999999999998890, below 3/10, costing a
  slightly larger scale) in the query's own currency (epsilon for pure DP); we compare with the
  exact rho rounded down, through OpenDP's pure-DP-to-zCDP map;
- accuracy: OpenDP's summary accuracy is the same OpenDP helper as our error95;
- cost: OpenDP's map of the query at d_in = R is at most the per-query budget, and ours charges
  that budget exactly. For epsilon spends split over k parts the two accounts differ, as
  explained in ``split_spend``: OpenDP's compositor spends e of pure DP (k queries of e / k);
  we charge each query's zCDP cost (e / k)^2 / 2 (OpenDP's own pure-DP-to-zCDP conversion of
  its query) and add rho, so the charge is e^2 / (2 k), not e^2 / 2.

``summarize`` and ``resolve`` plan the query without reading the data.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, cast

import opendp.prelude as dp
import polars as pl
import pytest

from gateway.privacy.noise import MechanismName, error95, plan_noise, split_spend
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import Spend

dp.enable_features("contrib")
# The prelude re-exports the polars extras without declaring them to type checkers.
PRELUDE: Any = dp

R = 3  # rows per person
LOWER, UPPER = -4, 10  # clamping bounds of the summed column
ALPHA = 0.05

DATA = pl.LazyFrame(
    {
        "person": [1, 1, 1, 2, 3, 3, 4],
        "group": ["a", "a", "b", "b", "c", "a", "c"],
        "value": [1, 12, -7, 5, 0, 3, 10],
    },
    schema={"person": pl.Int64, "group": pl.String, "value": pl.Int64},
)

SENSITIVITY = {
    "count": Sensitivity(l1=R, l2_squared=R * R),
    "sum": Sensitivity(l1=R * max(-LOWER, UPPER), l2_squared=(R * max(-LOWER, UPPER)) ** 2),
}

# OpenDP's Context finds its scale by an unbounded bisection that rebuilds the polars measurement
# about a hundred times (some 3 s a case here), so four cases cover the grid: each measure with
# each mechanism, budgets that are floats exactly (dyadic) and ones that are not, one part and a
# spend split over two. (spend, parts, measure, dyadic)
CASES = [
    (Spend(epsilon=Fraction(1)), 1, "count", True),
    (Spend(epsilon=Fraction(3, 10)), 2, "sum", False),
    (Spend(rho=Fraction(1, 7)), 2, "count", False),
    (Spend(rho=Fraction(1, 2)), 1, "sum", True),
]


def opendp_query(spend: Spend, parts: int, kind: str) -> Any:
    loss = (
        dp.loss_of(epsilon=float(spend.epsilon))
        if spend.epsilon is not None
        else dp.loss_of(rho=float(spend.rho or 0))
    )
    context = dp.Context.compositor(
        data=DATA,
        privacy_unit=dp.unit_of(contributions=R),
        privacy_loss=loss,
        split_evenly_over=parts,
        margins=[PRELUDE.polars.Margin(by=["group"], invariant="keys", max_length=1_000_000)],
    )
    aggregate = (
        PRELUDE.len(signed=True)
        if kind == "count"
        else cast(Any, pl.col("value").fill_null(0)).dp.sum(bounds=(LOWER, UPPER))
    )
    return context.query().group_by("group").agg(aggregate)


def meets_exactly(
    plan_rho: Fraction, mechanism: MechanismName, scale: float, s: Sensitivity
) -> bool:
    squared = s.l1**2 if mechanism == "discrete_laplace" else s.l2_squared
    return squared <= 2 * plan_rho * Fraction(scale) ** 2


@pytest.mark.parametrize(
    ("spend", "parts", "kind", "dyadic"),
    CASES,
    ids=["count-epsilon-1", "sum-epsilon-3/10-split-2", "count-rho-1/7-split-2", "sum-rho-1/2"],
)
def test_scale_accuracy_and_cost_match_opendp_context(
    spend: Spend, parts: int, kind: str, dyadic: bool
) -> None:
    sensitivity = SENSITIVITY[kind]
    plan = plan_noise(sensitivity, split_spend(spend, parts))
    measurement = opendp_query(spend, parts, kind).resolve()  # what summarize() reads
    summary = dp.summarize_polars_measurement(measurement, alpha=ALPHA)
    assert summary.height == 1
    theirs = float(summary["scale"][0])

    assert summary["distribution"][0] == (
        "Integer Laplace" if plan.mechanism == "discrete_laplace" else "Integer Gaussian"
    )

    # Scale.
    assert meets_exactly(plan.rho, plan.mechanism, plan.scale, sensitivity)
    assert meets_exactly(plan.rho, plan.mechanism, theirs, sensitivity)
    if dyadic:
        assert plan.scale == theirs
    else:
        assert abs(plan.scale - theirs) <= 4 * math.ulp(theirs)

    # Accuracy: the same OpenDP helper on the same (or a few floats apart) scale.
    assert float(summary["accuracy"][0]) == error95(plan.mechanism, theirs)
    assert plan.error95 == pytest.approx(float(summary["accuracy"][0]), rel=1e-12)

    # Cost of the query in OpenDP's own map, at d_in = R contributed rows.
    cost = float(measurement.map(R))
    if spend.epsilon is not None:
        budget = spend.epsilon / parts
        assert plan.epsilon == float(budget)
        assert cost <= float(budget)
        assert cost == pytest.approx(float(budget), rel=1e-14)
        # OpenDP's conversion of its own query to zCDP is the rho we charge for the part.
        assert plan.rho == budget**2 / 2
        zcdp: Any = dp.c.make_pureDP_to_zCDP(measurement)
        converted = float(zcdp.map(R))
        assert converted == pytest.approx(float(plan.rho), rel=1e-14)
        # The explained difference: OpenDP spends epsilon e in all; we charge e^2 / (2 parts).
        assert budget * parts == spend.epsilon
        assert plan.rho * parts == spend.epsilon**2 / (2 * parts)
    else:
        assert spend.rho is not None
        assert plan.rho * parts == spend.rho
        assert cost <= float(plan.rho) * (1 + 2**-52)
        assert cost == pytest.approx(float(plan.rho), rel=1e-14)
