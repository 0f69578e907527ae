"""``silogate audit verify`` on good and damaged logs: precise findings, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from audit_kit import ORIGIN, LogKey, make_key, query_record, silogate, write_log

from gateway.audit import jcs
from gateway.audit.log import AuditLog
from gateway.audit.merkle import leaf_hash
from gateway.audit.store import list_segments
from gateway.audit.verify import verify_with_keys


@pytest.fixture
def key(tmp_path: Path) -> LogKey:
    return make_key(tmp_path)


@pytest.fixture
def log_dir(tmp_path: Path, key: LogKey) -> Path:
    directory = tmp_path / "log"
    write_log(directory, key, 30, segment_max_bytes=4096, checkpoint_every_records=5)
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
    bad_digest["receipts"] = [{"silo": "civil", "digest": "xyz", "at": "2026-01-01T00:00:00Z"}]
    log.append("query", bad_digest)
    log.close()
    code, out = verify(directory, key)
    assert code == 1
    assert "segment-000000000000.jsonl:2 (seq 1): a released query without silo receipts" in out
    assert ":3 (seq 2): the receipt of silo 'civil' has no SHA-256 digest" in out
