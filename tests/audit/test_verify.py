"""``silogate audit verify`` on good and damaged logs: precise findings, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from audit_kit import (
    CIVIL_RECEIPTS,
    ORIGIN,
    LogKey,
    civil_receipt,
    make_key,
    query_record,
    silogate,
    write_log,
    write_receipt_public_key,
)
from Crypto.PublicKey import ECC

from gateway.audit import jcs
from gateway.audit.log import AuditLog, AuditLogOptions
from gateway.audit.merkle import leaf_hash
from gateway.audit.store import list_segments
from gateway.audit.verify import verify_with_keys
from gateway.silo.receipt import ReceiptSigner


@pytest.fixture
def key(tmp_path: Path) -> LogKey:
    return make_key(tmp_path)


@pytest.fixture
def log_dir(tmp_path: Path, key: LogKey) -> Path:
    directory = tmp_path / "log"
    write_log(directory, key, 30, segment_max_bytes=6500, checkpoint_every_records=5)
    return directory


def verify(directory: Path, key: LogKey, *more: str | Path) -> tuple[int, str]:
    code, out, err = silogate("audit", "verify", directory, "--key", key.public, *more)
    assert err == ""  # findings go to stdout; nothing escapes as a traceback
    assert code in (0, 1)
    return code, out


def _segment_lines(directory: Path, index: int) -> tuple[Path, list[bytes]]:
    path = list_segments(directory)[index].path
    return path, path.read_bytes().splitlines(keepends=True)


def test_a_good_log_verifies(log_dir: Path, key: LogKey) -> None:
    code, out = verify(log_dir, key)
    assert code == 0
    assert out.startswith("OK: 30 records in ")
    assert f"latest checkpoint: {ORIGIN} size 30 " in out


def test_a_corrupt_line_is_named_by_file_line_and_sequence(log_dir: Path, key: LogKey) -> None:
    path, lines = _segment_lines(log_dir, 1)
    first = list_segments(log_dir)[1].first
    lines[2] = b'{"seq": broken\n'
    path.write_bytes(b"".join(lines))
    code, out = verify(log_dir, key)
    assert code == 1
    assert f"  {path.name}:3 (seq {first + 2}): not a record: not JSON" in out
    # The changed bytes also change the tree: the checkpoints after it say so.
    assert "the records do not match the root signed for size" in out


def test_a_changed_but_well_formed_record_is_caught_by_its_checkpoint(
    log_dir: Path, key: LogKey
) -> None:
    path, lines = _segment_lines(log_dir, 0)
    lines[1] = lines[1].replace(b"civil-affairs", b"civil-affairz")
    assert jcs.is_canonical(lines[1].rstrip(b"\n"))
    path.write_bytes(b"".join(lines))
    code, out = verify(log_dir, key)
    assert code == 1
    # Checkpoints fell at each rotation (every 6 records here): the first one after the change
    # narrows it down to its segment.
    assert "the records do not match the root signed for size 6: a record in 0..5" in out
    assert f"({path.name} lines 1..6)" in out


def test_deleted_duplicated_and_reordered_records(
    tmp_path: Path, log_dir: Path, key: LogKey
) -> None:
    path, lines = _segment_lines(log_dir, 0)
    original = b"".join(lines)
    variants = {
        "deleted": (lines[:2] + lines[3:], ":3 (seq 2): sequence number 3, expected 2"),
        "duplicated": (lines[:3] + lines[2:], ":4 (seq 3): sequence number 2, expected 3"),
        "reordered": (
            lines[:2] + [lines[3], lines[2]] + lines[4:],
            ":3 (seq 2): sequence number 3, expected 2",
        ),
    }
    for name, (changed, finding) in variants.items():
        path.write_bytes(b"".join(changed))
        code, out = verify(log_dir, key)
        assert code == 1, name
        assert f"  {path.name}{finding}" in out, name
    path.write_bytes(original)
    assert verify(log_dir, key)[0] == 0


def test_truncated_files(log_dir: Path, key: LogKey) -> None:
    segments = list_segments(log_dir)
    middle = segments[1].path
    data = middle.read_bytes()
    middle.write_bytes(data[:-7])  # an old segment cut inside its last record
    code, out = verify(log_dir, key)
    assert code == 1 and f"{middle.name}:" in out and "the line is cut short" in out
    middle.write_bytes(data)
    last = segments[-1].path
    last_data = last.read_bytes()
    last.write_bytes(last_data[: last_data.rstrip(b"\n").rfind(b"\n") + 1])  # drop a record
    code, out = verify(log_dir, key)
    assert code == 1
    assert "a checkpoint for size 30, but the log has only 29 records" in out


def test_a_missing_segment_or_segment_start(log_dir: Path, key: LogKey) -> None:
    segments = list_segments(log_dir)
    gone = segments[1]
    hidden = gone.path.with_name("hidden")
    gone.path.rename(hidden)
    code, out = verify(log_dir, key)
    assert code == 1
    assert (
        f"records {gone.first}..{segments[2].first - 1} are missing (a segment was removed)" in out
    )
    hidden.rename(gone.path)
    gone.start_path.unlink()
    code, out = verify(log_dir, key)
    assert code == 1 and f"{gone.start_path.name}: missing" in out


def test_the_wrong_key(tmp_path: Path, log_dir: Path) -> None:
    other = make_key(tmp_path, "other")
    code, out = verify(log_dir, other)
    assert code == 1 and "checkpoints.jsonl:1: no signature by the given key" in out
    not_a_key = tmp_path / "not-a-key.pub"
    not_a_key.write_text("hello\n")
    code, out, err = silogate("audit", "verify", log_dir, "--key", not_a_key)
    assert code == 1 and err.startswith("silogate: KEY_UNREADABLE:") and err.count("\n") == 1


def test_a_checkpoint_for_a_size_the_log_does_not_have(log_dir: Path, key: LogKey) -> None:
    # Even correctly signed (the key leaked, or a checkpoint from a forked log).
    note = key.signer().sign(35, leaf_hash(b"a tree with more records"))
    with (log_dir / "checkpoints.jsonl").open("ab") as handle:
        handle.write(jcs.canonicalize({"note": note}) + b"\n")
    code, out = verify(log_dir, key)
    assert code == 1
    assert "a checkpoint for size 35, but the log has only 30 records" in out


def test_a_second_root_for_one_size_is_reported(log_dir: Path, key: LogKey) -> None:
    note = key.signer().sign(30, leaf_hash(b"another tree"))
    with (log_dir / "checkpoints.jsonl").open("ab") as handle:
        handle.write(jcs.canonicalize({"note": note}) + b"\n")
    code, out = verify(log_dir, key)
    assert code == 1 and "a second, different root for size 30" in out


def test_an_edited_published_checkpoint(log_dir: Path, key: LogKey) -> None:
    published = log_dir / "checkpoint"
    published.write_text(published.read_text().replace("\n30\n", "\n31\n"))
    code, out = verify(log_dir, key)
    assert code == 1 and "checkpoint: does not verify" in out


def test_a_line_above_the_record_limit_is_reported_not_read(log_dir: Path, key: LogKey) -> None:
    path, lines = _segment_lines(log_dir, -1)
    lines.insert(1, b"[" + b"1," * 5000 + b"1]\n")
    path.write_bytes(b"".join(lines))
    report = verify_with_keys(log_dir, [key.public_key()], max_record_bytes=4096)
    assert not report.ok
    assert "a line of 10003 bytes, above the record limit 4096" in report.render()


def test_garbage_and_empty_directories(tmp_path: Path, log_dir: Path, key: LogKey) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = verify(empty, key)
    assert code == 1 and "no segment files" in out
    code, out = verify(tmp_path / "nowhere", key)
    assert code == 1 and "not a directory" in out
    path = list_segments(log_dir)[0].path
    path.write_bytes(bytes(range(256)) * 10)
    code, out = verify(log_dir, key)
    assert code == 1 and f"{path.name}:1 (seq 0): not a record" in out
    (log_dir / "checkpoints.jsonl").write_bytes(b"\x00\xff garbage\n")
    code, out = verify(log_dir, key)
    assert code == 1 and "checkpoints.jsonl:1: not a checkpoint line" in out


def test_the_state_file_proves_the_log_only_grew(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    state = tmp_path / "auditor-state.json"
    write_log(directory, key, 10)
    code, out = verify(directory, key, "--state", state)
    assert code == 0 and "now remembers size 10" in out
    assert json.loads(state.read_text())["note"].split("\n")[1] == "10"
    before = tmp_path / "log-at-10"
    shutil.copytree(directory, before)
    (before / ".lock").unlink()
    log = AuditLog(directory, signer=key.signer())
    for number in range(10, 25):
        log.append("query", query_record(number))
    log.close()
    code, out = verify(directory, key, "--state", state)
    assert code == 0 and "consistent with the checkpoint verified before (size 10 -> 25)" in out
    # The operator puts back the old log: the auditor's state says it had grown.
    code, out = verify(before, key, "--state", state)
    assert code == 1 and "the log was rolled back" in out
    # A different history of the same length, signed with the same key: a fork.
    fork = tmp_path / "fork"
    log = AuditLog(fork, signer=key.signer())
    for number in range(25):
        log.append("query", query_record(1000 + number))
    log.close()
    code, out = verify(fork, key, "--state", state)
    assert code == 1 and "not an extension of the checkpoint verified before (size 25)" in out
    assert json.loads(state.read_text())["note"].split("\n")[1] == "25"  # not overwritten


def _grow(directory: Path, key: LogKey, start: int, end: int) -> None:
    log = AuditLog(directory, signer=key.signer(), options=AuditLogOptions(segment_max_bytes=6500))
    for number in range(start, end):
        log.append("query", query_record(number))
    log.close()


def test_with_a_state_file_only_the_new_records_are_checked_again(
    tmp_path: Path, key: LogKey
) -> None:
    directory = tmp_path / "log"
    state = tmp_path / "auditor-state.json"
    write_log(directory, key, 12, segment_max_bytes=6500, checkpoint_every_records=5)
    code, out = verify(directory, key, "--state", state)
    assert code == 0 and out.startswith("OK: 12 records") and "checked from" not in out
    assert len(json.loads(state.read_text())["frontier"]) == 2  # 12 = 8 + 4
    _grow(directory, key, 12, 30)
    code, out = verify(directory, key, "--state", state)
    assert code == 0, out
    assert out.startswith("OK: 18 records")  # 12..29: the 12 before were checked last time
    assert "checked from sequence number 12 on (--full checks every record again)" in out
    assert "consistent with the checkpoint verified before (size 12 -> 30)" in out
    assert "now remembers size 30" in out

    # A record the last run covered is edited on disk: an incremental run does not read it
    # again (it proves the new records extend what was verified); --full does, and says so.
    path, lines = _segment_lines(directory, 0)
    lines[3] = lines[3].replace(b"request-3", b"request-X")
    path.write_bytes(b"".join(lines))
    _grow(directory, key, 30, 33)
    code, out = verify(directory, key, "--state", state)
    assert code == 0 and out.startswith("OK: 3 records"), out
    code, out = verify(directory, key, "--state", state, "--full")
    assert code == 1 and "the records do not match the root signed" in out
    assert json.loads(state.read_text())["note"].split("\n")[1] == "33"  # not overwritten
    lines[3] = lines[3].replace(b"request-X", b"request-3")
    path.write_bytes(b"".join(lines))

    # A record after the remembered size is edited: its checkpoint catches it.
    _grow(directory, key, 33, 40)
    path, lines = _segment_lines(directory, -1)
    lines[-1] = lines[-1].replace(b"request-39", b"request-Y")
    path.write_bytes(b"".join(lines))
    code, out = verify(directory, key, "--state", state)
    assert code == 1 and "do not match the root signed for size 40" in out, out


def test_a_state_file_without_its_frontier_checks_everything(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    state = tmp_path / "saved.state"
    write_log(directory, key, 12)
    note = (directory / "checkpoint").read_text()
    state.write_text(json.dumps({"note": note}))  # a saved note, as the auditor guide shows
    _grow(directory, key, 12, 20)
    code, out = verify(directory, key, "--state", state)
    assert code == 0 and out.startswith("OK: 20 records") and "checked from" not in out
    assert "consistent with the checkpoint verified before (size 12 -> 20)" in out
    # A frontier that is not the remembered tree's is refused, and everything is checked.
    document = json.loads(state.read_text())
    document["frontier"] = document["frontier"][::-1]
    state.write_text(json.dumps(document))
    code, out = verify(directory, key, "--state", state)
    assert code == 1 and "the remembered frontier is unusable" in out
    assert "OK" not in out and "20 records" in out


def test_an_incremental_run_sees_a_fork_and_removed_records(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    state = tmp_path / "auditor-state.json"
    write_log(directory, key, 12, segment_max_bytes=6500)
    assert verify(directory, key, "--state", state)[0] == 0
    # Another history, longer than the remembered one, signed with the same key.
    fork = tmp_path / "fork"
    log = AuditLog(fork, signer=key.signer())
    for number in range(20):
        log.append("query", query_record(500 + number))
    log.close()
    code, out = verify(fork, key, "--state", state)
    assert code == 1 and "not an extension of the checkpoint verified before (size 12)" in out
    # The records the state covers were cut from the last segment.
    path, lines = _segment_lines(directory, -1)
    path.write_bytes(b"".join(lines[:-2]))
    code, out = verify(directory, key, "--state", state)
    assert code == 1 and "records were removed" in out, out


def test_uncovered_records_are_a_warning(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    log = AuditLog(directory, signer=key.signer())
    for number in range(3):
        log.append("query", query_record(number))
    # As after a crash: the records are durable, the next checkpoint never came.
    log._release()
    code, out = verify(directory, key)
    assert code == 0
    assert "records 0..2 are not yet covered by a signed checkpoint" in out


def test_a_released_query_needs_silo_receipts(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    log = AuditLog(directory, signer=key.signer())
    log.append("query", query_record(0))
    without = query_record(1)
    del without["receipts"]
    log.append("query", without)
    bad_digest = query_record(2)
    bad_digest["receipts"][0]["digest"] = "xyz"
    log.append("query", bad_digest)
    old_shape = query_record(3)
    old_shape["receipts"] = [{"silo": "civil", "digest": "ab" * 32, "at": "2026-01-01T00:00:00Z"}]
    log.append("query", old_shape)
    other_request = query_record(4)
    other_request["receipts"] = [civil_receipt(5)]
    log.append("query", other_request)
    twice = query_record(5)
    twice["receipts"] = [civil_receipt(5), civil_receipt(5)]
    log.append("query", twice)
    log.close()
    code, out = verify(directory, key)
    assert code == 1
    assert "segment-000000000000.jsonl:2 (seq 1): a released query without silo receipts" in out
    assert ":3 (seq 2): the receipt's digest is not a SHA-256 in hex" in out
    assert ":4 (seq 3): the receipt lacks datasets, key_id, query_digest, released_at," in out
    assert ":5 (seq 4): the receipt of silo 'civil' names another request id" in out
    assert ":6 (seq 5): two receipts from silo 'civil'" in out
    assert "FAILED: 5 failure(s)" in out


def test_receipt_signatures_are_checked_with_the_silo_keys(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    civil_pub = write_receipt_public_key(tmp_path / "civil-receipts.pub")
    log = AuditLog(directory, signer=key.signer())
    for number in range(3):
        log.append("query", query_record(number))
    health = ReceiptSigner(ECC.construct(curve="Ed25519", seed=bytes(32)))
    two_silos = query_record(3)
    two_silos["receipts"].append({**civil_receipt(3, health), "silo": "health"})
    log.append("query", two_silos)
    failed = query_record(4)
    failed.update(decision="failed")  # keeps the receipt of the silo that answered
    log.append("query", failed)
    log.append("explain", {"request_id": "explain-1"})
    log.close()

    code, out = verify(directory, key, "--silo-key", f"civil={civil_pub}")
    assert code == 0, out
    assert "receipts of silo 'civil': 5 signature(s) verified" in out
    assert "receipts of silo 'health': 1 not checked (no key given: --silo-key health=PUB)" in out

    # Without any silo key: every receipt is complete, none is checked, the log still verifies.
    code, out = verify(directory, key)
    assert code == 0
    assert "receipts of silo 'civil': 5 not checked" in out


def test_a_tampered_receipt_is_reported_with_file_line_and_seq(tmp_path: Path, key: LogKey) -> None:
    """A receipt edited before the record was logged (the gateway's log is intact, its
    checkpoints sign the edited record): only the silo's signature can tell."""
    directory = tmp_path / "log"
    civil_pub = write_receipt_public_key(tmp_path / "civil-receipts.pub")
    log = AuditLog(directory, signer=key.signer(), options=AuditLogOptions(segment_max_bytes=4096))
    for number in range(12):
        record = query_record(number)
        if number == 9:
            record["receipts"][0]["rho"] = "1/2000"  # the gateway claims a smaller cost
        if number == 10:
            forged = ReceiptSigner(ECC.construct(curve="Ed25519", seed=bytes(32)))
            forged.key_id = CIVIL_RECEIPTS.key_id
            record["receipts"] = [civil_receipt(number, forged)]
        log.append("query", record)
    log.close()
    segments = list_segments(directory)
    assert len(segments) > 1  # the findings name the segment holding each record
    code, out = verify(directory, key, "--silo-key", f"civil={civil_pub}")
    assert code == 1
    ninth = next(s for s in reversed(segments) if s.first <= 9)
    assert (
        f"{ninth.name}:{9 - ninth.first + 1} (seq 9): the receipt of silo 'civil': "
        "the receipt's digest does not match its statement"
    ) in out
    tenth = next(s for s in reversed(segments) if s.first <= 10)
    assert (
        f"{tenth.name}:{10 - tenth.first + 1} (seq 10): the receipt of silo 'civil': bad "
        "signature: it does not verify with the silo's receipt key"
    ) in out
    assert "FAILED: 2 failure(s)" in out
    # A wrong key for the silo: every receipt is from an unknown key.
    other = tmp_path / "other.pub"
    other.write_text(ECC.generate(curve="ed25519").public_key().export_key(format="PEM"))
    code, out = verify(directory, key, "--silo-key", f"civil={other}")
    assert code == 1 and "unknown receipt key id" in out
    # Both keys (a rotation): the right one is picked by key id.
    code, out = verify(
        directory, key, "--silo-key", f"civil={other}", "--silo-key", f"civil={civil_pub}"
    )
    assert "FAILED: 2 failure(s)" in out


def test_a_silo_release_log_is_checked_with_its_key(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "silo-civil"
    civil_pub = write_receipt_public_key(tmp_path / "civil-receipts.pub")
    log = AuditLog(directory, signer=key.signer("silogate/silo/civil"))
    for number in range(3):
        receipt = civil_receipt(number)
        entry = {"request_id": f"request-{number}", "digest": receipt["digest"]}
        if number == 1:
            entry["digest"] = "0" * 64  # the record says another release than its receipt
        log.append("release", {**entry, "receipt": receipt})
    log.append("release", {"request_id": "request-3"})
    log.close()
    code, out = verify(directory, key, "--silo-key", f"civil={civil_pub}")
    assert code == 1
    assert ":2 (seq 1): the record's digest differs from its receipt's" in out
    assert ":4 (seq 3): a release record without its receipt" in out
    assert "receipts of silo 'civil': 3 signature(s) verified" in out


@pytest.mark.parametrize("argument", ["civil", "=x.pub", "civil="])
def test_a_malformed_silo_key_argument_is_a_usage_error(
    log_dir: Path, key: LogKey, argument: str
) -> None:
    code, _, err = silogate("audit", "verify", log_dir, "--key", key.public, "--silo-key", argument)
    assert code == 2 and "is not NAME=PUB" in err


def test_an_unreadable_silo_key_is_one_line(log_dir: Path, key: LogKey, tmp_path: Path) -> None:
    code, out, err = silogate(
        "audit", "verify", log_dir, "--key", key.public, "--silo-key", f"civil={tmp_path}/no.pub"
    )
    assert code == 1 and out == ""
    assert err.startswith("silogate: KEY_UNREADABLE: cannot read the receipt public key")


def test_worker_processes_find_the_same_failures_in_the_same_order(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records and receipts checked by worker processes, a few lines per chunk: the report is
    the one a single process writes (failures by file, line and sequence, in log order)."""
    directory = tmp_path / "log"
    log = AuditLog(directory, signer=key.signer(), options=AuditLogOptions(segment_max_bytes=6000))
    forged = ReceiptSigner(ECC.construct(curve="Ed25519", seed=bytes(32)))
    forged.key_id = CIVIL_RECEIPTS.key_id
    for number in range(40):
        record = query_record(number)
        if number in (3, 17, 18, 31):
            record["receipts"] = [civil_receipt(number, forged)]
        if number == 25:
            record["receipts"][0]["rho"] = "1/2000"
        log.append("query", record)
    log.close()
    path, lines = _segment_lines(directory, 1)
    lines[2] = lines[2].replace(b'"consumer":', b'"consumer" :')  # not canonical
    path.write_bytes(b"".join(lines))
    lines = _segment_lines(directory, -1)[1]
    _segment_lines(directory, -1)[0].write_bytes(b"".join(lines) + b'{"seq":')  # torn tail
    silo_keys = {"civil": [CIVIL_RECEIPTS.public_key]}

    import gateway.audit._record_checks as record_checks
    import gateway.audit.verify as verify_module

    def run(jobs: int, max_failures: int = 20, fail_fast: bool = False) -> str:
        report = verify_with_keys(
            directory,
            [key.public_key()],
            silo_keys=silo_keys,
            jobs=jobs,
            max_failures=max_failures,
            fail_fast=fail_fast,
        )
        return report.render()

    one = run(1)
    assert "FAILED: 19 failure(s)" in one, one
    assert (
        one.index("(seq 3): the receipt")
        < one.index("(seq 7): not a record")
        < one.index("(seq 31): the receipt")
    )
    monkeypatch.setattr(record_checks, "CHUNK_LINES", 3)
    monkeypatch.setattr(verify_module, "PARALLEL_FROM_BYTES", 0)
    assert run(1) == one
    assert run(2) == one
    assert run(3, max_failures=2) == run(1, max_failures=2)
    assert run(2, fail_fast=True) == run(1, fail_fast=True)
    # Workers started by a fork server (what a process running other threads gets).
    monkeypatch.setattr(record_checks, "_one_thread", lambda: False)
    assert run(2) == one


def test_progress_is_reported_in_bytes_up_to_the_whole_log(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.audit.verify as verify_module

    directory = tmp_path / "log"
    write_log(directory, key, 40, segment_max_bytes=6500, checkpoint_every_records=5)
    monkeypatch.setattr(verify_module, "PROGRESS_LINES", 2)
    calls: list[tuple[int, int]] = []
    report = verify_with_keys(
        directory, [key.public_key()], progress=lambda done, total: calls.append((done, total))
    )
    assert report.ok, report.render()
    total = sum(segment.path.stat().st_size for segment in list_segments(directory))
    assert {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total
    assert len(calls) > report.segments  # within segments too, not only at their ends


def test_the_command_shows_progress_on_a_terminal_only(log_dir: Path, key: LogKey) -> None:
    """On a terminal (a real pseudo-terminal here) standard error shows a bar while records
    are read; the report on standard output is the same, and a pipe gets no bar."""
    import os
    import pty
    import subprocess
    import sys
    import threading

    command = [sys.executable, "-m", "gateway.cli", "audit", "verify", str(log_dir)]
    command += ["--key", str(key.public)]
    leader, follower = pty.openpty()
    terminal = bytearray()

    def drain() -> None:  # read as the command writes, so that it never blocks on a full terminal
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the other end is closed and everything was read
                return
            if not data:
                return
            terminal.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        shown = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=follower, timeout=120, check=False
        )
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    piped = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shown.returncode == piped.returncode == 0
    assert shown.stdout == piped.stdout and shown.stdout.startswith(b"OK: 30 records")
    assert b"verifying records" in terminal
    assert piped.stderr == b""


def test_the_json_report_carries_the_verdict_and_every_finding(log_dir: Path, key: LogKey) -> None:
    code, out = verify(log_dir, key, "--format", "json")
    good = json.loads(out)
    assert code == 0 and good["ok"] is True and good["failure_count"] == 0
    assert good["records"] == 30 and good["latest_checkpoint"]["size"] == 30
    assert good["latest_checkpoint"]["origin"] == ORIGIN
    assert good["latest_checkpoint"]["note"] == (log_dir / "checkpoint").read_text()

    path, lines = _segment_lines(log_dir, 1)
    first = list_segments(log_dir)[1].first
    lines[2] = b'{"seq": broken\n'
    path.write_bytes(b"".join(lines))
    code, out = verify(log_dir, key, "--format", "json")
    bad = json.loads(out)
    text_code, text = verify(log_dir, key)
    assert code == text_code == 1 and bad["ok"] is False
    assert bad["failure_count"] == len(bad["failures"]) == text.count("\n  ")
    found = bad["failures"][0]
    assert (found["file"], found["line"], found["seq"]) == (path.name, 3, first + 2)
    assert found["message"].startswith("not a record: not JSON")


@pytest.mark.parametrize("block_bytes", [1, 700, 2500, 1 << 20])
@pytest.mark.parametrize("damage", ["not canonical, torn tail", "a line too long"])
def test_blocks_of_any_size_give_the_report_of_the_line_by_line_reading(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch, block_bytes: int, damage: str
) -> None:
    """The main process reads segments in blocks of whole lines that the record checks split
    and hash; lines that need a look of their own (too long, cut short) are read one by one.
    Whatever the block size (lines across blocks, one line per block, one block per segment),
    with workers or without, the report is the one of reading every line on its own."""
    import gateway.audit._record_checks as record_checks
    import gateway.audit.verify as verify_module

    directory = tmp_path / "log"
    write_log(directory, key, 40, segment_max_bytes=9000, checkpoint_every_records=5)
    path, lines = _segment_lines(directory, 1)
    first = list_segments(directory)[1].first
    if damage == "a line too long":
        lines[3] = b"x" * 3000 + b"\n"  # above the limit below: read one by one from there
        expected = [f"(seq {first + 3}): a line of 3000 bytes, above the record limit 2900"]
    else:
        lines[1] = lines[1].replace(b'"consumer":', b'"consumer" :')
        last, tail = _segment_lines(directory, -1)
        last.write_bytes(b"".join(tail) + b'{"seq":')
        expected = [
            f"(seq {first + 1}): not a record: not in canonical form",
            "a record cut short (7 bytes, no newline)",
        ]
    path.write_bytes(b"".join(lines))

    def run(jobs: int) -> str:
        return verify_with_keys(
            directory, [key.public_key()], jobs=jobs, max_record_bytes=2900
        ).render()

    monkeypatch.setattr(record_checks, "CHUNK_LINES", 3)
    monkeypatch.setattr(verify_module, "PARALLEL_FROM_BYTES", 0)
    with monkeypatch.context() as line_by_line:  # every line read and hashed on its own
        line_by_line.setattr(verify_module._Verifier, "_blocks", lambda self, segment: (0, 1))
        alone = run(1)
        assert run(2) == alone
    for finding in expected:
        assert finding in alone, alone

    monkeypatch.setattr(verify_module, "BLOCK_BYTES", block_bytes)
    assert run(1) == alone
    assert run(2) == alone


def test_the_progress_bar_starts_no_thread() -> None:
    """Worker processes are forked only from a single-threaded process (otherwise a fork
    server starts them, more slowly): the bar is redrawn by the verifier's calls instead."""
    import threading

    from gateway.audit.cli import _verify_progress

    threads = threading.active_count()
    with _verify_progress(enabled=True) as progress:
        task = progress.add_task("verifying records", total=100)
        progress.update(task, completed=50, refresh=True)
        assert threading.active_count() == threads
