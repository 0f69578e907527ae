"""Observability: one structured log line per request, and the Prometheus text endpoint."""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path

import pydantic
import pytest
from support import gateway_config, wait_until

from gateway.client import ClientError, SilogateClient, count
from gateway.logs import JsonFormatter
from gateway.server.app import start_gateway

ELDERLY = "elderly-care-planning"


def test_each_request_logs_one_line_with_consumer_status_latency_and_cost(
    system, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="silogate.rpc")
    with system.client("civil-affairs") as client:
        client.query(
            purpose=ELDERLY,
            measures=[count("logged", "civil.residents", epsilon="0.5")],
            request_id="logged-1",
        )
        with pytest.raises(ClientError):
            client.query(
                purpose="not-a-purpose", measures=[count("x", "civil.residents", epsilon="0.5")]
            )

    def run_query_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "silogate.rpc" and r.rpc == "RunQuery"]

    # An error reaches the caller before the server thread writes its line: wait for it.
    wait_until(lambda: len(run_query_lines()) >= 2)
    released, denied = run_query_lines()[-2:]
    assert released.request_id == "logged-1"
    assert released.consumer == "civil-affairs"
    assert (released.status, released.reason) == ("OK", "OK")
    assert released.cost_rho == "1/8"
    assert released.latency_ms > 0
    assert denied.status == "PERMISSION_DENIED" and denied.cost_rho == "0"
    # The production formatter writes it as one JSON line with every field.
    text = JsonFormatter().format(released)
    assert "\n" not in text
    for field in ('"consumer": "civil-affairs"', '"cost_rho": "1/8"', '"status": "OK"'):
        assert field in text


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(f"{name}{{{wanted}}}" if labels else name) + r" (\S+)$"
    [value] = re.findall(pattern, text, flags=re.MULTILINE)
    return float(value)


def test_metrics_endpoint_counts_requests_latencies_and_budget(system, tmp_path: Path) -> None:
    addresses = {name: system.silo_address(name) for name in system.silos}
    gateway = system.loop.run(
        start_gateway(gateway_config(tmp_path, system.pki, addresses, metrics_listen="127.0.0.1:0"))
    )
    assert gateway.metrics_endpoint is not None
    port = gateway.metrics_endpoint.port
    tls = system.pki.consumer("civil-affairs")
    try:
        with SilogateClient.connect(
            f"127.0.0.1:{gateway.port}", ca=tls.ca, cert=tls.cert, key=tls.key, retries=0
        ) as client:
            for i in range(3):
                client.query(
                    purpose=ELDERLY,
                    measures=[count(f"m{i}", "civil.residents", epsilon="0.5")],
                    group_by=["district"],
                )
            with pytest.raises(ClientError):
                client.query(purpose="nope", measures=[count("x", "civil.residents", epsilon="1")])
            client.budget()
        status, content_type, text = _scrape(port)
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        ok = {"method": "RunQuery", "code": "OK", "reason": "OK"}
        assert _sample(text, "silogate_requests_total", **ok) == 3
        denied = {
            "method": "RunQuery",
            "code": "PERMISSION_DENIED",
            "reason": "PURPOSE_NOT_ALLOWED",
        }
        assert _sample(text, "silogate_requests_total", **denied) == 1
        assert (
            _sample(text, "silogate_requests_total", method="GetBudget", code="OK", reason="OK")
            == 1
        )
        assert _sample(text, "silogate_request_duration_seconds_count", method="RunQuery") == 4
        assert (
            _sample(text, "silogate_request_duration_seconds_bucket", method="RunQuery", le="+Inf")
            == 4
        )
        assert _sample(text, "silogate_request_duration_seconds_sum", method="RunQuery") > 0
        assert _sample(text, "silogate_requests_in_flight") == 0
        # Three releases of rho 1/8 each, in both scopes, read from the ledger.
        for scope in (
            "consumer:civil-affairs/rule:civil-elderly-care/lifetime",
            "population:city-residents/lifetime",
        ):
            assert _sample(text, "silogate_budget_spent_rho", scope=scope) == float(
                3 * Fraction(1, 8)
            )
            assert _sample(text, "silogate_budget_reserved_rho", scope=scope) == 0
        assert "# TYPE silogate_request_duration_seconds histogram" in text
        with pytest.raises(urllib.error.HTTPError) as missing:
            _scrape(port, "/other")
        assert missing.value.code == 404
        missing.value.close()
    finally:
        system.loop.run(gateway.stop(0))
    # Stopping the gateway closes the endpoint too.
    with pytest.raises(urllib.error.URLError):
        _scrape(port)


def test_the_metrics_endpoint_only_listens_on_loopback(system, tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError):
        gateway_config(tmp_path, system.pki, {}, metrics_listen="0.0.0.0:9464")
    assert gateway_config(tmp_path, system.pki, {}).metrics_listen is None  # off by default
