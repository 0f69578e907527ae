"""Human-readable (rich tables) and JSON renderings of results, budgets and datasets."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from fractions import Fraction

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from gateway.api.v1 import query_pb2, query_service_pb2
from gateway.client.client import QueryResult


def console() -> Console:
    """The terminal's width, or where output goes to a pipe or a CI log, a fixed width wide
    enough for most budget scopes on one line."""
    return Console(width=None if sys.stdout.isatty() else 124)


def result_table(result: QueryResult, *, title: str = "", limit: int | None = None) -> Table:
    shown = result.rows if limit is None else result.rows[:limit]
    caption = (
        f"{len(shown)} of {len(result.rows)} groups shown · "
        if limit is not None and len(result.rows) > limit
        else ""
    )
    caption += f"cost ρ={result.raw.cost.rho_value:.4g}"
    if result.raw.cost.key_delta:  # group keys from the data, released above a threshold
        caption += f" + δ={float(Fraction(result.raw.cost.key_delta)):.2g}"
    caption += " · cached" if result.cached else ""
    caption += f" · audit #{result.audit_sequence}"
    table = Table(title=title or None, caption=caption, min_width=len(title) + 4)
    for name in result.group_by:
        table.add_column(name)
    value_names = list(result.rows[0].values) if result.rows else []
    for name in value_names:
        table.add_column(name, justify="right")
        table.add_column("±95%", justify="right", style="dim")
    for row in shown:
        cells = [row.keys[g] for g in result.group_by]
        for name in value_names:
            value = row.values[name]
            cells += ["<suppressed>" if value.suppressed else f"{value.value:,.0f}"]
            cells += [f"{value.error95:,.0f}"]
        table.add_row(*cells)
    return table


def budget_table(balances: Sequence[query_service_pb2.BudgetBalance], *, title: str = "") -> Table:
    """Budgets in rho (exact, additive). The ε column is the pure-DP query the rest would pay for
    (ρ = ε²/2), so it does not add up the way ρ does."""
    table = Table(
        title=title or None,
        caption="ρ (zCDP) adds up across queries; 'left as ε' is the one pure-DP query the rest pays for: ε = √(2ρ)",
    )
    # Scopes are long; where the width runs out they wrap, so that no number is cut short.
    table.add_column("scope", overflow="fold")
    for name in ("total ρ", "spent", "reserved", "left", "left as ε"):
        table.add_column(name, justify="right", no_wrap=True)
    refreshing = any(b.period_end for b in balances)
    if refreshing:
        table.add_column("period ends", no_wrap=True)
    # The delta group keys from the data may still spend, where a scope allows any.
    key_deltas = any(b.HasField("key_delta") for b in balances)
    if key_deltas:
        table.add_column("key δ left", justify="right", no_wrap=True)
    for b in balances:
        cells = [
            b.scope,
            f"{b.total.rho_value:.4g}",
            f"{b.spent.rho_value:.4g}",
            f"{b.reserved.rho_value:.4g}",
            f"{b.remaining.rho_value:.4g}",
            f"{b.remaining.epsilon:.4g}",
        ]
        if refreshing:
            cells.append(_period_end(b.period_end))
        if key_deltas:
            left = b.key_delta.remaining if b.HasField("key_delta") else ""
            cells.append(f"{float(Fraction(left)):.2g}" if left else "")
        table.add_row(*cells)
    return table


def _period_end(iso: str) -> str:
    """A period's end for a table: its date when it ends at midnight (periods do, in the ledger's
    time zone), else to the minute. JSON output keeps the full instant."""
    if not iso:
        return "never"
    end = dt.datetime.fromisoformat(iso)
    return end.date().isoformat() if end.time() == dt.time(0) else end.strftime("%Y-%m-%d %H:%M")


def _dump(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def print_result(result: QueryResult, *, output: str = "table") -> None:
    if output == "json":
        _dump(
            MessageToDict(
                result.raw,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
        )
    else:
        console().print(result_table(result))


def print_budget(balances: Sequence[query_service_pb2.BudgetBalance], *, output: str) -> None:
    if output == "json":
        _dump(
            [
                MessageToDict(
                    b, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
                for b in balances
            ]
        )
    else:
        console().print(budget_table(balances))


def print_datasets(datasets: Sequence[query_service_pb2.DatasetInfo], *, output: str) -> None:
    if output == "json":
        _dump(
            [
                MessageToDict(
                    d, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
                for d in datasets
            ]
        )
        return
    table = Table()
    for name in ("dataset", "silo", "measures", "group by", "filter on", "purposes"):
        table.add_column(name)
    for d in datasets:
        table.add_row(
            d.name,
            d.silo,
            ", ".join(
                query_pb2.MeasureKind.Name(m).removeprefix("MEASURE_KIND_").lower()
                for m in d.measures
            ),
            ", ".join(c.name for c in d.columns if c.groupable),
            ", ".join(c.name for c in d.columns if c.filterable),
            ", ".join(d.purposes),
        )
    console().print(table)
