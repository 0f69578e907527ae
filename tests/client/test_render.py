"""The budget table stays readable where the width runs out: long scopes wrap, numbers never do."""

from __future__ import annotations

from rich.console import Console

from gateway.api.v1 import query_pb2, query_service_pb2
from gateway.client.render import budget_table

LONG_SCOPE = "consumer:org-department/rule:org-volunteer-planning-and-outreach/lifetime"


def cost(rho: float, epsilon: float) -> query_pb2.PrivacyCost:
    return query_pb2.PrivacyCost(rho_value=rho, epsilon=epsilon)


def balance(scope: str, period_end: str = "") -> query_service_pb2.BudgetBalance:
    return query_service_pb2.BudgetBalance(
        scope=scope,
        total=cost(32, 8),
        spent=cost(0.375, 0.866),
        reserved=cost(0, 0),
        remaining=cost(31.625, 7.953),
        period_end=period_end,
    )


def rendered(balances: list[query_service_pb2.BudgetBalance], width: int) -> str:
    console = Console(width=width, record=True)
    console.print(budget_table(balances))
    return console.export_text()


def test_numbers_are_whole_when_a_long_scope_must_wrap() -> None:
    text = rendered([balance(LONG_SCOPE), balance("population:city-residents/lifetime")], 90)
    for number in ("32", "0.375", "31.62", "7.953"):
        assert f" {number} " in text
    assert "…" not in text
    # The scope is all there, folded over lines of the first column.
    first_column = "".join(
        line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")
    )
    assert LONG_SCOPE in first_column


def test_period_ends_show_their_date_and_lifetime_never_ends() -> None:
    text = rendered(
        [
            balance(
                "consumer:org-department/rule:org-activity-hours/month", "2026-12-01T00:00:00+08:00"
            ),
            balance("population:city-residents/lifetime"),
        ],
        140,
    )
    assert " 2026-12-01 " in text
    assert "T00:00" not in text
    assert " never " in text


def test_a_period_ending_off_midnight_shows_the_minute() -> None:
    text = rendered([balance("consumer:x/rule:y/day", "2026-12-01T06:30:00+08:00")], 140)
    assert " 2026-12-01 06:30 " in text
