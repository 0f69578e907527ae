"""``audit prove`` and ``audit check-proof``: self-contained bundles, checked offline."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from audit_kit import LogKey, make_key, query_record, silogate, write_log

from gateway.audit.log import AuditLog
from gateway.audit.proofs import check_proof


@pytest.fixture
def key(tmp_path: Path) -> LogKey:
    return make_key(tmp_path)


@pytest.fixture
def log_dir(tmp_path: Path, key: LogKey) -> Path:
    directory = tmp_path / "log"
    write_log(directory, key, 20, segment_max_bytes=4096)
    return directory


def prove(directory: Path, request_id: str, out: Path) -> tuple[int, str, str]:
    return silogate("audit", "prove", directory, "--request-id", request_id, "--out", out)


def test_a_bundle_proves_a_record_offline(tmp_path: Path, log_dir: Path, key: LogKey) -> None:
    bundle = tmp_path / "proof.json"
    assert prove(log_dir, "request-13", bundle)[0] == 0
    document = json.loads(bundle.read_text())
    assert document["format"] == "silogate-audit-proof/1"
    [entry] = document["entries"]
    assert entry["leaf_index"] == 13 and json.loads(entry["record"])["request_id"] == "request-13"
    # The log directory is not needed any more.
    moved = tmp_path / "elsewhere"
    log_dir.rename(moved)
    code, out, err = silogate("audit", "check-proof", bundle, "--key", key.public)
    assert code == 0 and err == ""
    assert out.startswith("OK: 1 record(s) are in the log 'test.silogate/audit' at size 20")
    assert "seq 13: kind query, decision released, consumer civil-affairs" in out


def test_every_record_of_a_request_is_proved(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    log = AuditLog(directory, signer=key.signer())
    log.append("query", query_record(0))
    log.append("query", {"request_id": "request-0", "decision": "replayed"})
    log.close()
    bundle = tmp_path / "proof.json"
    assert prove(directory, "request-0", bundle)[0] == 0
    result = check_proof(json.loads(bundle.read_text()), [key.public_key()])
    assert result.ok and [r["seq"] for r in result.proved] == [0, 1]


def _tampered(bundle: Path, change: Any) -> Path:
    document = json.loads(bundle.read_text())
    change(document)
    out = bundle.with_name("tampered.json")
    out.write_text(json.dumps(document))
    return out


def _flip_hash(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda d: d["entries"][0].update(
                record=d["entries"][0]["record"].replace("civil-affairs", "civil-affairz")
            ),
            "entry 0: inclusion proof: the inclusion proof leads to a different root",
        ),
        (
            lambda d: d["entries"][0].update(leaf_index=12),
            "entry 0: record: the record's sequence number is not its leaf index 12",
        ),
        (
            lambda d: d["entries"][0]["inclusion_proof"].__setitem__(
                0, _flip_hash(d["entries"][0]["inclusion_proof"][0])
            ),
            "entry 0: inclusion proof: the inclusion proof leads to a different root",
        ),
        (
            lambda d: d["entries"][0]["inclusion_proof"].pop(),
            "entry 0: inclusion proof: the proof has 4 hashes, fewer than the path is long",
        ),
        (
            lambda d: d.update(checkpoint=d["checkpoint"].replace("\n20\n", "\n21\n")),
            "checkpoint: the signature does not verify with the given key",
        ),
        (lambda d: d.update(request_id="someone-else"), "is not about request 'someone-else'"),
        (lambda d: d.update(format="v0"), "not a proof bundle"),
        (
            lambda d: d["entries"][0].update(record=d["entries"][0]["record"].replace(":", ": ")),
            "entry 0: record: not in canonical form",
        ),
    ],
)
def test_a_tampered_bundle_is_refused(
    tmp_path: Path,
    log_dir: Path,
    key: LogKey,
    change: Any,
    problem: str,
) -> None:
    bundle = tmp_path / "proof.json"
    assert prove(log_dir, "request-13", bundle)[0] == 0
    code, out, err = silogate(
        "audit", "check-proof", _tampered(bundle, change), "--key", key.public
    )
    assert code == 1 and err == ""
    assert out.startswith("FAILED") and problem in out


def test_the_wrong_key_and_unreadable_bundles(tmp_path: Path, log_dir: Path) -> None:
    bundle = tmp_path / "proof.json"
    assert prove(log_dir, "request-3", bundle)[0] == 0
    other = make_key(tmp_path, "other")
    code, out, _ = silogate("audit", "check-proof", bundle, "--key", other.public)
    assert code == 1 and "no signature by the given key" in out
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01{{")
    code, out, err = silogate("audit", "check-proof", garbage, "--key", other.public)
    assert code == 1 and "garbage.json: unreadable" in out and err == ""


def test_what_cannot_be_proved(tmp_path: Path, log_dir: Path, key: LogKey) -> None:
    code, _, err = prove(log_dir, "never-asked", tmp_path / "p.json")
    assert code == 1 and err.startswith("silogate: AUDIT_RECORD_NOT_FOUND:")
    log = AuditLog(log_dir, signer=key.signer())
    log.append("query", {"request_id": "just-now", "decision": "denied"})
    log._release()  # stopped before the next checkpoint
    code, _, err = prove(log_dir, "just-now", tmp_path / "p.json")
    assert code == 1 and err.startswith("silogate: AUDIT_NOT_YET_CHECKPOINTED:")
    assert "is not yet covered by a signed checkpoint" in err
