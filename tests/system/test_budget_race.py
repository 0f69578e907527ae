"""Race: 500 concurrent queries from two consumers against budgets that admit exactly 50.

Real gateway and silos (in-process, mutual TLS, port 0) on a copy of the demo bundle whose
population budget admits exactly 50 queries of the cost used here. The ledger must release at most
50, charge exactly the released costs, and charge each consumer's scope only for its own queries.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import grpc
from small_budgets import ADMITTED, COST, EPSILON, bundle_with_small_budgets
from support import BackgroundLoop, start_silos, tls_config

from gateway.client import ClientError, SilogateClient, count
from gateway.server.app import start_gateway
from gateway.settings import GatewayConfig, GatewayLimits, SiloEndpoint

QUERIES = 500


def test_concurrent_queries_never_overspend(data_dir: Path, pki, tmp_path: Path) -> None:
    bundle = bundle_with_small_budgets(tmp_path)
    loop = BackgroundLoop()
    silos = start_silos(loop, pki, data_dir, tmp_path, ("civil", "events"), policy=bundle)
    gateway = loop.run(
        start_gateway(
            GatewayConfig(
                listen="127.0.0.1:0",
                tls=tls_config(pki.gateway),
                policy=bundle,
                ledger=tmp_path / "ledger.sqlite",
                audit=tmp_path / "audit",
                silos={
                    n: SiloEndpoint(
                        address=f"127.0.0.1:{s.port}", receipt_key=pki.receipt_keys(n).public
                    )
                    for n, s in silos.items()
                },
                # The race needs all 32 threads in flight at once, beyond the default 8 per
                # consumer (TOO_MANY_REQUESTS would hide an overspend instead of racing it).
                limits=GatewayLimits(max_in_flight_per_consumer=32),
            )
        )
    )
    address = f"127.0.0.1:{gateway.port}"
    clients = {}
    for consumer in ("civil-affairs", "grid-centre"):
        tls = pki.consumer(consumer)
        clients[consumer] = SilogateClient.connect(
            address, ca=tls.ca, cert=tls.cert, key=tls.key, retries=0, timeout=60
        )
    outcomes: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    def ask(i: int) -> None:
        consumer = "civil-affairs" if i % 2 else "grid-centre"
        purpose, dataset = (
            ("elderly-care-planning", "civil.residents")
            if consumer == "civil-affairs"
            else ("casework-monitoring", "events.cases")
        )
        try:
            result = clients[consumer].query(
                purpose=purpose,
                # A distinct measure id per query: identical queries would be answered from the cache.
                measures=[count(f"n{i}", dataset, epsilon=str(float(EPSILON)))],
                request_id=f"race-{i}",
            )
            assert Fraction(result.rho) == COST
            outcome = "released"
        except ClientError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert err.reason == "PRIVACY_BUDGET_EXHAUSTED"
            outcome = "exhausted"
        with lock:
            outcomes[(consumer, outcome)] += 1

    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(ask, range(QUERIES)))
        released = {c: outcomes[(c, "released")] for c in clients}
        assert sum(outcomes.values()) == QUERIES
        assert sum(released.values()) == ADMITTED  # the population budget admits exactly 50
        ledger = gateway.servicer.ledger
        ledger.verify()  # running sums agree with the individual charges
        for consumer, client in clients.items():
            balances = {b.scope: b for b in client.budget()}
            population = balances["population:city-residents/lifetime"]
            assert Fraction(population.spent.rho) == ADMITTED * COST  # exact, every consumer
            assert population.reserved.rho == "0"
            own = next(b for s, b in balances.items() if s.startswith(f"consumer:{consumer}/"))
            assert Fraction(own.spent.rho) == released[consumer] * COST
    finally:
        for client in clients.values():
            client.close()
        loop.run(gateway.stop(0))
        for silo in silos.values():
            loop.run(silo.stop(0))
        loop.close()
