"""The logs a real gateway and real silos write: contents, checkpoints, proofs, refused starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from audit_kit import AuditedSystem, audited_system, silogate
from support import BackgroundLoop, gateway_config

from gateway.audit.errors import AuditLogCorrupt
from gateway.audit.store import iter_records, list_segments
from gateway.server.app import start_gateway
from gateway.settings import AuditLogSettings


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, pki, data_dir: Path) -> AuditedSystem:
    return audited_system(tmp_path_factory, pki, data_dir)


def test_every_answer_a_client_got_is_in_the_log(audited: AuditedSystem) -> None:
    records = list(iter_records(audited.gateway_log))
    assert len(records) == 1000
    assert [r["seq"] for r in records] == list(range(1000))
    for request_id, sequence in audited.received.items():
        record = records[sequence]
        assert record["request_id"] == request_id and record["decision"] == "released"
        assert record["consumer"] == "civil-affairs" and record["policy_version"]
        assert {r["silo"] for r in record["receipts"]} == {"civil"}
        assert record["values"] and record["rho"] == "1/20000" and record["scales"]
        assert set(record["mechanisms"]) == {"aged"}
        # Cost and what is left, per budget scope (rho exact, epsilon at the scope's delta).
        assert record["cost"] and all(c["rho"] == "1/20000" for c in record["cost"].values())
        assert set(record["budget_left"]) == set(record["cost"])
        assert all(left["epsilon"] > 0 for left in record["budget_left"].values())
    kinds = {r["kind"] for r in records}
    assert {"policy_activated", "query", "explain"} <= kinds
    decisions = {r.get("decision") for r in records if r["kind"] == "query"}
    assert {"released", "denied", "rejected"} <= decisions


def test_the_gateway_and_silo_logs_verify(audited: AuditedSystem, pki, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    silo_keys = [
        option
        for name in audited.silo_logs
        for option in ("--silo-key", f"{name}={pki.receipt_keys(name).public}")
    ]
    code, out, err = silogate(
        "audit",
        "verify",
        audited.gateway_log,
        "--key",
        audited.gateway_key.public,
        "--state",
        state,
        *silo_keys,
    )
    assert code == 0 and err == "", out
    assert out.startswith("OK: 1000 records in ")
    assert "latest checkpoint: silogate/gateway size 1000 " in out
    assert "receipts of silo 'civil': " in out and " signature(s) verified" in out
    assert "not checked" not in out
    assert len(list_segments(audited.gateway_log)) > 1  # rotated by size on the way
    for name, directory in audited.silo_logs.items():
        code, out, _ = silogate(
            "audit", "verify", directory, "--key", audited.silo_key.public, *silo_keys
        )
        assert code == 0, (name, out)
        assert f"silogate/silo/{name}" in out
    # A receipt key of another silo: the civil receipts no longer verify.
    wrong = ["--silo-key", f"civil={pki.receipt_keys('org').public}"]
    code, out, _ = silogate(
        "audit", "verify", audited.gateway_log, "--key", audited.gateway_key.public, *wrong
    )
    assert code == 1 and "unknown receipt key id" in out


def test_a_real_release_is_proved_offline(audited: AuditedSystem, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.json"
    code, _, _ = silogate(
        "audit", "prove", audited.gateway_log, "--request-id", "released-5", "--out", bundle
    )
    assert code == 0
    code, out, _ = silogate("audit", "check-proof", bundle, "--key", audited.gateway_key.public)
    sequence = audited.received["released-5"]
    assert code == 0 and f"seq {sequence}: kind query, decision released" in out


def test_the_gateway_refuses_to_start_on_a_tail_it_cannot_verify(
    audited: AuditedSystem, pki, tmp_path: Path
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(audited.gateway_log, root / "state" / "audit")
    last = list_segments(root / "state" / "audit")[-1].path
    lines = last.read_bytes().splitlines(keepends=True)
    lines[-2] = lines[-2].replace(b'"kind":', b'"kind" :')
    last.write_bytes(b"".join(lines))
    config = gateway_config(
        root,
        pki,
        {},
        audit_log=AuditLogSettings(signing_key=audited.gateway_key.private),
    )
    loop = BackgroundLoop()
    try:
        with pytest.raises(AuditLogCorrupt) as caught:
            loop.run(start_gateway(config))
    finally:
        loop.close()
    assert caught.value.message.startswith(f"{last.name}:{len(lines) - 1}: not a canonical")
    assert "\n" not in caught.value.message
    # An auditor's verify points at the same line.
    code, out, err = silogate(
        "audit", "verify", root / "state" / "audit", "--key", audited.gateway_key.public
    )
    assert code == 1 and err == "" and f"{last.name}:{len(lines) - 1}" in out


def test_silogate_serve_refuses_a_damaged_log_in_one_line(
    audited: AuditedSystem, pki, tmp_path: Path
) -> None:
    audit = tmp_path / "audit"
    shutil.copytree(audited.gateway_log, audit, ignore=shutil.ignore_patterns(".lock"))
    last = list_segments(audit)[-1].path
    lines = last.read_bytes().splitlines(keepends=True)
    lines[0] = b"{}\n"
    last.write_bytes(b"".join(lines))
    config = gateway_config(
        tmp_path, pki, {}, audit_log=AuditLogSettings(signing_key=audited.gateway_key.private)
    ).model_copy(update={"audit": audit})
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    outcome = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "gateway", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outcome.returncode == 1
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("silogate:")]
    assert errors == [
        f"silogate: AUDIT_LOG_CORRUPT: {last.name}:1: expected sequence number "
        f"{list_segments(audit)[-1].first}"
    ]
    assert "Traceback" not in outcome.stderr


def test_the_package_exports() -> None:
    import gateway.audit

    assert gateway.audit.__all__ == [
        "AuditLog",
        "AuditLogOptions",
        "iter_records",
        "open_audit_log",
    ]
