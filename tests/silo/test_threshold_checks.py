"""The silo's checks of a release of group keys from the data (``events.cases.handler``).

An events silo runs on a copy of the demo bundle whose ``events.cases`` has a silo cap allowing
two thresholded releases' key delta. It is called directly with the gateway's certificate, as a
gateway that computed a wrong plan (or a compromised one) would.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from support import POLICY, BackgroundLoop, set_silo_budget, start_silos

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.store import iter_records
from gateway.client import count
from gateway.crypto.channels import channel_credentials
from gateway.policy.loader import load_bundle
from gateway.privacy.sensitivity import components
from gateway.privacy.thresholds import key_distance, plan_threshold
from gateway.query.form import parse_query
from gateway.server.silos import release_problem
from gateway.server.status import parse_rpc_error
from gateway.silo.receipt import (
    load_receipt_public_key,
    receipt_record_problem,
    receipt_to_record,
)

CONSUMER = "grid-centre"
CASEWORK = "casework-monitoring"
RHO = Fraction(1, 2)
KEY_DELTA = Fraction(1, 10**9)  # the demo rule's key_delta per release


@pytest.fixture(scope="module")
def events(tmp_path_factory, data_dir, pki) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("events-threshold")
    bundle = root / "policy"
    shutil.copytree(POLICY, bundle, ignore=shutil.ignore_patterns("tests"))
    set_silo_budget(
        bundle,
        "events.cases",
        {
            "rho": "100",
            "key_delta": "2e-9",  # two releases at the rule's 1e-9
            "period": "lifetime",
        },
    )
    loop = BackgroundLoop()
    silos = start_silos(loop, pki, data_dir, root, ["events"], policy=bundle)
    yield {"root": root, "silo": silos["events"], "pki": pki, "bundle": load_bundle(bundle)}
    loop.run(silos["events"].stop(0))
    loop.close()


def _plan():
    """The plan the gateway computes for a count of cases per handler at rho 1/2."""
    bundle = load_bundle(POLICY)
    measure = count("cases", "events.cases", rho="0.5")
    form = parse_query(query_pb2.Query(purpose=CASEWORK, measures=[measure], group_by=["handler"]))
    dataset = bundle.datasets["events.cases"]
    [part] = components(dataset, form.measures[0], ("handler",))
    return measure, plan_threshold(
        key_distance(dataset, form.measures[0], part.sensitivity), RHO, KEY_DELTA
    )


def _request(
    stub,
    request_id: str,
    *,
    threshold: int | None = None,
    delta: Fraction = KEY_DELTA,
    group_by: str = "handler",
    with_threshold: bool = True,
) -> silo_service_pb2.ReleaseRequest:
    measure, planned = _plan()
    version = stub.Describe(silo_service_pb2.DescribeRequest(), timeout=10).policy_version
    return silo_service_pb2.ReleaseRequest(
        request_id=request_id,
        consumer=CONSUMER,
        purpose=CASEWORK,
        policy_version=version,
        group_by=[group_by],
        plans=[
            silo_service_pb2.ReleasePlan(
                measure=measure,
                cost=query_pb2.PrivacyCost(rho=str(planned.rho)),
                components=[
                    silo_service_pb2.NoiseComponent(
                        name="value",
                        mechanism=query_pb2.MECHANISM_DISCRETE_GAUSSIAN,
                        scale=planned.scale,
                        rho=str(planned.rho),
                    )
                ],
                key_threshold=(
                    silo_service_pb2.KeyThreshold(
                        threshold=planned.threshold if threshold is None else threshold,
                        delta=str(delta),
                        max_keys=1000,
                    )
                    if with_threshold
                    else None
                ),
            )
        ],
    )


def _stub(events):
    address = f"127.0.0.1:{events['silo'].port}"
    channel = grpc.secure_channel(address, channel_credentials(events["pki"].gateway))
    return channel, silo_service_pb2_grpc.SiloServiceStub(channel)


def _refusal(stub, request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Release(request, timeout=10)
    return parse_rpc_error(caught.value).reason


def _released_ids(events) -> set[str]:
    log = Path(events["root"]) / "state" / "silo-events"
    return {r["request_id"] for r in iter_records(log) if r.get("kind") == "release"}


def test_a_low_threshold_or_a_missing_or_misplaced_one_is_refused(events) -> None:
    _, planned = _plan()
    channel, stub = _stub(events)
    with channel:
        low = _request(stub, "low", threshold=planned.threshold - 1)
        assert _refusal(stub, low) == "THRESHOLD_TOO_LOW"
        # A delta the silo's own rule does not allow per release, even with a matching threshold.
        loose = _request(stub, "loose", delta=KEY_DELTA * 2)
        assert _refusal(stub, loose) == "THRESHOLD_TOO_LOW"
        missing = _request(stub, "missing", with_threshold=False)
        assert _refusal(stub, missing) == "PLAN_INVALID"
        # A threshold for public keys (community has a key set) is a wrong plan too.
        misplaced = _request(stub, "misplaced", group_by="community")
        assert _refusal(stub, misplaced) in ("PLAN_INVALID", "POLICY_DENIED")
    assert not {"low", "loose", "missing", "misplaced"} & _released_ids(events)


def test_a_release_lists_keys_above_the_threshold_and_its_receipt_covers_them(events) -> None:
    _, planned = _plan()
    channel, stub = _stub(events)
    with channel:
        request = _request(stub, "keys-1")
        response = stub.Release(request, timeout=10)
    [release] = response.releases
    assert release.keys and len(release.keys) == len(release.components[0].values)
    assert all(v > planned.threshold for v in release.components[0].values)
    assert [list(k.values) for k in release.keys] == sorted(list(k.values) for k in release.keys)
    public_key = load_receipt_public_key(events["pki"].receipt_keys("events").public)
    assert release_problem("events", request, response, [], public_key=public_key) is None
    # The receipt signs the key delta too; as recorded, it verifies offline, and an edited
    # key delta does not.
    assert response.receipt.key_delta == str(KEY_DELTA)
    record = receipt_to_record(response.receipt)
    assert record["key_delta"] == str(KEY_DELTA)
    assert receipt_record_problem(record, public_key) is None
    edited = {**record, "key_delta": "1/1000000000000"}
    assert "digest" in (receipt_record_problem(edited, public_key) or "")
    emptied = {**record, "key_delta": ""}
    assert "key_delta is empty" in (receipt_record_problem(emptied, public_key) or "")
    # Another key in place of a released one: the values digest no longer matches the receipt.
    response.releases[0].keys[0].values[0] = "worker-999"
    problem = release_problem("events", request, response, [], public_key=public_key)
    assert problem is not None and "digest" in problem


def test_the_release_log_records_the_key_delta_and_threshold(events) -> None:
    _, planned = _plan()
    log = Path(events["root"]) / "state" / "silo-events"
    [record] = [r for r in iter_records(log) if r.get("request_id") == "keys-1"]
    assert record["key_delta"] == str(KEY_DELTA)
    assert record["key_thresholds"] == {"cases": planned.threshold}


def test_the_silo_cap_counts_key_delta(events) -> None:
    channel, stub = _stub(events)
    with channel:
        stub.Release(_request(stub, "keys-2"), timeout=10)  # the second 1e-9 of the cap's 2e-9
        assert _refusal(stub, _request(stub, "keys-3")) == "SILO_CAP_EXHAUSTED"
    assert "keys-3" not in _released_ids(events)
    sums = events["silo"].servicer.caps.ledger.scope_sums()
    assert sums["dataset:events.cases/lifetime#key_delta"] == (2 * KEY_DELTA, 0)
