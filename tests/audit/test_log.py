"""The audit log writer: sequence, durability, group commit, segments, checkpoints, recovery."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from audit_kit import ORIGIN, LogKey, make_key, query_record, silogate, write_log
from support import wait_until

import gateway.audit.log as log_module
from gateway.audit import jcs
from gateway.audit.checkpoint import Checkpoint, open_checkpoint
from gateway.audit.errors import AuditLogCorrupt, AuditRecordTooLarge, AuditUnavailable
from gateway.audit.log import AuditLog, AuditLogOptions
from gateway.audit.merkle import leaf_hash
from gateway.audit.store import iter_records, list_segments, read_segment_start


@pytest.fixture
def key(tmp_path: Path) -> LogKey:
    return make_key(tmp_path)


def _notes(directory: Path) -> list[str]:
    lines = (directory / "checkpoints.jsonl").read_text().splitlines()
    return [json.loads(line)["note"] for line in lines]


def _sizes(directory: Path, key: LogKey) -> list[int]:
    return [open_checkpoint(n, key.public_key(), ORIGIN).size for n in _notes(directory)]


def _verify(directory: Path, key: LogKey, *more: str) -> tuple[int, str]:
    code, out, err = silogate("audit", "verify", directory, "--key", key.public, *more)
    assert not err  # never a traceback
    return code, out


def test_records_get_consecutive_sequence_numbers_as_canonical_lines(
    tmp_path: Path, key: LogKey
) -> None:
    log = AuditLog(tmp_path / "log", signer=key.signer())
    assert [log.append("query", query_record(n)) for n in range(5)] == [0, 1, 2, 3, 4]
    log.close()
    [segment] = list_segments(tmp_path / "log")
    lines = segment.path.read_bytes().splitlines()
    assert len(lines) == 5 and all(jcs.is_canonical(line) for line in lines)
    records = list(iter_records(tmp_path / "log"))
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[2]["request_id"] == "request-2" and records[2]["kind"] == "query"
    reopened = AuditLog(tmp_path / "log", signer=key.signer())
    assert reopened.append("explain", {"decision": "permit"}) == 5
    reopened.close()
    assert _verify(tmp_path / "log", key)[0] == 0


def test_fields_may_not_overwrite_the_log_s_own(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "log")
    with pytest.raises(ValueError, match="seq"):
        log.append("query", {"seq": 7})
    assert log.size == 0
    log.close()


def test_a_one_gigabyte_record_is_refused_and_the_log_goes_on(tmp_path: Path, key: LogKey) -> None:
    log = AuditLog(tmp_path / "log", signer=key.signer(), options=AuditLogOptions())
    chunk = "x" * (1 << 20)
    with pytest.raises(AuditRecordTooLarge) as caught:
        log.append("query", {"values": [chunk] * 1024})  # 1 GiB of text, 1 MiB of memory
    assert caught.value.reason == "AUDIT_RECORD_TOO_LARGE"
    assert log.size == 0
    assert log.append("query", {"decision": "denied"}) == 0
    log.close()
    assert _verify(tmp_path / "log", key)[0] == 0


def test_a_torn_last_line_is_dropped_with_a_warning(
    tmp_path: Path, key: LogKey, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "log"
    write_log(directory, key, 3)
    [segment] = list_segments(directory)
    intact = segment.path.read_bytes()
    with segment.path.open("ab") as handle:
        handle.write(b'{"consumer":"civil-affairs","decision":"rele')  # a crash mid-write
    # Before the restart the auditor sees a warning, not a failure: it was never acknowledged.
    code, out = _verify(directory, key)
    assert code == 0 and "warning: segment-000000000000.jsonl:4 (seq 3): a record cut short" in out
    with caplog.at_level(logging.WARNING, logger="silogate.audit"):
        log = AuditLog(directory, signer=key.signer())
    assert "cut short by a crash" in caplog.text
    assert segment.path.read_bytes() == intact
    assert log.append("query", query_record(3)) == 3
    log.close()
    code, out = _verify(directory, key)
    assert code == 0 and "warning" not in out


def test_restart_reads_only_the_last_segment(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    write_log(directory, key, 60, segment_max_bytes=4096)
    segments = list_segments(directory)
    assert len(segments) > 3
    # Damage an old segment (same length, so nothing else moves): start-up does not read it ...
    old = segments[1].path
    data = bytearray(old.read_bytes())
    data[10] = ord("#")
    old.write_bytes(bytes(data))
    AuditLog(directory, signer=key.signer()).close()
    # ... but verify does, and says where.
    code, out = _verify(directory, key)
    assert code == 1 and f"{old.name}:1 (seq {segments[1].first}): not a record" in out


def test_a_damaged_tail_refuses_the_start_naming_file_and_line(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    write_log(directory, key, 5)
    [segment] = list_segments(directory)
    lines = segment.path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"decision"', b'"decision" ')
    segment.path.write_bytes(b"".join(lines))
    with pytest.raises(AuditLogCorrupt, match=r"segment-000000000000\.jsonl:4: not a canonical"):
        AuditLog(directory, signer=key.signer())


def test_a_tail_that_differs_from_its_checkpoint_refuses_the_start(
    tmp_path: Path, key: LogKey
) -> None:
    directory = tmp_path / "log"
    write_log(directory, key, 5)
    [segment] = list_segments(directory)
    text = segment.path.read_bytes()
    # Still canonical, still in sequence: only the signed root can tell.
    segment.path.write_bytes(text.replace(b"1236.5", b"1237.5"))
    with pytest.raises(AuditLogCorrupt, match="differ from the checkpoint signed for size 5"):
        AuditLog(directory, signer=key.signer())
    # Records that a checkpoint covers and that are gone: the start is refused too.
    segment.path.write_bytes(b"".join(text.splitlines(keepends=True)[:4]))
    with pytest.raises(AuditLogCorrupt, match="covers 5 records but the log has 4"):
        AuditLog(directory, signer=key.signer())


def test_the_log_never_signs_a_second_root_for_a_size(tmp_path: Path, key: LogKey) -> None:
    log = AuditLog(tmp_path / "log", signer=key.signer())
    log.append("query", query_record(0))
    log.checkpoint()
    # Pretend the persisted checkpoint for this size had another root (a bug or a tampered
    # state): the log must refuse to sign, and stop taking records.
    log._last_checkpoint = Checkpoint(ORIGIN, log.size, leaf_hash(b"another tree"))
    with pytest.raises(AuditLogCorrupt, match="refusing to sign size 1"):
        log.checkpoint()
    with pytest.raises(AuditUnavailable):
        log.append("query", query_record(1))
    assert _sizes(tmp_path / "log", key) == [0, 1]


def test_checkpoints_every_n_records_persisted_before_published(
    tmp_path: Path, key: LogKey
) -> None:
    directory = tmp_path / "log"
    log = AuditLog(
        directory,
        signer=key.signer(),
        options=AuditLogOptions(checkpoint_every_records=10, checkpoint_every_seconds=3600),
    )
    log.start_checkpoints()
    for number in range(35):
        log.append("query", query_record(number))
        if number % 10 == 9:
            target = number + 1
            wait_until(lambda target=target: _sizes(directory, key)[-1] >= target)
    log.close()
    sizes = _sizes(directory, key)
    assert sizes[0] == 0 and sizes[-1] == 35 and sizes == sorted(set(sizes))
    assert len(sizes) >= 5  # 0, >=10, >=20, >=30, 35
    published = (directory / "checkpoint").read_text()
    assert published == _notes(directory)[-1]


def test_time_based_checkpoints_also_when_nothing_happens(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    log = AuditLog(
        directory, signer=key.signer(), options=AuditLogOptions(checkpoint_every_seconds=0.05)
    )
    log.append("query", query_record(0))
    log.start_checkpoints()
    published = directory / "checkpoint"
    wait_until(lambda: _sizes(directory, key)[-1] == 1)
    first = published.stat().st_mtime_ns
    # Idle: the same size and root are signed again and re-published (the same note, since
    # Ed25519 is deterministic), and checkpoints.jsonl does not grow with repeats.
    wait_until(lambda: published.stat().st_mtime_ns > first)
    log.close()
    assert _sizes(directory, key) == [0, 1]
    assert published.read_text() == _notes(directory)[-1]


def test_group_commit_shares_syncs_between_concurrent_appends(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real_sync = log_module._sync

    def slow_sync(fd: int) -> None:
        syncs.append(fd)
        time.sleep(0.002)  # a slow disk makes the batching visible
        real_sync(fd)

    monkeypatch.setattr(log_module, "_sync", slow_sync)
    log = AuditLog(tmp_path / "log", signer=key.signer())
    sequences: list[int] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        for number in range(50):
            sequence = log.append("query", query_record(worker * 100 + number))
            with lock:
                sequences.append(sequence)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    assert sorted(sequences) == list(range(400))
    assert len(syncs) < 200, f"{len(syncs)} syncs for 400 records"
    assert _verify(tmp_path / "log", key)[0] == 0


def test_a_failed_write_is_taken_back(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "log", signer=key.signer())
    log.append("query", query_record(0))
    real_write = log_module._write_all

    def disk_full(fd: int, data: bytes) -> None:
        real_write(fd, data[:20])  # part of the line reached the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log_module, "_write_all", disk_full)
    with pytest.raises(AuditUnavailable, match="No space left"):
        log.append("query", query_record(1))
    monkeypatch.setattr(log_module, "_write_all", real_write)
    assert log.append("query", query_record(1)) == 1
    log.close()
    assert [r["request_id"] for r in iter_records(tmp_path / "log")] == [
        "request-0",
        "request-1",
    ]
    assert _verify(tmp_path / "log", key)[0] == 0


def test_a_failed_write_of_queued_records_drops_exactly_those(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent appends are written together by the append that syncs: when that write
    fails, every append in it raises, none of its records is in the log, and the log goes on
    with the next sequence number (no gap, no acknowledged record lost)."""
    real_write, real_sync = log_module._write_all, log_module._sync
    failed: list[int] = []

    def slow_sync(fd: int) -> None:
        time.sleep(0.002)  # writers pile up behind the sync: batches of several records
        real_sync(fd)

    def disk_full_once(fd: int, data: bytes) -> None:
        if not failed and b'"kind":"query"' in data and data.count(b"\n") > 1:
            failed.append(data.count(b"\n"))
            real_write(fd, data[:30])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(log_module, "_sync", slow_sync)
    monkeypatch.setattr(log_module, "_write_all", disk_full_once)
    directory = tmp_path / "log"
    log = AuditLog(directory, signer=key.signer())
    acknowledged: dict[str, int] = {}
    dropped: list[str] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        for number in range(30):
            record = query_record(worker * 100 + number)
            try:
                sequence = log.append("query", record)
            except AuditUnavailable as err:
                assert "No space left" in err.message
                with lock:
                    dropped.append(record["request_id"])
            else:
                with lock:
                    acknowledged[record["request_id"]] = sequence

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    assert failed and len(dropped) == failed[0]
    records = list(iter_records(directory))
    assert [r["seq"] for r in records] == list(range(240 - len(dropped)))
    assert {r["request_id"]: r["seq"] for r in records} == acknowledged
    assert _verify(directory, key)[0] == 0


def test_a_failed_sync_stops_the_log(
    tmp_path: Path, key: LogKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "log", signer=key.signer())

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(log_module, "_sync", broken)
    with pytest.raises(AuditUnavailable, match="durable"):
        log.append("query", query_record(0))
    monkeypatch.undo()
    # Whether that record reached the disk is unknown: the log takes no more (fail closed).
    with pytest.raises(AuditUnavailable, match="stopped after a write error"):
        log.append("query", query_record(1))
    log.close()


def test_segments_rotate_by_size_and_by_age(tmp_path: Path, key: LogKey) -> None:
    now = [1_000_000.0]
    directory = tmp_path / "log"
    log = AuditLog(
        directory,
        signer=key.signer(),
        options=AuditLogOptions(segment_max_bytes=4096, segment_max_seconds=3600),
        clock=lambda: now[0],
    )
    for number in range(12):
        log.append("query", query_record(number))
    by_size = list_segments(directory)
    assert len(by_size) >= 2
    now[0] += 3601  # an hour later, even without records, the segment is closed on time
    log.checkpoint()
    log.append("query", query_record(12))
    segments = list_segments(directory)
    assert len(segments) == len(by_size) + 1 and segments[-1].first == 12
    log.close()
    for segment in segments:
        start = read_segment_start(segment)
        assert start.first == segment.first
        if segment.first:
            assert start.checkpoint is not None
            signed = open_checkpoint(start.checkpoint, key.public_key(), ORIGIN)
            assert (signed.size, signed.root) == (segment.first, start.frontier.root())
            assert start.checkpoint in _notes(directory)  # persisted before it was used
    assert _verify(directory, key)[0] == 0


def test_archived_segments_still_allow_proofs(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    write_log(directory, key, 40, segment_max_bytes=4096)
    segments = list_segments(directory)
    archive = tmp_path / "archive"
    archive.mkdir()
    for segment in segments[:2]:
        segment.path.rename(archive / segment.path.name)
        segment.start_path.rename(archive / segment.start_path.name)
    first_kept = segments[2].first
    code, out = _verify(directory, key)
    assert code == 1 and f"records 0..{first_kept - 1} are missing (archived?" in out
    code, out = _verify(directory, key, "--allow-archived")
    assert code == 0, out
    # The log keeps working, and a record after the archived part can be proved.
    AuditLog(directory, signer=key.signer()).close()
    bundle = tmp_path / "proof.json"
    assert (
        silogate("audit", "prove", directory, "--request-id", "request-39", "--out", bundle)[0] == 0
    )
    code, out, _ = silogate("audit", "check-proof", bundle, "--key", key.public)
    assert code == 0 and "seq 39" in out


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "log")
    with pytest.raises(AuditUnavailable) as caught:
        AuditLog(tmp_path / "log")
    assert caught.value.reason == "AUDIT_LOG_IN_USE"
    log.close()
    AuditLog(tmp_path / "log").close()


def test_a_log_in_the_old_format_is_not_taken_over(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "audit.jsonl").write_text('{"seq":0}\n')
    with pytest.raises(AuditLogCorrupt, match="before Merkle trees"):
        AuditLog(tmp_path / "log")


def test_a_rotated_checkpoint_key_is_recorded(tmp_path: Path, key: LogKey) -> None:
    directory = tmp_path / "log"
    write_log(directory, key, 30, segment_max_bytes=4096)  # segment starts signed by the old key
    assert len(list_segments(directory)) > 1
    new_key = make_key(tmp_path, "new")
    log = AuditLog(directory, signer=new_key.signer())
    log.append("query", query_record(4))
    log.close()
    rotation = [r for r in iter_records(directory) if r["kind"] == "checkpoint_key_rotated"]
    assert len(rotation) == 1 and rotation[0]["key_id"] == new_key.signer().key_id
    code, out, _ = silogate("audit", "verify", directory, "--key", new_key.public)
    assert code == 1 and "no signature by the given key" in out
    code, out, _ = silogate(
        "audit", "verify", directory, "--key", key.public, "--key", new_key.public
    )
    assert code == 0, out


def test_unsigned_logs_still_chain_records(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = write_log(directory, None, 4)
    assert not (directory / "checkpoints.jsonl").exists()
    assert os.path.getsize(list_segments(directory)[0].path) > 0
    assert len(log.root_hash()) == 44
