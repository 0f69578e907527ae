"""The two Ed25519 verifiers behind receipt checks accept exactly the same signatures.

Receipts under a key that is a canonical prime-order point (every honest key) are verified with
ed25519-dalek's ``verify_strict`` (solders), any other key with libsodium (PyNaCl). Both are
strict: for prime-order keys they must agree on every signature, including the ones a lenient
(cofactored, ZIP 215) verifier accepts. The signatures below are made with the curve arithmetic
libsodium exposes, so that R can be chosen (a mixed-order or small-order R, a non-canonical S).
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_is_valid_point,
    crypto_core_ed25519_scalar_add,
    crypto_core_ed25519_scalar_mul,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_base_noclamp,
)
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gateway.silo.receipt import _OtherKey, _PrimeOrderKey, _verifier

# The group order L of the prime-order subgroup.
L = 2**252 + 27742317777372353535851937790883648493
# Canonical encodings of the points of order 1, 2, 4 and 8 (the torsion subgroup), from the
# curve's definition: the identity, y = -1, y = 0 (x = ±sqrt(-1)), and the four of order 8.
SMALL_ORDER = [
    bytes.fromhex("01" + "00" * 31),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),
    bytes(32),
    bytes(31) + b"\x80",
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
]
ORDER_EIGHT = SMALL_ORDER[4]


def _scalar(data: bytes) -> bytes:
    return crypto_core_ed25519_scalar_reduce(hashlib.sha512(data).digest())


def _keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(secret scalar a, public key A = aB)."""
    secret = _scalar(b"key" + seed)
    return secret, crypto_scalarmult_ed25519_base_noclamp(secret)


def _sign(
    secret: bytes, public: bytes, message: bytes, nonce: bytes, torsion: bytes | None
) -> bytes:
    """R || S with R = rB (+ a small-order point) and S = r + H(R || A || M) a mod L."""
    r = _scalar(b"nonce" + nonce)
    point = crypto_scalarmult_ed25519_base_noclamp(r)
    if torsion is not None:
        point = crypto_core_ed25519_add(point, torsion)
    k = _scalar(point + public + message)
    s = crypto_core_ed25519_scalar_add(r, crypto_core_ed25519_scalar_mul(k, secret))
    return point + s


def _libsodium(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public).verify(message, signature)
    except BadSignatureError:
        return False
    return True


def _dalek(public: bytes, message: bytes, signature: bytes) -> bool:
    return _PrimeOrderKey(public).verifies(message, signature)


def _agree(public: bytes, message: bytes, signature: bytes) -> bool:
    verdict = _libsodium(public, message, signature)
    assert _dalek(public, message, signature) == verdict, signature.hex()
    return verdict


seeds = st.binary(min_size=1, max_size=16)
messages = st.binary(max_size=200)


@settings(max_examples=200, deadline=None)
@given(seeds, messages, st.binary(min_size=1, max_size=8))
def test_honest_signatures_verify_with_both(seed: bytes, message: bytes, nonce: bytes) -> None:
    secret, public = _keypair(seed)
    assert crypto_core_ed25519_is_valid_point(public)
    assert isinstance(_verifier(public), _PrimeOrderKey)
    assert _agree(public, message, _sign(secret, public, message, nonce, None))


@settings(max_examples=200, deadline=None)
@given(seeds, messages, st.binary(min_size=1, max_size=8), st.sampled_from(SMALL_ORDER[1:]))
def test_a_mixed_order_r_fails_with_both(
    seed: bytes, message: bytes, nonce: bytes, torsion: bytes
) -> None:
    """R = rB + T satisfies the cofactored equation (which ZIP 215 and RFC 8032's optional
    check use), never the cofactorless one both of ours use."""
    secret, public = _keypair(seed)
    assert not _agree(public, message, _sign(secret, public, message, nonce, torsion))


@settings(max_examples=100, deadline=None)
@given(seeds, messages, st.sampled_from(SMALL_ORDER), st.integers(0, 3))
def test_a_small_order_r_fails_with_both(
    seed: bytes, message: bytes, point: bytes, s_value: int
) -> None:
    _, public = _keypair(seed)
    assert not _agree(public, message, point + s_value.to_bytes(32, "little"))


@settings(max_examples=200, deadline=None)
@given(seeds, messages, st.binary(min_size=1, max_size=8), st.integers(1, 15))
def test_a_non_canonical_s_fails_with_both(
    seed: bytes, message: bytes, nonce: bytes, multiple: int
) -> None:
    """S + kL (still below 2**256) satisfies the equation; both refuse it as not reduced."""
    secret, public = _keypair(seed)
    signature = _sign(secret, public, message, nonce, None)
    s_value = int.from_bytes(signature[32:], "little") + multiple * L
    forged = signature[:32] + s_value.to_bytes(32, "little")
    assert not _agree(public, message, forged)


@settings(max_examples=300, deadline=None)
@given(seeds, messages, st.binary(min_size=1, max_size=8), st.integers(0, 511))
def test_every_flipped_bit_fails_with_both(
    seed: bytes, message: bytes, nonce: bytes, bit: int
) -> None:
    secret, public = _keypair(seed)
    signature = bytearray(_sign(secret, public, message, nonce, None))
    signature[bit // 8] ^= 1 << (bit % 8)
    assert not _agree(public, message, bytes(signature))


def test_other_keys_go_to_libsodium_which_refuses_them() -> None:
    """A small-order key, a mixed-order key and a non-canonical encoding are no honest key:
    libsodium checks them, and the identity key's trivial forgery (R = identity, S = 0) fails."""
    _, public = _keypair(b"mixed")
    mixed = crypto_core_ed25519_add(public, ORDER_EIGHT)
    non_canonical_identity = (2**255 - 19 + 1).to_bytes(32, "little")  # y = p + 1 encodes y = 1
    for key in (*SMALL_ORDER, mixed, non_canonical_identity):
        assert not crypto_core_ed25519_is_valid_point(key)
        assert isinstance(_verifier(key), _OtherKey)
    identity = SMALL_ORDER[0]
    assert not _verifier(identity).verifies(b"anything", identity + bytes(32))
    assert not _verifier(non_canonical_identity).verifies(b"anything", identity + bytes(32))
