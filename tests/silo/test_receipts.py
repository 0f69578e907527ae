"""Signed release receipts: signing, the gateway's checks, the auditor's offline checks."""

from __future__ import annotations

import base64
import hashlib
from fractions import Fraction
from pathlib import Path

import pytest
from Crypto.PublicKey import ECC

from gateway.api.v1 import query_pb2, silo_service_pb2
from gateway.audit import jcs
from gateway.errors import ConfigurationError
from gateway.server.silos import release_problem
from gateway.silo.receipt import (
    STATEMENT_FIELDS,
    ReceiptSigner,
    generate_receipt_key,
    load_receipt_public_key,
    receipt_key_id,
    receipt_problem,
    receipt_record_problem,
    receipt_to_record,
    release_log_entry,
    request_query,
    request_rho,
    values_digest,
)

LAPLACE = query_pb2.MECHANISM_DISCRETE_LAPLACE
KEYS = [("north",), ("south",)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("receipt-keys")
    generate_receipt_key(folder / "silo.key", folder / "silo.pub")
    return folder / "silo.key", folder / "silo.pub"


@pytest.fixture(scope="module")
def signer(keys: tuple[Path, Path]) -> ReceiptSigner:
    return ReceiptSigner.load(keys[0])


@pytest.fixture(scope="module")
def public_key(keys: tuple[Path, Path]) -> ECC.EccKey:
    return load_receipt_public_key(keys[1])


def _request() -> silo_service_pb2.ReleaseRequest:
    def plan(measure_id: str, kind: int, rho: str, *names: str) -> silo_service_pb2.ReleasePlan:
        return silo_service_pb2.ReleasePlan(
            measure=query_pb2.Measure(
                id=measure_id,
                dataset="civil.residents",
                kind=kind,  # type: ignore[arg-type]
                column="" if kind == query_pb2.MEASURE_KIND_COUNT else "birth_year",
                spend=query_pb2.PrivacySpend(rho=str(float(Fraction(rho)))),
            ),
            cost=query_pb2.PrivacyCost(rho=rho),
            components=[
                silo_service_pb2.NoiseComponent(name=n, mechanism=LAPLACE, scale=2.0, rho=rho)
                for n in names
            ],
        )

    return silo_service_pb2.ReleaseRequest(
        request_id="req-1",
        consumer="civil-affairs",
        purpose="planning",
        policy_version="v1",
        group_by=["community"],
        plans=[
            plan("people", query_pb2.MEASURE_KIND_COUNT, "1/8", "value"),
            plan("age", query_pb2.MEASURE_KIND_MEAN, "1/4", "sum", "count"),
        ],
    )


def _releases(*, people: tuple[int, int] = (10, -3)) -> list[silo_service_pb2.MeasureRelease]:
    def component(name: str, values: tuple[int, int]) -> silo_service_pb2.ComponentRelease:
        return silo_service_pb2.ComponentRelease(
            name=name, values=list(values), mechanism=LAPLACE, scale=2.0
        )

    return [
        silo_service_pb2.MeasureRelease(
            measure_id="people", components=[component("value", people)]
        ),
        silo_service_pb2.MeasureRelease(
            measure_id="age",
            components=[component("sum", (2**62, -(2**62))), component("count", (7, 0))],
        ),
    ]


def _sign(signer: ReceiptSigner, **changes: object) -> silo_service_pb2.ReleaseReceipt:
    request = _request()
    query = request_query(request)
    arguments: dict[str, object] = {
        "silo": "civil",
        "request_id": request.request_id,
        "query_digest": query.digest,
        "datasets": list(query.datasets),
        "rho": request_rho(request),
        "releases": _releases(),
        "released_at": "2026-11-25T10:00:00.000+00:00",
        **changes,
    }
    return signer.sign(**arguments)  # type: ignore[arg-type]


def _check(
    receipt: silo_service_pb2.ReleaseReceipt, public_key: ECC.EccKey, **changes: object
) -> str | None:
    request = _request()
    query = request_query(request)
    arguments: dict[str, object] = {
        "silo": "civil",
        "request_id": "req-1",
        "releases": _releases(),
        "public_key": public_key,
        "query_digest": query.digest,
        "datasets": query.datasets,
        "rho": request_rho(request),
        **changes,
    }
    return receipt_problem(receipt, **arguments)  # type: ignore[arg-type]


# -- signing and the gateway's check ----------------------------------------------------------


def test_a_signed_receipt_verifies(signer: ReceiptSigner, public_key: ECC.EccKey) -> None:
    receipt = _sign(signer)
    assert _check(receipt, public_key) is None
    assert receipt.key_id == signer.key_id and len(receipt.key_id) == 16
    assert receipt.rho == "3/8"
    assert list(receipt.datasets) == ["civil.residents"]
    assert len(receipt.signature) == 64


def test_the_signature_covers_the_canonical_statement(
    signer: ReceiptSigner, public_key: ECC.EccKey
) -> None:
    receipt = _sign(signer)
    record = receipt_to_record(receipt)
    statement = jcs.canonicalize({name: record[name] for name in STATEMENT_FIELDS})
    assert receipt.digest == hashlib.sha256(statement).hexdigest()
    from Crypto.Signature import eddsa

    eddsa.new(public_key, "rfc8032").verify(statement, receipt.signature)  # raises if not


def test_signing_is_deterministic(signer: ReceiptSigner) -> None:
    assert _sign(signer) == _sign(signer)


def test_values_digest_is_canonical_and_orders_matter() -> None:
    releases = _releases()
    document = [
        {"measure": "people", "components": [{"name": "value", "values": "10,-3"}]},
        {
            "measure": "age",
            "components": [
                {"name": "sum", "values": f"{2**62},{-(2**62)}"},
                {"name": "count", "values": "7,0"},
            ],
        },
    ]
    assert values_digest(releases) == hashlib.sha256(jcs.canonicalize(document)).hexdigest()
    assert values_digest(releases) != values_digest(list(reversed(releases)))
    assert values_digest(releases) != values_digest(_releases(people=(-3, 10)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("silo", "health"),
        ("released_at", "2026-11-25T10:00:00.001+00:00"),
        ("request_id", "req-2"),
        ("query_digest", "0" * 64),
        ("datasets", ["civil.residents", "civil.x"]),
        ("rho", "1/2"),
        ("values_digest", "0" * 64),
        ("key_id", "0" * 16),
        ("digest", "0" * 64),
        ("signature", bytes(64)),
    ],
)
def test_every_tampered_field_is_detected(
    signer: ReceiptSigner, public_key: ECC.EccKey, field: str, value: object
) -> None:
    receipt = _sign(signer)
    if field == "datasets":
        del receipt.datasets[:]
        receipt.datasets.extend(value)  # type: ignore[arg-type]
    else:
        setattr(receipt, field, value)
    # Without the gateway's expectations the signature alone catches it ...
    assert (
        receipt_problem(
            receipt,
            silo=receipt.silo,
            request_id=receipt.request_id,
            releases=_releases(),
            public_key=public_key,
        )
        is not None
    )
    # ... and with them, the gateway names what differs.
    assert _check(receipt, public_key) is not None
    # The recorded receipt fails offline too.
    assert receipt_record_problem(receipt_to_record(receipt), public_key) is not None


def test_a_single_flipped_signature_bit_fails(
    signer: ReceiptSigner, public_key: ECC.EccKey
) -> None:
    receipt = _sign(signer)
    signature = bytearray(receipt.signature)
    signature[17] ^= 0x04
    receipt.signature = bytes(signature)
    assert _check(receipt, public_key) == (
        "bad signature: it does not verify with the silo's receipt key"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"silo": "health"}, "the receipt names another silo"),
        ({"request_id": "req-9"}, "the receipt names another request id"),
        ({"releases": _releases(people=(11, -3))}, "values digest mismatch"),
        ({"query_digest": "f" * 64}, "query digest mismatch"),
        ({"datasets": ("civil.other",)}, "the receipt states datasets"),
        ({"rho": Fraction(1, 2)}, "the receipt states rho '3/8', expected '1/2'"),
    ],
)
def test_the_gateway_names_what_is_wrong(
    signer: ReceiptSigner, public_key: ECC.EccKey, changes: dict[str, object], expected: str
) -> None:
    problem = _check(_sign(signer), public_key, **changes)
    assert problem is not None and problem.startswith(expected), problem


def test_a_receipt_from_another_key_is_an_unknown_key_id(signer: ReceiptSigner) -> None:
    other = ECC.generate(curve="ed25519").public_key()
    problem = _check(_sign(signer), other)
    assert problem is not None and problem.startswith("unknown receipt key id")


def test_a_forged_receipt_claiming_the_right_key_id_fails(
    signer: ReceiptSigner, public_key: ECC.EccKey
) -> None:
    forger = ReceiptSigner(ECC.generate(curve="ed25519"))
    forger.key_id = signer.key_id  # claims the silo's key
    assert _check(_sign(forger), public_key) == (
        "bad signature: it does not verify with the silo's receipt key"
    )


def test_a_small_order_receipt_key_verifies_nothing(signer: ReceiptSigner) -> None:
    """A silo key that is the identity point: with it, R = B and S = 1 satisfy the RFC 8032
    equation for any statement (OpenSSL's check accepts that); libsodium refuses the key, so no
    statement verifies with it, not in the gateway's check nor offline."""
    identity = ECC.construct(curve="Ed25519", point_x=0, point_y=1)
    forged = _sign(signer)
    forged.key_id = receipt_key_id(identity)
    base_point = bytes.fromhex("58" + "66" * 31)
    forged.signature = base_point + (1).to_bytes(32, "little")
    statement = jcs.canonicalize_record(
        {k: v for k, v in receipt_to_record(forged).items() if k not in ("digest", "signature")}
    )
    forged.digest = hashlib.sha256(statement).hexdigest()
    bad = "bad signature: it does not verify with the silo's receipt key"
    assert _check(forged, identity) == bad
    record = receipt_to_record(forged)
    assert receipt_record_problem(record, identity) == bad


def test_a_rotated_key_verifies_with_either_key(
    signer: ReceiptSigner, public_key: ECC.EccKey
) -> None:
    new = ReceiptSigner(ECC.generate(curve="ed25519"))
    both = [public_key, new.public_key]
    assert _check(_sign(signer), both) is None  # type: ignore[arg-type]
    assert _check(_sign(new), both) is None  # type: ignore[arg-type]


# -- records for auditors ---------------------------------------------------------------------


def test_a_recorded_receipt_verifies_offline(signer: ReceiptSigner, public_key: ECC.EccKey) -> None:
    record = receipt_to_record(_sign(signer))
    assert set(record) == {*STATEMENT_FIELDS, "digest", "signature"}
    assert base64.b64decode(record["signature"]) == _sign(signer).signature
    assert jcs.canonicalize(record)  # JSON-safe as it stands
    assert receipt_record_problem(record, public_key) is None
    assert receipt_record_problem(record, [public_key]) is None


@pytest.mark.parametrize("field", [*STATEMENT_FIELDS, "digest", "signature"])
def test_every_field_of_a_recorded_receipt_is_covered(
    signer: ReceiptSigner, public_key: ECC.EccKey, field: str
) -> None:
    record = receipt_to_record(_sign(signer))
    value = record[field]
    if field == "datasets":
        record[field] = [*value, "civil.extra"]
    elif field == "signature":
        raw = bytearray(base64.b64decode(value))
        raw[0] ^= 1
        record[field] = base64.b64encode(bytes(raw)).decode()
    elif field in ("digest", "values_digest", "query_digest"):
        record[field] = ("0" if value[0] != "0" else "1") + value[1:]
    else:
        record[field] = value + "x"
    assert receipt_record_problem(record, public_key) is not None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r.pop("signature"), "the receipt lacks signature"),
        (lambda r: r.update(extra=1), "the receipt has unknown field(s) extra"),
        (lambda r: r.update(rho=0.375), "the receipt's rho is not text"),
        (
            lambda r: r.update(datasets="civil.residents"),
            "the receipt's datasets are not a list of names",
        ),
        (lambda r: r.update(digest="ABC"), "the receipt's digest is not a SHA-256 in hex"),
        (lambda r: r.update(signature="@@@"), "the receipt's signature is not base64"),
    ],
)
def test_malformed_recorded_receipts_are_named(
    signer: ReceiptSigner, public_key: ECC.EccKey, change: object, expected: str
) -> None:
    record = receipt_to_record(_sign(signer))
    change(record)  # type: ignore[operator]
    assert receipt_record_problem(record, public_key) == expected
    assert receipt_record_problem("not a receipt", public_key) == "a receipt is not an object"


def test_the_release_log_entry_carries_the_receipt(signer: ReceiptSigner) -> None:
    request = _request()
    receipt = _sign(signer)
    entry = release_log_entry(
        receipt,
        request,
        policy_version="v1",
        query=request_query(request),
        releases=_releases(),
    )
    assert entry["digest"] == receipt.digest
    assert entry["receipt"] == receipt_to_record(receipt)
    assert entry["rho"] == "3/8"
    assert entry["rho_per_measure"] == {"people": "1/8", "age": "1/4"}
    assert entry["scales"] == {"people": [2.0], "age": [2.0, 2.0]}
    assert entry["values_digest"] == values_digest(_releases())
    assert entry["query_digest"] == request_query(request).digest
    assert jcs.canonicalize(entry)


# -- keys -------------------------------------------------------------------------------------


def test_key_files_are_checked(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    with pytest.raises(ConfigurationError, match="cannot read the receipt signing key"):
        ReceiptSigner.load(tmp_path / "absent.key")
    with pytest.raises(ConfigurationError, match="is a public key"):
        ReceiptSigner.load(public)
    with pytest.raises(ConfigurationError, match="is a private key"):
        load_receipt_public_key(private)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigurationError, match="is not a PEM key"):
        load_receipt_public_key(garbage)
    p256 = tmp_path / "p256.pem"
    p256.write_text(ECC.generate(curve="P-256").public_key().export_key(format="PEM"))
    with pytest.raises(ConfigurationError, match="is not an Ed25519 key"):
        load_receipt_public_key(p256)
    assert (private.stat().st_mode & 0o777) == 0o600


# -- the gateway's whole response check -------------------------------------------------------


def _response(signer: ReceiptSigner, **changes: object) -> silo_service_pb2.ReleaseResponse:
    releases = changes.pop("releases", _releases())
    return silo_service_pb2.ReleaseResponse(
        releases=releases,  # type: ignore[arg-type]
        receipt=_sign(signer, releases=releases, **changes),
    )


def test_a_well_formed_response_passes(signer: ReceiptSigner, public_key: ECC.EccKey) -> None:
    assert (
        release_problem("civil", _request(), _response(signer), KEYS, public_key=public_key) is None
    )


def test_the_response_check_names_shape_problems(
    signer: ReceiptSigner, public_key: ECC.EccKey
) -> None:
    request = _request()

    def problem(releases: list[silo_service_pb2.MeasureRelease]) -> str | None:
        response = _response(signer, releases=releases)
        return release_problem("civil", request, response, KEYS, public_key=public_key)

    swapped = list(reversed(_releases()))
    assert (problem(swapped) or "").startswith("released measures ['age', 'people']")
    short = _releases()
    del short[0].components[0].values[-1]
    assert problem(short) == "measure 'people' component 'value' has 1 values, expected 2"
    renamed = _releases()
    renamed[1].components[0].name = "total"
    assert (problem(renamed) or "").startswith("measure 'age' has components ['total', 'count']")
    quieter = _releases()
    quieter[0].components[0].scale = 1.5
    assert problem(quieter) == (
        "measure 'people' component 'value' was released at a scale below the planned 2.0"
    )
    louder = _releases()
    louder[0].components[0].scale = 3.0
    assert problem(louder) is None
    other = _releases()
    other[0].components[0].mechanism = query_pb2.MECHANISM_DISCRETE_GAUSSIAN
    assert problem(other) == (
        "measure 'people' component 'value' was released with another mechanism than planned"
    )


def test_the_response_check_rejects_a_receipt_for_other_values(
    signer: ReceiptSigner, public_key: ECC.EccKey
) -> None:
    response = _response(signer)
    response.releases[0].components[0].values[0] += 1  # changed after signing
    problem = release_problem("civil", _request(), response, KEYS, public_key=public_key)
    assert problem is not None and problem.startswith("values digest mismatch")
    response = _response(signer, rho=Fraction(1, 8))  # the silo states a cost it was not asked
    problem = release_problem("civil", _request(), response, KEYS, public_key=public_key)
    assert problem is not None and problem.startswith("the receipt states rho '1/8'")


def test_histogram_value_counts(signer: ReceiptSigner, public_key: ECC.EccKey) -> None:
    request = silo_service_pb2.ReleaseRequest(
        request_id="req-1",
        consumer="civil-affairs",
        purpose="planning",
        policy_version="v1",
        group_by=["community"],
        plans=[
            silo_service_pb2.ReleasePlan(
                measure=query_pb2.Measure(
                    id="ages",
                    dataset="civil.residents",
                    kind=query_pb2.MEASURE_KIND_HISTOGRAM,
                    column="birth_year",
                    spend=query_pb2.PrivacySpend(rho="0.125"),
                    bins=["1900", "1950", "2000", "2030"],
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

    def response(count: int) -> silo_service_pb2.ReleaseResponse:
        releases = [
            silo_service_pb2.MeasureRelease(
                measure_id="ages",
                components=[
                    silo_service_pb2.ComponentRelease(
                        name="value", values=[1] * count, mechanism=LAPLACE, scale=2.0
                    )
                ],
            )
        ]
        query = request_query(request)
        receipt = signer.sign(
            silo="civil",
            request_id="req-1",
            query_digest=query.digest,
            datasets=query.datasets,
            rho=Fraction(1, 8),
            releases=releases,
            released_at="2026-11-25T10:00:00.000+00:00",
        )
        return silo_service_pb2.ReleaseResponse(releases=releases, receipt=receipt)

    assert release_problem("civil", request, response(6), KEYS, public_key=public_key) is None
    assert release_problem("civil", request, response(4), KEYS, public_key=public_key) == (
        "measure 'ages' component 'value' has 4 values, expected 6"
    )
    # Bins from the policy: the caller tells how many; unknown, any whole number per group.
    del request.plans[0].measure.bins[:]
    assert (
        release_problem(
            "civil", request, response(8), KEYS, public_key=public_key, bins={"ages": 4}
        )
        is None
    )
    assert release_problem("civil", request, response(8), KEYS, public_key=public_key) is None
    assert release_problem("civil", request, response(7), KEYS, public_key=public_key) == (
        "measure 'ages' component 'value' has 7 values, not a whole number of bins for 2 groups"
    )


def test_the_gateway_names_the_silo_whose_key_is_missing(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from gateway.server.silos import load_receipt_keys
    from gateway.settings import SiloEndpoint

    good = SiloEndpoint(address="127.0.0.1:1", receipt_key=keys[1])
    assert set(load_receipt_keys({"civil": good})) == {"civil"}
    missing = SiloEndpoint(address="127.0.0.1:2", receipt_key=tmp_path / "org.pub")
    with pytest.raises(ConfigurationError) as caught:
        load_receipt_keys({"civil": good, "org": missing})
    assert caught.value.reason == "KEY_UNREADABLE"
    assert caught.value.message.startswith(
        f"silo 'org': cannot read the receipt public key {tmp_path / 'org.pub'}"
    )


def test_config_files_resolve_receipt_keys_beside_them(tmp_path: Path) -> None:
    from gateway.settings import GatewayConfig, SiloConfig, load_config

    (tmp_path / "gateway.yaml").write_text(
        "tls: {ca: ca.pem, cert: g.pem, key: g.key}\npolicy: p\nledger: l\naudit: a\n"
        "silos: {civil: {address: '127.0.0.1:1', receipt_key: keys/civil.pub}}\n"
    )
    gateway = load_config(tmp_path / "gateway.yaml", GatewayConfig)
    assert gateway.silos["civil"].receipt_key == tmp_path / "keys" / "civil.pub"
    (tmp_path / "silo.yaml").write_text(
        "silo: civil\ntls: {ca: ca.pem, cert: s.pem, key: s.key}\npolicy: p\ndatabase: d\n"
        "release_log: r\ngateway_identity: g\n"
    )
    with pytest.raises(ConfigurationError, match="receipt_key: Field required"):
        load_config(tmp_path / "silo.yaml", SiloConfig)
