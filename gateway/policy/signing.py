"""Bundle identity and signing: Ed25519 keys, ``manifest.txt`` + ``bundle.sig``, verified loading.

A signed bundle carries two files beside its rule files: ``manifest.txt`` (exactly
:func:`gateway.policy.loader.manifest_text`, one ``<sha256>  <path>`` line per file; its SHA-256
is the policy version) and ``bundle.sig`` (a one-line header naming the scheme, then the base64
Ed25519 signature, RFC 8032, over the manifest's bytes). Policy authors create keys with
:func:`generate_signing_key` and sign with :func:`sign_bundle`; servers load with
:func:`load_policy`, which verifies whenever a verification key is configured.

This module never lets the bundle decide whether it is verified: the presence of a configured key
does (a key id written in ``bundle.sig`` only improves the error message). It never activates
files other than the verified ones: the loader's version (the hash of the bytes it parsed) must
equal the verified one. It never writes a private key readable by others, and never overwrites a
key unless asked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from pathlib import Path

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from gateway.errors import ConfigurationError, PolicyInvalid, PolicyProblem
from gateway.policy.loader import bundle_version, load_bundle, manifest_text
from gateway.policy.model import Bundle

MANIFEST_FILE = "manifest.txt"
SIGNATURE_FILE = "bundle.sig"
# The first line of bundle.sig; a later scheme gets a new tag, and an unknown tag is refused.
SIGNATURE_SCHEME = "silogate-bundle-signature/1 ed25519"
SIGNATURE_INVALID = "POLICY_SIGNATURE_INVALID"
# Read limits for the two signature files, so a hostile bundle cannot make a server read a
# huge file into memory (a manifest line is about 100 bytes: 1 MiB is ten thousand files).
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_SIGNATURE_BYTES = 4096
_SIGN_COMMAND = "silogate policy sign"


# -- keys -------------------------------------------------------------------------------------


def generate_signing_key(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair as PEM (the private key mode 0600); return the key id.

    The private key stays with the policy authors; servers are configured with the public key.
    Existing files are kept (``KEY_EXISTS``) unless ``overwrite``: replacing a key silently would
    make every bundle signed with the old one unverifiable.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if not overwrite:
        existing = [p for p in (private_path, public_path) if p.exists()]
        if existing:
            raise ConfigurationError(
                f"key file {existing[0]} already exists; pass overwrite to replace it",
                reason="KEY_EXISTS",
                metadata={"path": existing[0]},
            )
    key = ECC.generate(curve="ed25519")
    try:
        _write_private(private_path, key.export_key(format="PEM").encode())
        public_path.parent.mkdir(parents=True, exist_ok=True)
        public_path.write_text(key.public_key().export_key(format="PEM") + "\n", encoding="ascii")
    except OSError as err:
        raise ConfigurationError(
            f"cannot write key file {err.filename}: {err.strerror}",
            reason="KEY_UNWRITABLE",
            metadata={"path": err.filename},
        ) from err
    return key_id(key)


def _write_private(path: Path, pem: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with mode 0600 from the start (no window where it is world-readable); fchmod covers
    # an overwritten file that had a looser mode before.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(pem + b"\n")


def key_id(key: ECC.EccKey) -> str:
    """A short fingerprint of the public key, shown in messages (never used to pick a key)."""
    return hashlib.sha256(key.public_key().export_key(format="raw")).hexdigest()[:16]


def read_key(path: Path, *, private: bool) -> ECC.EccKey:
    role = "signing" if private else "verification"
    try:
        key = ECC.import_key(Path(path).read_text(encoding="ascii"))
    except OSError as err:
        raise _key_problem(f"cannot read the {role} key {path}: {err.strerror}", path) from err
    except (ValueError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise _key_problem(f"the {role} key {path} is not a PEM key", path) from err
    if key.curve != "Ed25519":
        raise _key_problem(f"the {role} key {path} is not an Ed25519 key", path)
    if private and not key.has_private():
        raise _key_problem(
            f"the signing key {path} is a public key; sign with the private key", path
        )
    if not private and key.has_private():
        # A server holding the private key could sign any bundle itself: refuse the mistake.
        raise _key_problem(
            f"the verification key {path} is a private key; configure the public key", path
        )
    return key


def _key_problem(message: str, path: Path) -> ConfigurationError:
    return ConfigurationError(message, reason="KEY_UNREADABLE", metadata={"path": path})


# -- signing ----------------------------------------------------------------------------------


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> Path:
    """Validate the bundle, then write ``manifest.txt`` and ``bundle.sig``; return bundle.sig's path.

    An invalid bundle is not signed (PolicyInvalid with every problem): a signature states that
    the authors approved these exact files, and approving a bundle no server would load helps
    nobody. Each file is replaced atomically, the manifest first.
    """
    root = Path(bundle_dir)
    key = read_key(private_key_path, private=True)
    validated = load_bundle(root)
    manifest = manifest_text(root).encode()
    if hashlib.sha256(manifest).hexdigest() != validated.version:
        raise PolicyInvalid(
            [PolicyProblem(None, "the files changed while the bundle was being signed; sign again")]
        )
    signature = eddsa.new(key, "rfc8032").sign(manifest)
    body = f"{SIGNATURE_SCHEME} key={key_id(key)}\n{base64.b64encode(signature).decode()}\n"
    _replace(root / MANIFEST_FILE, manifest)
    _replace(root / SIGNATURE_FILE, body.encode())
    return root / SIGNATURE_FILE


def _replace(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # a dot file: never part of the bundle
    tmp.write_bytes(content)
    tmp.replace(path)


# -- verification -----------------------------------------------------------------------------


def verify_bundle(bundle_dir: Path, public_key_path: Path) -> str:
    """Check ``bundle.sig`` over ``manifest.txt`` and the manifest against the files.

    Returns the verified policy version (the SHA-256 of the manifest). Every failure is a
    PolicyInvalid whose ``reason`` is ``POLICY_SIGNATURE_INVALID``.
    """
    root = Path(bundle_dir)
    try:
        key = read_key(public_key_path, private=False)
    except ConfigurationError as err:
        raise _refusal(err.message) from err
    signature_path, manifest_path = root / SIGNATURE_FILE, root / MANIFEST_FILE
    if not signature_path.is_file():
        raise _refusal(
            f"the bundle is not signed: {SIGNATURE_FILE} is missing (sign it with "
            f"`{_SIGN_COMMAND}`)"
        )
    if not manifest_path.is_file():
        raise _refusal(f"{MANIFEST_FILE} is missing; sign the bundle again with `{_SIGN_COMMAND}`")
    manifest = _read_limited(manifest_path, _MAX_MANIFEST_BYTES)
    try:
        signature_text = _read_limited(signature_path, _MAX_SIGNATURE_BYTES).decode("ascii")
    except UnicodeDecodeError as err:
        raise _refusal(f"{SIGNATURE_FILE} is malformed: it is not ASCII text") from err
    header, signature = _parse_signature(signature_text)
    try:
        eddsa.new(key, "rfc8032").verify(manifest, signature)
    except ValueError as err:
        raise _refusal(_bad_signature_message(header, key)) from err
    actual = manifest_text(root).encode()
    if manifest != actual:
        raise _refusal(_manifest_mismatch(manifest, actual))
    return hashlib.sha256(manifest).hexdigest()


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise _refusal(f"cannot read {path.name}: {err.strerror}") from err
    if len(data) > limit:
        raise _refusal(f"{path.name} is over the limit of {limit} bytes")
    return data


def _parse_signature(text: str) -> tuple[str, bytes]:
    lines = text.splitlines()
    if len(lines) != 2 or not lines[0].startswith(SIGNATURE_SCHEME):
        raise _refusal(
            f"{SIGNATURE_FILE} is malformed: expected the line '{SIGNATURE_SCHEME} ...' and a "
            "base64 signature"
        )
    try:
        signature = base64.b64decode(lines[1].strip(), validate=True)
    except binascii.Error as err:
        raise _refusal(f"{SIGNATURE_FILE} is malformed: the signature is not base64") from err
    if len(signature) != 64:
        raise _refusal(f"{SIGNATURE_FILE} is malformed: an Ed25519 signature has 64 bytes")
    return lines[0], signature


def _bad_signature_message(header: str, key: ECC.EccKey) -> str:
    expected = key_id(key)
    claimed = header.removeprefix(SIGNATURE_SCHEME).strip().removeprefix("key=")
    if claimed and claimed != expected:
        return (
            f"{SIGNATURE_FILE} was not made with the configured key (it names key {claimed}, the "
            f"configured key is {expected})"
        )
    return (
        f"{SIGNATURE_FILE} does not verify over {MANIFEST_FILE} with the configured key "
        f"{expected}: the manifest or the signature was altered"
    )


def _manifest_mismatch(signed: bytes, actual: bytes) -> str:
    """Name the first file that differs between the signed manifest and the folder."""
    signed_files = _manifest_entries(signed.decode("utf-8", errors="replace"))
    actual_files = _manifest_entries(actual.decode())
    differing = [
        path
        for path in sorted(signed_files.keys() | actual_files.keys())
        if signed_files.get(path) != actual_files.get(path)
    ]
    if not differing:
        return f"{MANIFEST_FILE} is not in the expected format; sign the bundle again"
    first = differing[0]
    if first not in actual_files:
        what = f"{first} is listed in the signed manifest but missing"
    elif first not in signed_files:
        what = f"{first} is not in the signed manifest (added after signing)"
    else:
        what = f"{first} changed after signing"
    more = f" (and {len(differing) - 1} more file(s))" if len(differing) > 1 else ""
    return f"the files do not match the signed {MANIFEST_FILE}: {what}{more}"


def _manifest_entries(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        digest, sep, path = line.partition("  ")
        if sep:
            entries[path] = digest
    return entries


def _refusal(message: str) -> PolicyInvalid:
    err = PolicyInvalid([PolicyProblem(None, message)])
    err.reason = SIGNATURE_INVALID
    return err


# -- loading ----------------------------------------------------------------------------------


def load_policy(root: Path, verify_key: Path | None) -> Bundle:
    """Load a bundle for a server: verify it first when a key is configured, then validate it.

    The loader's version is the hash of the bytes it parsed, so requiring it to equal the
    verified version means exactly the verified files were loaded; a bundle edited between the
    two reads is refused (and loaded again at the next change). On failure the PolicyInvalid
    carries the refused files' version in its metadata (``policy_version``) when readable.
    """
    root = Path(root)
    if not root.is_dir():
        raise PolicyInvalid([PolicyProblem(None, f"policy bundle folder not found: {root}")])
    try:
        verified = verify_bundle(root, verify_key) if verify_key is not None else None
        bundle = load_bundle(root)
        if verified is not None and bundle.version != verified:
            raise _refusal("the files changed while the bundle was being verified and loaded")
    except PolicyInvalid as err:
        with contextlib.suppress(OSError):
            err.metadata.setdefault("policy_version", bundle_version(root))
        raise
    return bundle
