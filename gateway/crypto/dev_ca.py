"""The development certificate authority and the certificate identities Silogate relies on.

``init_dev_pki`` creates a throwaway CA and the certificates for one gateway, its silos and its
consumers, so that the demo and the tests run with real mutual TLS. It is for development only: the
CA key is written unencrypted next to the certificates it signs, nothing is ever revoked, and it
must never issue certificates for a deployment that holds real data.

Identities are URI SANs in the SPIFFE style (``spiffe://silogate.local/...``). The helpers that
build them (``GATEWAY_IDENTITY``, ``silo_identity``, ``consumer_identity``), the helpers that read
them back from a gRPC auth context (``peer_identities``, ``peer_identity``) and ``TlsFiles`` (the
PEM files a process loads) are not development-only: the servers use them whichever CA issued their
certificates. The readers only report what the TLS handshake verified; they never look at anything
the caller sends as metadata.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigurationError

TRUST_DOMAIN = "silogate.local"
GATEWAY_IDENTITY = f"spiffe://{TRUST_DOMAIN}/gateway"
_SILO_PREFIX = f"spiffe://{TRUST_DOMAIN}/silo/"
_CONSUMER_PREFIX = f"spiffe://{TRUST_DOMAIN}/consumer/"

# Names become both a file name and a URI path segment, so they are kept to a portable subset.
_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

# Auth-context keys, as observed with grpcio 1.85.1: "peer_uri" holds every URI SAN of the verified
# peer certificate, one value each, in certificate order. "x509_subject_alternative_name" (also the
# peer_identity_key()) mixes URI, DNS, e-mail and IP SANs in one list, so it is only a fallback for
# builds without "peer_uri". "peer_spiffe_id" is not used: gRPC sets it only when the certificate
# has exactly one URI SAN (an extra https:// URI makes it vanish), and it is not a strict validator
# either (it reported "spiffe://Silogate.local/consumer/a/").
_URI_SANS_KEY = "peer_uri"
_ALL_SANS_KEY = "x509_subject_alternative_name"

# Certificates are back-dated a little so that a peer whose clock runs slightly behind accepts them.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_ORGANIZATION = "Silogate development PKI"

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
_PRIVATE_KEY_MODE = 0o600
_CERTIFICATE_MODE = 0o644


class CertificateError(ConfigurationError):
    """A certificate or key file cannot be used; the message names the file and the problem."""

    UNREADABLE = "CERTIFICATE_UNREADABLE"
    KEY_MISMATCH = "CERTIFICATE_KEY_MISMATCH"

    def __init__(self, message: str, *, path: Path, reason: str = UNREADABLE) -> None:
        super().__init__(message, reason=reason)
        self.path = path


def silo_identity(name: str) -> str:
    """The SPIFFE ID that the certificate of silo ``name`` carries."""
    return _SILO_PREFIX + _checked_name(name, "silo")


def silo_server_name(name: str) -> str:
    """The DNS name in silo ``name``'s certificate that the gateway checks when it connects, so a
    silo cannot be impersonated by another silo's (or any other server's) certificate."""
    return f"{_checked_name(name, 'silo')}.silo.{TRUST_DOMAIN}"


def consumer_identity(name: str) -> str:
    """The SPIFFE ID that the certificate of consumer ``name`` carries."""
    return _CONSUMER_PREFIX + _checked_name(name, "consumer")


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    """The SPIFFE IDs (``spiffe://`` URI SANs) of the verified peer certificate, in its order.

    ``auth_context`` is what ``ServicerContext.auth_context()`` returns, in ``grpc`` and
    ``grpc.aio`` alike. Without TLS, or when the certificate has no SPIFFE URI, the result is empty.
    Other URI schemes and values that are not UTF-8 are skipped, never guessed at.
    """
    values = auth_context.get(_URI_SANS_KEY)
    if values is None:
        values = auth_context.get(_ALL_SANS_KEY, ())
    identities: list[str] = []
    for value in values:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.startswith("spiffe://") and text not in identities:
            identities.append(text)
    return tuple(identities)


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The peer's one SPIFFE ID, or ``None`` when it has none or several.

    A certificate naming several identities is ambiguous, so it authenticates nobody: servers that
    decide who is calling use this rather than picking one of ``peer_identities``.
    """
    identities = peer_identities(auth_context)
    return identities[0] if len(identities) == 1 else None


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files one process needs for mutual TLS: the CA it trusts, its own cert and key."""

    ca: Path
    cert: Path
    key: Path

    def load(self) -> tuple[bytes, bytes, bytes]:
        """Read and check the three files; return ``(ca, cert, key)`` PEM bytes for gRPC.

        Raises ``CertificateError`` naming the file when one is missing, unreadable, not PEM of the
        expected kind, or when the private key does not belong to the certificate. gRPC itself would
        only fail later, at the first handshake, with a message that names no file.
        """
        ca_pem = _read(self.ca, "CA certificate")
        cert_pem = _read(self.cert, "certificate")
        key_pem = _read(self.key, "private key")
        _parse_certificates(ca_pem, self.ca, "CA certificate")
        certificate = _parse_certificates(cert_pem, self.cert, "certificate")[0]
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError as err:  # raised for encrypted keys
            raise CertificateError(
                f"private key file {self.key} is encrypted; gRPC needs an unencrypted PEM key",
                path=self.key,
            ) from err
        except (ValueError, UnsupportedAlgorithm) as err:
            raise CertificateError(
                f"private key file {self.key} holds no usable PEM private key", path=self.key
            ) from err
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            raise CertificateError(
                f"private key file {self.key} does not belong to certificate {self.cert}",
                path=self.key,
                reason=CertificateError.KEY_MISMATCH,
            )
        return ca_pem, cert_pem, key_pem


class CertKeyPaths(NamedTuple):
    """Where one issued certificate and its private key were written."""

    cert: Path
    key: Path


class ReceiptKeyPaths(NamedTuple):
    """Where a silo's Ed25519 receipt key pair was written: the private key for the silo's
    ``receipt_key``, the public key for the gateway's ``silos.<name>.receipt_key``."""

    private: Path
    public: Path


@dataclass(frozen=True)
class DevPki:
    """The files ``init_dev_pki`` wrote: the CA, and a certificate and key per party."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    gateway_paths: CertKeyPaths
    silo_paths: Mapping[str, CertKeyPaths] = field(hash=False)
    consumer_paths: Mapping[str, CertKeyPaths] = field(hash=False)
    receipt_key_paths: Mapping[str, ReceiptKeyPaths] = field(
        hash=False, default_factory=lambda: MappingProxyType({})
    )

    @property
    def gateway(self) -> TlsFiles:
        """The gateway's files: its server cert for consumers is also its client cert to silos."""
        return TlsFiles(ca=self.ca_cert, cert=self.gateway_paths.cert, key=self.gateway_paths.key)

    def silo(self, name: str) -> TlsFiles:
        """The files of silo ``name``; ``KeyError`` if this PKI issued no such silo certificate."""
        return self._tls_files(self.silo_paths, name, "silo")

    def consumer(self, name: str) -> TlsFiles:
        """The files of consumer ``name``; ``KeyError`` if this PKI issued no such certificate."""
        return self._tls_files(self.consumer_paths, name, "consumer")

    def receipt_keys(self, name: str) -> ReceiptKeyPaths:
        """The receipt key pair of silo ``name``; ``KeyError`` if none was written."""
        try:
            return self.receipt_key_paths[name]
        except KeyError:
            known = ", ".join(sorted(self.receipt_key_paths)) or "none"
            raise KeyError(
                f"no receipt key for silo {name!r} in {self.directory} (known: {known})"
            ) from None

    def _tls_files(self, paths: Mapping[str, CertKeyPaths], name: str, role: str) -> TlsFiles:
        try:
            cert, key = paths[name]
        except KeyError:
            known = ", ".join(sorted(paths)) or "none"
            raise KeyError(
                f"no {role} certificate named {name!r} in {self.directory} (known: {known})"
            ) from None
        return TlsFiles(ca=self.ca_cert, cert=cert, key=key)


def init_dev_pki(
    directory: Path,
    *,
    silos: Sequence[str],
    consumers: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    validity_days: int = 365,
    overwrite: bool = False,
) -> DevPki:
    """Create a development CA in ``directory``; issue gateway, silo and consumer certificates.

    Files: ``ca.pem``/``ca.key``; ``gateway.pem``/``.key`` (serverAuth and clientAuth, because the
    gateway serves consumers and calls silos); ``silo-<name>.pem``/``.key`` (serverAuth);
    ``consumer-<name>.pem``/``.key`` (clientAuth); ``silo-<name>.receipt.key``/``.receipt.pub``
    (the Ed25519 key pair with which the silo signs its release receipts). Server certificates
    also carry ``hosts`` as DNS or IP SANs so that clients verify the host name. TLS keys are EC
    P-256, signatures ECDSA with SHA-256, private keys are written with mode 0600.

    Refuses with ``FileExistsError`` when ``directory`` already holds a CA, unless ``overwrite`` is
    true; overwriting replaces the CA and every certificate, and deletes the ``silo-*`` and
    ``consumer-*`` files of names no longer listed (they were signed by the replaced CA).
    """
    silo_names = _checked_names(silos, "silo")
    consumer_names = _checked_names(consumers, "consumer")
    host_names = _subject_alternative_host_names(hosts)
    if isinstance(validity_days, bool) or not isinstance(validity_days, int) or validity_days < 1:
        raise ValueError(
            f"validity_days must be a positive whole number of days, got {validity_days!r}"
        )

    directory = Path(directory)
    ca_cert_path = directory / CA_CERT_FILE
    ca_key_path = directory / CA_KEY_FILE
    if not overwrite and (ca_cert_path.exists() or ca_key_path.exists()):
        raise FileExistsError(
            f"{directory} already holds a development CA ({CA_CERT_FILE}); "
            "pass overwrite=True to replace it and every certificate it issued"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    validity = _Validity(
        not_before=now - _CLOCK_SKEW, not_after=now + datetime.timedelta(days=validity_days)
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue_ca(ca_key, validity)
    issuer = _Issuer(ca_cert, ca_key, validity)

    gateway_paths = issuer.issue(
        directory,
        "gateway",
        identity=GATEWAY_IDENTITY,
        hosts=host_names,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    silo_paths = {
        name: issuer.issue(
            directory,
            f"silo-{name}",
            identity=silo_identity(name),
            hosts=(*_subject_alternative_host_names((silo_server_name(name),)), *host_names),
            usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
        )
        for name in silo_names
    }
    consumer_paths = {
        name: issuer.issue(
            directory,
            f"consumer-{name}",
            identity=consumer_identity(name),
            hosts=(),
            usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        )
        for name in consumer_names
    }
    receipt_paths = {name: _write_receipt_keys(directory, f"silo-{name}") for name in silo_names}
    if overwrite:
        _remove_stale_leaves(
            directory,
            keep=[*silo_paths.values(), *consumer_paths.values(), *receipt_paths.values()],
        )
    # The CA is written last: a run that fails half-way leaves no CA, so a retry is not refused.
    _write_private_key(ca_key_path, ca_key)
    _write_file(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), _CERTIFICATE_MODE)

    return DevPki(
        directory=directory,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        gateway_paths=gateway_paths,
        silo_paths=MappingProxyType(silo_paths),
        consumer_paths=MappingProxyType(consumer_paths),
        receipt_key_paths=MappingProxyType(receipt_paths),
    )


@dataclass(frozen=True)
class _Validity:
    not_before: datetime.datetime
    not_after: datetime.datetime


@dataclass(frozen=True)
class _Issuer:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    validity: _Validity

    def issue(
        self,
        directory: Path,
        stem: str,
        *,
        identity: str,
        hosts: Sequence[x509.GeneralName],
        usages: Sequence[x509.ObjectIdentifier],
    ) -> CertKeyPaths:
        key = ec.generate_private_key(ec.SECP256R1())
        ca_public_key = self.private_key.public_key()
        certificate = (
            _builder(_name(stem), self.certificate.subject, key, self.validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity), *hosts]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key), critical=False
            )
            .sign(self.private_key, hashes.SHA256())
        )
        paths = CertKeyPaths(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
        _write_private_key(paths.key, key)
        _write_file(
            paths.cert, certificate.public_bytes(serialization.Encoding.PEM), _CERTIFICATE_MODE
        )
        return paths


def _issue_ca(key: ec.EllipticCurvePrivateKey, validity: _Validity) -> x509.Certificate:
    subject = _name("Silogate development CA")
    return (
        _builder(subject, subject, key, validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, validity: _Validity
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _checked_name(name: str, role: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{role} name {name!r} is not valid: use 1 to 63 lower-case letters, digits, '-' or"
            " '_', starting with a letter or digit"
        )
    return name


def _checked_names(names: Sequence[str], role: str) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"{role}s must be a sequence of names, not the single string {names!r}")
    checked = tuple(_checked_name(name, role) for name in names)
    duplicates = sorted({name for name in checked if checked.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate {role} names: {', '.join(duplicates)}")
    return checked


def _subject_alternative_host_names(hosts: Sequence[str]) -> tuple[x509.GeneralName, ...]:
    if isinstance(hosts, str):
        raise TypeError(f"hosts must be a sequence of host names, not the single string {hosts!r}")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        if not host:
            raise ValueError("hosts must not contain an empty host name")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return tuple(names)


def _remove_stale_leaves(directory: Path, keep: Iterable[tuple[Path, Path]]) -> None:
    kept = {path for paths in keep for path in paths}
    for pattern in ("silo-*.pem", "silo-*.key", "silo-*.pub", "consumer-*.pem", "consumer-*.key"):
        for path in directory.glob(pattern):
            if path not in kept and path.is_file():
                path.unlink()


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _write_file(path, pem, _PRIVATE_KEY_MODE)


def _write_receipt_keys(directory: Path, stem: str) -> ReceiptKeyPaths:
    # PKCS#8 / SubjectPublicKeyInfo PEM: what gateway.silo.receipt reads (pycryptodome).
    key = ed25519.Ed25519PrivateKey.generate()
    paths = ReceiptKeyPaths(
        private=directory / f"{stem}.receipt.key", public=directory / f"{stem}.receipt.pub"
    )
    private_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    _write_file(paths.private, private_pem, _PRIVATE_KEY_MODE)
    _write_file(paths.public, public_pem, _CERTIFICATE_MODE)
    return paths


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # Write a private temporary file, then rename it: a key is never readable by others, not even
    # for a moment, and a file left by a previous run is replaced whole, with the right mode.
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise CertificateError(f"TLS {what} file {path} does not exist", path=path) from err
    except OSError as err:
        problem = err.strerror or type(err).__name__
        raise CertificateError(f"cannot read TLS {what} file {path}: {problem}", path=path) from err
    return data


def _parse_certificates(pem: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise CertificateError(
            f"TLS {what} file {path} holds no PEM certificate", path=path
        ) from err


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
