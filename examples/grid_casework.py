"""The grid event centre watches its caseload: cases per street, with a target accuracy.

Run `silogate up work/up` in another terminal, then `python examples/grid_casework.py`.
"""

from __future__ import annotations

import datetime as dt

from _connect import connect_from_args

from gateway.client import count, where

with connect_from_args("grid-centre") as client:
    result = client.query(
        purpose="casework-monitoring",
        measures=[
            count(
                "open_cases",
                "events.cases",
                where("opened", ">=", dt.date(2026, 1, 1)),
                target_error="40",
            )
        ],
        group_by=["street"],
    )
    print(f"charged ε={result.epsilon:.3g} for ±40 at 95% per street")
    for row in result.rows:
        value = row.values["open_cases"]
        print(f"{row.keys['street']}: {'suppressed' if value.suppressed else f'{value.value:.0f}'}")

    # Cases per handler: there is no public list of handlers, so their names come from the data
    # and only handlers whose noisy count clears a DP threshold are released (rho spend only).
    handlers = client.query(
        purpose="casework-monitoring",
        measures=[count("cases", "events.cases", rho="0.5")],
        group_by=["handler"],
    )
    plan = handlers.raw.measures[0]
    print(
        f"\nhandlers above the threshold {plan.key_threshold} "
        f"(charged rho {handlers.rho} and delta {handlers.raw.cost.key_delta}):"
    )
    for row in handlers.rows:
        value = row.values["cases"]
        print(
            f"{row.keys['handler']}: {'suppressed' if value.suppressed else f'{value.value:.0f}'}"
        )
