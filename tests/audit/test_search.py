"""`silogate audit search` on logs written by the real gateway: filters, formats, bad input."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import (
    XSS_PURPOSE,
    XSS_RELEASED_ID,
    XSS_REQUEST_ID,
    AuditScenario,
    audit_scenario,
    copy_logs,
)
from rich.console import Console

from gateway.audit.search import COLUMNS, RecordFilter, parse_time, search_table
from gateway.audit.store import list_segments
from gateway.cli import build_parser, main


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, pki: Any, data_dir: Path) -> AuditScenario:
    return audit_scenario(tmp_path_factory, pki, data_dir)


def _search(capsys: pytest.CaptureFixture[str], log: Path, *options: str) -> list[dict[str, Any]]:
    code = main(["audit", "search", str(log), "--format", "jsonl", *options])
    out = capsys.readouterr().out
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def _ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["request_id"] for r in records if "request_id" in r}


def test_consumer_and_decision_filters_combine(scenario: AuditScenario, capsys) -> None:
    ids = scenario.request_ids
    found = _search(
        capsys,
        scenario.gateway_log,
        "--consumer",
        "org-department",
        "--decision",
        "released",
    )
    assert _ids(found) == {ids["org-activities"], ids["xss-released"], ids["org-v2"]}
    assert all(r["kind"] == "query" for r in found)
    # A filter given twice accepts either value.
    both = _search(capsys, scenario.gateway_log, "--decision", "denied", "--decision", "rejected")
    assert {ids["org-denied"], ids["health-research"], ids["rejected"]} <= _ids(both)
    assert {r["decision"] for r in both} == {"denied", "rejected"}


def test_dataset_filter_matches_any_measure_of_a_query(scenario: AuditScenario, capsys) -> None:
    ids = scenario.request_ids
    found = _search(capsys, scenario.gateway_log, "--dataset", "org.members", "--kind", "query")
    # civil-both-silos asks civil.residents and org.members: one matching measure is enough.
    assert _ids(found) == {
        ids["civil-both"],
        ids["civil-cached"],
        ids["civil-target"],
        ids["xss-refused"],
        ids["xss-released"],
        ids["org-v2"],
        ids["civil-partial"],
    }
    assert all("org.members" in {m["dataset"] for m in r["query"]["measures"]} for r in found)


def test_purpose_and_kind_filters(scenario: AuditScenario, capsys) -> None:
    research = _search(capsys, scenario.gateway_log, "--purpose", "research")
    assert _ids(research) == {scenario.request_ids["health-research"]}
    assert research[0]["decision"] == "denied"
    activations = _search(capsys, scenario.gateway_log, "--kind", "policy_activated")
    assert len(activations) == 2
    assert activations[0]["policy_version"] != activations[1]["policy_version"]
    explains = _search(capsys, scenario.gateway_log, "--kind", "explain")
    assert [r["consumer"] for r in explains] == ["civil-affairs"]


def test_time_window_splits_the_log_at_a_record(scenario: AuditScenario, capsys) -> None:
    records = scenario.gateway_records()
    second = [r for r in records if r["kind"] == "policy_activated"][1]
    boundary = second["time"]
    before = _search(capsys, scenario.gateway_log, "--until", boundary)
    after = _search(capsys, scenario.gateway_log, "--since", boundary)
    # --since is inclusive and --until exclusive, so the two windows split the log exactly
    # (records written in the same millisecond fall on the same side).
    assert [r["seq"] for r in before] + [r["seq"] for r in after] == [r["seq"] for r in records]
    assert second["seq"] == after[0]["seq"]
    assert scenario.request_ids["org-v2"] in _ids(after)
    assert scenario.request_ids["org-v2"] not in _ids(before)
    # A window without a zone is read as UTC: the same instant written two ways agrees.
    naive = parse_time(boundary).replace(tzinfo=None).isoformat()
    assert _search(capsys, scenario.gateway_log, "--since", naive) == after


def test_policy_version_prefix(scenario: AuditScenario, capsys) -> None:
    activations = [r for r in scenario.gateway_records() if r["kind"] == "policy_activated"]
    second = activations[1]["policy_version"]
    found = _search(
        capsys, scenario.gateway_log, "--policy-version", second[:10], "--kind", "query"
    )
    ids = scenario.request_ids
    assert _ids(found) == {ids["org-v2"], ids["civil-v2"], ids["grid-failed"], ids["civil-partial"]}
    assert {r["policy_version"] for r in found} == {second}


def test_limit_stops_after_that_many_matches(scenario: AuditScenario, capsys) -> None:
    found = _search(capsys, scenario.gateway_log, "--kind", "query", "--limit", "2")
    every = _search(capsys, scenario.gateway_log, "--kind", "query")
    assert found == every[:2] and len(every) > 2


def test_csv_has_the_stable_columns_and_keeps_strings_exact(
    scenario: AuditScenario, capsys
) -> None:
    code = main(
        [
            "audit",
            "search",
            str(scenario.gateway_log),
            "--consumer",
            "org-department",
            "--format",
            "csv",
        ]
    )
    assert code == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert tuple(rows[0]) == COLUMNS
    by_id = {
        row[COLUMNS.index("request_id")]: dict(zip(COLUMNS, row, strict=True)) for row in rows[1:]
    }
    released = by_id[XSS_RELEASED_ID]  # markup and quotes survive CSV quoting unchanged
    assert released["decision"] == "released"
    assert released["rho"] == "1/32"
    assert released["datasets"] == "org.members"
    assert released["rules"] == "org-volunteer-planning"
    assert by_id[XSS_REQUEST_ID]["purpose"] == XSS_PURPOSE
    first = dict(zip(COLUMNS, rows[1], strict=True))
    assert first["seq"].isdigit() and first["time"].startswith("20")


def test_csv_shows_what_a_failed_query_kept_charged(scenario: AuditScenario, capsys) -> None:
    request_id = scenario.request_ids["civil-partial"]
    code = main(
        [
            "audit",
            "search",
            str(scenario.gateway_log),
            "--request-id",
            request_id,
            "--format",
            "csv",
        ]
    )
    assert code == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["decision"], row["rho"], row["charged_rho"]) == ("failed", "1/4", "1/8")
    assert row["reason"] == "SILO_UNAVAILABLE"
    assert row["datasets"] == "civil.residents;org.members"


def test_table_is_plain_text(scenario: AuditScenario, capsys) -> None:
    code = main(["audit", "search", str(scenario.gateway_log), "--consumer", "org-department"])
    out = capsys.readouterr().out
    assert code == 0
    assert "org-activities" in out and "POLICY_DENIED" in out
    assert "record(s)" in out
    # Rich markup and terminal control sequences in caller strings are shown, not obeyed.
    record = {
        "seq": 1,
        "kind": "query",
        "purpose": "[bold red]urgent[/bold red]",
        "request_id": "id\x1b[2J\u202ehidden",
    }
    console = Console(record=True, width=200, color_system=None)
    console.print(search_table([record]))
    text = console.export_text()
    assert "[bold red]urgent[/bold red]" in text
    assert "\x1b" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text and "\\u202e" in text


def test_no_match_prints_so(scenario: AuditScenario, capsys) -> None:
    assert main(["audit", "search", str(scenario.gateway_log), "--consumer", "nobody"]) == 0
    assert "no records match" in capsys.readouterr().out


def test_bad_arguments_are_usage_errors(scenario: AuditScenario, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "search", str(scenario.gateway_log), "--since", "yesterday"])
    assert exited.value.code == 2
    assert "'yesterday' is not an ISO 8601 time" in capsys.readouterr().err
    assert main(["audit", "search", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    code = main(
        [
            "audit",
            "search",
            str(scenario.gateway_log),
            "--since",
            "2026-01-02",
            "--until",
            "2026-01-01",
        ]
    )
    assert code == 2
    assert "is not before --until" in capsys.readouterr().err


def test_a_corrupt_log_is_reported_not_crashed_on(
    scenario: AuditScenario, tmp_path: Path, capsys
) -> None:
    gateway, _ = copy_logs(scenario, tmp_path)
    segment = list_segments(gateway)[0].path
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[3] = b'{"seq": 3, "kind": \n'  # a complete line that is not a record
    segment.write_bytes(b"".join(lines))
    assert main(["audit", "search", str(gateway)]) == 1
    err = capsys.readouterr().err
    assert "AUDIT_LOG_CORRUPT" in err and f"{segment.name}:4" in err


def test_record_filter_reads_odd_records_without_failing() -> None:
    odd = {"seq": 1, "kind": 3, "consumer": None, "query": {"measures": "x"}, "time": "later"}
    assert RecordFilter().matches(odd)
    assert not RecordFilter(datasets=frozenset({"a"})).matches(odd)
    assert not RecordFilter(since=parse_time("2026-01-01")).matches(odd)  # no readable time
    assert not RecordFilter(kinds=frozenset({"query"})).matches(odd)


def test_every_command_in_the_auditors_guide_parses() -> None:
    guide = Path(__file__).resolve().parents[2] / "docs" / "auditors.md"
    blocks = re.findall(r"```sh\n(.*?)```", guide.read_text(encoding="utf-8"), re.S)
    commands = [
        line
        for block in blocks
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("silogate audit")
    ]
    documented = {shlex.split(c)[2] for c in commands}
    assert documented == {
        "keygen",
        "verify",
        "prove",
        "check-proof",
        "search",
        "report",
        "reconcile",
    }
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)
        if ">" in words:
            words = words[: words.index(">")]
        args = parser.parse_args(words[1:])  # exits (a failed test) on an unknown option
        assert callable(args.handler), command
