"""Hot reload with running servers: a gateway and the civil silo watching one bundle folder.

Each test starts its own gateway and silo (port 0, mutual TLS, the session's DuckDB files) on a
private copy of the demo bundle with a short reload interval, edits the copy, and waits (with a
timeout, never a fixed sleep) until both processes report the expected version: the silo refuses
plans decided under another version, so a query is only meaningful once both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import BackgroundLoop, edit_rule, gateway_config, silo_config, wait_until

from gateway.api.v1 import query_service_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.store import iter_records
from gateway.client import ClientError, SilogateClient, count
from gateway.crypto.channels import channel_credentials
from gateway.crypto.dev_ca import DevPki
from gateway.errors import PolicyInvalid
from gateway.policy.loader import bundle_version
from gateway.policy.signing import sign_bundle
from gateway.server.app import GatewayProcess, start_gateway
from gateway.silo.app import SiloProcess, start_silo

RULE = "civil-elderly-care"  # its per-query cap is 1 at the start (see conftest.py)
PURPOSE = "elderly-care-planning"
RELOAD_SECONDS = 0.1


@dataclass
class Running:
    root: Path
    pki: DevPki
    loop: BackgroundLoop
    silo: SiloProcess
    gateway: GatewayProcess

    def client(self) -> SilogateClient:
        tls = self.pki.consumer("civil-affairs")
        return SilogateClient.connect(
            f"127.0.0.1:{self.gateway.port}", ca=tls.ca, cert=tls.cert, key=tls.key, timeout=30
        )

    def explain(self, epsilon: str) -> query_service_pb2.ExplainQueryResponse:
        with self.client() as client:
            return client.explain(
                purpose=PURPOSE, measures=[count("residents", "civil.residents", epsilon=epsilon)]
            )

    def query(self, epsilon: str) -> query_service_pb2.RunQueryResponse:
        with self.client() as client:
            result = client.query(
                purpose=PURPOSE, measures=[count("residents", "civil.residents", epsilon=epsilon)]
            )
        return result.raw

    def silo_version(self) -> str:
        credentials = channel_credentials(self.pki.gateway)
        with grpc.secure_channel(f"127.0.0.1:{self.silo.port}", credentials) as channel:
            stub = silo_service_pb2_grpc.SiloServiceStub(channel)
            return stub.Describe(silo_service_pb2.DescribeRequest(), timeout=10).policy_version

    def versions(self) -> tuple[str, str]:
        """(gateway, silo) policy versions, as each answers right now."""
        return self.explain("0.5").policy_version, self.silo_version()

    def wait_for_version(self, version: str) -> None:
        wait_until(lambda: self.versions() == (version, version))

    def records(self, who: str, kind: str) -> list[dict[str, Any]]:
        folder = self.root / "state" / ("audit" if who == "gateway" else "silo-civil")
        return [r for r in iter_records(folder) if r["kind"] == kind]

    def wait_for_records(self, who: str, kind: str, n: int) -> list[dict[str, Any]]:
        return wait_until(lambda: (r := self.records(who, kind)) and len(r) >= n and r)


@pytest.fixture
def start(
    tmp_path: Path, pki: DevPki, data_dir: Path, bundle_dir: Path
) -> Iterator[Callable[..., Running]]:
    """Start a silo and a gateway on ``bundle_dir``, watching it; stopped after the test."""
    started: list[Running] = []
    loop = BackgroundLoop()

    def run(verify_key: Path | None = None) -> Running:
        options = {"policy_verify_key": verify_key, "policy_reload_seconds": RELOAD_SECONDS}
        config = silo_config(
            tmp_path, pki, "civil", data_dir / "civil.duckdb", policy=bundle_dir, **options
        )
        silo = loop.run(start_silo(config))
        try:
            gateway = loop.run(
                start_gateway(
                    gateway_config(
                        tmp_path,
                        pki,
                        {"civil": f"127.0.0.1:{silo.port}"},
                        policy=bundle_dir,
                        **options,
                    )
                )
            )
        except BaseException:
            loop.run(silo.stop(0))
            raise
        running = Running(tmp_path, pki, loop, silo, gateway)
        started.append(running)
        return running

    yield run
    for running in started:
        loop.run(running.gateway.stop(0))
        loop.run(running.silo.stop(0))
    loop.close()


def test_a_valid_change_is_applied_and_its_version_answers(
    start: Callable[..., Running], bundle_dir: Path
) -> None:
    running = start()
    old = bundle_version(bundle_dir)
    assert running.versions() == (old, old)
    # A per-query cap of 1 makes an epsilon of 1.5 a denial before the change...
    before = running.explain("1.5")
    assert before.decision == query_service_pb2.DECISION_DENY
    assert before.policy_version == old

    edit_rule(bundle_dir, RULE, max_epsilon_per_query="2")
    new = bundle_version(bundle_dir)
    assert new != old
    running.wait_for_version(new)

    # ...and a permitted, released query after it, decided and released under the new version.
    after = running.explain("1.5")
    assert after.decision == query_service_pb2.DECISION_PERMIT
    assert after.policy_version == new
    assert running.query("1.5").policy_version == new
    activated = [r["policy_version"] for r in running.records("gateway", "policy_activated")]
    assert activated == [old, new]
    silo_activated = [r["policy_version"] for r in running.records("silo", "policy_activated")]
    assert silo_activated == [old, new]
    assert running.records("gateway", "policy_refused") == []


def test_an_invalid_change_is_refused_and_the_old_version_keeps_answering(
    start: Callable[..., Running], bundle_dir: Path
) -> None:
    running = start()
    old = bundle_version(bundle_dir)
    rules = bundle_dir / "rules.yaml"
    valid = rules.read_text()
    rules.write_text(valid + "  broken-rule: {effect: permit\n")  # an unclosed flow mapping
    broken = bundle_version(bundle_dir)

    [refused] = running.wait_for_records("gateway", "policy_refused", 1)
    assert refused["reason"] == "POLICY_INVALID"
    assert refused["refused_version"] == broken and refused["active_version"] == old
    assert refused["problem_count"] >= 1 and refused["problems"][0].startswith("rules.yaml:")
    silo_refused = running.wait_for_records("silo", "policy_refused", 1)
    assert silo_refused[0]["refused_version"] == broken

    assert running.versions() == (old, old)
    assert running.query("0.5").policy_version == old

    # Fixing the file is a new change like any other: applied, and only once.
    rules.write_text(valid)
    edit_rule(bundle_dir, RULE, description="fixed")
    fixed = bundle_version(bundle_dir)
    running.wait_for_version(fixed)
    assert running.query("0.5").policy_version == fixed
    activated = [r["policy_version"] for r in running.records("gateway", "policy_activated")]
    assert activated == [old, fixed]
    assert len(running.records("gateway", "policy_refused")) == 1


def test_with_a_verify_key_an_unsigned_change_is_refused_until_signed(
    start: Callable[..., Running], bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    running = start(public)
    old = bundle_version(bundle_dir)
    assert running.versions() == (old, old)

    edit_rule(bundle_dir, RULE, max_epsilon_per_query="2")
    unsigned = bundle_version(bundle_dir)
    [refused] = running.wait_for_records("gateway", "policy_refused", 1)
    assert refused["reason"] == "POLICY_SIGNATURE_INVALID"
    assert refused["refused_version"] == unsigned
    assert "rules.yaml changed after signing" in refused["problems"][0]
    running.wait_for_records("silo", "policy_refused", 1)
    # The old bundle keeps deciding: the cap of 1 still applies.
    assert running.versions() == (old, old)
    assert running.explain("1.5").decision == query_service_pb2.DECISION_DENY
    with pytest.raises(ClientError) as caught:
        running.query("1.5")
    assert caught.value.reason == "EPSILON_CAP_EXCEEDED"
    assert running.query("0.5").policy_version == old

    sign_bundle(bundle_dir, private)
    running.wait_for_version(unsigned)
    assert running.query("1.5").policy_version == unsigned
    activated = [r["policy_version"] for r in running.records("gateway", "policy_activated")]
    assert activated == [old, unsigned]


def test_with_a_verify_key_an_unsigned_bundle_does_not_start(
    start: Callable[..., Running], keys: tuple[Path, Path]
) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        start(keys[1])
    assert caught.value.reason == "POLICY_SIGNATURE_INVALID"
    assert "the bundle is not signed" in caught.value.message
