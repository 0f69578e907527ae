"""`silogate audit reconcile`: real gateway and silo logs agree; each kind of tampering or loss
on either side is reported with the silo, the request id and what differs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import (
    XSS_RELEASED_ID,
    AuditScenario,
    audit_scenario,
    copy_logs,
    rewrite_records,
)

from gateway.audit.reconcile import parse_silo_log_argument, reconcile
from gateway.audit.store import iter_records
from gateway.cli import main


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, pki: Any, data_dir: Path) -> AuditScenario:
    return audit_scenario(tmp_path_factory, pki, data_dir)


def _run(
    capsys: pytest.CaptureFixture[str], gateway: Path, silos: dict[str, Path], *options: str
) -> tuple[int, list[dict[str, Any]]]:
    code = main(
        [
            "audit",
            "reconcile",
            str(gateway),
            *(f"{name}={path}" for name, path in silos.items()),
            "--format",
            "jsonl",
            *options,
        ]
    )
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _edit(
    request_id: str, kind: str, change: Callable[[dict[str, Any]], None]
) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    def edit(record: dict[str, Any]) -> dict[str, Any] | None:
        if record.get("request_id") == request_id and record.get("kind") == kind:
            change(record)
        return record

    return edit


def _released_record(gateway: Path, request_id: str) -> dict[str, Any]:
    return next(
        r
        for r in iter_records(gateway)
        if r.get("request_id") == request_id and r.get("decision") == "released"
    )


def test_the_real_logs_reconcile(scenario: AuditScenario, capsys) -> None:
    arguments = [str(path) for path in scenario.silo_logs.values()]  # named silo-<name>
    code = main(["audit", "reconcile", str(scenario.gateway_log), *arguments])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("reconciled: every release matches")
    for name, path in scenario.silo_logs.items():
        releases = sum(1 for r in iter_records(path) if r["kind"] == "release")
        # A failed query keeps the receipts of the silos that did answer.
        receipts = sum(
            1
            for r in scenario.gateway_records()
            if r.get("decision") in {"released", "failed"}
            for receipt in r.get("receipts", [])
            if receipt["silo"] == name
        )
        assert releases == receipts  # the scenario itself: every release has its receipt
        assert f"{name}: {releases} release(s) in its log, {receipts} receipt(s)" in out
    assert "civil: 0 release" not in out and "org: 0 release" not in out


def test_the_real_receipts_carry_the_silos_signatures(
    scenario: AuditScenario, pki: Any, capsys
) -> None:
    keys = [
        option
        for name in scenario.silo_logs
        for option in ("--silo-key", f"{name}={pki.receipt_keys(name).public}")
    ]
    arguments = [str(path) for path in scenario.silo_logs.values()]
    code = main(["audit", "reconcile", str(scenario.gateway_log), *arguments, *keys])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "civil: 0 receipt signature(s)" not in out
    assert "receipt signatures not checked" not in out
    code = main(["audit", "reconcile", str(scenario.gateway_log), *arguments, *keys[:2]])
    out = capsys.readouterr().out
    assert code == 0 and "receipt signatures not checked for" in out


def test_a_changed_digest_is_reported_with_both_values(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["civil-both"]
    original = next(
        r["digest"] for r in iter_records(silos["civil"]) if r.get("request_id") == request_id
    )
    rewrite_records(
        silos["civil"], _edit(request_id, "release", lambda r: r.update(digest="0" * 64))
    )
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["request_id"], m["problem"]) for m in found] == [
        ("civil", request_id, "DIGEST_DIFFERS")
    ]
    assert "0" * 64 in found[0]["detail"] and original in found[0]["detail"]
    assert found[0]["gateway_seq"] == _released_record(gateway, request_id)["seq"]
    assert isinstance(found[0]["silo_seq"], int)


def test_a_changed_cost_is_reported(scenario: AuditScenario, tmp_path: Path, capsys) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["org-activities"]
    rewrite_records(silos["org"], _edit(request_id, "release", lambda r: r.update(rho=["1/4"])))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["problem"]) for m in found] == [("org", "COST_DIFFERS")]
    assert "rho 1/4 charged in the silo's log" in found[0]["detail"]
    assert "leaves 1/8" in found[0]["detail"]


def test_a_multi_silo_cost_is_checked_per_silo(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    # Epsilon spends price every measure: the changed silo alone is named.
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["civil-both"]
    rewrite_records(silos["org"], _edit(request_id, "release", lambda r: r.update(rho=["1/16"])))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["problem"]) for m in found] == [("org", "COST_DIFFERS")]


def test_target_error_costs_are_checked_on_the_total(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    # Target-error spends cannot be priced from the record: the silos' shares must add up.
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["civil-target"]

    def raise_cost(record: dict[str, Any]) -> None:
        record["rho"] = [f"{record['rho'][0]}0"]  # ten times the accepted rho

    rewrite_records(silos["civil"], _edit(request_id, "release", raise_cost))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["request_id"], m["problem"]) for m in found] == [
        ("(all)", request_id, "COST_DIFFERS")
    ]
    assert "civil " in found[0]["detail"] and "org " in found[0]["detail"]
    # Without the org log the total cannot be told: nothing is claimed either way.
    code, found = _run(capsys, gateway, {"civil": silos["civil"]})
    assert (code, found) == (0, [])


def test_changed_query_fields_are_each_named(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["grid-rho"]

    def change(record: dict[str, Any]) -> None:
        record["consumer"] = "civil-affairs"
        record["scales"] = {
            measure: [scale * 2 for scale in scales] for measure, scales in record["scales"].items()
        }
        record["query"]["measures"][0]["filters"] = [
            {"column": "category", "op": "=", "values": ["noise"]}
        ]
        record["query"]["group_by"] = ["street"]

    rewrite_records(silos["events"], _edit(request_id, "release", change))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert {m["problem"] for m in found} == {
        "CONSUMER_DIFFERS",
        "SCALE_DIFFERS",
        "MEASURE_DIFFERS",
        "GROUP_BY_DIFFERS",
    }
    assert {(m["silo"], m["request_id"]) for m in found} == {("events", request_id)}
    consumer = next(m for m in found if m["problem"] == "CONSUMER_DIFFERS")
    assert "'civil-affairs' in the silo's log, 'grid-centre' in the gateway's" in consumer["detail"]


def test_a_release_the_gateway_did_not_record(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["org-v2"]
    renamed = "someone-else"
    rewrite_records(gateway, _edit(request_id, "query", lambda r: r.update(request_id=renamed)))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["request_id"], m["problem"]) for m in found] == [
        ("org", request_id, "NOT_IN_GATEWAY_LOG"),
        ("org", renamed, "RELEASE_MISSING"),
    ]


def test_a_failed_query_keeps_the_receipt_of_the_silo_that_answered(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    request_id = scenario.request_ids["civil-partial"]
    failed = next(r for r in scenario.gateway_records() if r.get("request_id") == request_id)
    assert failed["decision"] == "failed" and [r["silo"] for r in failed["receipts"]] == ["civil"]
    # Matched like a release (the clean run above passes); without the receipt it is reported.
    gateway, silos = copy_logs(scenario, tmp_path)
    rewrite_records(gateway, _edit(request_id, "query", lambda r: r.update(receipts=[])))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["request_id"], m["problem"]) for m in found] == [
        ("civil", request_id, "NOT_RELEASED_BY_GATEWAY")
    ]
    assert "recorded 'failed' (SILO_UNAVAILABLE)" in found[0]["detail"]
    assert found[0]["gateway_seq"] == failed["seq"]


def test_a_release_the_gateway_recorded_as_failed(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["civil-both"]

    def fail(record: dict[str, Any]) -> None:
        record.update(decision="failed", reason="SILO_UNAVAILABLE")
        del record["receipts"]

    rewrite_records(gateway, _edit(request_id, "query", fail))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["problem"]) for m in found] == [
        ("civil", "NOT_RELEASED_BY_GATEWAY"),
        ("org", "NOT_RELEASED_BY_GATEWAY"),
    ]
    assert "recorded 'failed' (SILO_UNAVAILABLE)" in found[0]["detail"]


def test_a_receipt_without_its_release(scenario: AuditScenario, tmp_path: Path, capsys) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["org-activities"]
    rewrite_records(
        silos["org"],
        lambda r: None if r.get("request_id") == request_id and r["kind"] == "release" else r,
    )
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["request_id"], m["problem"]) for m in found] == [
        ("org", request_id, "RELEASE_MISSING")
    ]
    assert found[0]["silo_seq"] is None


def test_a_receipt_from_another_silo_name(scenario: AuditScenario, tmp_path: Path, capsys) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["grid-rho"]

    def rename(record: dict[str, Any]) -> None:
        record["receipts"][0]["silo"] = "elsewhere"

    rewrite_records(gateway, _edit(request_id, "query", rename))
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    assert [(m["silo"], m["problem"]) for m in found] == [("events", "RECEIPT_MISSING")]
    assert "receipts from elsewhere" in found[0]["detail"]


def test_until_leaves_out_releases_still_in_flight(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    # The gateway writes its record after the silo answers: cut the gateway log just before a
    # release's record, as if reconciling while that release was in flight.
    gateway, silos = copy_logs(scenario, tmp_path)
    request_id = scenario.request_ids["civil-v2"]
    record = _released_record(gateway, request_id)
    rewrite_records(gateway, lambda r: r if r["seq"] < record["seq"] else None)
    code, found = _run(capsys, gateway, silos)
    assert code == 1
    # The cut also loses the record of the later civil-half-released query.
    assert [(m["silo"], m["request_id"], m["problem"]) for m in found] == [
        ("civil", scenario.request_ids["civil-partial"], "NOT_IN_GATEWAY_LOG"),
        ("civil", request_id, "NOT_IN_GATEWAY_LOG"),
    ]
    at = record["receipts"][0]["released_at"]
    code, found = _run(capsys, gateway, silos, "--until", at)
    assert (code, found) == (0, [])


def test_text_output_names_silo_request_and_difference(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    gateway, silos = copy_logs(scenario, tmp_path)
    rewrite_records(
        silos["org"], _edit(XSS_RELEASED_ID, "release", lambda r: r.update(purpose="other"))
    )
    code = main(["audit", "reconcile", str(gateway), *(str(p) for p in silos.values())])
    out = capsys.readouterr().out
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("PURPOSE_DIFFERS"))
    assert f"silo 'org', request '{XSS_RELEASED_ID}'" in line
    assert "purpose 'other' in the silo's log, 'volunteer-planning' in the gateway's" in line
    assert out.rstrip().endswith("1 mismatch(es)")


def test_unchecked_receipts_are_counted(scenario: AuditScenario, capsys) -> None:
    code = main(
        ["audit", "reconcile", str(scenario.gateway_log), f"civil={scenario.silo_logs['civil']}"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "org: " in out and "receipt(s) not checked (its log was not given)" in out


def test_silo_log_arguments(tmp_path: Path, capsys) -> None:
    assert parse_silo_log_argument(str(tmp_path / "silo-civil")).name == "civil"
    assert parse_silo_log_argument(str(tmp_path / "org")).name == "org"
    named = parse_silo_log_argument(f"health={tmp_path / 'x'}")
    assert (named.name, named.directory) == ("health", tmp_path / "x")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code = main(
        ["audit", "reconcile", str(tmp_path / "a"), f"x={tmp_path / 'a'}", f"x={tmp_path / 'b'}"]
    )
    assert code == 2
    assert "silo 'x' is given twice" in capsys.readouterr().err


def test_duplicate_releases_are_reported() -> None:
    gateway = [
        {
            "seq": 0,
            "kind": "query",
            "decision": "released",
            "request_id": "r",
            "consumer": "c",
            "purpose": "p",
            "policy_version": "v",
            "query": {"group_by": [], "measures": [{"id": "m", "spend": {"rho": "1/8"}}]},
            "rho": "1/8",
            "scales": {"m": 2.0},
            "receipts": [{"silo": "s", "digest": "d", "at": "2026-01-01T00:00:00+00:00"}],
        }
    ]
    release = {
        "kind": "release",
        "request_id": "r",
        "consumer": "c",
        "purpose": "p",
        "policy_version": "v",
        "query": {"group_by": [], "measures": [{"id": "m", "spend": {"rho": "1/8"}}]},
        "rho": ["1/8"],
        "scales": [2.0],
        "digest": "d",
    }
    clean = reconcile(gateway, {"s": [{**release, "seq": 1}]})
    assert clean.ok and clean.silo_releases["s"] == 1 and clean.receipts_checked["s"] == 1
    twice = reconcile(gateway, {"s": [{**release, "seq": 1}, {**release, "seq": 2}]})
    assert [(m.problem, m.silo_seq) for m in twice.mismatches] == [("DUPLICATE_RELEASE", 2)]
