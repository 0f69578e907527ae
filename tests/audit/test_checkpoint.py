"""C2SP signed-note checkpoints: the exact text, the key hash, and strict verification."""

from __future__ import annotations

import base64
import hashlib

import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from gateway.audit.checkpoint import CheckpointError, CheckpointSigner, open_checkpoint
from gateway.audit.merkle import EMPTY_ROOT, leaf_hash

ORIGIN = "example.org/audit"
KEY = ECC.generate(curve="ed25519")
OTHER = ECC.generate(curve="ed25519")
ROOT = leaf_hash(b"root")


def test_the_note_is_the_c2sp_checkpoint_text() -> None:
    note = CheckpointSigner(KEY, ORIGIN).sign(7, ROOT)
    body, _, signatures = note.partition("\n\n")
    assert body + "\n" == f"{ORIGIN}\n7\n{base64.b64encode(ROOT).decode()}\n"
    [line] = signatures.splitlines()
    dash, name, encoded = line.split(" ")
    assert dash == "\u2014" and name == ORIGIN
    blob = base64.b64decode(encoded)
    raw = KEY.public_key().export_key(format="raw")
    # signed-note key ID: SHA-256(name || "\n" || 0x01 || public key)[:4], then the signature.
    assert blob[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + raw).digest()[:4]
    eddsa.new(KEY.public_key(), "rfc8032").verify((body + "\n").encode(), blob[4:])
    checkpoint = open_checkpoint(note, KEY.public_key(), ORIGIN)
    assert (checkpoint.origin, checkpoint.size, checkpoint.root) == (ORIGIN, 7, ROOT)


def test_signing_is_deterministic_so_an_idle_interval_signs_the_same_note() -> None:
    signer = CheckpointSigner(KEY, ORIGIN)
    assert signer.sign(3, ROOT) == signer.sign(3, ROOT)
    assert signer.sign(0, EMPTY_ROOT) != signer.sign(3, ROOT)


def _tamper(note: str, old: str, new: str) -> str:
    assert old in note
    return note.replace(old, new, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda n: _tamper(n, "\n7\n", "\n8\n"), "does not verify"),
        (lambda n: _tamper(n, "\n7\n", "\n07\n"), "not a decimal"),
        (lambda n: _tamper(n, ORIGIN, "example.org/other"), "origin"),
        (lambda n: n.replace("\n\n", "\nextension\n\n", 1), "lines"),
        (lambda n: n.rstrip("\n"), "newline"),
        (lambda n: n.replace("\n\n", "\n", 1), "signature block"),
        (lambda n: _tamper(n, "\u2014 ", "- "), "em dash"),
    ],
)
def test_tampered_notes_are_refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    note = CheckpointSigner(KEY, ORIGIN).sign(7, ROOT)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(change(note), KEY.public_key(), ORIGIN)


def test_every_single_character_change_is_refused() -> None:
    note = CheckpointSigner(KEY, ORIGIN).sign(7, ROOT)
    for position, character in enumerate(note):
        for replacement in {chr(ord(character) ^ 1), "A", "="} - {character}:
            changed = note[:position] + replacement + note[position + 1 :]
            with pytest.raises(CheckpointError):
                open_checkpoint(changed, KEY.public_key(), ORIGIN)


def test_unused_base64_padding_bits_are_not_ignored() -> None:
    note = CheckpointSigner(KEY, ORIGIN).sign(7, ROOT)
    root_line = note.split("\n")[2]  # 32 bytes: the last character carries 2 unused bits
    last = root_line[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    same_bytes = root_line[:-2] + twin + "="
    assert base64.b64decode(same_bytes) == base64.b64decode(root_line)
    with pytest.raises(CheckpointError, match="canonical base64"):
        open_checkpoint(note.replace(root_line, same_bytes), KEY.public_key(), ORIGIN)


def test_the_wrong_key_and_foreign_signatures() -> None:
    note = CheckpointSigner(KEY, ORIGIN).sign(7, ROOT)
    with pytest.raises(CheckpointError, match="no signature by the given key"):
        open_checkpoint(note, OTHER.public_key(), ORIGIN)
    # A witness's cosignature line beside the log's is allowed and ignored.
    witness = CheckpointSigner(OTHER, "witness.example/w1").sign(7, ROOT).split("\n\n")[1]
    cosigned = note + witness
    assert open_checkpoint(cosigned, KEY.public_key(), ORIGIN).size == 7
    with pytest.raises(CheckpointError):
        open_checkpoint(cosigned, OTHER.public_key(), ORIGIN)  # OTHER signed as the witness
