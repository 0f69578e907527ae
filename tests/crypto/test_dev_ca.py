"""The development CA issues the certificates the servers rely on; real mTLS servers honour them.

The server tests start a real ``grpc.aio`` server on 127.0.0.1 port 0 serving only the standard
health service, with the credentials from ``gateway.crypto.channels``; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.crypto.channels import channel_credentials, server_credentials
from gateway.crypto.dev_ca import (
    GATEWAY_IDENTITY,
    CertificateError,
    DevPki,
    TlsFiles,
    consumer_identity,
    init_dev_pki,
    peer_identities,
    peer_identity,
    silo_identity,
)

LOOPBACK = "127.0.0.1"
CALL_TIMEOUT_SECONDS = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(
        tmp_path_factory.mktemp("pki"), silos=["org", "civil"], consumers=["alice", "bob"]
    )


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _extended_key_usages(certificate: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --- what init_dev_pki writes ---------------------------------------------------------------------


def test_ca_is_a_self_signed_p256_certificate_authority(pki: DevPki) -> None:
    ca = _certificate(pki.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)

    assert constraints.critical and constraints.value.ca
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)


def test_file_names_follow_the_roles(pki: DevPki) -> None:
    assert sorted(path.name for path in pki.directory.iterdir()) == [
        "ca.key",
        "ca.pem",
        "consumer-alice.key",
        "consumer-alice.pem",
        "consumer-bob.key",
        "consumer-bob.pem",
        "gateway.key",
        "gateway.pem",
        "silo-civil.key",
        "silo-civil.pem",
        "silo-civil.receipt.key",  # Ed25519: the silo signs its release receipts with it
        "silo-civil.receipt.pub",
        "silo-org.key",
        "silo-org.pem",
        "silo-org.receipt.key",
        "silo-org.receipt.pub",
    ]


@pytest.mark.parametrize(
    ("select", "identity", "usages", "has_hosts"),
    [
        pytest.param(
            lambda pki: pki.gateway,
            "spiffe://silogate.local/gateway",
            {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
            True,
            id="gateway",
        ),
        pytest.param(
            lambda pki: pki.silo("org"),
            "spiffe://silogate.local/silo/org",
            {ExtendedKeyUsageOID.SERVER_AUTH},
            True,
            id="silo",
        ),
        pytest.param(
            lambda pki: pki.consumer("alice"),
            "spiffe://silogate.local/consumer/alice",
            {ExtendedKeyUsageOID.CLIENT_AUTH},
            False,
            id="consumer",
        ),
    ],
)
def test_leaf_certificate_carries_identity_usages_and_hosts(
    pki: DevPki,
    select: Callable[[DevPki], TlsFiles],
    identity: str,
    usages: set[x509.ObjectIdentifier],
    has_hosts: bool,
) -> None:
    tls = select(pki)
    leaf = _certificate(tls.cert)
    sans = _sans(leaf)

    leaf.verify_directly_issued_by(_certificate(pki.ca_cert))
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
    assert _extended_key_usages(leaf) == usages
    if has_hosts:
        dns = sans.get_values_for_type(x509.DNSName)
        # Silo certificates also name the silo (`<name>.silo.silogate.local`), which the gateway verifies.
        assert [name for name in dns if not name.endswith(".silo.silogate.local")] == ["localhost"]
        assert len(dns) == (2 if "/silo/" in identity else 1)
        assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    else:
        assert sans.get_values_for_type(x509.DNSName) == []
        assert sans.get_values_for_type(x509.IPAddress) == []
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_private_keys_are_readable_by_the_owner_only(pki: DevPki) -> None:
    keys = sorted(pki.directory.glob("*.key"))

    assert len(keys) == 8  # CA, two consumers, gateway, two silos: TLS; two silos: receipts
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in keys} == {
        path.name: 0o600 for path in keys
    }


def test_identity_helpers_match_the_issued_certificates(pki: DevPki) -> None:
    assert GATEWAY_IDENTITY == "spiffe://silogate.local/gateway"
    assert silo_identity("civil") == "spiffe://silogate.local/silo/civil"
    assert consumer_identity("bob") == "spiffe://silogate.local/consumer/bob"
    bob = _sans(_certificate(pki.consumer("bob").cert))
    assert bob.get_values_for_type(x509.UniformResourceIdentifier) == [consumer_identity("bob")]


def test_unknown_party_names_the_known_ones(pki: DevPki) -> None:
    with pytest.raises(KeyError, match=r"no consumer certificate named 'carol'.*alice, bob"):
        pki.consumer("carol")
    with pytest.raises(KeyError, match="no silo certificate named 'health'"):
        pki.silo("health")


def test_existing_ca_is_refused_unless_overwrite(tmp_path: Path) -> None:
    first = init_dev_pki(tmp_path, silos=["org"], consumers=["alice", "bob"])
    first_ca = first.ca_cert.read_bytes()

    with pytest.raises(FileExistsError, match=r"already holds a development CA.*overwrite=True"):
        init_dev_pki(tmp_path, silos=["org"], consumers=["alice"])
    assert first.ca_cert.read_bytes() == first_ca

    second = init_dev_pki(tmp_path, silos=["org"], consumers=["alice"], overwrite=True)
    new_ca = _certificate(second.ca_cert)
    assert second.ca_cert.read_bytes() != first_ca
    _certificate(second.consumer("alice").cert).verify_directly_issued_by(new_ca)
    # bob's files were signed by the replaced CA; they are removed rather than left to mislead.
    assert not (tmp_path / "consumer-bob.pem").exists()
    assert not (tmp_path / "consumer-bob.key").exists()


def test_hosts_become_dns_and_ip_sans_of_server_certificates(tmp_path: Path) -> None:
    pki = init_dev_pki(
        tmp_path, silos=["org"], consumers=[], hosts=["silo.internal", "::1", "10.0.0.7"]
    )
    sans = _sans(_certificate(pki.silo("org").cert))

    assert sans.get_values_for_type(x509.DNSName) == ["org.silo.silogate.local", "silo.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"silos": ["Org"]}, "silo name 'Org' is not valid"),
        ({"silos": ["../org"]}, r"silo name '\.\./org' is not valid"),
        ({"consumers": [""]}, "consumer name '' is not valid"),
        ({"consumers": ["a/b"]}, "consumer name 'a/b' is not valid"),
        ({"consumers": ["alice", "alice"]}, "duplicate consumer names: alice"),
        ({"hosts": [""]}, "empty host name"),
        ({"validity_days": 0}, "validity_days must be a positive whole number of days, got 0"),
    ],
)
def test_invalid_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    directory = tmp_path / "pki"
    with pytest.raises(ValueError, match=message):
        init_dev_pki(directory, **{"silos": ["org"], "consumers": ["alice"], **arguments})
    assert not directory.exists()


def test_a_single_string_is_not_taken_for_a_list_of_names(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="single string 'org'"):
        init_dev_pki(tmp_path, silos="org", consumers=[])


# --- reading identities back ----------------------------------------------------------------------


def test_peer_identities_reads_spiffe_uris_and_skips_everything_else() -> None:
    # Shapes as grpcio 1.85.1 reports them for a certificate with URI, DNS, e-mail and IP SANs.
    auth_context = {
        "x509_subject_alternative_name": [
            b"https://example.org/x",
            b"spiffe://silogate.local/consumer/alice",
            b"localhost",
            b"127.0.0.1",
        ],
        "peer_uri": [b"https://example.org/x", b"spiffe://silogate.local/consumer/alice"],
        "peer_dns": [b"localhost"],
        "peer_ip": [b"127.0.0.1"],
    }

    assert peer_identities(auth_context) == ("spiffe://silogate.local/consumer/alice",)
    assert peer_identity(auth_context) == "spiffe://silogate.local/consumer/alice"


def test_peer_identities_falls_back_to_the_mixed_san_list() -> None:
    auth_context = {
        "x509_subject_alternative_name": [b"localhost", b"spiffe://silogate.local/gateway"],
    }

    assert peer_identities(auth_context) == (GATEWAY_IDENTITY,)


def test_no_tls_or_an_ambiguous_certificate_identifies_nobody() -> None:
    two = {"peer_uri": [b"spiffe://silogate.local/consumer/a", b"spiffe://silogate.local/silo/b"]}
    not_utf8 = {"peer_uri": [b"spiffe://silogate.local/consumer/\xff"]}

    assert peer_identities({}) == ()
    assert peer_identity({}) is None
    assert peer_identities(two) == (
        "spiffe://silogate.local/consumer/a",
        "spiffe://silogate.local/silo/b",
    )
    assert peer_identity(two) is None
    assert peer_identities(not_utf8) == ()


# --- real mTLS servers ----------------------------------------------------------------------------


class _IdentityRecordingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health servicer, recording who each Check call came from."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[tuple[str, ...]] = []

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.callers.append(peer_identities(context.auth_context()))
        return await super().Check(request, context)


@contextlib.asynccontextmanager
async def _health_server(tls: TlsFiles) -> AsyncIterator[tuple[int, _IdentityRecordingHealth]]:
    server = grpc.aio.server()
    servicer = _IdentityRecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(f"{LOOPBACK}:0", server_credentials(tls))
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(grace=None)


async def _check(target: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


async def _check_gateway(pki: DevPki, client: grpc.ChannelCredentials) -> list[tuple[str, ...]]:
    async with _health_server(pki.gateway) as (port, servicer):
        status = await _check(f"{LOOPBACK}:{port}", client)
    assert status is (grpc.StatusCode.OK if servicer.callers else grpc.StatusCode.UNAVAILABLE)
    return servicer.callers


def test_gateway_accepts_a_consumer_and_sees_its_identity(pki: DevPki) -> None:
    callers = asyncio.run(_check_gateway(pki, channel_credentials(pki.consumer("alice"))))

    assert callers == [(consumer_identity("alice"),)]


def test_silo_accepts_the_gateway_by_host_name_and_sees_its_identity(pki: DevPki) -> None:
    async def call_silo() -> tuple[grpc.StatusCode, list[tuple[str, ...]]]:
        async with _health_server(pki.silo("org")) as (port, servicer):
            status = await _check(f"localhost:{port}", channel_credentials(pki.gateway))
        return status, servicer.callers

    assert asyncio.run(call_silo()) == (grpc.StatusCode.OK, [(GATEWAY_IDENTITY,)])


def test_client_without_a_certificate_is_refused(pki: DevPki) -> None:
    ca, _, _ = pki.consumer("alice").load()
    server_only = grpc.ssl_channel_credentials(root_certificates=ca)

    assert asyncio.run(_check_gateway(pki, server_only)) == []


def test_client_certificate_from_another_ca_is_refused(pki: DevPki, tmp_path: Path) -> None:
    foreign = init_dev_pki(tmp_path, silos=[], consumers=["alice"]).consumer("alice")
    # The impostor trusts the real CA, so only the server's check of its certificate can stop it.
    impostor = TlsFiles(ca=pki.ca_cert, cert=foreign.cert, key=foreign.key)

    assert asyncio.run(_check_gateway(pki, channel_credentials(impostor))) == []


def test_server_only_certificate_cannot_act_as_a_client(pki: DevPki) -> None:
    # A silo certificate is signed by the right CA but lacks clientAuth; BoringSSL refuses it.
    assert asyncio.run(_check_gateway(pki, channel_credentials(pki.silo("org")))) == []


def test_server_certificate_must_name_the_host_the_client_dialled(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path, silos=[], consumers=["alice"], hosts=["localhost"])

    async def call_by_ip() -> grpc.StatusCode:
        async with _health_server(pki.gateway) as (port, _):
            return await _check(f"{LOOPBACK}:{port}", channel_credentials(pki.consumer("alice")))

    assert asyncio.run(call_by_ip()) is grpc.StatusCode.UNAVAILABLE


# --- unusable files -------------------------------------------------------------------------------


def test_missing_key_file_is_named(pki: DevPki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "consumer-alice.key"
    tls = TlsFiles(ca=pki.ca_cert, cert=pki.consumer("alice").cert, key=missing)

    with pytest.raises(CertificateError, match=f"private key file {missing} does not exist") as err:
        tls.load()
    assert err.value.reason == "CERTIFICATE_UNREADABLE"
    assert err.value.path == missing
    assert "\n" not in str(err.value)
    with pytest.raises(CertificateError, match="does not exist"):
        server_credentials(tls)
    with pytest.raises(CertificateError, match="does not exist"):
        channel_credentials(tls)


def test_directory_instead_of_a_certificate_is_named(pki: DevPki, tmp_path: Path) -> None:
    tls = TlsFiles(ca=tmp_path, cert=pki.gateway.cert, key=pki.gateway.key)

    with pytest.raises(CertificateError, match=f"cannot read TLS CA certificate file {tmp_path}: "):
        tls.load()


def test_file_that_is_not_pem_is_named(pki: DevPki, tmp_path: Path) -> None:
    garbage = tmp_path / "gateway.key"
    garbage.write_bytes(b"not a key\n")
    tls = TlsFiles(ca=pki.ca_cert, cert=pki.gateway.cert, key=garbage)

    with pytest.raises(CertificateError, match=f"private key file {garbage} holds no usable PEM"):
        tls.load()


def test_key_of_another_certificate_is_refused(pki: DevPki) -> None:
    tls = TlsFiles(ca=pki.ca_cert, cert=pki.gateway.cert, key=pki.consumer("alice").key)

    with pytest.raises(CertificateError, match="does not belong to certificate") as err:
        tls.load()
    assert err.value.reason == "CERTIFICATE_KEY_MISMATCH"
