"""Mutation test: every change to a log the real gateway wrote is caught by ``verify``.

On the 1,000-record log: one single-byte change in every record (a random position, newline
included, and a random new value), changes in the checkpoint and segment-start files, and
deleted, duplicated, reordered and truncated records, removed segments and edited checkpoints.
On a small log from the same gateway: every byte of every file, changed two ways. Each mutation
is applied alone to an otherwise intact copy and verified from scratch (stopping at the first
failure: the verdict is what matters here, and it does not depend on where verify stops).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from audit_kit import AuditedSystem, audited_system
from Crypto.PublicKey import ECC

from gateway.audit import jcs
from gateway.audit.merkle import leaf_hash
from gateway.audit.store import list_segments
from gateway.audit.verify import verify_with_keys

SEED = 20261125


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, pki, data_dir: Path) -> AuditedSystem:
    return audited_system(tmp_path_factory, pki, data_dir)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, pki, data_dir: Path) -> AuditedSystem:
    return audited_system(tmp_path_factory, pki, data_dir, records=0, queries=3)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock", "*.tmp"))
    return target


def _keys(system: AuditedSystem) -> list[ECC.EccKey]:
    return [system.gateway_key.public_key()]


class Mutator:
    """Applies one change to one file at a time and checks that verify notices."""

    def __init__(self, directory: Path, keys: list[ECC.EccKey]) -> None:
        self.directory = directory
        self.keys = keys
        self.tried = 0
        report = verify_with_keys(directory, keys)
        assert report.ok and not report.warnings, report.render()

    def detected(self, path: Path, changed: bytes, what: str) -> None:
        original = path.read_bytes()
        assert changed != original, what
        path.write_bytes(changed)
        try:
            report = verify_with_keys(self.directory, self.keys, fail_fast=True)
        finally:
            path.write_bytes(original)
        self.tried += 1
        assert not report.ok, f"undetected: {path.name}: {what}"

    def byte(self, path: Path, position: int, value: int) -> None:
        data = path.read_bytes()
        changed = data[:position] + bytes([value]) + data[position + 1 :]
        self.detected(path, changed, f"byte {position} {data[position]:#04x} -> {value:#04x}")


def test_the_untouched_log_verifies(audited: AuditedSystem) -> None:
    report = verify_with_keys(audited.gateway_log, _keys(audited))
    assert report.ok and report.records == 1000 and not report.warnings


def test_a_single_byte_change_in_every_record(audited: AuditedSystem, tmp_path: Path) -> None:
    log = _copy(audited.gateway_log, tmp_path / "log")
    mutator = Mutator(log, _keys(audited))
    rng = random.Random(SEED)
    records = 0
    for segment in list_segments(log):
        data = segment.path.read_bytes()
        start = 0
        while start < len(data):
            end = data.index(b"\n", start) + 1  # the newline is part of the record
            position = rng.randrange(start, end)
            value = rng.choice([data[position] ^ 1, rng.randrange(256)])
            if value == data[position]:
                value ^= 0x80
            mutator.byte(segment.path, position, value)
            records += 1
            start = end
    assert records == 1000 and mutator.tried == 1000


def test_changes_in_checkpoints_and_segment_starts(audited: AuditedSystem, tmp_path: Path) -> None:
    log = _copy(audited.gateway_log, tmp_path / "log")
    mutator = Mutator(log, _keys(audited))
    rng = random.Random(SEED + 1)
    files = [log / "checkpoints.jsonl", log / "checkpoint"]
    files += [segment.start_path for segment in list_segments(log)]
    for path in files:
        size = len(path.read_bytes())
        for position in rng.sample(range(size), min(size, 40)):
            value = rng.choice([path.read_bytes()[position] ^ 1, rng.randrange(256)])
            if value != path.read_bytes()[position]:
                mutator.byte(path, position, value)
    assert mutator.tried > 40 * 3


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_deleted_duplicated_reordered_and_truncated_records(
    audited: AuditedSystem, tmp_path: Path
) -> None:
    log = _copy(audited.gateway_log, tmp_path / "log")
    mutator = Mutator(log, _keys(audited))
    segments = list_segments(log)
    for segment in segments:
        lines = _lines(segment.path)
        picks = sorted({0, 1, len(lines) // 2, len(lines) - 2, len(lines) - 1})
        for i in picks:
            mutator.detected(segment.path, b"".join(lines[:i] + lines[i + 1 :]), f"delete {i}")
            mutator.detected(segment.path, b"".join(lines[: i + 1] + lines[i:]), f"repeat {i}")
            if i + 1 < len(lines):
                swapped = lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2 :]
                mutator.detected(segment.path, b"".join(swapped), f"swap {i}")
            cut = sum(map(len, lines[:i])) + len(lines[i]) // 2
            mutator.detected(segment.path, b"".join(lines)[:cut], f"cut inside record {i}")
            mutator.detected(segment.path, b"".join(lines[:i]), f"cut before record {i}")
        # A record moved into the next segment (same order overall, wrong file).
        if segment is not segments[-1]:
            following = segments[segments.index(segment) + 1].path
            original_following = following.read_bytes()
            following.write_bytes(lines[-1] + original_following)
            mutator.detected(segment.path, b"".join(lines[:-1]), "record moved to next segment")
            following.write_bytes(original_following)
    assert mutator.tried > 20 * len(segments)


def test_removed_segments_and_files(audited: AuditedSystem, tmp_path: Path) -> None:
    log = _copy(audited.gateway_log, tmp_path / "log")
    keys = _keys(audited)
    segments = list_segments(log)
    assert len(segments) >= 3
    targets = [segments[0].path, segments[1].path, segments[-1].path, segments[1].start_path]
    targets += [log / "checkpoints.jsonl"]
    for path in targets:
        hidden = path.with_name("hidden")
        path.rename(hidden)
        try:
            assert not verify_with_keys(log, keys).ok, f"undetected: {path.name} removed"
        finally:
            hidden.rename(path)
    assert verify_with_keys(log, keys).ok


def test_edited_checkpoints(audited: AuditedSystem, tmp_path: Path) -> None:
    log = _copy(audited.gateway_log, tmp_path / "log")
    mutator = Mutator(log, _keys(audited))
    path = log / "checkpoints.jsonl"
    lines = _lines(path)
    for index, line in enumerate(lines):
        note = json.loads(line)["note"]
        origin, size, root, _, signature = note.split("\n")[:5]
        edits = {
            "size + 1": note.replace(f"\n{size}\n", f"\n{int(size) + 1}\n", 1),
            "root": note.replace(root, root[::-1], 1),
            "signature": note.replace(signature, signature[:-6] + "AAAAA=", 1),
            "origin": note.replace(origin, origin + "x"),
        }
        for name, edited in edits.items():
            changed = (
                lines[:index] + [jcs.canonicalize({"note": edited}) + b"\n"] + lines[index + 1 :]
            )
            mutator.detected(path, b"".join(changed), f"checkpoint {index}: {name}")
    # Signed with the real key but for a root the records do not have (a leaked key).
    signer = audited.gateway_key.signer("silogate/gateway")
    forged = signer.sign(1000, leaf_hash(b"a different history"))
    changed = lines[:-1] + [jcs.canonicalize({"note": forged}) + b"\n"]
    mutator.detected(path, b"".join(changed), "last checkpoint re-signed for another root")
    published = log / "checkpoint"
    mutator.detected(published, forged.encode(), "published checkpoint replaced")
    assert mutator.tried == 4 * len(lines) + 2


def test_every_byte_of_a_small_log(small: AuditedSystem, tmp_path: Path) -> None:
    log = _copy(small.gateway_log, tmp_path / "log")
    mutator = Mutator(log, _keys(small))
    files = [p for p in sorted(log.iterdir()) if p.is_file()]
    assert {p.name for p in files} == {
        "checkpoint",
        "checkpoints.jsonl",
        "segment-000000000000.jsonl",
        "segment-000000000000.start.json",
    }
    total = 0
    for path in files:
        data = path.read_bytes()
        total += len(data)
        for position, value in enumerate(data):
            # A low bit (digits, letters, quotes, braces, the newline) and case or punctuation.
            for changed in {value ^ 0x01, value ^ 0x20}:
                mutator.byte(path, position, changed)
    assert mutator.tried == 2 * total
