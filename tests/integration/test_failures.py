"""Failure semantics across processes: an unreachable silo, start-up errors of the servers."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from ruamel.yaml import YAML
from support import POLICY, BackgroundLoop, gateway_config, tls_config

from gateway.audit.store import iter_records
from gateway.client import ClientError, SilogateClient, count
from gateway.crypto.dev_ca import GATEWAY_IDENTITY
from gateway.server.app import start_gateway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_silo_fails_clearly_and_spends_nothing(system, tmp_path: Path) -> None:
    addresses = {name: system.silo_address(name) for name in system.silos}
    addresses["events"] = f"127.0.0.1:{_free_port()}"  # nothing listens there
    loop = BackgroundLoop()
    gateway = loop.run(start_gateway(gateway_config(tmp_path, system.pki, addresses)))
    tls = system.pki.consumer("grid-centre")
    try:
        with SilogateClient.connect(
            f"127.0.0.1:{gateway.port}", ca=tls.ca, cert=tls.cert, key=tls.key, retries=0
        ) as client:
            with pytest.raises(ClientError) as caught:
                client.query(
                    purpose="casework-monitoring",
                    measures=[count("cases", "events.cases", epsilon="0.5")],
                    request_id="to-a-dead-silo",
                )
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert caught.value.reason == "SILO_UNAVAILABLE"
            assert caught.value.metadata["silo"] == "events"
            assert caught.value.metadata["budget_spent"] == "false"
            assert all(
                b.spent.rho_value == 0 and b.reserved.rho_value == 0 for b in client.budget()
            )
    finally:
        loop.run(gateway.stop(0))
        loop.close()
    records = list(iter_records(tmp_path / "state" / "audit"))
    failed = [r for r in records if r.get("request_id") == "to-a-dead-silo"]
    assert len(failed) == 1 and failed[0]["decision"] == "failed"
    assert failed[0]["reason"] == "SILO_UNAVAILABLE"


def _write_config(path: Path, content: dict[str, object]) -> Path:
    with path.open("w") as handle:
        YAML(typ="safe", pure=True).dump(content, handle)
    return path


def _silo_config(tmp_path: Path, system, **changes: object) -> Path:
    tls = tls_config(system.pki.silo("civil"))
    content: dict[str, object] = {
        "silo": "civil",
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
        "policy": str(POLICY),
        "database": str(system.data / "civil.duckdb"),
        "release_log": str(tmp_path / "release-log"),
        "gateway_identity": GATEWAY_IDENTITY,
        "receipt_key": str(system.pki.receipt_keys("civil").private),
    }
    content.update(changes)
    return _write_config(tmp_path / "silo.yaml", content)


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "silo", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_data_file_is_one_line_and_non_zero(system, tmp_path: Path) -> None:
    outcome = _serve(_silo_config(tmp_path, system, database=str(tmp_path / "absent.duckdb")))
    assert outcome.returncode == 1
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and "DATA_MISSING" in lines[0] and "absent.duckdb" in lines[0]


def test_port_in_use_is_one_line_and_non_zero(system, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        outcome = _serve(_silo_config(tmp_path, system, listen=f"127.0.0.1:{port}"))
    assert outcome.returncode == 1
    lines = [line for line in outcome.stderr.strip().splitlines() if line.startswith("silogate:")]
    assert len(lines) == 1 and "PORT_IN_USE" in lines[0] and str(port) in lines[0]


def test_missing_certificate_is_one_line_and_non_zero(system, tmp_path: Path) -> None:
    tls = tls_config(system.pki.silo("civil"))
    missing = {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tmp_path / "nokey.pem")}
    outcome = _serve(_silo_config(tmp_path, system, tls=missing))
    assert outcome.returncode == 1
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and "CERTIFICATE_UNREADABLE" in lines[0] and "nokey.pem" in lines[0]


def test_gateway_refuses_a_server_that_is_not_the_named_silo(system, tmp_path: Path) -> None:
    """A certificate from the same CA is not enough: the civil silo cannot stand in for events."""
    addresses = {name: system.silo_address(name) for name in system.silos}
    addresses["events"] = system.silo_address("civil")
    loop = BackgroundLoop()
    gateway = loop.run(start_gateway(gateway_config(tmp_path, system.pki, addresses)))
    tls = system.pki.consumer("grid-centre")
    try:
        with (
            SilogateClient.connect(
                f"127.0.0.1:{gateway.port}", ca=tls.ca, cert=tls.cert, key=tls.key, retries=0
            ) as client,
            pytest.raises(ClientError) as caught,
        ):
            client.query(
                purpose="casework-monitoring",
                measures=[count("cases", "events.cases", epsilon="0.5")],
            )
    finally:
        loop.run(gateway.stop(0))
        loop.close()
    assert caught.value.reason == "SILO_UNAVAILABLE"
    assert caught.value.metadata["budget_spent"] == "false"


def test_sigterm_shuts_a_server_down_gracefully(system, tmp_path: Path) -> None:
    port_file = tmp_path / "silo.port"
    config = _silo_config(tmp_path, system)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gateway.cli", "serve", "silo"),
            *("--config", str(config), "--port-file", str(port_file)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(port_file.read_text())
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert process.stderr is not None
        assert b"shutting down" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
