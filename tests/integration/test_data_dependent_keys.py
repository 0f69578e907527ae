"""Group keys from the data, end to end: real gateway and silos, values checked against DuckDB.

The demo's ``events.cases.handler`` has no public key set; rule ``grid-handler-workload`` lets the
grid centre count cases per handler, released with OpenDP's discrete Gaussian threshold mechanism
at key_delta 1e-9 per query.
"""

from __future__ import annotations

from fractions import Fraction

import duckdb
import grpc
import pytest
from rich.console import Console

from gateway.client import ClientError, count, sum_of
from gateway.client.render import budget_table, result_table

CASEWORK = "casework-monitoring"
WIDTH = 8  # discrete Gaussian: P(|noise| > 8 sigma) < 1.3e-15 per value
RULE_SCOPE = "consumer:grid-centre/rule:grid-handler-workload/lifetime"


def handler_counts(system) -> dict[str, tuple[int, int]]:
    """Per handler, the least and the most its bounded count can be.

    A person keeps 5 of their cases (max_rows_per_person), picked by the silo's row order; of a
    person's ``n`` cases with ``k`` at this handler, at least ``min(n, 5) - (n - k)`` and at most
    ``min(k, 5)`` are kept here.
    """
    with duckdb.connect(str(system.data / "events.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT handler, sum(greatest(least(total, 5) - (total - k), 0)), sum(least(k, 5)) "
            "FROM (SELECT person_key, handler, count(*) AS k, "
            "sum(count(*)) OVER (PARTITION BY person_key) AS total "
            "FROM cases GROUP BY person_key, handler) GROUP BY handler"
        ).fetchall()
    return {str(h): (int(low), int(high)) for h, low, high in rows}


def key_delta_spent(client) -> Fraction:
    [balance] = [b for b in client.budget() if b.scope == RULE_SCOPE]
    return Fraction(balance.key_delta.spent)


def test_handlers_above_the_threshold_are_released_near_their_truth(system) -> None:
    with system.client("grid-centre") as client:
        spent_before = key_delta_spent(client)
        result = client.query(
            purpose=CASEWORK,
            measures=[count("cases", "events.cases", rho="0.5")],
            group_by=["handler"],
        )
        assert key_delta_spent(client) - spent_before == Fraction(1, 10**9)
    plan = result.raw.measures[0]
    threshold = plan.key_threshold
    assert threshold > 0 and plan.mechanism == 2  # MECHANISM_DISCRETE_GAUSSIAN
    assert result.raw.cost.key_delta == "1/1000000000"
    assert result.raw.cost.rho == "1/2"
    truth = handler_counts(system)
    released = {row.keys["handler"]: row.values["cases"] for row in result.rows}
    assert released, "the demo's busiest handlers are far above the threshold"
    margin = WIDTH * plan.scale
    for handler, value in released.items():
        assert handler in truth  # a released key exists in the data
        low, high = truth[handler]
        assert low - margin <= value.value <= high + margin
        assert value.value > threshold  # the raw noisy count cleared it (no suppression below)
    # Every handler far above the threshold is released, every one far below is not.
    for handler, (low, high) in truth.items():
        if low > threshold + margin:
            assert handler in released
        if high < threshold - margin:
            assert handler not in released
    assert any(low > threshold + margin for low, _ in truth.values())


def test_explain_shows_the_threshold_and_key_delta_and_spends_nothing(system) -> None:
    measures = [count("cases", "events.cases", rho="0.25")]
    with system.client("grid-centre") as client:
        before = key_delta_spent(client)
        preview = client.explain(purpose=CASEWORK, measures=measures, group_by=["handler"])
        after = key_delta_spent(client)
    assert preview.deciding_rules == ["grid-handler-workload"]
    assert preview.measures[0].key_threshold > 0
    assert preview.cost.key_delta == "1/1000000000"
    left = next(b for b in preview.budget_after if b.scope == RULE_SCOPE)
    assert Fraction(left.key_delta.spent) == before + Fraction(1, 10**9)
    assert after == before


@pytest.mark.parametrize(
    ("measures", "field"),
    [
        # An epsilon spend would need the Laplace threshold, whose (epsilon, delta) map OpenDP
        # cannot convert to the ledger's rho.
        ([count("cases", "events.cases", epsilon="0.5")], "query.measures[0].spend"),
        (
            [sum_of("days", "events.cases", "days_to_close", rho="0.5")],
            "query.measures[0].kind",
        ),
        (
            [
                count("a", "events.cases", rho="0.1"),
                count("b", "events.cases", rho="0.1"),
            ],
            "query.measures",
        ),
    ],
)
def test_what_keys_from_the_data_cannot_have_is_refused_before_spending(
    system, measures, field
) -> None:
    with system.client("grid-centre") as client:
        before = key_delta_spent(client)
        with pytest.raises(ClientError) as caught:
            client.query(purpose=CASEWORK, measures=measures, group_by=["handler"])
        assert key_delta_spent(client) == before
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v.field for v in caught.value.violations]


def test_a_rule_without_allow_data_dependent_keys_does_not_grant_them(system) -> None:
    # grid-casework grants counts of events.cases, but not by handler and not keys from data;
    # civil-affairs has no rule on events.cases at all.
    with system.client("civil-affairs") as client, pytest.raises(ClientError) as caught:
        client.query(
            purpose="elderly-care-planning",
            measures=[count("cases", "events.cases", rho="0.1")],
            group_by=["handler"],
        )
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_tables_show_the_delta_spent_and_the_key_delta_left(system) -> None:
    with system.client("grid-centre") as client:
        result = client.query(
            purpose=CASEWORK,
            measures=[count("cases", "events.cases", rho="0.125")],
            group_by=["handler"],
        )
        balances = client.budget()
    console = Console(width=200, record=True)
    console.print(result_table(result))
    console.print(budget_table(balances))
    text = console.export_text()
    assert "cost ρ=0.125 + δ=1e-09" in text
    assert "key δ left" in text
    [rule_line] = [line for line in text.splitlines() if RULE_SCOPE in line]
    left = Fraction(1, 10**7) - key_delta_spent_of(balances)
    assert f"{float(left):.2g}" in rule_line


def key_delta_spent_of(balances) -> Fraction:
    [balance] = [b for b in balances if b.scope == RULE_SCOPE]
    return Fraction(balance.key_delta.spent)
