"""The walking skeleton end to end: real gateway and silos (port 0, mutual TLS), real DuckDB."""

from __future__ import annotations

import math
import uuid

import duckdb
import grpc
import pytest

from gateway.api.v1 import (
    query_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
    silo_service_pb2,
    silo_service_pb2_grpc,
)
from gateway.audit.store import iter_records
from gateway.client import ClientError, count, where
from gateway.crypto.channels import channel_credentials
from gateway.server.status import parse_rpc_error

ELDERLY = "elderly-care-planning"


def exact_counts(system, silo: str, sql: str) -> dict[str, int]:
    with duckdb.connect(str(system.data / f"{silo}.duckdb"), read_only=True) as db:
        return {str(k): int(v) for k, v in db.execute(sql).fetchall()}


def budget_spent(client) -> dict[str, float]:
    return {b.scope: b.spent.rho_value for b in client.budget()}


def test_allowed_query_returns_values_near_the_truth(system) -> None:
    truth = exact_counts(
        system,
        "civil",
        "SELECT community, count(*) FROM residents WHERE birth_year <= 1966 GROUP BY community",
    )
    with system.client("civil-affairs") as client:
        result = client.query(
            purpose=ELDERLY,
            measures=[
                count(
                    "aged_60_plus",
                    "civil.residents",
                    where("birth_year", "<=", 1966),
                    epsilon="1",
                )
            ],
            group_by=["community"],
        )
    assert len(result.rows) == 200  # every public key, zero counts included
    plan = result.raw.measures[0]
    assert plan.silo == "civil" and plan.sensitivity == 1.0
    assert plan.scale == pytest.approx(1.0, rel=1e-9)  # sensitivity / epsilon
    # Discrete Laplace with scale 1: P(|noise| > 25) = 2e^-25/(1+e^-1) < 1e-10 per value, so a
    # miss over 200 values has probability < 3e-8.
    tolerance = 25 * plan.scale
    within_error95 = 0
    for row in result.rows:
        value = row.values["aged_60_plus"]
        true = truth.get(row.keys["community"], 0)
        assert value.error95 == pytest.approx(plan.error95)
        if value.suppressed:
            assert value.value == 0 and true < 5 + tolerance
            continue
        assert abs(value.value - true) <= tolerance
        within_error95 += abs(value.value - true) <= value.error95
    kept = sum(not r.values["aged_60_plus"].suppressed for r in result.rows)
    # 95% intervals: at least 85% of the kept values must fall inside (binomial tail < 1e-6 for n >= 100).
    assert kept >= 150 and within_error95 >= 0.85 * kept
    assert result.epsilon == pytest.approx(1.0) and result.rho == "1/2"
    assert result.policy_version and result.audit_sequence > 0


def test_cross_silo_query_merges_on_group_keys(system) -> None:
    with system.client("civil-affairs") as client:
        result = client.query(
            purpose=ELDERLY,
            measures=[
                count("residents", "civil.residents", epsilon="0.5"),
                count("members", "org.members", epsilon="0.5"),
            ],
            group_by=["community"],
        )
    assert [r.keys["community"] for r in result.rows][:3] == ["C001", "C002", "C003"]
    assert len(result.rows) == 200
    assert {p.silo for p in result.raw.measures} == {"civil", "org"}
    assert result.rho == "1/4"  # two epsilon-0.5 measures: 2 * 0.5^2 / 2
    residents = sum(r.values["residents"].value for r in result.rows)
    members = sum(r.values["members"].value for r in result.rows)
    # Members are ~8% of adults: far fewer than residents, far more than zero (noise scale 2).
    assert 0.02 * residents < members < 0.15 * residents


def test_caller_without_certificate_is_refused(system, pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    with grpc.secure_channel(system.address, credentials) as channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBudget(query_service_pb2.GetBudgetRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_certificate_of_unknown_consumer_is_unauthenticated(system) -> None:
    with system.client("stranger", retries=0) as client, pytest.raises(ClientError) as caught:
        client.budget()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "UNKNOWN_CONSUMER"


def test_consumer_certificate_cannot_call_silo_service(system, pki) -> None:
    credentials = channel_credentials(pki.consumer("civil-affairs"))
    with grpc.secure_channel(system.silo_address("civil"), credentials) as channel:
        stub = silo_service_pb2_grpc.SiloServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Describe(silo_service_pb2.DescribeRequest(), timeout=10)
    error = parse_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "CALLER_NOT_GATEWAY"


def _silo_stub_as_gateway(system, pki):
    channel = grpc.secure_channel(system.silo_address("civil"), channel_credentials(pki.gateway))
    return channel, silo_service_pb2_grpc.SiloServiceStub(channel)


def test_silo_refuses_noise_smaller_than_its_own_computation(system, pki) -> None:
    channel, stub = _silo_stub_as_gateway(system, pki)
    with channel:
        describe = stub.Describe(silo_service_pb2.DescribeRequest(), timeout=10)
        assert describe.silo == "civil" and "civil.residents" in describe.datasets
        measure = count("residents", "civil.residents", epsilon="1")
        request = silo_service_pb2.ReleaseRequest(
            request_id="direct-1",
            consumer="civil-affairs",
            purpose=ELDERLY,
            policy_version=describe.policy_version,
            group_by=["district"],
            plans=[
                silo_service_pb2.ReleasePlan(
                    measure=measure,
                    cost=query_pb2.PrivacyCost(rho="1/2"),
                    components=[
                        silo_service_pb2.NoiseComponent(
                            name="value",
                            mechanism=query_pb2.MECHANISM_DISCRETE_LAPLACE,
                            scale=0.5,  # epsilon 1 at sensitivity 1 needs scale >= 1
                            rho="1/2",
                        )
                    ],
                )
            ],
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Release(request, timeout=10)
        assert parse_rpc_error(caught.value).reason == "NOISE_TOO_SMALL"
        request.policy_version = "0" * 64
        request.plans[0].components[0].scale = 1.0 + 1e-9
        with pytest.raises(grpc.RpcError) as caught:
            stub.Release(request, timeout=10)
        assert parse_rpc_error(caught.value).reason == "POLICY_VERSION_MISMATCH"
        request.policy_version = describe.policy_version
        released = stub.Release(request, timeout=10)
    assert [c.name for c in released.releases[0].components] == ["value"]
    assert len(released.releases[0].components[0].values) == 4  # D01..D04
    assert len(released.receipt.digest) == 64


def test_unknown_dataset_is_invalid_argument_and_server_keeps_serving(system) -> None:
    with system.client("civil-affairs") as client:
        with pytest.raises(ClientError) as caught:
            client.query(
                purpose=ELDERLY,
                measures=[count("x", "civil.nonexistent", epsilon="0.1")],
                group_by=["community"],
            )
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.reason == "UNKNOWN_DATASET"
        assert caught.value.metadata["dataset"] == "civil.nonexistent"
        assert [v.field for v in caught.value.violations] == ["query.measures[0].dataset"]
        assert client.datasets()  # still serving


def test_malformed_request_lists_every_violation(system) -> None:
    with system.client("civil-affairs") as client, pytest.raises(ClientError) as caught:
        client.query(
            purpose="",
            measures=[
                query_pb2.Measure(id="Bad Id", dataset="civil.residents"),
            ],
            group_by=["community", "community"],
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_QUERY"
    fields = {v.field for v in caught.value.violations}
    assert {
        "query.purpose",
        "query.measures[0].id",
        "query.measures[0].kind",
        "query.measures[0].spend",
        "query.group_by",
    } <= fields


def test_denied_query_spends_nothing_and_is_audited(system) -> None:
    with system.client("org-department") as client:
        before = budget_spent(client)
        with pytest.raises(ClientError) as caught:
            client.query(
                purpose="volunteer-planning",
                measures=[count("patients", "health.chronic", epsilon="0.5")],
                group_by=["community"],
                request_id="denied-health",
            )
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.reason == "POLICY_DENIED"
        assert "no-health-data-to-org" in caught.value.message
        assert budget_spent(client) == before
    records = list(iter_records(system.root / "state" / "audit"))
    denied = [r for r in records if r.get("request_id") == "denied-health"]
    assert len(denied) == 1 and denied[0]["decision"] == "denied"
    assert denied[0]["reason"] == "POLICY_DENIED" and denied[0]["consumer"] == "org-department"


def test_per_query_cap_and_purpose_are_enforced(system) -> None:
    with system.client("civil-affairs") as client:
        with pytest.raises(ClientError) as caught:
            client.query(
                purpose=ELDERLY,
                measures=[count("residents", "civil.residents", epsilon="1.5")],
            )
        assert caught.value.reason == "EPSILON_CAP_EXCEEDED"
        preview = client.explain(
            purpose=ELDERLY, measures=[count("residents", "civil.residents", epsilon="1.5")]
        )
        assert preview.decision == query_service_pb2.DECISION_DENY
        assert "per query" in preview.reasons[-1] and not preview.measures
        with pytest.raises(ClientError) as caught:
            client.query(
                purpose="volunteer-planning",
                measures=[count("residents", "civil.residents", epsilon="0.5")],
            )
        assert caught.value.reason == "PURPOSE_NOT_ALLOWED"


def test_retry_with_same_request_id_never_spends_twice(system) -> None:
    request_id = str(uuid.uuid4())
    measures = [count("residents", "civil.residents", epsilon="0.25")]
    with system.client("civil-affairs") as client:
        before = budget_spent(client)
        first = client.query(purpose=ELDERLY, measures=measures, request_id=request_id)
        after_first = budget_spent(client)
        second = client.query(purpose=ELDERLY, measures=measures, request_id=request_id)
        assert budget_spent(client) == after_first
        assert second.raw.groups == first.raw.groups
        assert second.audit_sequence == first.audit_sequence
        scope = next(s for s in after_first if s.startswith("consumer:civil-affairs"))
        assert after_first[scope] - before.get(scope, 0) == pytest.approx(0.25**2 / 2)
        with pytest.raises(ClientError) as caught:
            client.query(
                purpose=ELDERLY,
                measures=[count("residents", "civil.residents", epsilon="0.3")],
                request_id=request_id,
            )
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_explain_previews_cost_without_spending(system) -> None:
    measures = [count("members", "org.members", epsilon="0.5")]
    with system.client("civil-affairs") as client:
        before = budget_spent(client)
        preview = client.explain(purpose=ELDERLY, measures=measures, group_by=["community"])
        assert budget_spent(client) == before
    assert preview.decision == query_service_pb2.DECISION_PERMIT
    assert list(preview.deciding_rules) == ["civil-elderly-care"]
    assert preview.cost.rho == "1/8"
    assert preview.measures[0].error95 == pytest.approx(6.4296, rel=1e-3)
    for balance in preview.budget_after:
        spent_now = before.get(balance.scope, 0.0)
        assert balance.spent.rho_value == pytest.approx(spent_now + 0.125)


def test_list_datasets_paginates_and_rejects_bad_tokens(system) -> None:
    with system.client("civil-affairs") as client:
        names = [d.name for d in client.datasets(page_size=1)]
    assert names == ["civil.residents", "org.members"]
    credentials = channel_credentials(system.pki.consumer("civil-affairs"))
    with grpc.secure_channel(system.address, credentials) as channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        page = stub.ListDatasets(query_service_pb2.ListDatasetsRequest(page_size=1), timeout=10)
        assert len(page.datasets) == 1 and page.next_page_token
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListDatasets(
                query_service_pb2.ListDatasetsRequest(page_token="not-a-token"), timeout=10
            )
    assert parse_rpc_error(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT


def test_health_service_reports_serving(system) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = channel_credentials(system.pki.consumer("civil-affairs"))
    with grpc.secure_channel(system.address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service="gateway.api.v1.QueryService"), timeout=10
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_noise_scale_error_matches_opendp_accuracy(system) -> None:
    with system.client("grid-centre") as client:
        result = client.query(
            purpose="casework-monitoring",
            measures=[count("cases", "events.cases", target_error="50")],
            group_by=["street"],
        )
    plan = result.raw.measures[0]
    assert plan.error95 == pytest.approx(50, rel=1e-6)
    assert plan.sensitivity == 5  # events.cases allows 5 rows per person
    assert math.isclose(result.epsilon, 5 / plan.scale, rel_tol=1e-9)


def test_repeated_query_is_answered_from_the_cache_at_no_cost(system) -> None:
    measures = [count("cached_members", "org.members", epsilon="0.5")]
    with system.client("civil-affairs") as client:
        first = client.query(purpose=ELDERLY, measures=measures, group_by=["community"])
        spent = budget_spent(client)
        preview = client.explain(purpose=ELDERLY, measures=measures, group_by=["community"])
        assert preview.would_be_cached
        second = client.query(purpose=ELDERLY, measures=measures, group_by=["community"])
        assert budget_spent(client) == spent  # nothing charged
    assert not first.cached and second.cached
    assert second.rho == "0" and second.request_id != first.request_id
    assert second.raw.groups == first.raw.groups  # the same noisy numbers, not a new draw
    assert second.audit_sequence > first.audit_sequence
    audit = list(iter_records(system.root / "state" / "audit"))
    record = audit[second.audit_sequence]
    assert record["seq"] == second.audit_sequence
    assert record["decision"] == "cached" and record["cached_from"] == first.audit_sequence


def test_list_datasets_leaves_out_what_a_forbid_always_denies(system) -> None:
    with system.client("health-commission") as client:
        names = {d.name for d in client.datasets()}
    assert "health.chronic" in names
    assert "civil.subsidies" not in names  # permitted by a pattern, forbidden outright
    assert not any(name.startswith("org.") for name in names)
