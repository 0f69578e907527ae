"""Real audit logs for the auditor tools' tests (search, report, reconcile).

One scenario runs once per test session against a fresh gateway and four fresh silos (real mutual
TLS on port 0, real DuckDB files), in two phases: the demo policy, then a changed bundle (a second
population takes the org datasets, so the policy version changes and spending splits over two
populations). It leaves released, cached, denied, rejected and failed queries, explains, two
policy activations, and caller-chosen strings meant to break a report (HTML in a request id and in
a purpose). The servers are stopped afterwards: tests read finished logs, and a test that tampers
with a log works on a copy (:func:`copy_logs`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from support import POLICY, BackgroundLoop, edit_rule, gateway_config, silo_config

from gateway.audit.store import iter_records, list_segments
from gateway.client import ClientError, SilogateClient, count, where
from gateway.crypto.dev_ca import DevPki
from gateway.demo.stack import DEMO_SILOS
from gateway.server.app import start_gateway
from gateway.silo.app import start_silo

XSS_REQUEST_ID = '"><script>alert("request")</script>'
XSS_PURPOSE = "<img src=x onerror=alert(1)>"
# A released query whose request id is markup: it reaches search output and reconcile reports.
XSS_RELEASED_ID = "<b onmouseover=alert(2)>released</b>"
SECOND_POPULATION = "party-members"


@dataclass(frozen=True)
class AuditScenario:
    root: Path
    policy: Path  # the bundle of the second phase (the one in force at the end)
    gateway_log: Path
    silo_logs: dict[str, Path]
    request_ids: dict[str, str]  # scenario step -> request id

    def gateway_records(self) -> list[dict[str, Any]]:
        return list(iter_records(self.gateway_log))


_scenario: AuditScenario | None = None


def audit_scenario(factory: pytest.TempPathFactory, pki: DevPki, data_dir: Path) -> AuditScenario:
    """The session's scenario, run on first use (the logs are only read afterwards)."""
    global _scenario  # noqa: PLW0603 - one scenario per session, shared by three test modules
    if _scenario is None:
        _scenario = _run(factory.mktemp("audit-scenario"), pki, data_dir)
    return _scenario


def copy_logs(scenario: AuditScenario, target: Path) -> tuple[Path, dict[str, Path]]:
    """A private copy of every log, for tests that change one."""
    gateway = target / "gateway"
    shutil.copytree(scenario.gateway_log, gateway)
    silos = {}
    for name, path in scenario.silo_logs.items():
        silos[name] = target / f"silo-{name}"
        shutil.copytree(path, silos[name])
    return gateway, silos


def rewrite_records(
    directory: Path, edit: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> None:
    """Rewrite a copied log's records: ``edit`` returns the new record, or None to drop it.

    Later records are renumbered so the log still reads in sequence (the store refuses gaps): the
    tools under test must find the change itself, not a numbering error.
    """
    seq = None
    for segment in list_segments(directory):
        lines = []
        for line in segment.path.read_bytes().splitlines():
            record = edit(json.loads(line))
            if record is None:
                continue
            seq = record["seq"] if seq is None else seq + 1
            record["seq"] = seq
            lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
        segment.path.write_text("".join(lines), encoding="utf-8")


def _run(root: Path, pki: DevPki, data_dir: Path) -> AuditScenario:
    bundle = root / "policy"
    shutil.copytree(POLICY, bundle)
    ids: dict[str, str] = {}
    loop = BackgroundLoop()
    try:
        with _Stack(loop, root, pki, data_dir, bundle) as stack:
            _first_phase(stack, ids)
        _split_population(bundle)
        with _Stack(loop, root, pki, data_dir, bundle) as stack:
            _second_phase(stack, ids)
    finally:
        loop.close()
    return AuditScenario(
        root=root,
        policy=bundle,
        gateway_log=root / "state" / "audit",
        silo_logs={name: root / "state" / f"silo-{name}" for name in DEMO_SILOS},
        request_ids=ids,
    )


class _Stack:
    """Four silos and a gateway sharing ``root/state`` across restarts."""

    def __init__(
        self, loop: BackgroundLoop, root: Path, pki: DevPki, data_dir: Path, bundle: Path
    ) -> None:
        self.loop, self.root, self.pki, self.data_dir, self.bundle = (
            loop,
            root,
            pki,
            data_dir,
            bundle,
        )
        self.silos: dict[str, Any] = {}
        self.gateway: Any = None

    def __enter__(self) -> _Stack:
        for name in DEMO_SILOS:
            config = silo_config(
                self.root, self.pki, name, self.data_dir / f"{name}.duckdb", policy=self.bundle
            )
            self.silos[name] = self.loop.run(start_silo(config))
        addresses = {name: f"127.0.0.1:{s.port}" for name, s in self.silos.items()}
        config = gateway_config(self.root, self.pki, addresses, policy=self.bundle)
        self.gateway = self.loop.run(start_gateway(config))
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.run(self.gateway.stop(0))
        for silo in self.silos.values():
            self.loop.run(silo.stop(0))

    def client(self, consumer: str, timeout: float = 30) -> SilogateClient:
        tls = self.pki.consumer(consumer)
        return SilogateClient.connect(
            f"127.0.0.1:{self.gateway.port}",
            ca=tls.ca,
            cert=tls.cert,
            key=tls.key,
            timeout=timeout,
            retries=0,
        )

    def stop_silo(self, name: str) -> None:
        self.loop.run(self.silos.pop(name).stop(0))


def _refused(call: Callable[[], object]) -> str:
    try:
        call()
    except ClientError as err:
        return err.reason
    raise AssertionError("the scenario expected this call to be refused")


def _first_phase(stack: _Stack, ids: dict[str, str]) -> None:
    elderly = [
        count(
            "elderly_alone",
            "civil.residents",
            where("lives_alone_elderly", "=", True),
            epsilon="0.5",
        ),
        count("members", "org.members", epsilon="0.5"),
    ]
    with stack.client("civil-affairs") as civil:
        civil.explain(purpose="elderly-care-planning", measures=elderly, group_by=["community"])
        ids["civil-both"] = "civil-both-silos"
        civil.query(
            purpose="elderly-care-planning",
            measures=elderly,
            group_by=["community"],
            request_id=ids["civil-both"],
        )
        ids["civil-cached"] = "civil-repeat"
        repeat = civil.query(
            purpose="elderly-care-planning",
            measures=elderly,
            group_by=["community"],
            request_id=ids["civil-cached"],
        )
        assert repeat.cached
        # Two target-error measures on datasets that end up in different populations: the
        # report must price each from the bundle, not split the total evenly.
        ids["civil-target"] = "civil-target-error"
        civil.query(
            purpose="elderly-care-planning",
            measures=[
                count("residents", "civil.residents", target_error="20"),
                count("members", "org.members", target_error="40"),
            ],
            group_by=["community"],
            request_id=ids["civil-target"],
        )
    with stack.client("org-department") as org:
        ids["org-activities"] = "org-activities"
        org.query(
            purpose="volunteer-planning",
            measures=[count("activities", "org.activities", epsilon="0.5")],
            group_by=["activity_type"],
            request_id=ids["org-activities"],
        )
        ids["org-denied"] = "org-health"
        _refused(
            lambda: org.query(
                purpose="volunteer-planning",
                measures=[count("patients", "health.chronic", epsilon="0.5")],
                group_by=["community"],
                request_id=ids["org-denied"],
            )
        )
        ids["xss-refused"] = XSS_REQUEST_ID
        _refused(
            lambda: org.query(
                purpose=XSS_PURPOSE,
                measures=[count("members", "org.members", epsilon="0.25")],
                group_by=["community"],
                request_id=XSS_REQUEST_ID,
            )
        )
        ids["xss-released"] = XSS_RELEASED_ID
        org.query(
            purpose="volunteer-planning",
            measures=[count("members", "org.members", epsilon="0.25")],
            group_by=["community"],
            request_id=XSS_RELEASED_ID,
        )
        ids["rejected"] = "unknown-dataset"
        _refused(
            lambda: org.query(
                purpose="volunteer-planning",
                measures=[count("x", "org.nothing", epsilon="0.25")],
                request_id=ids["rejected"],
            )
        )
    with stack.client("grid-centre") as grid:
        ids["grid-rho"] = "grid-rho"
        grid.query(
            purpose="casework-monitoring",
            measures=[count("cases", "events.cases", rho="0.02")],
            group_by=["category"],
            request_id=ids["grid-rho"],
        )
    with stack.client("health-commission") as health:
        ids["health-research"] = "health-research"
        _refused(
            lambda: health.query(
                purpose="research",
                measures=[count("patients", "health.chronic", epsilon="0.5")],
                group_by=["community"],
                request_id=ids["health-research"],
            )
        )


def _split_population(bundle: Path) -> None:
    """Move the org datasets to a second population (a new policy version)."""
    yaml = YAML()
    populations = yaml.load((bundle / "populations.yaml").read_text(encoding="utf-8"))
    populations["populations"][SECOND_POPULATION] = {
        "description": "Registered party members.",
        "budget": {"epsilon": "20", "period": "lifetime"},
    }
    with (bundle / "populations.yaml").open("w", encoding="utf-8") as handle:
        yaml.dump(populations, handle)
    datasets = yaml.load((bundle / "datasets.yaml").read_text(encoding="utf-8"))
    for name in ("org.members", "org.activities"):
        datasets["datasets"][name]["population"] = SECOND_POPULATION
    with (bundle / "datasets.yaml").open("w", encoding="utf-8") as handle:
        yaml.dump(datasets, handle)
    edit_rule(bundle, "grid-casework", description="The grid centre counts cases (version 2).")


def _second_phase(stack: _Stack, ids: dict[str, str]) -> None:
    with stack.client("org-department") as org:
        ids["org-v2"] = "org-members-v2"
        org.query(
            purpose="volunteer-planning",
            measures=[count("members", "org.members", epsilon="0.5")],
            group_by=["community"],
            request_id=ids["org-v2"],
        )
    with stack.client("civil-affairs") as civil:
        ids["civil-v2"] = "civil-residents-v2"
        civil.query(
            purpose="elderly-care-planning",
            measures=[count("residents", "civil.residents", epsilon="0.5")],
            group_by=["district"],
            request_id=ids["civil-v2"],
        )
    stack.stop_silo("events")
    # The gateway waits for a stopped silo until the caller's deadline nears: keep it short.
    with stack.client("grid-centre", timeout=2) as grid:
        ids["grid-failed"] = "grid-silo-down"
        reason = _refused(
            lambda: grid.query(
                purpose="casework-monitoring",
                measures=[count("cases", "events.cases", epsilon="0.5")],
                group_by=["category"],
                request_id=ids["grid-failed"],
            )
        )
        assert reason == "SILO_UNAVAILABLE", reason
    # One silo of two down: civil releases and keeps its share charged, the query fails.
    stack.stop_silo("org")
    with stack.client("civil-affairs", timeout=2) as civil:
        ids["civil-partial"] = "civil-half-released"
        reason = _refused(
            lambda: civil.query(
                purpose="elderly-care-planning",
                measures=[
                    count("residents", "civil.residents", epsilon="0.5"),
                    count("members", "org.members", epsilon="0.5"),
                ],
                group_by=["community"],
                request_id=ids["civil-partial"],
            )
        )
        assert reason == "SILO_UNAVAILABLE", reason
