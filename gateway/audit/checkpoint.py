"""Checkpoints: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note`` envelopes, Ed25519.

A checkpoint note as the log writes it::

    <origin>
    <tree size, decimal>
    <base64 of the 32-byte RFC 6962 root>

    — <origin> <base64(key hash (4 bytes) || Ed25519 signature (64 bytes))>

The signature covers the body (the first three lines, each ending in a newline); the key hash is
the first four bytes of SHA-256(key name || 0x0A || 0x01 || public key), as the signed-note
specification defines it for Ed25519. The key name is the origin.

Parsing is strict so that one note has one spelling: no extension lines, decimal sizes without
leading zeros, canonical base64 (re-encoding must give the same text, so unused padding bits
cannot be flipped unnoticed). :func:`open_checkpoint` never returns a checkpoint whose signature
by the given key it has not verified; signature lines of other keys (witness cosignatures) are
allowed and ignored. This module never reads the log and never decides when to sign: that is
:class:`gateway.audit.log.AuditLog`'s job, which persists each note before publishing it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from gateway.audit.merkle import HASH_SIZE
from gateway.crypto.keys import read_ed25519_key
from gateway.errors import ConfigurationError

_SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space start every signature line
_ED25519_TYPE = b"\x01"
_SIGNATURE_SIZE = 4 + 64
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,18})$")
# Key names (and so origins) per signed-note: non-empty, no spaces, no '+'.
_KEY_NAME = re.compile(r"^[^\s+]+$")
MAX_NOTE_BYTES = 8192


class CheckpointError(ValueError):
    """A checkpoint note is malformed or its signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log called ``origin`` had ``size`` records with this ``root``."""

    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def check_origin(origin: str) -> str:
    if not _KEY_NAME.match(origin) or len(origin) > 256:
        raise ConfigurationError(
            f"checkpoint origin {origin!r} must be 1 to 256 characters without spaces or '+'",
            metadata={"origin": origin},
        )
    return origin


def key_hash(name: str, public_key: ECC.EccKey) -> bytes:
    raw = public_key.public_key().export_key(format="raw")
    return hashlib.sha256(name.encode() + b"\n" + _ED25519_TYPE + raw).digest()[:4]


class CheckpointSigner:
    """Signs checkpoints of one log (its origin) with an Ed25519 private key."""

    def __init__(self, private_key: ECC.EccKey, origin: str) -> None:
        self.origin = check_origin(origin)
        self.public_key = private_key.public_key()
        self._signer = eddsa.new(private_key, "rfc8032")
        self._hash = key_hash(origin, private_key)
        self.key_id = self._hash.hex()

    def sign(self, size: int, root: bytes) -> str:
        """The signed note text. Ed25519 is deterministic: one size and root, one note."""
        body = Checkpoint(self.origin, size, root).body()
        signature = self._signer.sign(body.encode())
        encoded = base64.b64encode(self._hash + signature).decode()
        return f"{body}\n{_SIGNATURE_PREFIX}{self.origin} {encoded}\n"


def _decode_b64(text: str, what: str) -> bytes:
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{what} is not base64") from None
    if base64.b64encode(value).decode() != text:
        raise CheckpointError(f"{what} is not in canonical base64")
    return value


def parse_body(note: str) -> tuple[Checkpoint, str, list[str]]:
    """The checkpoint, the signed body text and the signature lines, unverified."""
    if len(note.encode("utf-8", "surrogatepass")) > MAX_NOTE_BYTES:
        raise CheckpointError(f"the note is longer than {MAX_NOTE_BYTES} bytes")
    body, separator, signatures = note.partition("\n\n")
    if not separator or not signatures.endswith("\n"):
        raise CheckpointError("the note has no signature block ending in a newline")
    body += "\n"
    lines = body.split("\n")[:-1]
    if len(lines) != 3:
        raise CheckpointError(f"the body has {len(lines)} lines, not origin, size and root")
    origin, size_text, root_text = lines
    if not _KEY_NAME.match(origin):
        raise CheckpointError("the origin line is empty or has spaces")
    if not _SIZE.match(size_text):
        raise CheckpointError(f"the size line {size_text[:30]!r} is not a decimal number")
    root = _decode_b64(root_text, "the root hash")
    if len(root) != HASH_SIZE:
        raise CheckpointError(f"the root hash has {len(root)} bytes, not {HASH_SIZE}")
    return Checkpoint(origin, int(size_text), root), body, signatures[:-1].split("\n")


def open_checkpoint(note: str, public_key: ECC.EccKey, origin: str | None = None) -> Checkpoint:
    """The checkpoint in ``note`` once its signature by ``public_key`` verifies.

    The signature must be on a line named after the checkpoint's origin (and the origin must be
    ``origin`` when given). Raises :class:`CheckpointError` otherwise.
    """
    checkpoint, body, lines = parse_body(note)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"the origin is {checkpoint.origin!r}, expected {origin!r}")
    expected_hash = key_hash(checkpoint.origin, public_key)
    verifier = eddsa.new(public_key, "rfc8032")
    found = False
    for line in lines:
        if not line.startswith(_SIGNATURE_PREFIX):
            raise CheckpointError("a signature line does not start with an em dash and a space")
        name, space, encoded = line[len(_SIGNATURE_PREFIX) :].partition(" ")
        if not space or not _KEY_NAME.match(name) or " " in encoded:
            raise CheckpointError("a signature line is not '— <name> <base64>'")
        blob = _decode_b64(encoded, "a signature")
        if len(blob) < 5:
            raise CheckpointError("a signature is too short")
        if name != checkpoint.origin or blob[:4] != expected_hash:
            continue  # another key's signature (a witness): not ours to judge
        if len(blob) != _SIGNATURE_SIZE:
            raise CheckpointError(f"the Ed25519 signature has {len(blob) - 4} bytes, not 64")
        try:
            verifier.verify(body.encode(), blob[4:])
        except ValueError:
            raise CheckpointError("the signature does not verify with the given key") from None
        found = True
    if not found:
        raise CheckpointError(f"no signature by the given key for origin {checkpoint.origin!r}")
    return checkpoint


# -- keys -------------------------------------------------------------------------------------


def _read_key(path: Path, role: str) -> ECC.EccKey:
    return read_ed25519_key(path, f"the {role} key")


def load_signing_key(path: Path) -> ECC.EccKey:
    """The log's private checkpoint key (PEM, from ``silogate audit keygen``)."""
    key = _read_key(path, "checkpoint signing")
    if not key.has_private():
        raise ConfigurationError(
            f"the checkpoint signing key {path} is a public key; configure the private key",
            reason="KEY_UNREADABLE",
            metadata={"path": path},
        )
    return key


def load_verification_key(path: Path) -> ECC.EccKey:
    """An auditor's copy of the log's public key."""
    key = _read_key(path, "checkpoint verification")
    # Auditors only need the public half; accepting a private key would hide a leaked one.
    if key.has_private():
        raise ConfigurationError(
            f"the key {path} is a private key; verify with the public key",
            reason="KEY_UNREADABLE",
            metadata={"path": path},
        )
    return key
