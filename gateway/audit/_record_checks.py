"""The per-record checks of ``silogate audit verify``, in worker processes or in-process.

The verifier's main process reads the segments and builds the Merkle tree; what needs only the
record itself (canonical form, sequence number, kind and time, the silo receipts with their
Ed25519 signatures) is checked here, a chunk of consecutive lines at a time. A chunk is either a
block of whole lines as read from the file, which is split and hashed (RFC 6962 leaf hashes) here
too, so the main process only appends the hashes it gets back, or lines the main process read
and hashed one by one (around a line it must look at itself: one too long, or cut short). Either
way the hashes are of exactly the bytes checked. Results are taken back in log order whatever
the number of workers: the tree grows in log order, and a report names the same failures (file,
line, sequence number), in the same order, with one worker or many.

This module never reads or writes files and never raises on damaged input: each problem is a
message for one line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from gateway.audit import jcs
from gateway.silo.receipt import ReceiptKeyring, record_shape_problem

CHUNK_LINES = 512
CHUNK_BYTES = 4 << 20  # and at most this much text (plus one line): records may be large
BLOCK_BYTES = 1 << 20  # a block of whole lines: what the main process reads at a time
# Below this many bytes of segments, starting worker processes costs more than they save.
PARALLEL_FROM_BYTES = 8 << 20


@dataclass
class ChunkResult:
    """Problems of a chunk of lines (index in the chunk, message) and receipts counted per silo:
    signatures verified, and receipts of silos without a key."""

    problems: list[tuple[int, str]] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)
    unchecked: Counter[str] = field(default_factory=Counter)
    leaves: bytes = b""  # for a block: the leaf hash of each line, in order, 32 bytes each


class ReceiptChecker:
    """Checks the silo receipts of records with the silos' keyrings (where given)."""

    def __init__(self, keyrings: Mapping[str, ReceiptKeyring]) -> None:
        self.keyrings = keyrings
        self.result = ChunkResult()

    def one(self, receipt: object, request_id: object) -> str | None:
        """Why one receipt is not acceptable (None when it is)."""
        shape = record_shape_problem(receipt)
        if shape is not None:
            return shape
        assert isinstance(receipt, dict)
        name = receipt["silo"]
        if not name:
            return "a silo receipt names no silo"
        if receipt["request_id"] != request_id:
            return f"the receipt of silo '{name}' names another request id"
        keyring = self.keyrings.get(name)
        if keyring is None:
            self.result.unchecked[name] += 1
            return None
        problem = keyring.shaped_record_problem(receipt)
        if problem is not None:
            return f"the receipt of silo '{name}': {problem}"
        self.result.checked[name] += 1
        return None

    def query(self, record: dict[str, Any]) -> str | None:
        """A gateway query record: a released one needs one receipt per silo it used; a failed
        one keeps the receipts of the silos that answered."""
        receipts = record.get("receipts")
        released = record.get("decision") == "released"
        if receipts is None and not released:
            return None
        if not isinstance(receipts, list) or (released and not receipts):
            return "a released query without silo receipts" if released else "bad receipts"
        silos: set[str] = set()
        for receipt in receipts:
            problem = self.one(receipt, record.get("request_id"))
            if problem is not None:
                return problem
            silo = receipt["silo"]
            if silo in silos:
                return f"two receipts from silo '{silo}'"
            silos.add(silo)
        return None

    def release(self, record: dict[str, Any]) -> str | None:
        """A silo's ``release`` record: its receipt, and the digests it states beside it."""
        if "receipt" not in record:
            return "a release record without its receipt"
        receipt = record["receipt"]
        problem = self.one(receipt, record.get("request_id"))
        if problem is not None:
            return problem
        assert isinstance(receipt, dict)
        for name in ("digest", "values_digest", "query_digest", "rho"):
            if name in record and record[name] != receipt[name]:
                return f"the record's {name} differs from its receipt's"
        return None

    def check(self, record: dict[str, Any]) -> str | None:
        kind = record.get("kind")
        if kind == "query":
            return self.query(record)
        if kind == "release":
            return self.release(record)
        return None


def record_problem(record: object, position: int) -> str | None:
    """What is wrong with a parsed record at leaf index ``position`` (not its receipts)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    seq = record.get("seq")
    if seq != position or isinstance(seq, bool):
        return f"sequence number {seq!r}, expected {position}"
    kind, time = record.get("kind"), record.get("time")
    if not isinstance(kind, str) or not kind:
        return "no record kind"
    if not isinstance(time, str):
        return "no record time"
    try:
        dt.datetime.fromisoformat(time)
    except ValueError:
        return f"the time {time[:40]!r} is not ISO 8601"
    return None


def check_lines(lines: Sequence[bytes], first: int, checker: ReceiptChecker) -> ChunkResult:
    """Check consecutive record lines, the first at leaf index ``first``."""
    checker.result = result = ChunkResult()
    for index, data in enumerate(lines):
        try:
            record = jcs.canonical_value(data)
        except ValueError as err:
            result.problems.append((index, f"not a record: {err}"))
            continue
        problem = record_problem(record, first + index)
        if problem is None:
            assert isinstance(record, dict)
            problem = checker.check(record)
        if problem is not None:
            result.problems.append((index, problem))
    return result


def check_block(block: bytes, first: int, checker: ReceiptChecker) -> ChunkResult:
    """Check and hash the whole lines of ``block`` (each ends with a newline), the first at
    leaf index ``first``."""
    lines = block.split(b"\n")
    lines.pop()  # after the last newline
    result = check_lines(lines, first, checker)
    sha256 = hashlib.sha256
    result.leaves = b"".join([sha256(b"\x00" + line).digest() for line in lines])
    return result


# -- in worker processes ----------------------------------------------------------------------

# A worker process's receipt checker, built once from the raw keys it was started with.
_IN_WORKER: dict[str, ReceiptChecker] = {}


def _start_worker(raw_keys: dict[str, tuple[bytes, ...]]) -> None:
    keyrings = {silo: ReceiptKeyring(raw) for silo, raw in raw_keys.items()}
    _IN_WORKER["checker"] = ReceiptChecker(keyrings)


def _check_in_worker(lines: list[bytes], first: int) -> ChunkResult:
    return check_lines(lines, first, _IN_WORKER["checker"])


def _check_block_in_worker(block: bytes, first: int) -> ChunkResult:
    return check_block(block, first, _IN_WORKER["checker"])


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers at once with everything imported, and is safe while this process runs
    # one thread (the command line); otherwise a fork server starts them from a clean process.
    methods = multiprocessing.get_all_start_methods()
    if _one_thread() and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _one_thread() -> bool:
    """Whether this process runs a single thread, native ones included (as Python 3.12's fork
    warning counts them)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


@dataclass
class _Chunk:
    file: str
    line: int  # line number of the chunk's first line
    first: int  # leaf index of the chunk's first line
    lines: list[bytes] = field(default_factory=list)
    size: int = 0  # bytes of text
    block: bytes | None = None  # whole lines to split and hash (then ``lines`` stays empty)
    count: int = 0  # lines in ``block``

    def check(self, checker: ReceiptChecker) -> ChunkResult:
        if self.block is not None:
            return check_block(self.block, self.first, checker)
        return check_lines(self.lines, self.first, checker)


Report = Callable[[str, int, int, str], None]
Leaves = Callable[[bytes], None]


class RecordChecks:
    """Lines checked chunk by chunk, in ``jobs`` worker processes (in-process with one job);
    :meth:`settle` reports every problem of the lines added so far, in log order, and hands the
    leaf hashes of every block added so far to ``leaves``.

    At most ``2 * jobs`` chunks (each of at most ``CHUNK_LINES`` lines and about
    ``CHUNK_BYTES``, or a block of about ``BLOCK_BYTES``) are in flight, so memory stays
    bounded on any log.
    """

    def __init__(
        self,
        keyrings: Mapping[str, ReceiptKeyring],
        *,
        jobs: int,
        fail: Report,
        checked: Counter[str],
        unchecked: Counter[str],
        leaves: Leaves | None = None,
    ) -> None:
        self.keyrings = keyrings
        self.jobs = max(1, jobs)
        self.fail = fail
        self.leaves = leaves
        self.queued_leaves = 0  # lines of blocks added whose hashes are not handed over yet
        self.checked, self.unchecked = checked, unchecked
        self._checker = ReceiptChecker(keyrings)
        self._chunk: _Chunk | None = None
        self._pending: deque[tuple[_Chunk, Future[ChunkResult]]] = deque()
        self._pool: ProcessPoolExecutor | None = None

    def add(self, file: str, line: int, position: int, data: bytes) -> None:
        """Queue the record at ``file``:``line`` (1-based), leaf index ``position``."""
        chunk = self._chunk
        if chunk is None or chunk.file != file or chunk.line + len(chunk.lines) != line:
            if chunk is not None:
                self._submit(chunk)
            chunk = self._chunk = _Chunk(file, line, position)
        chunk.lines.append(data)
        chunk.size += len(data)
        if len(chunk.lines) >= CHUNK_LINES or chunk.size >= CHUNK_BYTES:
            self._submit(chunk)
            self._chunk = None

    def add_block(self, file: str, line: int, position: int, block: bytes, count: int) -> None:
        """Queue ``count`` whole lines (``block``, each line ending with a newline) from
        ``file``:``line``, the first at leaf index ``position``, to be checked and hashed."""
        if self._chunk is not None:
            chunk, self._chunk = self._chunk, None
            self._submit(chunk)
        self.queued_leaves += count
        self._submit(_Chunk(file, line, position, block=block, count=count))

    def settle(self) -> None:
        """Report the problems of every line added so far (before a finding of the caller's)."""
        if self._chunk is not None:
            chunk, self._chunk = self._chunk, None
            self._submit(chunk)
        while self._pending:
            self._take()

    def close(self) -> None:
        """Stop the workers (pending chunks are dropped: only a stopped run leaves any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, chunk: _Chunk) -> None:
        if self.jobs > 1:
            try:
                if self._pool is None:
                    raw = {silo: keyring.raw for silo, keyring in self.keyrings.items()}
                    self._pool = ProcessPoolExecutor(
                        self.jobs,
                        mp_context=_pool_context(),
                        initializer=_start_worker,
                        initargs=(raw,),
                    )
                while len(self._pending) >= 2 * self.jobs:
                    self._take()
                if self.jobs > 1:
                    if chunk.block is not None:
                        future = self._pool.submit(_check_block_in_worker, chunk.block, chunk.first)
                    else:
                        future = self._pool.submit(_check_in_worker, chunk.lines, chunk.first)
                    self._pending.append((chunk, future))
                    return
            except BrokenProcessPool:
                self.jobs = 1
        while self._pending:  # earlier chunks first
            self._take()
        self._report(chunk, chunk.check(self._checker))

    def _take(self) -> None:
        chunk, future = self._pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the same checks, here, from now on.
            self.jobs = 1
            result = chunk.check(self._checker)
        self._report(chunk, result)

    def _report(self, chunk: _Chunk, result: ChunkResult) -> None:
        if chunk.block is not None:
            self.queued_leaves -= chunk.count
            if self.leaves is not None:
                self.leaves(result.leaves)
        self.checked.update(result.checked)
        self.unchecked.update(result.unchecked)
        for index, message in result.problems:
            self.fail(chunk.file, chunk.line + index, chunk.first + index, message)


def default_jobs() -> int:
    """Worker processes for record checks: one per CPU this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
