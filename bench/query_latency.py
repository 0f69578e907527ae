"""End-to-end RunQuery latency through real processes' code (in-process servers, mutual TLS),
and the share of it spent in the budget ledger.

Baseline, measured in the same run: a gRPC health check over the same mutual-TLS channel (the
transport floor). Each query is distinct (a new measure id), so none is answered from the cache.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.client import SilogateClient, count
from gateway.crypto.channels import channel_credentials
from gateway.crypto.dev_ca import GATEWAY_IDENTITY, init_dev_pki
from gateway.demo.stack import DEMO_CONSUMERS, DEMO_SILOS
from gateway.demo.synthetic import generate_departments
from gateway.server.app import start_gateway
from gateway.settings import GatewayConfig, SiloConfig, SiloEndpoint, TlsConfig
from gateway.silo.app import start_silo

REPO = Path(__file__).resolve().parents[1]
QUERIES = 200


def _timed(target: Any, name: str, spent: list[float]) -> None:
    """Wrap ``target.name`` so its wall time adds to ``spent`` (bench instrumentation only)."""
    original: Callable[..., Any] = getattr(target, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(target, name, wrapper)


def run(people: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_departments(root / "data", people, seed=1)
        pki = init_dev_pki(root / "certs", silos=DEMO_SILOS, consumers=DEMO_CONSUMERS)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def call(coroutine: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)

        def tls(files: Any) -> TlsConfig:
            return TlsConfig(ca=files.ca, cert=files.cert, key=files.key)

        silos = {
            name: call(
                start_silo(
                    SiloConfig(
                        silo=name,
                        tls=tls(pki.silo(name)),
                        policy=REPO / "policies",
                        database=root / "data" / f"{name}.duckdb",
                        release_log=root / f"silo-{name}",
                        gateway_identity=GATEWAY_IDENTITY,
                        receipt_key=pki.receipt_keys(name).private,
                        policy_reload_seconds=0,
                    )
                )
            )
            for name in ("civil", "org")
        }
        gateway = call(
            start_gateway(
                GatewayConfig(
                    listen="127.0.0.1:0",
                    tls=tls(pki.gateway),
                    policy=REPO / "policies",
                    ledger=root / "ledger.sqlite",
                    audit=root / "audit",
                    silos={
                        n: SiloEndpoint(
                            address=f"127.0.0.1:{s.port}", receipt_key=pki.receipt_keys(n).public
                        )
                        for n, s in silos.items()
                    },
                    policy_reload_seconds=0,
                )
            )
        )
        ledger_time: list[float] = []
        for method in ("reserve", "commit", "balances"):
            _timed(gateway.servicer.ledger, method, ledger_time)
        consumer = pki.consumer("civil-affairs")
        address = f"127.0.0.1:{gateway.port}"
        try:
            with grpc.secure_channel(address, channel_credentials(consumer)) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                floor = []
                for _ in range(QUERIES):
                    started = time.perf_counter()
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    floor.append(time.perf_counter() - started)
            latencies = []
            with SilogateClient.connect(
                address, ca=consumer.ca, cert=consumer.cert, key=consumer.key
            ) as client:
                for i in range(QUERIES):
                    started = time.perf_counter()
                    client.query(
                        purpose="elderly-care-planning",
                        measures=[count(f"q{i}", "civil.residents", epsilon="0.01")],
                        group_by=["community"],
                    )
                    latencies.append(time.perf_counter() - started)
        finally:
            call(gateway.stop(0))
            for silo in silos.values():
                call(silo.stop(0))
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
    median = statistics.median(latencies)
    share = sum(ledger_time) / sum(latencies)
    sys.stdout.write(
        f"query    health check round trip (baseline)  {statistics.median(floor) * 1000:7.2f} ms\n"
        f"query    RunQuery, 200 communities, {people:,} people  {median * 1000:7.2f} ms median, "
        f"p95 {sorted(latencies)[int(0.95 * len(latencies))] * 1000:.2f} ms, "
        f"ratio={median / statistics.median(floor):5.1f}x\n"
        f"query    share of query latency in the ledger (reserve+commit+balances): {share:.1%}\n"
    )
