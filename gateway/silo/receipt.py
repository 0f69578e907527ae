"""Signed release receipts: what a silo states it released, verifiable by the gateway and auditors.

A receipt (``silo_service_pb2.ReleaseReceipt``) is the silo's Ed25519 signature (RFC 8032, with
pycryptodome) over its *statement*: the RFC 8785 canonical JSON of every receipt field but
``signature`` and ``digest``::

    {"datasets": [...], "key_id": "...", "query_digest": "...", "released_at": "...",
     "request_id": "...", "rho": "p/q", "silo": "...", "values_digest": "..."}

``digest`` is the SHA-256 (hex) of the statement's bytes: the identity by which the silo's release
log and the gateway's audit log name one release. ``values_digest`` is the SHA-256 (hex) of the
canonical JSON of the released values (:func:`values_digest`); ``query_digest`` is
:attr:`gateway.query.form.QueryForm.digest` of the silo's part of the query; ``key_id`` is the
first 16 hex characters of the SHA-256 of the raw public key (as for policy keys).

One module for every side, so that each recomputes exactly what the silo signed: the silo signs
(:class:`ReceiptSigner`) and logs (:func:`release_log_entry`); the gateway checks a receipt
against its request and the released values (:func:`receipt_problem`) and records it
(:func:`receipt_to_record`); an auditor checks a recorded receipt offline with the silo's public
key (:func:`receipt_record_problem`). Checks return a description of the problem instead of
raising, and never name a released value. This module never signs anything but a statement it
built itself, and never accepts a receipt whose signature it has not verified.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from solders.pubkey import Pubkey
from solders.signature import Signature

from gateway.api.v1 import query_pb2, silo_service_pb2
from gateway.audit import jcs
from gateway.crypto.keys import read_ed25519_key
from gateway.errors import ConfigurationError
from gateway.policy.signing import generate_signing_key
from gateway.query.form import QueryForm, parse_query

# The statement's fields, in the receipt's terms; the signature and digest cover exactly these.
STATEMENT_FIELDS = (
    "silo",
    "released_at",
    "request_id",
    "query_digest",
    "datasets",
    "rho",
    "values_digest",
    "key_id",
)
# Stated (signed, recorded) only when the release has them: the delta of keys from the data.
OPTIONAL_FIELDS = ("key_delta",)
RECORD_FIELDS = frozenset((*STATEMENT_FIELDS, "digest", "signature"))
_KNOWN_FIELDS = RECORD_FIELDS | frozenset(OPTIONAL_FIELDS)
# Checked in this order, so that a receipt with several wrong fields is always named alike.
_TEXT_FIELDS = tuple(sorted(_KNOWN_FIELDS - {"datasets"}))
_SHA256_HEX = re.compile("[0-9a-f]{64}")
_BAD_SIGNATURE = "bad signature: it does not verify with the silo's receipt key"
_SIGNATURE_BYTES = 64
_KEY_ID_CHARS = 16


# -- keys -------------------------------------------------------------------------------------


def receipt_key_id(key: ECC.EccKey) -> str:
    """The receipt's ``key_id``: hex SHA-256 of the raw Ed25519 public key, 16 characters."""
    raw = key.public_key().export_key(format="raw")
    return hashlib.sha256(raw).hexdigest()[:_KEY_ID_CHARS]


def _read_key(path: Path, role: str) -> ECC.EccKey:
    return read_ed25519_key(path, f"the {role}")


def load_receipt_public_key(path: Path) -> ECC.EccKey:
    """A silo's public receipt key (the gateway's ``silos.<name>.receipt_key``, an auditor's
    ``--silo-key``). A private key is refused: whoever holds it could forge receipts."""
    key = _read_key(path, "receipt public key")
    if key.has_private():
        raise ConfigurationError(
            f"the receipt public key {path} is a private key; give the silo's public key",
            reason="KEY_UNREADABLE",
            metadata={"path": path},
        )
    return key


def generate_receipt_key(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 receipt key pair (PEM, the private key mode 0600); return its key id.

    The private key stays with the silo (``receipt_key`` in its config); the public key goes to
    the gateway (``silos.<name>.receipt_key``) and to auditors (``--silo-key NAME=PUB``).
    """
    # The same PEM key pair as policy and checkpoint keys, but its own pair: a silo's receipt
    # key states what the silo released, and must not be able to sign anything else.
    generate_signing_key(private_path, public_path, overwrite=overwrite)
    return receipt_key_id(load_receipt_public_key(public_path))


# -- what is signed ---------------------------------------------------------------------------


def values_digest(releases: Sequence[silo_service_pb2.MeasureRelease]) -> str:
    """SHA-256 (hex) of the released values, every component of every measure in order.

    The hashed bytes are the RFC 8785 JSON of ``[{"measure": id, "components": [{"name": name,
    "values": "v1,v2,..."}, ...]}, ...]`` with each value in decimal (a minus sign, no leading
    zeros): text, because a 64-bit value need not be an exact JSON number. The measure ids and
    component names are in it so that values cannot move between measures unnoticed. A release
    of data-dependent group keys adds ``"keys": [[v, ...], ...]``, the keys in value order.
    """
    document = [
        {
            "measure": release.measure_id,
            "components": [
                {"name": component.name, "values": ",".join(map(str, component.values))}
                for component in release.components
            ],
            **({"keys": [list(key.values) for key in release.keys]} if release.keys else {}),
        }
        for release in releases
    ]
    return hashlib.sha256(jcs.canonicalize_record(document)).hexdigest()


def _statement_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a receipt's signature covers: every statement field, and the optional ones
    the receipt has."""
    stated = {name: fields[name] for name in STATEMENT_FIELDS}
    for name in OPTIONAL_FIELDS:
        value = fields.get(name)
        if value:
            stated[name] = value
    return stated


def _statement(fields: Mapping[str, Any]) -> bytes:
    return jcs.canonicalize_record(_statement_fields(fields))


def _statement_of(receipt: silo_service_pb2.ReleaseReceipt) -> bytes:
    return _statement(receipt_to_record(receipt))


def rho_text(rho: Fraction) -> str:
    """An exact rho as a receipt states it: ``p/q``, or an integer."""
    return str(Fraction(rho))


def request_query(request: silo_service_pb2.ReleaseRequest) -> QueryForm:
    """The silo's part of the query, as the silo parses it from a release request.

    The gateway uses it to recompute ``query_digest`` and ``datasets`` from what it sent; raises
    ``InvalidQuery`` for a request the silo would refuse anyway.
    """
    return parse_query(
        query_pb2.Query(
            purpose=request.purpose,
            measures=[plan.measure for plan in request.plans],
            group_by=request.group_by,
        )
    )


def request_key_delta(request: silo_service_pb2.ReleaseRequest) -> Fraction:
    """The delta a release request's key thresholds state (0 when it has none)."""
    return sum(
        (Fraction(p.key_threshold.delta) for p in request.plans if p.HasField("key_threshold")),
        Fraction(0),
    )


def request_rho(request: silo_service_pb2.ReleaseRequest) -> Fraction:
    """The rho a release request states for the silo (the sum of its plans' costs)."""
    return sum(
        (Fraction(plan.cost.rho) if plan.cost.rho else Fraction(0) for plan in request.plans),
        Fraction(0),
    )


class ReceiptSigner:
    """Signs a silo's receipts with its Ed25519 private key (``receipt_key`` in its config)."""

    def __init__(self, private_key: ECC.EccKey) -> None:
        if private_key.curve != "Ed25519" or not private_key.has_private():
            raise ValueError("a receipt signer needs an Ed25519 private key")
        self.public_key = private_key.public_key()
        self.key_id = receipt_key_id(private_key)
        self._signer = eddsa.new(private_key, "rfc8032")

    @classmethod
    def load(cls, path: Path) -> ReceiptSigner:
        """The signer of the PEM private key at ``path``; ConfigurationError (one line naming
        the file) when it is missing, unreadable, not Ed25519 or a public key."""
        key = _read_key(path, "receipt signing key")
        if not key.has_private():
            raise ConfigurationError(
                f"the receipt signing key {path} is a public key; configure the private key",
                reason="KEY_UNREADABLE",
                metadata={"path": path},
            )
        return cls(key)

    def sign(
        self,
        *,
        silo: str,
        request_id: str,
        query_digest: str,
        datasets: Sequence[str],
        rho: Fraction,
        releases: Sequence[silo_service_pb2.MeasureRelease],
        released_at: str,
        key_delta: Fraction = Fraction(0),
    ) -> silo_service_pb2.ReleaseReceipt:
        """The signed receipt of ``releases`` (Ed25519 is deterministic: one statement, one
        signature). ``key_delta``: the delta keys from the data spent, stated when not 0."""
        fields: dict[str, Any] = {
            "silo": silo,
            "released_at": released_at,
            "request_id": request_id,
            "query_digest": query_digest,
            "datasets": sorted(datasets),
            "rho": rho_text(rho),
            "values_digest": values_digest(releases),
            "key_id": self.key_id,
        }
        if key_delta:
            fields["key_delta"] = rho_text(key_delta)
        statement = _statement(fields)
        return silo_service_pb2.ReleaseReceipt(
            **fields,
            digest=hashlib.sha256(statement).hexdigest(),
            signature=self._signer.sign(statement),
        )


# -- checking ---------------------------------------------------------------------------------


def _keys(public_key: ECC.EccKey | Sequence[ECC.EccKey]) -> list[ECC.EccKey]:
    return [public_key] if isinstance(public_key, ECC.EccKey) else list(public_key)


def _signature_problem(
    statement: bytes,
    digest: str,
    signature: bytes,
    key_id: str,
    public_key: ECC.EccKey | Sequence[ECC.EccKey],
) -> str | None:
    if digest != hashlib.sha256(statement).hexdigest():
        return "the receipt's digest does not match its statement"
    keys = dict(_raw_key(key) for key in _keys(public_key))
    raw_key = keys.get(key_id)
    if raw_key is None:
        known = ", ".join(sorted(keys)) or "none"
        return f"unknown receipt key id {key_id[:_KEY_ID_CHARS]!r} (known: {known})"
    if len(signature) != _SIGNATURE_BYTES:
        return f"bad signature: {len(signature)} bytes, not {_SIGNATURE_BYTES}"
    if not _verifier(raw_key).verifies(statement, signature):
        return _BAD_SIGNATURE
    return None


# Exporting a pycryptodome key costs more than verifying a signature: each key object's raw bytes
# and key id are kept (the object too, so its id is never reused while it is in here).
_RAW_KEYS: dict[int, tuple[ECC.EccKey, str, bytes]] = {}


def _raw_key(key: ECC.EccKey) -> tuple[str, bytes]:
    """(key id, raw public key) of ``key``."""
    hit = _RAW_KEYS.get(id(key))
    if hit is not None and hit[0] is key:
        return hit[1], hit[2]
    raw = key.public_key().export_key(format="raw")
    found = (hashlib.sha256(raw).hexdigest()[:_KEY_ID_CHARS], raw)
    if len(_RAW_KEYS) < 256:
        _RAW_KEYS[id(key)] = (key, *found)
    return found


class _PrimeOrderKey:
    """A public key that is a canonical point of the prime-order subgroup (every honest key),
    verified with ed25519-dalek's ``verify_strict`` (through solders): 25-30% faster than
    libsodium here, which matters to ``audit verify`` (one receipt or more per released query).

    For such keys the two accept exactly the same signatures
    (``tests/silo/test_receipt_verifiers.py`` compares them): S must be canonical, R must not
    be of small order, and the recomputed R must equal R byte for byte (the cofactorless RFC
    8032 equation, so a non-canonical or mixed-order R fails)."""

    __slots__ = ("_key",)

    def __init__(self, raw_key: bytes) -> None:
        self._key = Pubkey.from_bytes(raw_key)

    def verifies(self, statement: bytes, signature: bytes) -> bool:
        return Signature.from_bytes(signature).verify(self._key, statement)


class _OtherKey:
    """Any other 32 bytes, verified with libsodium, which refuses small-order and
    non-canonical keys outright (a small-order key would let anyone "sign" some statements)
    and otherwise applies the same rules as :class:`_PrimeOrderKey`."""

    __slots__ = ("_key",)

    def __init__(self, raw_key: bytes) -> None:
        self._key = VerifyKey(raw_key)

    def verifies(self, statement: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(statement, signature)
        except BadSignatureError:
            return False
        return True


@functools.lru_cache(maxsize=64)
def _verifier(raw_key: bytes) -> _PrimeOrderKey | _OtherKey:
    """Strict Ed25519 (RFC 8032) verification with ``raw_key``: a non-canonical S, a small-
    order R or key, and a non-canonical R or key are refused, as libsodium refuses them."""
    if len(raw_key) == 32 and crypto_core_ed25519_is_valid_point(raw_key):
        return _PrimeOrderKey(raw_key)
    return _OtherKey(raw_key)


def receipt_problem(
    receipt: silo_service_pb2.ReleaseReceipt,
    *,
    silo: str,
    request_id: str,
    releases: Sequence[silo_service_pb2.MeasureRelease],
    public_key: ECC.EccKey | Sequence[ECC.EccKey],
    query_digest: str | None = None,
    datasets: Sequence[str] | None = None,
    rho: Fraction | None = None,
    key_delta: Fraction | None = None,
) -> str | None:
    """What is wrong with a silo's receipt for ``releases``, or None when it holds.

    Checked: the silo's name, the request id, the values digest against the values received,
    the query digest, datasets, rho and key delta when given (the gateway passes what it asked
    for), the digest, the key id against the silo's configured key(s) and the signature.
    """
    if receipt.silo != silo:
        return f"the receipt names another silo ({receipt.silo[:64]!r}, expected {silo!r})"
    if receipt.request_id != request_id:
        return "the receipt names another request id"
    if receipt.values_digest != values_digest(releases):
        return "values digest mismatch: the receipt does not state the released values"
    if query_digest is not None and receipt.query_digest != query_digest:
        return "query digest mismatch: the receipt states another query"
    if datasets is not None and list(receipt.datasets) != sorted(datasets):
        return f"the receipt states datasets {sorted(receipt.datasets)!r}, expected {sorted(datasets)!r}"
    if rho is not None and receipt.rho != rho_text(rho):
        return f"the receipt states rho {receipt.rho[:64]!r}, expected {rho_text(rho)!r}"
    if key_delta is not None and receipt.key_delta != (rho_text(key_delta) if key_delta else ""):
        return f"the receipt states key delta {receipt.key_delta[:64]!r}, expected {key_delta}"
    return _signature_problem(
        _statement_of(receipt), receipt.digest, receipt.signature, receipt.key_id, public_key
    )


def receipt_to_record(receipt: silo_service_pb2.ReleaseReceipt) -> dict[str, Any]:
    """The receipt as JSON for an audit record (the signature in base64), complete enough to
    be verified offline with :func:`receipt_record_problem`."""
    return {
        "silo": receipt.silo,
        "released_at": receipt.released_at,
        "request_id": receipt.request_id,
        "query_digest": receipt.query_digest,
        "datasets": list(receipt.datasets),
        "rho": receipt.rho,
        "values_digest": receipt.values_digest,
        "key_id": receipt.key_id,
        **({"key_delta": receipt.key_delta} if receipt.key_delta else {}),
        "digest": receipt.digest,
        "signature": base64.b64encode(receipt.signature).decode("ascii"),
    }


def record_shape_problem(record: object) -> str | None:
    """Why ``record`` is not a receipt record in the shape :func:`receipt_to_record` writes
    (None when it is): every field present, of its type, hex digests, canonical base64."""
    if not isinstance(record, dict):
        return "a receipt is not an object"
    fields = record.keys()
    if not fields >= RECORD_FIELDS:
        return f"the receipt lacks {', '.join(sorted(RECORD_FIELDS - fields))}"
    if not fields <= _KNOWN_FIELDS:
        return f"the receipt has unknown field(s) {', '.join(sorted(fields - _KNOWN_FIELDS)[:5])}"
    for name in _TEXT_FIELDS:
        value = record.get(name, "")
        if not isinstance(value, str):
            return f"the receipt's {name} is not text"
    if "key_delta" in record and not record["key_delta"]:
        return "the receipt's key_delta is empty (a receipt without one leaves it out)"
    datasets = record["datasets"]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        return "the receipt's datasets are not a list of names"
    for name in ("digest", "values_digest", "query_digest"):
        if _SHA256_HEX.fullmatch(record[name]) is None:
            return f"the receipt's {name} is not a SHA-256 in hex"
    signature = record["signature"]
    try:
        raw = binascii.a2b_base64(signature, strict_mode=True)
    except (binascii.Error, ValueError):
        return "the receipt's signature is not base64"
    if binascii.b2a_base64(raw, newline=False).decode("ascii") != signature:
        return "the receipt's signature is not canonical base64"
    return None


def receipt_record_problem(
    record: Mapping[str, Any] | object, public_key: ECC.EccKey | Sequence[ECC.EccKey]
) -> str | None:
    """What is wrong with a receipt as recorded by :func:`receipt_to_record`, checked with the
    silo's public key(s) (several when the silo rotated its key); None when it holds."""
    return ReceiptKeyring.of(public_key).record_problem(record)


class ReceiptKeyring:
    """A silo's public receipt keys by key id, each ready to verify with (see :func:`_verifier`).

    Built once for a run that checks many receipts (``audit verify``, ``reconcile``): the keys
    are exported, identified and loaded once, not per receipt. ``raw`` (the raw public keys) is
    all a worker process needs to build the same keyring.
    """

    def __init__(self, raw_keys: Iterable[bytes]) -> None:
        self.raw = tuple(raw_keys)
        self._keys = {
            hashlib.sha256(raw).hexdigest()[:_KEY_ID_CHARS]: _verifier(raw) for raw in self.raw
        }

    @classmethod
    def of(cls, public_key: ECC.EccKey | Sequence[ECC.EccKey]) -> ReceiptKeyring:
        return _keyring(tuple(_raw_key(key)[1] for key in _keys(public_key)))

    def record_problem(self, record: Mapping[str, Any] | object) -> str | None:
        """:func:`receipt_record_problem` with these keys."""
        problem = record_shape_problem(record)
        if problem is not None:
            return problem
        assert isinstance(record, dict)
        return self.shaped_record_problem(record)

    def shaped_record_problem(self, record: Mapping[str, Any]) -> str | None:
        """The digest, key id and signature of a receipt record that
        :func:`record_shape_problem` accepted (None when they hold)."""
        # Every statement field is text or a list of text under an ASCII name: the C encoder
        # writes those in RFC 8785 form, as the silo's signer did.
        try:
            statement = jcs.canonicalize_plain(_statement_fields(record))
        except jcs.NotCanonicalizable:
            return "the receipt's statement has no canonical form (a lone surrogate)"
        if record["digest"] != hashlib.sha256(statement).hexdigest():
            return "the receipt's digest does not match its statement"
        key_id = record["key_id"]
        key = self._keys.get(key_id)
        if key is None:
            known = ", ".join(sorted(self._keys)) or "none"
            return f"unknown receipt key id {key_id[:_KEY_ID_CHARS]!r} (known: {known})"
        signature = base64.b64decode(record["signature"])
        if len(signature) != _SIGNATURE_BYTES:
            return f"bad signature: {len(signature)} bytes, not {_SIGNATURE_BYTES}"
        if not key.verifies(statement, signature):
            return _BAD_SIGNATURE
        return None


@functools.lru_cache(maxsize=64)
def _keyring(raw_keys: tuple[bytes, ...]) -> ReceiptKeyring:
    return ReceiptKeyring(raw_keys)


# -- the silo's release log -------------------------------------------------------------------


def release_log_entry(
    receipt: silo_service_pb2.ReleaseReceipt,
    request: silo_service_pb2.ReleaseRequest,
    *,
    policy_version: str,
    query: QueryForm,
    releases: Sequence[silo_service_pb2.MeasureRelease],
) -> dict[str, Any]:
    """The fields of the silo's ``release`` record (``release_log.append("release", ...)``).

    ``request_id``, ``consumer``, ``purpose``, ``policy_version``, ``datasets``, ``query`` (the
    canonical form), ``query_digest``, ``rho`` (the total the silo accepted, as in the receipt),
    ``rho_per_measure`` and ``scales`` (per measure id: one scale per component, as released),
    ``values_digest``, ``digest`` (the receipt's, which reconciliation matches) and ``receipt``
    (:func:`receipt_to_record`, so the log alone proves what the silo signed). A release of
    group keys from the data adds ``key_delta`` (the exact delta it spent) and ``key_thresholds``
    (per measure id).
    """
    thresholds = {p.measure.id: p for p in request.plans if p.HasField("key_threshold")}
    return {
        "request_id": receipt.request_id,
        "consumer": request.consumer,
        "purpose": request.purpose,
        "policy_version": policy_version,
        "datasets": list(receipt.datasets),
        "query": query.canonical(),
        "query_digest": receipt.query_digest,
        "rho": receipt.rho,
        "rho_per_measure": {plan.measure.id: plan.cost.rho for plan in request.plans},
        "scales": {
            release.measure_id: [component.scale for component in release.components]
            for release in releases
        },
        "values_digest": receipt.values_digest,
        "digest": receipt.digest,
        "receipt": receipt_to_record(receipt),
        **(
            {
                "key_delta": receipt.key_delta,
                "key_thresholds": {m: p.key_threshold.threshold for m, p in thresholds.items()},
            }
            if thresholds
            else {}
        ),
    }


__all__ = [
    "OPTIONAL_FIELDS",
    "RECORD_FIELDS",
    "STATEMENT_FIELDS",
    "ReceiptKeyring",
    "ReceiptSigner",
    "generate_receipt_key",
    "load_receipt_public_key",
    "receipt_key_id",
    "receipt_problem",
    "receipt_record_problem",
    "receipt_to_record",
    "record_shape_problem",
    "release_log_entry",
    "request_key_delta",
    "request_query",
    "request_rho",
    "rho_text",
    "values_digest",
]
