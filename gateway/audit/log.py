"""The audit log writer: durable records in a Merkle tree, segments, signed checkpoints.

``append(kind, fields)`` gives the record the next sequence number (its leaf index), encodes it as
one canonical (RFC 8785) JSON line for the current segment, adds its leaf hash to the in-memory
Merkle frontier (O(log n)), and returns only once the line is on disk (``fdatasync``). Concurrent
appends share one write and one sync ("group commit"): while one thread syncs, others queue
their lines and wait; the next of them writes every queued line at once and syncs, which covers
them all. Durability before the answer is unchanged; only the number of system calls per record
falls under load. A write that fails is taken back whole: every append in it raises, and the
log goes on from the sequence number it had. The on-disk layout is described in
:mod:`gateway.audit.store`.

Segments rotate when the next record would make the current one larger than
``segment_max_bytes`` or it is older than ``segment_max_seconds``; the new segment's
``.start.json`` holds the frontier and a checkpoint signed for exactly that size, so older
segments can be archived while proofs for later records still work.

Checkpoints are signed every ``checkpoint_every_records`` records or ``checkpoint_every_seconds``
seconds, also when nothing happened (the same size and root are signed again and re-published),
at rotation and on close. Each note is appended durably to ``checkpoints.jsonl`` before
``checkpoint`` is replaced, and the log refuses to sign a root for a size that already has a
different one.

Start-up checks only the tail: the last segment is re-hashed from its persisted frontier
(bounded by the segment size, not the log size) and compared with the latest checkpoint. A last
line without a newline is a write cut short by a crash; its ``fdatasync`` never returned, so no
caller was told of it: it is truncated and a warning is logged. Any other damage refuses the
start with one line naming file and line.

This module never returns from ``append`` before the record is durable, never rewrites or
deletes a complete record, never writes two records with one sequence number, and never signs a
checkpoint covering records that are not yet durable. Application logs are not the audit log.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit import jcs
from gateway.audit.checkpoint import (
    MAX_NOTE_BYTES,
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    load_signing_key,
    open_checkpoint,
    parse_body,
)
from gateway.audit.errors import AuditLogCorrupt, AuditRecordTooLarge, AuditUnavailable
from gateway.audit.merkle import CompactAppender, Frontier, leaf_hash
from gateway.audit.store import (
    CHECKPOINTS_FILE,
    DEFAULT_MAX_LINE_BYTES,
    LATEST_CHECKPOINT_FILE,
    LOCK_FILE,
    Line,
    Segment,
    SegmentStart,
    list_segments,
    read_segment_start,
    scan_lines,
    segment_name,
    start_name,
)

if TYPE_CHECKING:
    from gateway.settings import AuditLogSettings

_sync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
_RESERVED = frozenset({"seq", "time", "kind"})
_EXACT_INT = 2**53  # integers beyond are not all exact doubles: the exact encoder writes them
_log = logging.getLogger("silogate.audit")


@dataclass(frozen=True)
class AuditLogOptions:
    """Limits and schedules of one log (``gateway.settings.AuditSettings`` builds these)."""

    max_record_bytes: int = 1 << 20
    segment_max_bytes: int = 64 << 20
    segment_max_seconds: float = 86_400.0
    checkpoint_every_records: int = 1000
    checkpoint_every_seconds: float = 60.0


class _Waiter:
    """An append waiting for a sync that covers its record; woken exactly once."""

    __slots__ = ("_ready", "dropped", "lead", "target")

    def __init__(self, target: int) -> None:
        self.target = target
        self.lead = False
        self.dropped: AuditUnavailable | None = None  # its record was never written
        self._ready = threading.Lock()
        self._ready.acquire()

    def wake(self, *, lead: bool = False, dropped: AuditUnavailable | None = None) -> None:
        self.lead = lead
        self.dropped = dropped
        self._ready.release()

    def wait(self) -> None:
        self._ready.acquire()


@dataclass
class _Queued:
    """Records numbered and hashed but not yet written, and the log as it was before them."""

    lines: list[bytes]
    frontier: Frontier
    segment_bytes: int


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class _Walk:
    """What turning record fields into JSON found: a running estimate of the encoded size (at
    least the characters of its text), and whether every number and key is one the C encoder
    writes in RFC 8785 form already (:func:`jcs.canonicalize_plain`)."""

    def __init__(self) -> None:
        self.total = 0
        self.plain = True


def _jsonable(value: object, walk: _Walk) -> object:
    """Record fields as JSON values; other types (Fraction, Decimal, Path, times) as text.

    Callers have always been able to pass such values (the log used ``default=str``); turning
    them into text here keeps every record writable, so no outcome escapes the log on a type.
    """
    kind = type(value)
    # The exact built-in containers first: the ABC checks below cost more than the copy.
    if kind is dict:
        return _json_object(value, walk)  # type: ignore[arg-type]
    if kind is list or kind is tuple:
        return _json_array(value, walk)  # type: ignore[arg-type]
    walk.total += 8
    if kind is str:
        walk.total += len(value)  # type: ignore[arg-type]
        return value
    if value is None or kind is bool:
        return value
    if kind is int:
        if not -_EXACT_INT <= value <= _EXACT_INT:  # type: ignore[operator]
            walk.plain = False
        return value
    if kind is float:
        return _json_float(value, walk)  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return _jsonable({str(k): v for k, v in value.items()}, walk)
    if isinstance(value, list | tuple):
        return [_jsonable(v, walk) for v in value]
    if isinstance(value, str | int):  # subclasses (enums) as their plain value
        return _jsonable(str(value) if isinstance(value, str) else int(value), walk)
    if isinstance(value, float):
        return _jsonable(float(value), walk)
    if isinstance(value, Fraction | Decimal):
        return str(value)
    return str(value)


# The containers' own loops take their strings, integers, booleans and nulls without a call per
# value: records are mostly such leaves, and a call each cost more than encoding the record.


def _json_float(value: float, walk: _Walk) -> object:
    text = repr(value)
    if text[-1] in "nf":  # nan, inf, -inf: no JSON form, kept as text
        return text
    if "e" in text or text.endswith(".0"):
        walk.plain = False  # see jcs.plain_number
    return value


def _json_object(value: dict[object, object], walk: _Walk) -> dict[str, object]:
    copy: dict[str, object] = {}
    total = 8
    for key, given in value.items():
        item, kind = given, type(given)
        total += 8
        if kind is str:
            total += len(item)  # type: ignore[arg-type]
        elif kind is int:
            if not -_EXACT_INT <= item <= _EXACT_INT:  # type: ignore[operator]
                walk.plain = False
        elif kind is float:
            item = _json_float(item, walk)  # type: ignore[arg-type]
        elif item is not None and kind is not bool:
            total -= 8
            item = _jsonable(item, walk)
        copy[key if type(key) is str else str(key)] = item
    walk.total += total
    if walk.plain:
        names = "".join(copy)
        if not names.isascii() and not jcs.plain_key(names):
            walk.plain = False
    return copy


def _json_array(value: list[object] | tuple[object, ...], walk: _Walk) -> list[object]:
    copy: list[object] = []
    total = 8
    for given in value:
        item, kind = given, type(given)
        total += 8
        if kind is str:
            total += len(item)  # type: ignore[arg-type]
        elif kind is int:
            if not -_EXACT_INT <= item <= _EXACT_INT:  # type: ignore[operator]
                walk.plain = False
        elif kind is float:
            item = _json_float(item, walk)  # type: ignore[arg-type]
        elif item is not None and kind is not bool:
            total -= 8
            item = _jsonable(item, walk)
        copy.append(item)
    walk.total += total
    return copy


def _scrub(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically and durably (temporary file, fsync, rename, fsync folder)."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_directory(path.parent)


class AuditLog:
    """The audit log in one directory; sequence numbers start at 0 and never repeat."""

    def __init__(
        self,
        directory: Path,
        *,
        signer: CheckpointSigner | None = None,
        options: AuditLogOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.signer = signer
        self.options = options or AuditLogOptions()
        self._clock = clock
        self._lock = threading.Lock()  # record order, the frontier, files
        # Group commit (see `_sync_through`): how far is durable, whether an append leads the
        # syncing, whether a sync is running, and the appends waiting for one.
        self._synced = threading.Condition()
        self._durable = 0
        self._leading = False
        self._in_flight = False
        self._waiters: list[_Waiter] = []
        # Lines are written by the append that syncs, all at once (see `_queue_line`); a failed
        # write drops them and bumps the epoch, which their appends check.
        self._queued: _Queued | None = None
        self._epoch = 0
        self._dropped: AuditUnavailable | None = None
        self._failure: str | None = None
        self._closed = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_checkpoint: Checkpoint | None = None
        self._last_note: str | None = None
        self._last_checkpoint_at = clock()
        self._key_rotated = False
        self._lock_fd = -1
        self._fd = -1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._take_lock()
            self._recover()
            if self._key_rotated and self.signer is not None:
                self.append(
                    "checkpoint_key_rotated",
                    {"origin": self.signer.origin, "key_id": self.signer.key_id},
                )
            if self.signer is not None:
                # Sign what was recovered straight away: a log always has a checkpoint, and a
                # tail that cannot be signed (another root for a signed size) stops the start.
                self.checkpoint()
        except OSError as err:
            self._release()
            raise AuditUnavailable(
                f"cannot open the audit log: {err.strerror}", metadata={"error": err.strerror}
            ) from err
        except BaseException:
            self._release()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # Two writers would give two records one sequence number.
            raise AuditUnavailable(
                "the audit log is in use by another process", reason="AUDIT_LOG_IN_USE"
            ) from None
        return fd

    def _recover(self) -> None:
        segments = list_segments(self.directory)
        if not segments:
            if (self.directory / "audit.jsonl").exists():
                raise AuditLogCorrupt(
                    "audit.jsonl is a log in the format before Merkle trees; move it to an "
                    "archive to start a new log",
                    metadata={"file": "audit.jsonl"},
                )
            self._appender = CompactAppender(Frontier(0))
            self._open_segment(0, Frontier(0), None)
            self._durable = 0
            self._load_latest_checkpoint()
            return
        segment = segments[-1]
        start = read_segment_start(segment)
        self._check_start(segment, start)
        latest = self._load_latest_checkpoint()
        appender = CompactAppender(start.frontier)
        roots = {appender.size: appender.root()}
        end = 0
        opened = self._clock()
        # Read with the reader's limit, not this process's: records written under a higher
        # configured limit are still records.
        for line in scan_lines(segment.path, DEFAULT_MAX_LINE_BYTES):
            if not line.terminated:
                self._truncate_torn(segment, line)
                break
            if line.data is None or not jcs.is_canonical(line.data):
                raise AuditLogCorrupt(
                    f"{segment.name}:{line.number}: not a canonical JSON record; the log tail "
                    "cannot be verified (run 'silogate audit verify')",
                    metadata={"file": segment.name, "line": line.number},
                )
            record = jcs.parse(line.data)
            if not isinstance(record, dict) or record.get("seq") != appender.size:
                raise AuditLogCorrupt(
                    f"{segment.name}:{line.number}: expected sequence number {appender.size}",
                    metadata={"file": segment.name, "line": line.number},
                )
            if appender.size == start.first:
                # A segment's age counts from its first record (a time the tree covers).
                opened = self._record_time(record.get("time"))
            appender.append(leaf_hash(line.data))
            if latest is not None and appender.size == latest.size:
                roots[latest.size] = appender.root()
            end = line.offset + line.length
        self._appender = appender
        self._durable = appender.size
        if latest is not None:
            self._check_tail_against(latest, segment, roots)
        self._segment = segment
        self._segment_opened = opened
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        self._segment_bytes = end

    def _check_start(self, segment: Segment, start: SegmentStart) -> None:
        if self.signer is None:
            return
        if start.checkpoint is None:
            if start.first > 0:
                _log.warning(
                    "audit segment start is not signed",
                    extra={"file": segment.start_path.name},
                )
            return
        try:
            checkpoint = open_checkpoint(start.checkpoint, self.signer.public_key)
        except CheckpointError:
            try:
                checkpoint, _, _ = parse_body(start.checkpoint)
            except CheckpointError as err:
                raise AuditLogCorrupt(
                    f"{segment.start_path.name}: its checkpoint is unreadable ({err})",
                    metadata={"file": segment.start_path.name},
                ) from None
            # Well formed but signed by another key: a rotated key (recorded once the log is
            # open); ``silogate audit verify`` with both public keys checks the signature.
            self._key_rotated = True
        if checkpoint.size != start.first or checkpoint.root != start.frontier.root():
            raise AuditLogCorrupt(
                f"{segment.start_path.name}: the frontier does not match its signed checkpoint",
                metadata={"file": segment.start_path.name},
            )

    def _truncate_torn(self, segment: Segment, line: Line) -> None:
        # Its fdatasync never completed, so append() never returned: nobody was given this
        # sequence number. Dropping the partial bytes restores the last durable state.
        with segment.path.open("r+b") as handle:
            handle.truncate(line.offset)
            handle.flush()
            os.fsync(handle.fileno())
        _log.warning(
            "audit log: dropped a record cut short by a crash (never acknowledged)",
            extra={"file": segment.name, "line": line.number, "bytes": line.length},
        )

    def _check_tail_against(
        self, latest: Checkpoint, segment: Segment, roots: dict[int, bytes]
    ) -> None:
        size = self._appender.size
        if latest.size > size:
            raise AuditLogCorrupt(
                f"{CHECKPOINTS_FILE}: the latest checkpoint covers {latest.size} records but "
                f"the log has {size} (records were lost after {segment.name})",
                metadata={"file": CHECKPOINTS_FILE, "size": latest.size, "records": size},
            )
        root = roots.get(latest.size)
        if root is not None and root != latest.root:
            raise AuditLogCorrupt(
                f"{segment.name}: the records differ from the checkpoint signed for size "
                f"{latest.size}",
                metadata={"file": segment.name, "size": latest.size},
            )

    def _load_latest_checkpoint(self) -> Checkpoint | None:
        """The last note of ``checkpoints.jsonl`` (a torn last line is dropped, as for records)."""
        path = self.directory / CHECKPOINTS_FILE
        if not path.exists():
            return None
        last: Line | None = None
        for line in scan_lines(path, MAX_NOTE_BYTES * 2):
            if not line.terminated:
                self._truncate_torn(Segment(0, path), line)
                break
            last = line
        if last is None:
            return None
        try:
            if last.data is None:
                raise ValueError("the line is too long")
            document = jcs.parse(last.data)
            if not isinstance(document, dict) or not isinstance(document.get("note"), str):
                raise ValueError("not a checkpoint document")
            note: str = document["note"]
            checkpoint, _, _ = parse_body(note)
        except (ValueError, CheckpointError) as err:
            raise AuditLogCorrupt(
                f"{CHECKPOINTS_FILE}:{last.number}: the latest checkpoint is unreadable ({err})",
                metadata={"file": CHECKPOINTS_FILE, "line": last.number},
            ) from None
        if self.signer is not None:
            if checkpoint.origin != self.signer.origin:
                raise AuditLogCorrupt(
                    f"{CHECKPOINTS_FILE}:{last.number}: the log's origin is "
                    f"{checkpoint.origin!r}, the configured origin {self.signer.origin!r}",
                    metadata={"file": CHECKPOINTS_FILE, "line": last.number},
                )
            try:
                open_checkpoint(note, self.signer.public_key, self.signer.origin)
            except CheckpointError:
                # Signed by another key: the operator rotated the checkpoint key. The tail is
                # still checked against the note's size and root; the rotation is recorded.
                self._key_rotated = True
        self._last_note = note
        self._last_checkpoint = checkpoint
        return checkpoint

    def _record_time(self, text: object) -> float:
        try:
            return dt.datetime.fromisoformat(str(text)).timestamp()
        except ValueError:
            return self._clock()

    def _open_segment(self, first: int, frontier: Frontier, note: str | None) -> None:
        start = SegmentStart(first, frontier, note)
        # The start document first: a segment file never exists without it.
        _replace_file(self.directory / start_name(first), start.document())
        path = self.directory / segment_name(first)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_directory(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segment = Segment(first, path)
        self._segment_opened = self._clock()
        self._segment_bytes = 0

    # -- appending --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """How many records the log holds (written; durable once ``append`` returned)."""
        return self._appender.size

    def append(self, kind: str, fields: Mapping[str, Any]) -> int:
        """Write one record durably and return its sequence number."""
        reserved = _RESERVED.intersection(fields)
        if reserved:
            raise ValueError(f"record fields may not be named {', '.join(sorted(reserved))}")
        walk = _Walk()
        body = _jsonable(fields, walk)
        assert isinstance(body, dict)
        limit = self.options.max_record_bytes
        with self._lock:
            self._check_usable()
            sequence = self._appender.size
            record = {"seq": sequence, "time": _now_text(), "kind": kind, **body}
            try:
                if walk.total > limit:
                    # Possibly huge: the exact encoder gives up as soon as the limit is passed.
                    line = jcs.canonicalize(record, limit=limit)
                else:
                    try:
                        line = (
                            jcs.canonicalize_plain(record)
                            if walk.plain and jcs.plain_number(sequence)
                            else jcs.canonicalize_record(record)
                        )
                    except jcs.NotCanonicalizable:
                        # Only a lone surrogate gets here (_jsonable made everything else
                        # JSON): keep the record, with U+FFFD in its place.
                        line = jcs.canonicalize_record(_scrub(record))
                if len(line) > limit:
                    raise jcs.TooLarge(f"{len(line)} bytes")
            except jcs.TooLarge:
                raise AuditRecordTooLarge(
                    f"a '{kind}' record is larger than {limit} bytes",
                    metadata={"kind": kind, "limit": limit},
                ) from None
            self._rotate_if_due(len(line) + 1)
            self._queue_line(line)
            target, epoch = self._appender.size, self._epoch
            if target - self._checkpointed_size() >= self.options.checkpoint_every_records:
                self._wake.set()
        self._sync_through(target, epoch)
        return sequence

    def _check_usable(self) -> None:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        if self._failure is not None:
            raise AuditUnavailable(
                f"the audit log stopped after a write error: {self._failure}",
                metadata={"error": self._failure},
            )

    def _queue_line(self, line: bytes) -> None:
        """Number and hash ``line``; the append that syncs next writes it with the others.

        One ``write`` per sync rather than per record: a system call releases the GIL, and with
        the log lock held that made every other writer queue behind it.
        """
        if self._queued is None:
            self._queued = _Queued([], self._appender.frontier(), self._segment_bytes)
        self._queued.lines.append(line + b"\n")
        if self._segment_bytes == 0:
            self._segment_opened = self._clock()  # a segment's age counts from its first record
        self._segment_bytes += len(line) + 1
        self._appender.append(leaf_hash(line))

    def _write_queued_locked(self) -> None:
        """With the log lock held: write the queued lines. If that fails, take the partial
        bytes back and drop the queued records (their appends raise); the log goes on."""
        queued, self._queued = self._queued, None
        if queued is None:
            return
        try:
            _write_all(self._fd, b"".join(queued.lines))
        except OSError as err:
            # Take back a partial line so the file stays a sequence of whole records.
            try:
                os.ftruncate(self._fd, queued.segment_bytes)
            except OSError:
                self._failure = err.strerror or "write failed"
            self._appender = CompactAppender(queued.frontier)
            self._segment_bytes = queued.segment_bytes
            dropped = AuditUnavailable(
                f"cannot write the audit log: {err.strerror}", metadata={"error": err.strerror}
            )
            with self._synced:
                # Every waiting append's record was queued: earlier ones are durable already.
                self._epoch += 1
                self._dropped = dropped
                waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.wake(dropped=dropped)
            raise dropped from err

    def _sync_through(self, target: int, epoch: int) -> None:
        """Return once records up to ``target`` are durable (leader-follower group commit).

        One append at a time leads: it syncs everything written so far. Appends that finish
        writing while it syncs wait, each on its own lock, and are woken exactly once: when a
        sync covered their record, or (the first still uncovered) to lead the next sync, which
        covers every record written before it starts. Waking only the appends a sync concerns
        keeps the cost per append flat however many writers wait; a condition variable's
        ``notify_all`` woke every waiter after every sync, which cost more CPU than it saved.
        """
        with self._synced:
            if epoch != self._epoch:  # a failed write dropped the record
                assert self._dropped is not None
                raise self._dropped
            if self._durable >= target:
                return
            if self._failure is not None:
                self._check_usable()
            waiter: _Waiter | None = None
            if self._leading:
                waiter = _Waiter(target)
                self._waiters.append(waiter)
            else:
                self._leading = True
        if waiter is not None:
            waiter.wait()
            if waiter.dropped is not None:
                raise waiter.dropped
            if not waiter.lead:
                if self._durable < target:  # woken by a sync that failed
                    self._check_usable()
                return
        self._lead()

    def _lead(self) -> None:
        """Write the queued lines and sync, then wake the appends covered and the next leader."""
        with self._lock:
            if self._failure is None and self._fd >= 0:
                try:
                    self._write_queued_locked()
                except AuditUnavailable:
                    with self._synced:
                        self._leading = False  # every waiting append was dropped with it
                    raise
            # Taken under the log lock, which a rotation or close holds while it waits for
            # `_in_flight` to clear: the fd stays open until this sync returns.
            with self._synced:
                upto = self._appender.size
                if self._failure is None and self._fd < 0 and upto > self._durable:
                    self._failure = "the audit log was closed"
                syncing = self._failure is None and upto > self._durable
                self._in_flight = syncing
            fd = self._fd
        error: OSError | None = None
        if syncing:
            try:
                _sync(fd)
            except OSError as err:
                error = err
        with self._synced:
            self._in_flight = False
            if error is not None:
                self._failure = error.strerror or "sync failed"
            elif syncing:
                self._durable = max(self._durable, upto)
            covered, after = self._settle_locked()
            self._leading = after is not None
            self._synced.notify_all()  # a rotation or close waiting for `_in_flight`
        for waiter in covered:
            waiter.wake()
        if after is not None:
            after.wake(lead=True)
        if error is not None:
            raise AuditUnavailable(
                f"cannot make the audit log durable: {error.strerror}",
                metadata={"error": error.strerror},
            ) from error

    def _settle_locked(self) -> tuple[list[_Waiter], _Waiter | None]:
        """With ``_synced`` held: the waiters to wake (covered, or failed) and the next leader."""
        if self._failure is not None:
            covered, self._waiters = self._waiters, []
            return covered, None
        durable = self._durable
        covered = [w for w in self._waiters if w.target <= durable]
        if len(covered) == len(self._waiters):
            self._waiters = []
            return covered, None
        rest = [w for w in self._waiters if w.target > durable]
        self._waiters = rest[1:]
        return covered, rest[0]

    def _sync_all_locked(self) -> None:
        """With the log lock held: write what is queued and make everything durable."""
        with self._synced:
            while self._in_flight:
                self._synced.wait()
            if self._failure is not None:
                self._check_usable()  # never sign or rotate over records that may be lost
        self._write_queued_locked()
        with self._synced:
            if self._durable >= self._appender.size:
                return
            upto = self._appender.size
            self._in_flight = True
        # No other sync can start meanwhile (a leader takes the log lock first), and appends
        # may still register as waiters.
        error: OSError | None = None
        try:
            _sync(self._fd)
        except OSError as err:
            error = err
        with self._synced:
            self._in_flight = False
            if error is not None:
                self._failure = error.strerror or "sync failed"
            else:
                self._durable = max(self._durable, upto)
            # Leadership is left as it is: a leader woken to sync finds nothing left to do.
            covered: list[_Waiter] = []
            waiting: list[_Waiter] = []
            for waiter in self._waiters:
                (covered if error is not None or waiter.target <= upto else waiting).append(waiter)
            self._waiters = waiting
            self._synced.notify_all()
        for waiter in covered:
            waiter.wake()
        if error is not None:
            raise AuditUnavailable(
                f"cannot make the audit log durable: {error.strerror}",
                metadata={"error": error.strerror},
            ) from error

    def _rotate_if_due(self, incoming: int) -> None:
        if self._segment_bytes == 0:
            return  # never leave an empty segment behind
        too_big = self._segment_bytes + incoming > self.options.segment_max_bytes
        too_old = self._clock() - self._segment_opened >= self.options.segment_max_seconds
        if too_big or too_old:
            self._rotate()

    def _rotate(self) -> None:
        self._sync_all_locked()
        note = self._checkpoint_locked() if self.signer is not None else None
        self._open_segment(self._appender.size, self._appender.frontier(), note)

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpointed_size(self) -> int:
        return self._last_checkpoint.size if self._last_checkpoint is not None else 0

    def checkpoint(self) -> str | None:
        """Sign the current size and root now (None without a signing key); rotate if due."""
        with self._lock:
            self._check_usable()
            if self._segment_bytes and (
                self._clock() - self._segment_opened >= self.options.segment_max_seconds
            ):
                self._rotate()  # an idle log still closes its segment on time
            if self.signer is None:
                return None
            self._sync_all_locked()
            return self._checkpoint_locked()

    @property
    def latest_checkpoint(self) -> str | None:
        """The last note this log persisted (None before the first)."""
        return self._last_note

    def _checkpoint_locked(self) -> str:
        assert self.signer is not None
        size, root = self._appender.size, self._appender.root()
        last = self._last_checkpoint
        if last is not None and (size < last.size or (size == last.size and root != last.root)):
            # Signing now would put two different trees under one key: refuse for good.
            self._failure = f"the log no longer matches its checkpoint for size {last.size}"
            raise AuditLogCorrupt(
                f"refusing to sign size {size}: {self._failure}",
                metadata={"size": size, "checkpoint_size": last.size},
            )
        note = self.signer.sign(size, root)
        if note != self._last_note:
            # Persisted before published: a note anyone saw is always in checkpoints.jsonl.
            document = jcs.canonicalize({"note": note}) + b"\n"
            path = self.directory / CHECKPOINTS_FILE
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _write_all(fd, document)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._last_note = note
        self._last_checkpoint = Checkpoint(self.signer.origin, size, root)
        self._last_checkpoint_at = self._clock()
        _replace_file(self.directory / LATEST_CHECKPOINT_FILE, note.encode())
        return note

    def start_checkpoints(self) -> None:
        """Start signing in the background every N records or T seconds (needs a signer)."""
        if self.signer is None or self._worker is not None:
            return
        self._worker = threading.Thread(
            target=self._checkpoint_loop, name="audit-checkpoints", daemon=True
        )
        self._worker.start()

    def _checkpoint_loop(self) -> None:
        while not self._stop.is_set():
            due = self._last_checkpoint_at + self.options.checkpoint_every_seconds
            self._wake.wait(max(0.0, due - self._clock()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.checkpoint()
            except (AuditUnavailable, AuditLogCorrupt, OSError) as err:
                _log.error("audit checkpoint failed", extra={"error": str(err)})
                self._stop.wait(min(self.options.checkpoint_every_seconds, 5.0))

    def close(self) -> None:
        """Stop the checkpoint thread, sign a last checkpoint, close the files. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        with self._lock:
            if self._closed:
                return
            try:
                if self._failure is None and self._fd >= 0:
                    self._sync_all_locked()
                    if self.signer is not None:
                        self._checkpoint_locked()
            finally:
                self._closed = True
                self._release()

    def _release(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1

    def root_hash(self) -> str:
        """Base64 root of the records written so far (for logs and tests)."""
        return base64.b64encode(self._appender.root()).decode()


def open_audit_log(directory: Path, settings: AuditLogSettings, *, origin: str) -> AuditLog:
    """Open (and check the tail of) a server's audit log as configured; ``origin`` is the
    default name of the log when the settings give none."""
    signer = None
    if settings.signing_key is not None:
        signer = CheckpointSigner(load_signing_key(settings.signing_key), settings.origin or origin)
    else:
        _log.warning(
            "audit checkpoints are not signed: set audit_log.signing_key",
            extra={"directory": str(directory)},
        )
    options = AuditLogOptions(
        max_record_bytes=settings.max_record_bytes,
        segment_max_bytes=settings.segment_max_bytes,
        segment_max_seconds=settings.segment_max_seconds,
        checkpoint_every_records=settings.checkpoint_every_records,
        checkpoint_every_seconds=settings.checkpoint_every_seconds,
    )
    return AuditLog(directory, signer=signer, options=options)
