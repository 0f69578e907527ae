"""The audit log's files on disk, and reading its records back in sequence order.

Layout of an audit directory (one writer, :class:`gateway.audit.log.AuditLog`)::

    segment-000000000000.jsonl        records with sequence numbers 0 .. k-1, one canonical (RFC 8785)
                                      JSON object per line, newline-terminated
    segment-000000000000.start.json   where that segment starts: sequence number, Merkle frontier of
                                      the records before it, the checkpoint signed for that size
                                      (nothing unsigned or unchecked: every byte is verified)
    segment-00000000000k.jsonl        the next segment starts at sequence number k (the file name)
    segment-00000000000k.start.json
    checkpoints.jsonl                 every signed checkpoint note, in the order they were signed
    checkpoint                        the latest checkpoint (a C2SP signed note), replaced atomically
    .lock                             held (flock) by the one process writing the log

The leaf hash of a record is SHA-256(0x00 || its line without the newline); its leaf index is its
sequence number. Old segments (a ``.jsonl`` with its ``.start.json``) may be moved to an archive:
the next segment's ``.start.json`` keeps what proofs need of them.

This module only reads; it never writes, repairs or deletes a file, and never returns a record it
could not parse (it raises :class:`AuditLogCorrupt` naming the file and line instead). The one
thing :func:`iter_records` passes over in silence is an unterminated last line of the last
segment: a record whose write was cut by a crash was never acknowledged (see
:mod:`gateway.audit.log`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gateway.audit import jcs
from gateway.audit.errors import AuditLogCorrupt
from gateway.audit.merkle import Frontier

SEGMENT_PREFIX = "segment-"
SEGMENT_SUFFIX = ".jsonl"
START_SUFFIX = ".start.json"
CHECKPOINTS_FILE = "checkpoints.jsonl"
LATEST_CHECKPOINT_FILE = "checkpoint"
LOCK_FILE = ".lock"
# Lines longer than this are reported, not read into memory (the writer's limit is far lower).
DEFAULT_MAX_LINE_BYTES = 64 << 20
_SEGMENT_NAME = re.compile(r"^segment-(\d{12})\.jsonl$")
_START_KEYS = {"checkpoint", "first", "frontier"}

__all__ = [
    "AuditLogCorrupt",
    "Line",
    "Segment",
    "SegmentStart",
    "iter_records",
    "list_segments",
    "read_segment_start",
    "scan_lines",
    "segment_name",
]


@dataclass(frozen=True)
class Segment:
    """One segment file; ``first`` is the sequence number of its first record."""

    first: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def start_path(self) -> Path:
        return self.path.with_name(start_name(self.first))


def segment_name(first: int) -> str:
    """The file name of the segment whose first record has sequence number ``first``."""
    return f"{SEGMENT_PREFIX}{first:012d}{SEGMENT_SUFFIX}"


def start_name(first: int) -> str:
    return f"{SEGMENT_PREFIX}{first:012d}{START_SUFFIX}"


def list_segments(directory: Path) -> list[Segment]:
    """Every segment file in ``directory``, by first sequence number (other files are ignored)."""
    segments = []
    for path in Path(directory).iterdir():
        match = _SEGMENT_NAME.match(path.name)
        if match:
            segments.append(Segment(int(match.group(1)), path))
    return sorted(segments, key=lambda segment: segment.first)


# -- lines ------------------------------------------------------------------------------------


class Line(NamedTuple):
    """One line of a file: 1-based ``number``, byte ``offset``, content without the newline.

    ``data`` is None when the line is longer than the reader's limit (``length`` still counts
    it); ``terminated`` is False for a last line without a newline.
    """

    number: int
    offset: int
    data: bytes | None
    length: int
    terminated: bool


def scan_lines(
    path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, *, offset: int = 0, number: int = 1
) -> Iterator[Line]:
    """Every line of ``path``, reading at most ``max_line_bytes`` + 1 bytes of any one line;
    from byte ``offset`` on, where a line begins, whose number is ``number``."""
    with Path(path).open("rb") as handle:
        handle.seek(offset)
        number -= 1
        while True:
            chunk = handle.readline(max_line_bytes + 1)
            if not chunk:
                return
            number += 1
            if chunk.endswith(b"\n"):
                yield Line(number, offset, chunk[:-1], len(chunk), True)
                offset += len(chunk)
                continue
            if len(chunk) <= max_line_bytes:  # end of file without a newline
                yield Line(number, offset, chunk, len(chunk), False)
                return
            # Too long: skip to the end of the line without keeping it.
            length, terminated = len(chunk), False
            while True:
                more = handle.readline(1 << 20)
                length += len(more)
                if not more or more.endswith(b"\n"):
                    terminated = more.endswith(b"\n")
                    break
            yield Line(number, offset, None, length - terminated, terminated)
            offset += length
            if not terminated:
                return


def _corrupt(file: str, line: int | None, message: str) -> AuditLogCorrupt:
    where = f"{file}:{line}" if line is not None else file
    return AuditLogCorrupt(f"{where}: {message}", metadata={"file": file, "line": line or ""})


def parse_record(file: str, line: Line) -> dict[str, Any]:
    """One record line as a JSON object, or :class:`AuditLogCorrupt` naming file and line."""
    if line.data is None:
        raise _corrupt(file, line.number, f"a line of {line.length} bytes is too long")
    try:
        record = jcs.parse(line.data)
    except (ValueError, RecursionError) as err:
        raise _corrupt(file, line.number, f"not a JSON record ({err})") from None
    if not isinstance(record, dict):
        raise _corrupt(file, line.number, "not a JSON object")
    return record


def iter_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record of the audit log in ``directory``, in sequence order, as parsed JSON.

    Reads segment after segment without loading a whole file. It checks that sequence numbers
    follow each other (from the first segment present, which may not be 0 when old segments were
    archived) but not hashes or signatures: ``silogate audit verify`` does that.
    """
    segments = list_segments(directory)
    expected: int | None = None
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if expected is None:
            expected = segment.first
        elif segment.first != expected:
            raise _corrupt(
                segment.name,
                None,
                f"the segment starts at {segment.first}, expected {expected} (a segment is missing)",
            )
        for line in scan_lines(segment.path):
            if not line.terminated:
                if last:
                    return  # a torn write: never acknowledged, truncated at the next start
                raise _corrupt(segment.name, line.number, "the line is cut short (no newline)")
            record = parse_record(segment.name, line)
            if record.get("seq") != expected:
                raise _corrupt(
                    segment.name,
                    line.number,
                    f"sequence number {record.get('seq')!r}, expected {expected}",
                )
            expected += 1
            yield record


# -- segment starts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentStart:
    """What a ``.start.json`` holds: the tree before the segment's first record."""

    first: int
    frontier: Frontier
    checkpoint: str | None

    def document(self) -> bytes:
        return jcs.canonicalize(
            {
                "checkpoint": self.checkpoint,
                "first": self.first,
                "frontier": [base64.b64encode(h).decode() for h in self.frontier.hashes],
            }
        )


def read_segment_start(segment: Segment) -> SegmentStart:
    """Parse and check a segment's ``.start.json`` (the document must be exactly as written)."""
    file = segment.start_path.name
    try:
        data = segment.start_path.read_bytes()
    except FileNotFoundError:
        raise _corrupt(file, None, "missing (the start of its segment is unknown)") from None
    except OSError as err:
        raise _corrupt(file, None, f"unreadable ({err.strerror})") from None
    if len(data) > 1 << 16 or not jcs.is_canonical(data):
        raise _corrupt(file, 1, "not a canonical JSON document")
    value = jcs.parse(data)
    if not isinstance(value, dict) or set(value) != _START_KEYS:
        raise _corrupt(file, 1, f"expected exactly the fields {', '.join(sorted(_START_KEYS))}")
    first, hashes = value["first"], value["frontier"]
    if first != segment.first or isinstance(first, bool):
        raise _corrupt(file, 1, f"'first' is {first!r}, the file name says {segment.first}")
    checkpoint = value["checkpoint"]
    if not (checkpoint is None or isinstance(checkpoint, str)):
        raise _corrupt(file, 1, "'checkpoint' must be a signed note or null")
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise _corrupt(file, 1, "'frontier' must be a list of base64 hashes")
    try:
        decoded = [base64.b64decode(h, validate=True) for h in hashes]
        if [base64.b64encode(h).decode() for h in decoded] != hashes:
            raise ValueError("not canonical base64")
        frontier = Frontier(first, tuple(decoded))
    except (binascii.Error, ValueError) as err:
        raise _corrupt(file, 1, f"'frontier' is not a frontier of size {first} ({err})") from None
    return SegmentStart(first, frontier, checkpoint)
