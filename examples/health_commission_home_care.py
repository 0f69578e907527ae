"""The health commission plans home care: how long visits last, by visit type.

One query, one silo: the mean visit length (a noisy sum of minutes over a noisy count of visits,
the spend split between them) and a histogram of visit lengths over bins the commission chooses.
Run `silogate up work/up` in another terminal, then `python examples/health_commission_home_care.py`.
"""

from __future__ import annotations

from _connect import connect_from_args

from gateway.client import histogram, mean_of

BINS = [0, 30, 60, 120]

with connect_from_args("health-commission") as client:
    measures = [
        mean_of("mean_minutes", "health.visits", "minutes", epsilon="0.5"),
        histogram("minutes", "health.visits", "minutes", bins=BINS, epsilon="0.5"),
    ]
    preview = client.explain(
        purpose="home-care-planning", measures=measures, group_by=["visit_type"]
    )
    print(f"the query would cost rho={preview.cost.rho} (epsilon {preview.cost.epsilon:.3g})")
    result = client.query(purpose="home-care-planning", measures=measures, group_by=["visit_type"])
    for row in result.rows:
        mean = row.values["mean_minutes"]
        cells = [
            f"{name[len('minutes') :]}: {'-' if v.suppressed else f'{v.value:,.0f}'}"
            for name, v in row.values.items()
            if name.startswith("minutes[")
        ]
        shown = "suppressed" if mean.suppressed else f"{mean.value:.1f} ±{mean.error95:.1f} min"
        print(f"{row.keys['visit_type']:<22} mean {shown:<18} " + "  ".join(cells))
