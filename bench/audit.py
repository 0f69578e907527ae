"""Audit log: append throughput with durability on, and ``verify`` speed.

Append: records shaped like the gateway's released-query records (about 1,800 bytes), each
durable (``fdatasync``) before ``append`` returns. Measured with one writer (one sync per record:
nothing to share) and with concurrent writers (group commit: one sync covers every record
written while the previous sync ran). Baselines in the same run, on the same disk, with the same
bytes: ``write`` + ``fdatasync`` per record, and the same with one sync per batch of the size
group commit achieved. Issue 7's target: >= 5,000 records per second.

Verify: ``silogate audit verify``'s work on a log of such records with a checkpoint every 1,000
records (canonical-form check, sequence, receipts, Merkle tree, signatures, consistency), full
(every record), without and with the silo's receipt key (one Ed25519 verification per record),
in one process (``--jobs 1``) and with one worker process per CPU (the default). Baseline:
reading the same lines and hashing each once (SHA-256), the least any verifier does. Issue 7's
target: >= 20,000 records per second, for a full verify as it runs by default. Then, apart: an
incremental run (``--state``) after 10,000 more records, which checks only those.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

from Crypto.PublicKey import ECC

from gateway.audit import jcs
from gateway.audit._record_checks import default_jobs
from gateway.audit.checkpoint import CheckpointSigner
from gateway.audit.log import AuditLog, AuditLogOptions
from gateway.audit.store import list_segments
from gateway.audit.verify import VerifyReport, verify_with_keys
from gateway.silo.receipt import ReceiptSigner, receipt_to_record

APPEND_TARGET = 5_000
VERIFY_TARGET = 20_000
SINGLE = 1_000  # records written by one thread (one sync each)
CONCURRENT = 20_000  # records written by the concurrent writers
WRITERS = 32
VERIFY_RECORDS = 100_000
INCREMENT = 10_000  # records added before the incremental (--state) verify
_sync = getattr(os, "fdatasync", os.fsync)


RECEIPTS = ReceiptSigner(ECC.generate(curve="ed25519"))


def _receipt(number: int) -> dict[str, object]:
    """A signed receipt of silo "civil" for ``bench-<number>``, as the gateway records it."""
    receipt = RECEIPTS.sign(
        silo="civil",
        request_id=f"bench-request-{number:08d}",
        query_digest="cd" * 32,
        datasets=["civil.residents"],
        rho=Fraction(1, 20000),
        releases=[],
        released_at="2026-01-01T00:00:00.000+00:00",
    )
    return receipt_to_record(receipt)


def _record(number: int, receipt: dict[str, object] | None = None) -> dict[str, object]:
    """The fields of a released count query as the gateway records it (servicer.py): plan
    (``plan_fields``), cost and budget left per scope, values, one silo receipt; about 1,800
    bytes once ``seq``, ``time`` and ``kind`` are added, the size of a real record."""
    scopes = (
        "consumer:civil-affairs/rule:civil-elderly-care/lifetime",
        "population:city-residents/lifetime",
    )
    return {
        "request_id": f"bench-request-{number:08d}",
        "decision": "released",
        "consumer": "civil-affairs",
        "purpose": "elderly-care-planning",
        "query": {
            "group_by": [],
            "measures": [
                {
                    "column": "",
                    "dataset": "civil.residents",
                    "filters": [{"column": "birth_year", "op": "<=", "values": [1952]}],
                    "id": "aged",
                    "kind": "count",
                    "spend": {"epsilon": "1/100"},
                }
            ],
            "purpose": "elderly-care-planning",
        },
        "digest": "cd" * 32,
        "policy_version": "ab" * 32,
        "rules": ["civil-elderly-care"],
        "rho": "1/20000",
        "scales": {"aged": 100.00000000000003},
        "mechanisms": {"aged": "discrete_laplace"},
        "components": {
            "aged": [
                {
                    "name": "value",
                    "mechanism": "discrete_laplace",
                    "scale": 100.00000000000003,
                    "rho": "1/20000",
                }
            ]
        },
        "cost": {scope: {"rho": "1/20000", "epsilon": 0.01, "delta": "0"} for scope in scopes},
        "receipts": [receipt if receipt is not None else _receipt(number)],
        "values": [[[], "aged", 1234 + number % 1000, False]],
        "budget_left": {
            scope: {
                "rho": f"{999_997 - number}/20000",
                "epsilon": 9.999984999988751 - number * 1e-9,
            }
            for scope in scopes
        },
    }


def _line(number: int) -> bytes:
    record = {"seq": number, "time": "2026-01-01T00:00:00.000+00:00", "kind": "query"}
    return jcs.canonicalize({**record, **_record(number)}) + b"\n"


def _raw_appends(path: Path, count: int, batch: int) -> float:
    """Records per second writing the same lines with one ``fdatasync`` per ``batch`` lines."""
    lines = [_line(n) for n in range(count)]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        started = time.perf_counter()
        for index, line in enumerate(lines, start=1):
            os.write(fd, line)
            if index % batch == 0 or index == count:
                _sync(fd)
        return count / (time.perf_counter() - started)
    finally:
        os.close(fd)


class _CountingSync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        _sync(fd)


def _log_appends(
    directory: Path, signer: CheckpointSigner, count: int, writers: int
) -> tuple[float, int]:
    """(records per second, syncs) appending ``count`` records from ``writers`` threads."""
    import gateway.audit.log as log_module

    counting = _CountingSync()
    log_module._sync = counting
    try:
        log = AuditLog(directory, signer=signer, options=AuditLogOptions())
        log.start_checkpoints()
        per_writer = count // writers
        # Built (and their receipts signed) before the clock starts: only appends are timed.
        prepared = [
            [_record(worker * per_writer + number) for number in range(per_writer)]
            for worker in range(writers)
        ]

        def write(worker: int) -> None:
            for record in prepared[worker]:
                log.append("query", record)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        log.close()
        return per_writer * writers / elapsed, counting.calls
    finally:
        log_module._sync = _sync


def _write_verify_log(
    directory: Path, signer: CheckpointSigner, count: int, first: int = 0
) -> None:
    """``count`` more records in the log, written fast (no sync: it is a fixture)."""
    import gateway.audit.log as log_module

    log_module._sync = lambda fd: None
    try:
        log = AuditLog(directory, signer=signer, options=AuditLogOptions())
        for number in range(first, first + count):
            log.append("query", _record(number))
            if number % 1000 == 999:
                log.checkpoint()
        log.close()
    finally:
        log_module._sync = _sync


def _hash_lines(directory: Path) -> float:
    started = time.perf_counter()
    count = 0
    for segment in list_segments(directory):
        with segment.path.open("rb") as handle:
            for line in handle:
                hashlib.sha256(b"\x00" + line[:-1]).digest()
                count += 1
    return count / (time.perf_counter() - started)


def _verdict(measured: float, target: int) -> str:
    met = "met" if measured >= target else "NOT met"
    return f"target >= {target:,}: {measured / target:.2f}x target, {met}"


def _verify(
    directory: Path,
    key: ECC.EccKey,
    silo_keys: dict[str, list[ECC.EccKey]] | None,
    jobs: int,
    state: Path | None = None,
) -> tuple[float, VerifyReport]:
    """(seconds, report) of one ``verify`` run."""
    started = time.perf_counter()
    report = verify_with_keys(
        directory, [key.public_key()], silo_keys=silo_keys, jobs=jobs, state_file=state
    )
    elapsed = time.perf_counter() - started
    assert report.ok, report.render()
    if silo_keys:
        assert sum(report.receipts_checked.values()) == report.records
    return elapsed, report


def run() -> None:
    print("\n== audit log (issue 7) ==")
    cpus = default_jobs()
    print(f"{cpus} CPU(s); load average before the run: {os.getloadavg()[0]:.2f}")
    # On the project's disk, not a RAM-backed /tmp: fsync cost is what is measured.
    base = Path(__file__).resolve().parents[1] / "work"
    base.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=base))
    try:
        key = ECC.generate(curve="ed25519")
        signer = CheckpointSigner(key, "bench/audit")
        raw_each = _raw_appends(root / "raw-each.jsonl", SINGLE, batch=1)
        single, single_syncs = _log_appends(root / "single", signer, SINGLE, writers=1)
        many, many_syncs = _log_appends(root / "many", signer, CONCURRENT, writers=WRITERS)
        batch = max(1, round(CONCURRENT / max(many_syncs, 1)))
        raw_batched = _raw_appends(root / "raw-batched.jsonl", CONCURRENT, batch=batch)
        print(f"baseline write+fdatasync per record:      {raw_each:10,.0f} records/s")
        print(
            f"AuditLog.append, 1 writer:                 {single:10,.0f} records/s "
            f"({single / raw_each:.2f}x baseline, {single_syncs} syncs; one writer waits for "
            "every sync, so the per-record baseline bounds it)"
        )
        print(f"baseline write, fdatasync per {batch:>3} records: {raw_batched:10,.0f} records/s")
        print(
            f"AuditLog.append, {WRITERS} writers (group commit): {many:10,.0f} records/s "
            f"({many / raw_each:.1f}x the per-record baseline, {many / raw_batched:.2f}x the "
            f"batched one; {many_syncs} syncs for {CONCURRENT} records) "
            f"{_verdict(many, APPEND_TARGET)}"
        )

        directory = root / "verify"
        _write_verify_log(directory, signer, VERIFY_RECORDS)
        hashed = _hash_lines(directory)
        print(f"baseline read + SHA-256 per line:          {hashed:10,.0f} records/s")
        silo_keys = {"civil": [RECEIPTS.public_key]}
        state = root / "auditor.state"
        for label, keys in (
            ("receipts not given keys", None),
            ("every receipt signature", silo_keys),
        ):
            for jobs in sorted({1, cpus}):
                # The last full run writes the state file the incremental run starts from.
                last = keys is not None and jobs == cpus
                seconds, report = _verify(directory, key, keys, jobs, state if last else None)
                assert report.records == VERIFY_RECORDS
                verified = report.records / seconds
                # The target is about verify as it runs by default (one worker per CPU); a
                # one-process figure on a machine with more CPUs is for comparison only.
                verdict = (
                    _verdict(verified, VERIFY_TARGET)
                    if jobs == cpus
                    else "(one process, for comparison: the target is for the default --jobs)"
                )
                print(
                    f"audit verify, full, {label}, --jobs {jobs} ({report.records:,} records, "
                    f"{report.checkpoints} checkpoints): {verified:10,.0f} records/s "
                    f"({verified / hashed:.2f}x baseline) {verdict}"
                )
        _write_verify_log(directory, signer, INCREMENT, first=VERIFY_RECORDS)
        seconds, report = _verify(directory, key, silo_keys, cpus, state)
        assert report.records == INCREMENT and report.resumed_from == VERIFY_RECORDS
        print(
            f"audit verify --state (incremental: {INCREMENT:,} new records checked with every "
            f"receipt signature, the {VERIFY_RECORDS:,} verified before not read again; not "
            f"the full-verify figure the target is about): {seconds:.2f} s, "
            f"{INCREMENT / seconds:,.0f} new records/s, "
            f"{(VERIFY_RECORDS + INCREMENT) / seconds:,.0f} log records/s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    run()
