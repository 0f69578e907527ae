"""Civil affairs plans home visits: elderly living alone next to party members, per community.

Run `silogate up work/up` in another terminal, then `python examples/civil_affairs_elderly_care.py`.
"""

from __future__ import annotations

from _connect import connect_from_args

from gateway.client import count, where

with connect_from_args("civil-affairs") as client:
    measures = [
        count(
            "elderly_alone",
            "civil.residents",
            where("lives_alone_elderly", "=", True),
            epsilon="0.5",
        ),
        count("members", "org.members", epsilon="0.5"),
    ]
    preview = client.explain(
        purpose="elderly-care-planning", measures=measures, group_by=["community"]
    )
    print(
        f"cost ρ={preview.cost.rho_value:.4g}; 95% error per value:",
        [round(m.error95) for m in preview.measures],
    )
    result = client.query(
        purpose="elderly-care-planning", measures=measures, group_by=["community"]
    )
    # Communities where the most elderly live alone, with the members who could visit them.
    ranked = sorted(
        (r for r in result.rows if not r.values["elderly_alone"].suppressed),
        key=lambda r: r.values["elderly_alone"].value,
        reverse=True,
    )
    for row in ranked[:10]:
        alone, members = row.values["elderly_alone"], row.values["members"]
        shown = (
            "fewer than 5" if members.suppressed else f"{members.value:.0f} ±{members.error95:.0f}"
        )
        print(
            f"{row.keys['community']}: {alone.value:5.0f} ±{alone.error95:.0f} elderly alone, "
            f"members: {shown}"
        )
