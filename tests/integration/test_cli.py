"""The `silogate` command against the running system: query, budget, datasets, certs, data."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from ruamel.yaml import YAML

from gateway.cli import main


def _client_file(system, consumer: str, tmp_path: Path) -> Path:
    tls = system.pki.consumer(consumer)
    path = tmp_path / f"{consumer}.yaml"
    with path.open("w") as handle:
        YAML(typ="safe", pure=True).dump(
            {
                "address": system.address,
                "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
            },
            handle,
        )
    return path


def test_query_prints_a_table_and_json(system, tmp_path: Path, capsys) -> None:
    client = str(_client_file(system, "civil-affairs", tmp_path))
    common = ["query", "--client", client, "--purpose", "elderly-care-planning"]
    common += ["--dataset", "civil.residents", "--group-by", "district", "--epsilon", "0.5"]
    assert main([*common, "--where", "birth_year<=1966"]) == 0
    table = capsys.readouterr().out
    assert all(district in table for district in ("D01", "D02", "D03", "D04"))
    assert "±95%" in table and "cost ρ=0.125" in table
    assert main([*common, "--format", "json", "--request-id", "cli-json-1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["request_id"] == "cli-json-1"
    assert [g["keys"] for g in answer["groups"]] == [["D01"], ["D02"], ["D03"], ["D04"]]
    assert answer["cost"]["rho"] == "1/8"


def test_query_error_is_one_line_with_reason(system, tmp_path: Path, capsys) -> None:
    client = str(_client_file(system, "org-department", tmp_path))
    code = main(
        ["query", "--client", client, "--purpose", "volunteer-planning"]
        + ["--dataset", "health.chronic", "--epsilon", "0.5"]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["silogate: POLICY_DENIED: forbidden by rule 'no-health-data-to-org'"]


def test_budget_and_datasets(system, tmp_path: Path, capsys) -> None:
    client = str(_client_file(system, "grid-centre", tmp_path))
    assert main(["budget", "--client", client, "--format", "json"]) == 0
    scopes = {b["scope"] for b in json.loads(capsys.readouterr().out)}
    assert scopes == {
        "consumer:grid-centre/rule:grid-casework/lifetime",
        "consumer:grid-centre/rule:grid-handler-workload/lifetime",
        "population:city-residents/lifetime",
    }
    assert main(["datasets", "--client", client]) == 0
    out = capsys.readouterr().out
    assert "events.cases" in out and "civil.residents" not in out


def test_certs_init_and_data_generate(tmp_path: Path, capsys) -> None:
    assert main(["certs", "init", str(tmp_path / "certs"), "--silo", "a", "--consumer", "b"]) == 0
    assert {p.name for p in (tmp_path / "certs").iterdir()} >= {
        "ca.pem",
        "gateway.pem",
        "silo-a.pem",
        "consumer-b.key",
    }
    assert main(["certs", "init", str(tmp_path / "certs")]) == 2  # refuses to replace a CA
    assert "already holds a development CA" in capsys.readouterr().err
    assert main(["data", "generate", str(tmp_path / "data"), "--people", "500", "--seed", "3"]) == 0
    with duckdb.connect(str(tmp_path / "data" / "civil.duckdb"), read_only=True) as db:
        assert db.execute("SELECT count(*) FROM residents").fetchone() == (500,)


@pytest.mark.parametrize("flag", [False, True])
def test_reflection_only_behind_its_flag(system, tmp_path: Path, flag: bool) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from support import BackgroundLoop

    from gateway.crypto.channels import channel_credentials
    from gateway.server.app import start_gateway

    config = system.gateway_config.model_copy(
        update={"reflection": flag, "ledger": tmp_path / "l.sqlite", "audit": tmp_path / "a"}
    )
    loop = BackgroundLoop()
    gateway = loop.run(start_gateway(config))
    try:
        credentials = channel_credentials(system.pki.consumer("civil-affairs"))
        with grpc.secure_channel(f"127.0.0.1:{gateway.port}", credentials) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            if flag:
                response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
                names = {s.name for s in response.list_services_response.service}
                assert "gateway.api.v1.QueryService" in names
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    next(stub.ServerReflectionInfo(iter([request]), timeout=10))
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        loop.run(gateway.stop(0))
        loop.close()
