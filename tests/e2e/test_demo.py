"""`silogate demo` as a newcomer runs it: separate processes, tables, exit 0, nothing left over."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.audit.store import iter_records


@pytest.mark.slow
def test_demo_runs_end_to_end_and_stops_every_process(tmp_path: Path) -> None:
    outcome = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--people",
            "3000",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    out = outcome.stdout
    assert "civil-affairs: elderly living alone and party members per community" in out
    assert "org-department: residents aged 60+ and members per community" in out
    assert "PERMISSION_DENIED POLICY_DENIED" in out
    assert "budget left: civil-affairs" in out and "budget left: org-department" in out
    assert "grid-centre: cases per handler (keys from the data" in out
    assert "every process stopped" in out
    # Every server bound a port and wrote it; after the demo none of them is still listening.
    ports = [int(p.read_text()) for p in (tmp_path / "run").glob("*.port")]
    assert len(ports) == 5
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    # Each silo logged its own releases; the gateway's audit log has every query.
    civil_log = list(iter_records(tmp_path / "state" / "silo-civil"))
    assert sum(r["kind"] == "release" for r in civil_log) == 2  # civil affairs' silo asked twice
    audit = list(iter_records(tmp_path / "state" / "gateway" / "audit"))
    assert sum(r.get("decision") == "released" for r in audit) == 5
    # The grid centre's handlers came from the data: the record holds the delta and threshold.
    [handlers] = [r for r in audit if "key_delta" in r]
    assert handlers["key_delta"] == "1/1000000000" and handlers["key_thresholds"]["cases"] > 0
    assert sum(r.get("decision") == "denied" for r in audit) == 1
    # Both kinds of log were closed with a signed checkpoint that covers every record.
    for log, key in (("gateway/audit", "gateway-audit"), ("silo-civil", "silo-audit")):
        verified = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "audit", "verify"]
            + [str(tmp_path / "state" / log), "--key", str(tmp_path / "keys" / f"{key}.pub")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert verified.returncode == 0 and "warning" not in verified.stdout, verified.stdout
