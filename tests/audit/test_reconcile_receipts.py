"""`silogate audit reconcile` with signed receipts: a silo's release log (built as the silo writes
it, :func:`release_log_entry`) and a gateway log holding the receipts, matched by receipt digest
and request id; with ``--silo-key`` every receipt on both sides must carry the silo's signature."""

from __future__ import annotations

import base64
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from audit_kit import CIVIL_RECEIPTS, make_key, silogate, write_receipt_public_key
from Crypto.PublicKey import ECC

from gateway.api.v1 import query_pb2, silo_service_pb2
from gateway.audit.log import AuditLog
from gateway.audit.reconcile import reconcile
from gateway.silo.receipt import (
    ReceiptSigner,
    receipt_to_record,
    release_log_entry,
    request_query,
    request_rho,
)

LAPLACE = query_pb2.MECHANISM_DISCRETE_LAPLACE


def _request(number: int) -> silo_service_pb2.ReleaseRequest:
    return silo_service_pb2.ReleaseRequest(
        request_id=f"request-{number}",
        consumer="civil-affairs",
        purpose="elderly-care-planning",
        policy_version="v1",
        group_by=["community"],
        plans=[
            silo_service_pb2.ReleasePlan(
                measure=query_pb2.Measure(
                    id="people",
                    dataset="civil.residents",
                    kind=query_pb2.MEASURE_KIND_COUNT,
                    spend=query_pb2.PrivacySpend(rho="0.125"),
                ),
                cost=query_pb2.PrivacyCost(rho="1/8"),
                components=[
                    silo_service_pb2.NoiseComponent(
                        name="value", mechanism=LAPLACE, scale=2.0, rho="1/8"
                    )
                ],
            )
        ],
    )


def _release(
    number: int, signer: ReceiptSigner = CIVIL_RECEIPTS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the silo's release record fields, the gateway's query record fields) of one release."""
    request = _request(number)
    query = request_query(request)
    releases = [
        silo_service_pb2.MeasureRelease(
            measure_id="people",
            components=[
                silo_service_pb2.ComponentRelease(
                    name="value", values=[100 + number, 7], mechanism=LAPLACE, scale=2.0
                )
            ],
        )
    ]
    receipt = signer.sign(
        silo="civil",
        request_id=request.request_id,
        query_digest=query.digest,
        datasets=query.datasets,
        rho=request_rho(request),
        releases=releases,
        released_at="2026-11-25T10:00:00.000+00:00",
    )
    silo = release_log_entry(receipt, request, policy_version="v1", query=query, releases=releases)
    gateway = {
        "request_id": request.request_id,
        "consumer": request.consumer,
        "purpose": request.purpose,
        "policy_version": "v1",
        "query": query.canonical(),
        "decision": "released",
        "rho": "1/8",
        "scales": {"people": 2.0},
        "components": {
            "people": [
                {"name": "value", "mechanism": "discrete_laplace", "scale": 2.0, "rho": "1/8"}
            ]
        },
        "receipts": [receipt_to_record(receipt)],
    }
    return silo, gateway


def _write(directory: Path, kind: str, records: list[dict[str, Any]]) -> Path:
    log = AuditLog(directory)
    for record in records:
        log.append(kind, record)
    log.close()
    return directory


def _logs(tmp_path: Path, count: int = 3, edit: Any = None) -> tuple[Path, Path]:
    pairs = [_release(number) for number in range(count)]
    if edit is not None:
        edit(pairs)
    silo = _write(tmp_path / "silo-civil", "release", [s for s, _ in pairs])
    gateway = _write(tmp_path / "gateway", "query", [g for _, g in pairs])
    return gateway, silo


def _reconcile(gateway: Path, silo: Path, *options: str | Path) -> tuple[int, str]:
    code, out, err = silogate("audit", "reconcile", gateway, f"civil={silo}", *options)
    assert err == ""
    return code, out


@pytest.fixture
def civil_pub(tmp_path: Path) -> Path:
    return write_receipt_public_key(tmp_path / "civil-receipts.pub")


def test_signed_logs_reconcile(tmp_path: Path, civil_pub: Path) -> None:
    gateway, silo = _logs(tmp_path)
    code, out = _reconcile(gateway, silo, "--silo-key", f"civil={civil_pub}")
    assert code == 0, out
    assert "civil: 3 release(s) in its log, 3 receipt(s) in the gateway log" in out
    assert "civil: 6 receipt signature(s) verified" in out  # both sides
    assert out.endswith("reconciled: every release matches\n")
    code, out = _reconcile(gateway, silo)
    assert code == 0
    assert "receipt signatures not checked for civil (no --silo-key)" in out


def _flip_signature(record: dict[str, Any]) -> None:
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[5] ^= 0x10
    record["signature"] = base64.b64encode(bytes(raw)).decode()


def test_a_silo_receipt_with_a_bad_signature(tmp_path: Path, civil_pub: Path) -> None:
    gateway, silo = _logs(tmp_path, edit=lambda pairs: _flip_signature(pairs[1][0]["receipt"]))
    code, out = _reconcile(gateway, silo, "--silo-key", f"civil={civil_pub}", "--format", "jsonl")
    assert code == 1
    [found] = [json.loads(line) for line in out.splitlines()]
    assert (found["problem"], found["request_id"], found["silo_seq"]) == (
        "RECEIPT_INVALID",
        "request-1",
        1,
    )
    assert (
        "the silo's log holds a receipt the silo's key does not verify: bad signature"
        in (found["detail"])
    )
    # Without the key the digests still match: only a signature check can tell.
    assert _reconcile(gateway, silo)[0] == 0


def test_a_gateway_receipt_the_silo_did_not_sign(tmp_path: Path, civil_pub: Path) -> None:
    forger = ReceiptSigner(ECC.construct(curve="Ed25519", seed=bytes(32)))
    forger.key_id = CIVIL_RECEIPTS.key_id

    def forge(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        silo_side, _ = pairs[2]
        _, forged = _release(2, forger)
        # The gateway's record claims a receipt with the silo's digest but another signature.
        forged["receipts"][0]["digest"] = silo_side["digest"]
        pairs[2] = (silo_side, forged)

    gateway, silo = _logs(tmp_path, edit=forge)
    code, out = _reconcile(gateway, silo, "--silo-key", f"civil={civil_pub}", "--format", "jsonl")
    assert code == 1
    [found] = [json.loads(line) for line in out.splitlines()]
    assert (found["problem"], found["request_id"], found["gateway_seq"]) == (
        "RECEIPT_INVALID",
        "request-2",
        2,
    )
    assert "the gateway's log holds a receipt" in found["detail"]


def test_a_release_is_matched_by_digest_and_request_id(tmp_path: Path) -> None:
    pairs = [_release(number) for number in range(2)]
    silo = [{**s, "kind": "release", "seq": i} for i, (s, _) in enumerate(pairs)]
    gateway = [{**g, "kind": "query", "seq": i} for i, (_, g) in enumerate(pairs)]
    assert reconcile(gateway, {"civil": silo}).ok
    # The gateway holds request-0's receipt under request-1: the digests no longer match.
    swapped = [dict(g) for g in gateway]
    swapped[1]["receipts"] = gateway[0]["receipts"]
    problems = {(m.problem, m.request_id) for m in reconcile(swapped, {"civil": silo}).mismatches}
    assert ("DIGEST_DIFFERS", "request-1") in problems
    # With keys, the receipt is also seen to name another request.
    keys = {"civil": [CIVIL_RECEIPTS.public_key]}
    found = reconcile(swapped, {"civil": silo}, silo_keys=keys).mismatches
    assert any(m.problem == "RECEIPT_INVALID" and "another request id" in m.detail for m in found)


def test_a_scale_that_differs_from_the_plan(tmp_path: Path) -> None:
    silo_side, gateway_side = _release(0)
    silo_side["scales"] = {"people": [4.0]}
    found = reconcile(
        [{**gateway_side, "kind": "query", "seq": 0}],
        {"civil": [{**silo_side, "kind": "release", "seq": 0}]},
    ).mismatches
    assert [(m.problem, m.detail) for m in found] == [
        (
            "SCALE_DIFFERS",
            "noise scales [4.0] of measure 'people' in the silo's log, [2.0] in the gateway's",
        )
    ]


def test_the_cost_is_the_receipts_total(tmp_path: Path) -> None:
    silo_side, gateway_side = _release(0)
    gateway_side["rho"] = str(Fraction(1, 4))
    found = reconcile(
        [{**gateway_side, "kind": "query", "seq": 0}],
        {"civil": [{**silo_side, "kind": "release", "seq": 0}]},
    ).mismatches
    assert [m.problem for m in found] == ["COST_DIFFERS"]


def test_an_unreadable_silo_key_is_one_line(tmp_path: Path) -> None:
    gateway, silo = _logs(tmp_path, count=1)
    key = make_key(tmp_path, "not-a-receipt-key")
    code, out, err = silogate(
        "audit", "reconcile", gateway, f"civil={silo}", "--silo-key", f"civil={key.private}"
    )
    assert code == 1 and out == ""
    assert "is a private key" in err
