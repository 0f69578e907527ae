"""The query service end to end with real processes: four silo agents and the gateway started by
``start_stack`` (``silogate serve``, mutual TLS, port 0), real DuckDB files, the Python client.

The truth is computed from the same DuckDB files directly. The tests run in file order on one
stack; the last one kills a silo.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import duckdb
import grpc
import pytest
from conftest import PEOPLE, SEED

from gateway.client import ClientError, SilogateClient, count, where
from gateway.demo.stack import Stack, start_stack

pytestmark = pytest.mark.slow
PURPOSE = "elderly-care-planning"
GRANT = "consumer:civil-affairs/rule:civil-elderly-care/lifetime"
POPULATION = "population:city-residents/lifetime"
MIN_GROUP_SIZE = 5  # rule civil-elderly-care


def measures(suffix: str = "") -> list:
    """Aged 60+ per community from civil affairs, members per community from the org department:
    two silos, aligned on the public key set of communities. Epsilon 1 each (rho 1/2 each)."""
    return [
        count(
            f"aged_60_plus{suffix}", "civil.residents", where("birth_year", "<=", 1966), epsilon="1"
        ),
        count(f"members{suffix}", "org.members", epsilon="1"),
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("processes")
    # The session's databases, marked as generated for (PEOPLE, SEED): the stack reuses them.
    shutil.copytree(data_dir, workdir / "data")
    (workdir / "data" / "generated.json").write_text(json.dumps({"people": PEOPLE, "seed": SEED}))
    running = start_stack(
        workdir, people=PEOPLE, seed=SEED, gateway_settings={"metrics_listen": "127.0.0.1:0"}
    )
    try:
        yield running
    finally:
        running.stop()


def client(stack: Stack, consumer: str = "civil-affairs") -> SilogateClient:
    tls = stack.pki.consumer(consumer)
    return SilogateClient.connect(
        stack.gateway_address, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=30, retries=0
    )


def charged(c: SilogateClient) -> dict[str, tuple[Fraction, Fraction]]:
    return {b.scope: (Fraction(b.spent.rho), Fraction(b.reserved.rho)) for b in c.budget()}


def truth(stack: Stack, silo: str, sql: str) -> dict[str, int]:
    with duckdb.connect(str(stack.workdir / "data" / f"{silo}.duckdb"), read_only=True) as db:
        return {str(k): int(v) for k, v in db.execute(sql).fetchall()}


def test_a_two_silo_query_returns_both_measures_per_community_near_the_truth(stack: Stack) -> None:
    aged = truth(
        stack,
        "civil",
        "SELECT community, count(*) FROM residents WHERE birth_year <= 1966 GROUP BY community",
    )
    members = truth(stack, "org", "SELECT community, count(*) FROM members GROUP BY community")
    with client(stack) as c:
        result = c.query(purpose=PURPOSE, measures=measures(), group_by=["community"])
    assert len(result.rows) == 200  # every community, zero counts included
    assert {p.measure_id: p.silo for p in result.raw.measures} == {
        "aged_60_plus": "civil",
        "members": "org",
    }
    assert result.rho == "1"
    for name, exact in (("aged_60_plus", aged), ("members", members)):
        plan = next(p for p in result.raw.measures if p.measure_id == name)
        # Discrete Laplace of scale 1: P(|noise| > 25) < 1e-10 per value.
        tolerance = 25 * plan.scale
        kept = within = 0
        for row in result.rows:
            value, true = row.values[name], exact.get(row.keys["community"], 0)
            assert value.error95 == pytest.approx(plan.error95)
            if value.suppressed:
                assert value.value == 0 and true < MIN_GROUP_SIZE + tolerance
                continue
            kept += 1
            assert abs(value.value - true) <= tolerance, (name, row.keys, value, true)
            within += abs(value.value - true) <= value.error95
        # 95% intervals: at least 85% of the kept values inside (binomial tail < 1e-6, n >= 100).
        assert kept >= 100 and within >= 0.85 * kept, (name, kept, within)


def test_explain_previews_the_cost_and_spends_nothing(stack: Stack) -> None:
    with client(stack) as c:
        before = charged(c)
        preview = c.explain(purpose=PURPOSE, measures=measures("_preview"), group_by=["community"])
        assert preview.cost.rho == "1"
        after = {b.scope: Fraction(b.spent.rho) for b in preview.budget_after}
        assert after[GRANT] == before[GRANT][0] + 1
        assert charged(c) == before


def test_a_retried_request_id_does_not_spend_twice(stack: Stack) -> None:
    with client(stack) as c:
        before = charged(c)
        first = c.query(
            purpose=PURPOSE,
            measures=measures("_retry"),
            group_by=["community"],
            request_id="retry-1",
        )
        again = c.query(
            purpose=PURPOSE,
            measures=measures("_retry"),
            group_by=["community"],
            request_id="retry-1",
        )
        # The stored answer: the same noise, cost and audit record.
        assert again.rows == first.rows and again.raw.measures == first.raw.measures
        assert (again.rho, again.audit_sequence, again.cached) == (
            first.rho,
            first.audit_sequence,
            False,
        )
        spent = charged(c)
    assert spent[GRANT] == (before[GRANT][0] + 1, before[GRANT][1])
    assert spent[POPULATION] == (before[POPULATION][0] + 1, before[POPULATION][1])


def _metrics(stack: Stack) -> str:
    log = (stack.workdir / "logs" / "gateway.log").read_text()
    [port] = [
        json.loads(line)["port"]
        for line in log.splitlines()
        if line.startswith("{") and json.loads(line)["message"] == "metrics endpoint listening"
    ]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_a_failed_silo_leaves_charged_exactly_what_the_other_silo_released(stack: Stack) -> None:
    org = stack.processes["silo-org"]
    org.send_signal(signal.SIGKILL)
    org.wait(10)
    time.sleep(0.5)  # the gateway's connection to org notices the closed socket
    with client(stack) as c:
        before = charged(c)
        with pytest.raises(ClientError) as caught:
            c.query(purpose=PURPOSE, measures=measures("_failed"), group_by=["community"])
        after = charged(c)
    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "SILO_UNAVAILABLE"
    assert error.metadata["silo"] == "org"
    assert error.metadata["budget_spent"] == "true"
    assert error.metadata["charged_silos"] == "civil"
    civil_share = Fraction(1, 2)  # the civil measure, epsilon 1; org's rho 1/2 was given back
    assert error.metadata["charged_rho"] == str(civil_share)
    for scope in (GRANT, POPULATION):
        assert after[scope] == (before[scope][0], before[scope][1] + civil_share)
    # The metrics endpoint of the gateway process says the same.
    text = _metrics(stack)
    reserved = re.search(
        rf'^silogate_budget_reserved_rho{{scope="{re.escape(GRANT)}"}} (\S+)$', text, re.MULTILINE
    )
    assert reserved is not None and float(reserved.group(1)) == float(after[GRANT][1])
    assert 'silogate_silo_failures_total{silo="org",may_have_released="false"} 1' in text
    assert (
        'silogate_requests_total{method="RunQuery",code="UNAVAILABLE",reason="SILO_UNAVAILABLE"} 1'
        in text
    )
