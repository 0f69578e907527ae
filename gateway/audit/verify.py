"""``silogate audit verify``: recompute the whole log and hold it against its signed checkpoints.

What is checked, in one pass over the segments (memory: about 64 bytes per record for the
Merkle tree, nothing per record otherwise):

- segments follow each other without gaps; each ``.start.json`` holds exactly the frontier of
  the records before it and a checkpoint, signed by one of the keys, for that size;
- every record line is canonical JSON (RFC 8785), a JSON object, with the sequence number of its
  position, a kind and a time; a released query carries a receipt from each silo it used;
- every silo receipt (in the gateway's query records, and in a silo's own ``release`` records) is
  complete and names the record's request; with the silo's public receipt key (``--silo-key
  NAME=PUB``) its digest and Ed25519 signature are verified (:mod:`gateway.silo.receipt`). A
  receipt from a silo without a given key is counted as unchecked and reported, not failed;
- every checkpoint in ``checkpoints.jsonl`` verifies with one of the keys, has the log's origin,
  covers no more records than the log has, has the root recomputed from the records, and is
  consistent (RFC 9162 proof, generated and verified) with the one before it; no size has two
  roots; the published ``checkpoint`` is one of them;
- with ``--state FILE``: the checkpoint verified on the previous run is proved consistent with
  the latest one (the log only grew), and on success the file remembers the latest and the
  frontier of its tree. A run given such a file starts from that frontier and checks only the
  records after its size (``--full``: all of them again).

Segments are read here in blocks of whole lines; worker processes
(:mod:`gateway.audit._record_checks`) split each block, hash its lines (RFC 6962 leaves) and
check each record (canonical form, sequence, kind and time, receipts and their signatures), and
the hashes and findings are taken back here in log order, the hashes into the tree. From a line
that needs a look of its own (one above the record limit or longer than a block, or cut short)
to the end of its segment, and in a resumed segment, lines are read and hashed here one by one
and only checked in the workers.

A last line without a newline at the end of the newest segment, and records after the latest
checkpoint, are warnings: a crash leaves exactly that, and nothing in them was ever covered by
a signature (a covered record that is cut or missing fails through its checkpoint).

This module never raises on damaged input: every problem becomes a :class:`Finding` with file,
line and sequence number where they are known. It never writes anything but the state file, and
that only when every check passed; it never trusts a remembered frontier whose root is not the
remembered checkpoint's, signed by one of the keys.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from Crypto.PublicKey import ECC

from gateway.audit import jcs
from gateway.audit._record_checks import (
    BLOCK_BYTES,
    PARALLEL_FROM_BYTES,
    RecordChecks,
    default_jobs,
)
from gateway.audit.checkpoint import (
    MAX_NOTE_BYTES,
    Checkpoint,
    CheckpointError,
    load_verification_key,
    open_checkpoint,
)
from gateway.audit.errors import AuditLogCorrupt
from gateway.audit.merkle import (
    Frontier,
    MerkleTree,
    MissingLeaves,
    ProofError,
    leaf_hash,
    verify_consistency,
)
from gateway.audit.store import (
    CHECKPOINTS_FILE,
    DEFAULT_MAX_LINE_BYTES,
    LATEST_CHECKPOINT_FILE,
    Line,
    Segment,
    SegmentStart,
    list_segments,
    read_segment_start,
    scan_lines,
)
from gateway.silo.receipt import ReceiptKeyring, load_receipt_public_key


@dataclass(frozen=True)
class Finding:
    """One problem (or warning) and where it is: file, line (1-based), sequence number."""

    file: str
    line: int | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.seq is not None:
            where += f" (seq {self.seq})"
        return f"{where}: {self.message}"


# Called with (bytes read, bytes to read) of the segments checked: after each block of lines,
# every PROGRESS_LINES lines read one by one, and after each segment.
Progress = Callable[[int, int], None]
PROGRESS_LINES = 4096


class _Stop(Exception):
    """The first failure ends a fail-fast run (the verdict is already known)."""


@dataclass
class VerifyReport:
    """What ``verify`` found; ``ok`` when there is no failure (warnings allowed)."""

    directory: Path
    max_failures: int = 20
    fail_fast: bool = False
    records: int = 0
    segments: int = 0
    checkpoints: int = 0
    latest: Checkpoint | None = None
    latest_note: str | None = None
    failures: list[Finding] = field(default_factory=list)
    failure_count: int = 0
    warnings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Silo receipts whose signature was verified / could not be (no key for the silo), per silo.
    receipts_checked: Counter[str] = field(default_factory=Counter)
    receipts_unchecked: Counter[str] = field(default_factory=Counter)
    # With a state file: the size the records were checked from (None: from the start).
    resumed_from: int | None = None

    @property
    def ok(self) -> bool:
        return self.failure_count == 0

    def fail(self, file: str, line: int | None, seq: int | None, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < self.max_failures:
            self.failures.append(Finding(file, line, seq, message))
        if self.fail_fast:
            raise _Stop

    def warn(self, file: str, line: int | None, seq: int | None, message: str) -> None:
        if len(self.warnings) < self.max_failures:
            self.warnings.append(Finding(file, line, seq, message))

    def to_json(self) -> dict[str, object]:
        """The report as one JSON object (``verify --format json``), for scripts and monitoring:
        the verdict, the counts, the latest checkpoint (origin, size, base64 root, its signed
        note) and every listed finding with its file, line and sequence number."""
        latest = self.latest
        return {
            "ok": self.ok,
            "directory": str(self.directory),
            "records": self.records,
            "segments": self.segments,
            "checkpoints": self.checkpoints,
            "latest_checkpoint": None
            if latest is None
            else {
                "origin": latest.origin,
                "size": latest.size,
                "root": base64.b64encode(latest.root).decode(),
                "note": self.latest_note,
            },
            "resumed_from": self.resumed_from,
            "failure_count": self.failure_count,
            "failures": [asdict(finding) for finding in self.failures],
            "warnings": [asdict(finding) for finding in self.warnings],
            "notes": list(self.notes),
            "receipts_checked": dict(sorted(self.receipts_checked.items())),
            "receipts_unchecked": dict(sorted(self.receipts_unchecked.items())),
        }

    def render(self) -> str:
        lines = []
        summary = (
            f"{self.records} records in {self.segments} segment(s), "
            f"{self.checkpoints} checkpoint(s)"
        )
        if self.latest is not None:
            root = base64.b64encode(self.latest.root).decode()
            summary += f"; latest checkpoint: {self.latest.origin} size {self.latest.size} {root}"
        if self.ok:
            lines.append(f"OK: {summary}")
        else:
            lines.append(f"FAILED: {self.failure_count} failure(s); {summary}")
            lines.extend(f"  {finding}" for finding in self.failures)
            if self.failure_count > len(self.failures):
                lines.append(f"  ... and {self.failure_count - len(self.failures)} more")
        lines.extend(f"warning: {finding}" for finding in self.warnings)
        lines.extend(self.notes)
        for silo, count in sorted(self.receipts_checked.items()):
            lines.append(f"receipts of silo '{silo}': {count} signature(s) verified")
        for silo, count in sorted(self.receipts_unchecked.items()):
            lines.append(
                f"receipts of silo '{silo}': {count} not checked (no key given: "
                f"--silo-key {silo}=PUB)"
            )
        return "\n".join(lines) + "\n"


def _open_with_any(note: str, keys: Sequence[ECC.EccKey], origin: str | None) -> Checkpoint:
    """The checkpoint if one of ``keys`` signed it (the first key's error otherwise)."""
    first_error: CheckpointError | None = None
    for key in keys:
        try:
            return open_checkpoint(note, key, origin)
        except CheckpointError as err:
            first_error = first_error or err
    assert first_error is not None
    raise first_error


class _Verifier:
    def __init__(
        self,
        directory: Path,
        keys: Sequence[ECC.EccKey],
        report: VerifyReport,
        *,
        allow_archived: bool,
        max_record_bytes: int,
        silo_keys: Mapping[str, Sequence[ECC.EccKey]],
        jobs: int,
        progress: Progress | None = None,
    ) -> None:
        self.directory = directory
        self.progress = progress
        self.bytes_done = 0
        self.bytes_total = 0
        self.keys = keys
        self.report = report
        self.checks = RecordChecks(
            {silo: ReceiptKeyring.of(keys) for silo, keys in silo_keys.items()},
            jobs=jobs,
            fail=report.fail,
            checked=report.receipts_checked,
            unchecked=report.receipts_unchecked,
            leaves=self._leaves,
        )
        self.allow_archived = allow_archived
        self.max_record_bytes = max_record_bytes
        self.tree = MerkleTree()
        self.origin: str | None = None
        # Where each segment's records sit, to name lines for a range of sequence numbers.
        self.segment_of: list[tuple[int, str]] = []
        self.start_notes: list[tuple[str, str]] = []  # (file, note) of each segment start
        self.complete = True  # False once records are missing: later roots cannot be recomputed

    # -- records ----------------------------------------------------------------------------

    def records(self, resume: Remembered | None = None) -> None:
        """Hash and check every record; with ``resume`` (a remembered checkpoint and its
        frontier), only the records after its size, on top of that frontier."""
        report = self.report
        try:
            segments = list_segments(self.directory)
        except OSError as err:
            report.fail(self.directory.name, None, None, f"cannot list: {err.strerror}")
            self.complete = False
            return
        report.segments = len(segments)
        if not segments:
            report.fail(self.directory.name, None, None, "no segment files: not an audit log")
            self.complete = False
            return
        first_checked = 0
        if resume is not None and resume.frontier is not None and resume.size > 0:
            holding = [i for i, segment in enumerate(segments) if segment.first <= resume.size]
            if holding:
                first_checked = holding[-1]
                self.tree = MerkleTree(resume.frontier)
                self.origin = resume.checkpoint.origin
                report.resumed_from = resume.size
                report.notes.append(
                    f"note: records 0..{resume.size - 1} were verified by the run that remembered "
                    f"size {resume.size}; checked from sequence number {resume.size} on "
                    "(--full checks every record again)"
                )
        self.bytes_total = _total_bytes(segments[first_checked:])
        if self.bytes_total < PARALLEL_FROM_BYTES:
            self.checks.jobs = 1
        for index in range(first_checked, len(segments)):
            segment = segments[index]
            resuming = report.resumed_from is not None and index == first_checked
            start = self._start(segment, first=index == 0 and not resuming)
            if start is None and index == 0 and not resuming:
                self.complete = False
                return
            skip = self.tree.size - segment.first if resuming else 0
            if segment.first != self.tree.size and not (resuming and skip > 0):
                missing = f"{self.tree.size}..{segment.first - 1}"
                report.fail(
                    segment.name,
                    None,
                    segment.first,
                    f"records {missing} are missing (a segment was removed)"
                    if segment.first > self.tree.size
                    else f"the segment overlaps the previous one (it ends at {self.tree.size})",
                )
                self.complete = False
                return
            if start is not None and skip == 0:
                self._check_frontier(segment, start)
            self.segment_of.append((segment.first, segment.name))
            if not self._segment_records(segment, last=index == len(segments) - 1, skip=skip):
                self.complete = False
                return

    def _start(self, segment: Segment, *, first: bool) -> SegmentStart | None:
        report = self.report
        try:
            start = read_segment_start(segment)
        except AuditLogCorrupt as err:
            report.fail(segment.start_path.name, None, None, err.message.split(": ", 1)[-1])
            return None
        if start.checkpoint is not None:
            try:
                checkpoint = _open_with_any(start.checkpoint, self.keys, self.origin)
            except CheckpointError as err:
                report.fail(segment.start_path.name, 1, None, f"its checkpoint: {err}")
            else:
                self.origin = self.origin or checkpoint.origin
                if checkpoint.size != start.first or checkpoint.root != start.frontier.root():
                    report.fail(
                        segment.start_path.name,
                        1,
                        None,
                        f"its checkpoint (size {checkpoint.size}) does not match its frontier",
                    )
                self.start_notes.append((segment.start_path.name, start.checkpoint))
        elif start.first > 0:
            report.warn(segment.start_path.name, 1, None, "the segment start is not signed")
        if first and start.first > 0:
            if not self.allow_archived:
                report.fail(
                    segment.name,
                    None,
                    start.first,
                    f"records 0..{start.first - 1} are missing (archived? --allow-archived "
                    "verifies from the first segment present)",
                )
            elif start.checkpoint is None:
                report.fail(
                    segment.start_path.name,
                    1,
                    None,
                    "cannot start after archived segments: this start has no signed checkpoint",
                )
            report.notes.append(f"note: verified from sequence number {start.first} on")
            self.tree = MerkleTree(start.frontier)
        return start

    def _check_frontier(self, segment: Segment, start: SegmentStart) -> None:
        for a, b, digest in start.frontier.subtrees():
            if self.tree.subtree(a, b) != digest:
                self.report.fail(
                    segment.start_path.name,
                    1,
                    None,
                    "its frontier does not match the records before the segment",
                )
                return

    def _leaves(self, hashes: bytes) -> None:
        """Append leaf hashes (32 bytes each, in log order) that the record checks computed."""
        append = self.tree.append
        for index in range(0, len(hashes), 32):
            append(hashes[index : index + 32])

    def _segment_records(self, segment: Segment, *, last: bool, skip: int = 0) -> bool:
        """Hash every line of ``segment`` (but the first ``skip``, verified before) into the
        tree and queue its record checks; a finding of this loop first settles the checks of
        the lines before it (log order).

        Blocks of whole lines go to the record checks as read, which hash them too; from the
        first line that needs a look of its own (above the record limit or longer than a block,
        or cut short at the end), and in a resumed segment, lines are read and hashed here one
        by one."""
        report, checks, progress = self.report, self.checks, self.progress
        offset, number = 0, 1
        try:
            if not skip:
                taken_over = self._blocks(segment)
                if taken_over is None:
                    checks.settle()
                    self._segment_read(segment)
                    return True
                offset, number = taken_over
            checks.settle()  # the tree holds every line before ``offset``
            tree = self.tree
            lines = scan_lines(segment.path, self.max_record_bytes, offset=offset, number=number)
            if skip and not self._skip(segment, lines, skip):
                return False
            for line in lines:
                position = tree.size
                if not line.terminated:
                    checks.settle()
                    if last:
                        report.warn(
                            segment.name,
                            line.number,
                            position,
                            f"a record cut short ({line.length} bytes, no newline): a write "
                            "interrupted by a crash, never acknowledged; the log drops it "
                            "when it next starts",
                        )
                        return True
                    report.fail(segment.name, line.number, position, "the line is cut short")
                    return False
                if line.data is None:
                    checks.settle()
                    report.fail(
                        segment.name,
                        line.number,
                        position,
                        f"a line of {line.length} bytes, above the record limit "
                        f"{self.max_record_bytes}; roots cannot be recomputed past it",
                    )
                    return False
                tree.append(leaf_hash(line.data))
                report.records += 1
                checks.add(segment.name, line.number, position, line.data)
                if progress is not None and line.number % PROGRESS_LINES == 0:
                    progress(self.bytes_done + line.offset, self.bytes_total)
        except OSError as err:
            checks.settle()
            report.fail(segment.name, None, None, f"unreadable: {err.strerror}")
            return False
        checks.settle()
        self._segment_read(segment)
        return True

    def _blocks(self, segment: Segment) -> tuple[int, int] | None:
        """Queue ``segment``'s lines in blocks of whole lines (about ``BLOCK_BYTES`` each);
        None once every line went so, otherwise the byte offset and number of the first line
        left to the line-by-line reading (a line above the record limit or longer than a block,
        or a last line without a newline), which comes after everything queued."""
        report, checks, progress = self.report, self.checks, self.progress
        limit = self.max_record_bytes
        offset, number = 0, 1  # of the first line not queued yet
        carried = b""  # its bytes read so far
        with segment.path.open("rb") as handle:
            while True:
                data = handle.read(BLOCK_BYTES)
                if not data:
                    return (offset, number) if carried else None
                if carried:
                    data = carried + data
                end = data.rfind(b"\n") + 1
                if end == 0:  # a line longer than a block, or cut short: one by one from here
                    return offset, number
                block, carried = data[:end], data[end:]
                if len(block) > limit + 1 and max(map(len, block.split(b"\n"))) > limit:
                    return offset, number
                if len(carried) > limit:
                    return offset, number  # never mind the lines before it: read them one by one
                count = block.count(b"\n")
                position = self.tree.size + checks.queued_leaves
                report.records += count  # read (a failure found in them may stop the run)
                checks.add_block(segment.name, number, position, block, count)
                offset += end
                number += count
                if progress is not None:
                    progress(self.bytes_done + offset, self.bytes_total)

    def _segment_read(self, segment: Segment) -> None:
        if self.progress is not None:
            with contextlib.suppress(OSError):
                self.bytes_done += segment.path.stat().st_size
            self.progress(min(self.bytes_done, self.bytes_total), self.bytes_total)

    def _skip(self, segment: Segment, lines: Iterator[Line], count: int) -> bool:
        """Pass over the ``count`` whole lines a resumed run does not check again."""
        seen = 0
        for line in lines:
            if not line.terminated:
                break
            seen += 1
            if seen == count:
                return True
        self.report.fail(
            segment.name,
            None,
            segment.first + seen,
            f"the segment holds {seen} whole record(s), but the checkpoint verified before "
            f"covers {count} of them (size {segment.first + count}): records were removed",
        )
        return False

    def _where(self, first: int, end: int) -> str:
        """``segment-….jsonl lines a..b`` for sequence numbers ``first``..``end - 1``."""
        names = [
            (start, name)
            for index, (start, name) in enumerate(self.segment_of)
            if start < end
            and (index + 1 == len(self.segment_of) or self.segment_of[index + 1][0] > first)
        ]
        if len(names) == 1:
            start, name = names[0]
            return f"{name} lines {first - start + 1}..{end - start}"
        return ", ".join(name for _, name in names)

    def _segment_name(self, seq: int) -> str:
        names = [name for start, name in self.segment_of if start <= seq]
        return names[-1] if names else self.directory.name

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoints(self) -> list[str]:
        report, tree = self.report, self.tree
        path = self.directory / CHECKPOINTS_FILE
        notes: list[str] = []
        if not path.exists():
            if tree.size:
                report.fail(CHECKPOINTS_FILE, None, None, "missing: no record is proved")
            return notes
        previous: Checkpoint | None = None
        previous_good = False
        try:
            for line in scan_lines(path, MAX_NOTE_BYTES * 2):
                if not line.terminated:
                    report.warn(
                        CHECKPOINTS_FILE,
                        line.number,
                        None,
                        "a checkpoint cut short by a crash (never published)",
                    )
                    break
                note = self._note_line(line.number, line.data)
                if note is None:
                    continue
                try:
                    checkpoint = _open_with_any(note, self.keys, self.origin)
                except CheckpointError as err:
                    report.fail(CHECKPOINTS_FILE, line.number, None, str(err))
                    continue
                self.origin = self.origin or checkpoint.origin
                report.checkpoints += 1
                notes.append(note)
                good = self._checkpoint_matches(line.number, checkpoint)
                if previous is not None:
                    if checkpoint.size < previous.size:
                        report.fail(
                            CHECKPOINTS_FILE,
                            line.number,
                            None,
                            f"size {checkpoint.size} is below the previous checkpoint's "
                            f"{previous.size}",
                        )
                    elif checkpoint.size == previous.size and checkpoint.root != previous.root:
                        report.fail(
                            CHECKPOINTS_FILE,
                            line.number,
                            None,
                            f"a second, different root for size {checkpoint.size}",
                        )
                    elif good and previous_good:
                        self._consistent(line.number, previous, checkpoint)
                previous, previous_good = checkpoint, good
                report.latest, report.latest_note = checkpoint, note
        except OSError as err:
            report.fail(CHECKPOINTS_FILE, None, None, f"unreadable: {err.strerror}")
        return notes

    def _note_line(self, number: int, data: bytes | None) -> str | None:
        try:
            if data is None:
                raise ValueError("the line is too long")
            document = jcs.canonical_value(data)
            if not isinstance(document, dict) or set(document) != {"note"}:
                raise ValueError("expected exactly the field 'note'")
            note = document["note"]
            if not isinstance(note, str):
                raise ValueError("'note' is not text")
        except ValueError as err:
            self.report.fail(CHECKPOINTS_FILE, number, None, f"not a checkpoint line: {err}")
            return None
        return note

    def _checkpoint_matches(self, number: int, checkpoint: Checkpoint) -> bool:
        report, tree = self.report, self.tree
        if checkpoint.size > tree.size:
            if self.complete:
                report.fail(
                    CHECKPOINTS_FILE,
                    number,
                    None,
                    f"a checkpoint for size {checkpoint.size}, but the log has only "
                    f"{tree.size} records (records were cut or removed)",
                )
            return False
        if checkpoint.size < tree.start:
            return False  # about archived records only
        try:
            root = tree.root(checkpoint.size)
        except MissingLeaves:
            return False
        if root != checkpoint.root:
            previous = self.report.latest.size if self.report.latest is not None else 0
            first = previous if previous < checkpoint.size else 0
            report.fail(
                CHECKPOINTS_FILE,
                number,
                None,
                f"the records do not match the root signed for size {checkpoint.size}: a "
                f"record in {first}..{checkpoint.size - 1} was changed "
                f"({self._where(first, checkpoint.size)})",
            )
            return False
        return True

    def _consistent(self, number: int, older: Checkpoint, newer: Checkpoint) -> None:
        if older.size == 0 or older.size < self.tree.start:
            return  # everything extends the empty tree; archived sizes have no proof here
        try:
            proof = self.tree.consistency_proof(older.size, newer.size)
            verify_consistency(older.size, newer.size, older.root, newer.root, proof)
        except (ProofError, MissingLeaves) as err:
            self.report.fail(
                CHECKPOINTS_FILE,
                number,
                None,
                f"not consistent with the checkpoint for size {older.size}: {err}",
            )

    def published(self, notes: list[str]) -> None:
        report = self.report
        path = self.directory / LATEST_CHECKPOINT_FILE
        known = set(notes)
        for file, note in self.start_notes:
            if note not in known:
                report.fail(file, 1, None, "its checkpoint is not in checkpoints.jsonl")
        if not path.exists():
            if notes:
                report.warn(LATEST_CHECKPOINT_FILE, None, None, "missing (not yet published)")
            return
        try:
            data = path.read_bytes()[: MAX_NOTE_BYTES + 1]
            note = data.decode("utf-8")
            _open_with_any(note, self.keys, self.origin)
        except (OSError, UnicodeDecodeError, CheckpointError) as err:
            report.fail(LATEST_CHECKPOINT_FILE, None, None, f"does not verify: {err}")
            return
        if note not in known:
            report.fail(
                LATEST_CHECKPOINT_FILE,
                None,
                None,
                "the published checkpoint is not in checkpoints.jsonl",
            )

    def coverage(self) -> None:
        report = self.report
        latest = report.latest.size if report.latest is not None else 0
        if report.latest is not None and self.tree.size > latest:
            report.warn(
                self._segment_name(latest),
                None,
                latest,
                f"records {latest}..{self.tree.size - 1} are not yet covered by a signed "
                "checkpoint (the next one will cover them)",
            )

    # -- state ------------------------------------------------------------------------------

    def remembered(self, state_file: Path) -> Remembered | None:
        """The checkpoint (signed by one of the keys) and frontier ``state_file`` remembers."""
        report = self.report
        name = state_file.name
        if not state_file.exists():
            report.notes.append(f"note: {name} does not exist yet; it will remember this run")
            return None
        try:
            document = json.loads(state_file.read_bytes()[: MAX_NOTE_BYTES * 4])
            note = document["note"]
            if not isinstance(note, str):
                raise TypeError("'note' is not text")
            checkpoint = _open_with_any(note, self.keys, self.origin)
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
            report.fail(name, None, None, f"the remembered checkpoint is unreadable: {err}")
            return None
        hashes = document.get("frontier")
        if hashes is None:
            return Remembered(checkpoint, None)  # a saved note alone: checked in full
        try:
            if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
                raise TypeError("not a list of base64 hashes")
            frontier = Frontier(
                checkpoint.size, tuple(base64.b64decode(h, validate=True) for h in hashes)
            )
            if frontier.root() != checkpoint.root:
                raise ValueError("its root is not the remembered checkpoint's")
        except (TypeError, ValueError) as err:
            report.fail(name, None, None, f"the remembered frontier is unusable: {err}")
            return Remembered(checkpoint, None)
        return Remembered(checkpoint, frontier)

    def state(self, name: str, remembered: Remembered) -> None:
        """Prove the latest checkpoint consistent with the remembered one (the log only grew)."""
        report = self.report
        checkpoint = remembered.checkpoint
        latest = report.latest
        if latest is None:
            report.fail(
                name, None, None, f"remembers size {checkpoint.size}, the log has no checkpoint"
            )
        elif latest.size < checkpoint.size:
            report.fail(
                name,
                None,
                None,
                f"remembers size {checkpoint.size}, but the log's latest checkpoint is size "
                f"{latest.size}: the log was rolled back",
            )
        elif checkpoint.size < self.tree.start:
            report.fail(
                name,
                None,
                None,
                f"remembers size {checkpoint.size}, but the records before {self.tree.start} "
                "were archived: consistency cannot be proved from here",
            )
        elif checkpoint.size == 0:
            pass  # every log extends the empty one
        else:
            try:
                proof = self.tree.consistency_proof(checkpoint.size, latest.size)
                verify_consistency(
                    checkpoint.size, latest.size, checkpoint.root, latest.root, proof
                )
            except (ProofError, MissingLeaves, ValueError) as err:
                report.fail(
                    name,
                    None,
                    None,
                    f"the log is not an extension of the checkpoint verified before (size "
                    f"{checkpoint.size}): {err}",
                )
            else:
                report.notes.append(
                    f"note: consistent with the checkpoint verified before (size "
                    f"{checkpoint.size} -> {latest.size})"
                )


@dataclass(frozen=True)
class Remembered:
    """What a state file holds: the checkpoint verified last time and, when that run wrote
    it, the frontier of its tree (which lets the next run start there)."""

    checkpoint: Checkpoint
    frontier: Frontier | None

    @property
    def size(self) -> int:
        return self.checkpoint.size


def verify_log(
    directory: Path,
    *,
    keys: Sequence[Path],
    state_file: Path | None = None,
    full: bool = False,
    allow_archived: bool = False,
    max_failures: int = 20,
    max_record_bytes: int = DEFAULT_MAX_LINE_BYTES,
    silo_keys: Mapping[str, Sequence[Path]] | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check the audit log in ``directory`` (see the module docstring). ``silo_keys``: each
    silo's public receipt key file(s) (several after a rotation). ``jobs``: worker processes
    checking records (default: one per CPU; 1 checks in this process). With a ``state_file``
    that holds a frontier, only the records after its size are checked unless ``full``.
    ``progress``, when given, is called with (bytes read, bytes to read) as records are read.
    Keys that cannot be read raise ``ConfigurationError``; everything about the log goes into
    the report."""
    return verify_with_keys(
        directory,
        [load_verification_key(path) for path in keys],
        state_file=state_file,
        full=full,
        allow_archived=allow_archived,
        max_failures=max_failures,
        max_record_bytes=max_record_bytes,
        silo_keys={
            silo: [load_receipt_public_key(path) for path in paths]
            for silo, paths in (silo_keys or {}).items()
        },
        jobs=jobs,
        progress=progress,
    )


def verify_with_keys(
    directory: Path,
    public_keys: Sequence[ECC.EccKey],
    *,
    state_file: Path | None = None,
    full: bool = False,
    allow_archived: bool = False,
    max_failures: int = 20,
    max_record_bytes: int = DEFAULT_MAX_LINE_BYTES,
    fail_fast: bool = False,
    silo_keys: Mapping[str, Sequence[ECC.EccKey]] | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """:func:`verify_log` with keys already loaded. With ``fail_fast``, stop at the first
    failure: the verdict (``ok``) is the same, the report shorter."""
    directory = Path(directory)
    report = VerifyReport(directory, max_failures=max(1, max_failures), fail_fast=fail_fast)
    if not directory.is_dir():
        with contextlib.suppress(_Stop):
            report.fail(directory.name or str(directory), None, None, "not a directory")
        return report
    verifier = _Verifier(
        directory,
        public_keys,
        report,
        allow_archived=allow_archived,
        max_record_bytes=max_record_bytes,
        silo_keys=silo_keys or {},
        jobs=default_jobs() if jobs is None else jobs,
        progress=progress,
    )
    with contextlib.suppress(_Stop):
        _run(verifier, state_file, full=full)
    return report


def _run(verifier: _Verifier, state_file: Path | None, *, full: bool) -> None:
    report = verifier.report
    remembered = verifier.remembered(state_file) if state_file is not None else None
    try:
        verifier.records(None if full else remembered)
    finally:
        verifier.checks.close()
    notes = verifier.checkpoints()
    verifier.published(notes)
    verifier.coverage()
    if state_file is None:
        return
    if remembered is not None:
        verifier.state(state_file.name, remembered)
    latest, note = report.latest, report.latest_note
    if report.ok and latest is not None and note is not None:
        _remember(state_file, note, verifier.tree.frontier(latest.size))
        report.notes.append(f"note: {state_file.name} now remembers size {latest.size}")


def _total_bytes(segments: Sequence[Segment]) -> int:
    total = 0
    for segment in segments:
        with contextlib.suppress(OSError):
            total += segment.path.stat().st_size
    return total


def _remember(state_file: Path, note: str, frontier: Frontier) -> None:
    document = {
        "note": note,
        # The tree at the note's size: the next run starts there instead of at record 0.
        "frontier": [base64.b64encode(h).decode() for h in frontier.hashes],
        "verified_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    temporary = state_file.with_name(state_file.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, state_file)


__all__ = ["Finding", "VerifyReport", "verify_log", "verify_with_keys"]
