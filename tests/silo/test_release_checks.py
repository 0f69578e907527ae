"""The silo's own checks: under-noised plans, inconsistent costs and its per-dataset cap.

A health silo runs on a copy of the demo bundle whose ``health.visits`` cap (``silo_budget``) is
small. The silo is called directly with the gateway's certificate, as a gateway that computed a
wrong plan (or a compromised one) would; then through a real gateway, which mirrors the cap.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from support import POLICY, BackgroundLoop, gateway_config, set_silo_budget, start_silos

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.store import iter_records
from gateway.client import ClientError, SilogateClient, count
from gateway.crypto.channels import channel_credentials
from gateway.server.app import start_gateway
from gateway.server.status import parse_rpc_error

HOME_CARE = "home-care-planning"
CONSUMER = "health-commission"
CAP_EPSILON = "1"  # rho 1/2 over every consumer


@pytest.fixture(scope="module")
def capped(tmp_path_factory, data_dir, pki) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("capped")
    bundle = root / "policy"
    shutil.copytree(POLICY, bundle, ignore=shutil.ignore_patterns("tests"))
    set_silo_budget(
        bundle,
        "health.visits",
        {
            "epsilon": CAP_EPSILON,
            "period": "lifetime",
        },
    )
    loop = BackgroundLoop()
    silos = start_silos(loop, pki, data_dir, root, ["health"], policy=bundle)
    gateway = loop.run(
        start_gateway(
            gateway_config(
                root, pki, {"health": f"127.0.0.1:{silos['health'].port}"}, policy=bundle
            )
        )
    )
    yield {"root": root, "silo": silos["health"], "gateway": gateway, "pki": pki}
    loop.run(gateway.stop(0))
    loop.run(silos["health"].stop(0))
    loop.close()


def _stub(capped):
    address = f"127.0.0.1:{capped['silo'].port}"
    channel = grpc.secure_channel(address, channel_credentials(capped["pki"].gateway))
    return channel, silo_service_pb2_grpc.SiloServiceStub(channel)


def _plan(epsilon: Fraction, scale: float, *, stated: Fraction | None = None):
    rho = epsilon**2 / 2
    return silo_service_pb2.ReleasePlan(
        measure=count("visits", "health.visits", epsilon=str(float(epsilon))),
        cost=query_pb2.PrivacyCost(rho=str(stated if stated is not None else rho)),
        components=[
            silo_service_pb2.NoiseComponent(
                name="value",
                mechanism=query_pb2.MECHANISM_DISCRETE_LAPLACE,
                scale=scale,
                rho=str(rho),
            )
        ],
    )


def _request(stub, request_id: str, plan) -> silo_service_pb2.ReleaseRequest:
    version = stub.Describe(silo_service_pb2.DescribeRequest(), timeout=10).policy_version
    return silo_service_pb2.ReleaseRequest(
        request_id=request_id,
        consumer=CONSUMER,
        purpose=HOME_CARE,
        policy_version=version,
        group_by=["community"],
        plans=[plan],
    )


def _released_ids(capped) -> set[str]:
    log = Path(capped["root"]) / "state" / "silo-health"
    return {r["request_id"] for r in iter_records(log) if r.get("kind") == "release"}


def _refusal(stub, request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Release(request, timeout=10)
    error = parse_rpc_error(caught.value)
    assert error.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)
    return error.reason


def test_under_noised_and_inconsistent_plans_are_refused_and_nothing_is_logged(capped) -> None:
    channel, stub = _stub(capped)
    with channel:
        # Sensitivity 12 (visits: 12 rows per person): epsilon 1/2 needs scale >= 24.
        under = _request(stub, "under-noised", _plan(Fraction(1, 2), 23.9))
        assert _refusal(stub, under) == "NOISE_TOO_SMALL"
        # Each component claims a rho its scale pays for, but the total cost says less.
        cheap = _request(stub, "cheap-total", _plan(Fraction(1, 2), 24.1, stated=Fraction(1, 9)))
        assert _refusal(stub, cheap) == "PLAN_INVALID"
    assert not {"under-noised", "cheap-total"} & _released_ids(capped)
    # Refused before anything was reserved: the cap's ledger holds nothing for them.
    assert capped["silo"].servicer.caps.ledger.scope_sums() == {} or all(
        reserved == 0 for _, reserved in capped["silo"].servicer.caps.ledger.scope_sums().values()
    )


def test_the_gateway_mirrors_the_cap_and_refuses_before_any_silo_runs(capped) -> None:
    tls = capped["pki"].consumer(CONSUMER)
    address = f"127.0.0.1:{capped['gateway'].port}"

    def ask(name: str):
        return client.query(
            purpose=HOME_CARE,
            # epsilon 3/4 costs rho 9/32: one fits under the cap's rho 1/2, two do not. (Another
            # measure id each time: an identical query would be answered from the cache.)
            measures=[count(name, "health.visits", epsilon="0.75")],
            group_by=["community"],
        )

    with SilogateClient.connect(address, ca=tls.ca, cert=tls.cert, key=tls.key) as client:
        first = ask("first")
        assert any(b.scope == "dataset:health.visits/lifetime" for b in first.budget_left)
        before = _released_ids(capped)
        with pytest.raises(ClientError) as caught:
            ask("second")
    assert caught.value.reason == "PRIVACY_BUDGET_EXHAUSTED"
    assert "dataset:health.visits" in caught.value.message
    assert _released_ids(capped) == before  # the silo was never asked


def test_the_silo_refuses_beyond_its_own_cap_whatever_the_gateway_says(capped) -> None:
    channel, stub = _stub(capped)
    with channel:
        # 9/32 is spent (the gateway test above): another 9/32 would pass 1/2, 1/8 does not.
        over = _request(stub, "cap-over", _plan(Fraction(3, 4), 16.01))
        assert _refusal(stub, over) == "SILO_CAP_EXHAUSTED"
        within = _request(stub, "cap-within", _plan(Fraction(1, 2), 24.01))
        assert len(stub.Release(within, timeout=10).releases) == 1
    released = _released_ids(capped)
    assert "cap-within" in released and "cap-over" not in released
    sums = capped["silo"].servicer.caps.ledger.scope_sums()
    assert sums == {"dataset:health.visits/lifetime": (Fraction(9, 32) + Fraction(1, 8), 0)}
