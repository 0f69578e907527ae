"""``silogate demo``: the whole system on loopback and a short scenario as two departments.

Civil affairs plans visits to elderly people living alone: elderly living alone per community
(civil silo) next to registered members per community (org silo), one query across two silos.
The organization department counts older residents and members per community, and member
activities by type. A forbidden request shows a denial with its reason code. The health commission
asks for the mean length of home-care visits and a histogram of it per visit type. The grid centre
counts cases per handler, a column with no public list of keys: only handlers whose noisy count
clears a DP threshold come out. Budgets are printed at the end.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from gateway.client import ClientError, SilogateClient, count, histogram, mean_of, where
from gateway.client.render import budget_table, result_table
from gateway.client.render import console as render_console
from gateway.demo.stack import Stack, start_stack
from gateway.settings import ClientConfig, load_config


def _connect(stack: Stack, consumer: str) -> SilogateClient:
    config = load_config(stack.client_config(consumer), ClientConfig)
    return SilogateClient.connect(
        config.address, ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key, timeout=60
    )


def _civil_affairs(console: Console, client: SilogateClient) -> None:
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
    console.print(
        f"[bold]civil-affairs[/] previews the query: decision "
        f"{'PERMIT' if preview.decision == 1 else 'DENY'} by {', '.join(preview.deciding_rules)}; "
        + "; ".join(
            f"{m.measure_id} from silo '{m.silo}': ±{m.error95:.0f} (95%)" for m in preview.measures
        )
        + f"; cost ρ={preview.cost.rho_value:.4g}"
    )
    result = client.query(
        purpose="elderly-care-planning", measures=measures, group_by=["community"]
    )
    console.print(
        result_table(
            result,
            title="civil-affairs: elderly living alone and party members per community",
            limit=12,
        )
    )


def _org_department(console: Console, client: SilogateClient) -> None:
    result = client.query(
        purpose="volunteer-planning",
        measures=[
            count(
                "residents_60_plus",
                "civil.residents",
                where("birth_year", "<=", 1966),
                epsilon="0.5",
            ),
            count("members", "org.members", epsilon="0.5"),
        ],
        group_by=["community"],
    )
    console.print(
        result_table(
            result, title="org-department: residents aged 60+ and members per community", limit=8
        )
    )
    activities = client.query(
        purpose="volunteer-planning",
        measures=[count("activities", "org.activities", epsilon="0.5")],
        group_by=["activity_type"],
    )
    console.print(result_table(activities, title="org-department: member activities by type"))
    try:
        client.query(
            purpose="volunteer-planning",
            measures=[count("patients", "health.chronic", epsilon="0.5")],
            group_by=["community"],
        )
    except ClientError as err:
        console.print(
            f"[bold]org-department[/] asks for chronic patients per community: "
            f"[red]{err.code.name} {err.reason}[/]: {err.message}"
        )


def _health_commission(console: Console, client: SilogateClient) -> None:
    result = client.query(
        purpose="home-care-planning",
        measures=[
            mean_of("mean_minutes", "health.visits", "minutes", epsilon="1"),
            histogram("minutes", "health.visits", "minutes", bins=[0, 30, 60, 120], epsilon="1"),
        ],
        group_by=["visit_type"],
    )
    console.print(
        result_table(
            result, title="health-commission: home-care visit length by visit type (minutes)"
        )
    )


def _grid_centre(console: Console, client: SilogateClient) -> None:
    result = client.query(
        purpose="casework-monitoring",
        measures=[count("cases", "events.cases", rho="0.5")],
        group_by=["handler"],
    )
    threshold = result.raw.measures[0].key_threshold
    delta = float(Fraction(result.raw.cost.key_delta))
    console.print(
        result_table(
            result,
            title=f"grid-centre: cases per handler (keys from the data: released when the "
            f"noisy count is above {threshold}; δ={delta:.0e})",
            limit=8,
        )
    )


def run_demo(workdir: Path, *, people: int, seed: int) -> int:
    console = render_console()
    started = time.monotonic()
    console.print(Panel.fit("Silogate demo: four department silos and a gateway on loopback"))
    with start_stack(
        workdir,
        people=people,
        seed=seed,
        on_step=lambda step: console.print(f"[dim]starting[/] {step}"),
    ) as stack:
        console.print(f"gateway on {stack.gateway_address}, mutual TLS on every hop\n")
        with _connect(stack, "civil-affairs") as civil:
            _civil_affairs(console, civil)
            civil_budget = civil.budget()
        with _connect(stack, "org-department") as org:
            _org_department(console, org)
            org_budget = org.budget()
        with _connect(stack, "health-commission") as health:
            _health_commission(console, health)
        with _connect(stack, "grid-centre") as grid:
            _grid_centre(console, grid)
        console.print(budget_table(civil_budget, title="budget left: civil-affairs"))
        console.print(budget_table(org_budget, title="budget left: org-department"))
    console.print(
        f"[green]demo finished in {time.monotonic() - started:.1f} s[/]; every process stopped. "
        f"Audit log: {workdir / 'state' / 'gateway' / 'audit'} (segment-*.jsonl)"
    )
    return 0
