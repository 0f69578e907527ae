"""The organization department sizes volunteer work: activities by type, older residents per community.

Run `silogate up work/up` in another terminal, then `python examples/org_volunteer_planning.py`.
"""

from __future__ import annotations

from _connect import connect_from_args

from gateway.client import ClientError, count, where

with connect_from_args("org-department") as client:
    activities = client.query(
        purpose="volunteer-planning",
        measures=[count("activities", "org.activities", target_error="100")],
        group_by=["activity_type"],
    )
    for row in activities.rows:
        value = row.values["activities"]
        print(f"{row.keys['activity_type']:<20} {value.value:8.0f} ±{value.error95:.0f}")
    try:
        client.query(
            purpose="volunteer-planning",
            measures=[
                count(
                    "patients", "health.chronic", where("condition", "=", "diabetes"), epsilon="0.5"
                )
            ],
        )
    except ClientError as err:  # health data is forbidden to this department
        print(f"refused: {err.reason}: {err.message}")
    for balance in client.budget():
        print(f"{balance.scope}: ρ left {balance.remaining.rho_value:.4g}")
