"""Proof bundles: ``silogate audit prove`` writes one, ``silogate audit check-proof`` checks it.

A bundle is one JSON document that needs nothing else but the log's public key::

    {
      "format": "silogate-audit-proof/1",
      "request_id": "...",
      "checkpoint": "<signed note: origin, size, root, signature>",
      "entries": [
        {"leaf_index": 17, "record": "<the record line, exactly as logged>",
         "inclusion_proof": ["<base64 hash>", ...]}
      ]
    }

Every record of the request (a query may be logged again as replayed or cached) is proved
against the same checkpoint: the latest one that covers them all. The record is kept as the
exact text that was hashed, so checking needs no canonicalisation guesswork; the checker still
insists that it is canonical and that its sequence number is its leaf index.

:func:`export_proof` never exports a proof it has not checked against the checkpoint's root
(recomputed from the log), and never proves against an unsigned or missing checkpoint.
:func:`check_proof` never reports success unless the signature verifies with a given key and
every inclusion proof leads to the signed root.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from Crypto.PublicKey import ECC

from gateway.audit import jcs
from gateway.audit.checkpoint import (
    MAX_NOTE_BYTES,
    Checkpoint,
    CheckpointError,
    load_verification_key,
    open_checkpoint,
    parse_body,
)
from gateway.audit.errors import AuditLogCorrupt
from gateway.audit.merkle import MerkleTree, ProofError, leaf_hash, verify_inclusion
from gateway.audit.store import (
    CHECKPOINTS_FILE,
    DEFAULT_MAX_LINE_BYTES,
    list_segments,
    read_segment_start,
    scan_lines,
)
from gateway.errors import InvalidQuery

FORMAT = "silogate-audit-proof/1"
MAX_BUNDLE_BYTES = 64 << 20


def _latest_note(directory: Path) -> tuple[str, Checkpoint] | None:
    path = directory / CHECKPOINTS_FILE
    if not path.exists():
        return None
    latest = None
    for line in scan_lines(path, MAX_NOTE_BYTES * 2):
        if line.terminated and line.data is not None:
            latest = line
    if latest is None or latest.data is None:
        return None
    try:
        document = jcs.canonical_value(latest.data)
        note = document["note"]
        checkpoint, _, _ = parse_body(note)
    except (ValueError, KeyError, TypeError, CheckpointError) as err:
        raise AuditLogCorrupt(
            f"{CHECKPOINTS_FILE}:{latest.number}: the latest checkpoint is unreadable ({err})",
            metadata={"file": CHECKPOINTS_FILE, "line": latest.number},
        ) from None
    return note, checkpoint


def export_proof(directory: Path, request_id: str) -> str:
    """The proof bundle (JSON text) for every record with ``request_id``."""
    directory = Path(directory)
    segments = list_segments(directory) if directory.is_dir() else []
    if not segments:
        raise AuditLogCorrupt(
            f"{directory.name}: no audit segments here", metadata={"file": directory.name}
        )
    latest = _latest_note(directory)
    if latest is None:
        raise AuditLogCorrupt(
            f"{CHECKPOINTS_FILE}: no signed checkpoint yet: nothing can be proved",
            metadata={"file": CHECKPOINTS_FILE},
        )
    note, checkpoint = latest
    tree = MerkleTree(read_segment_start(segments[0]).frontier)
    # The request id as it appears inside a canonical record: a cheap filter before parsing.
    needle = b'"request_id":' + jcs.canonicalize(request_id)
    found: list[tuple[int, bytes]] = []
    for segment in segments:
        if segment.first != tree.size:
            raise AuditLogCorrupt(
                f"{segment.name}: records {tree.size}..{segment.first - 1} are missing",
                metadata={"file": segment.name},
            )
        for line in scan_lines(segment.path, DEFAULT_MAX_LINE_BYTES):
            if not line.terminated or line.data is None:
                break  # a torn tail (never acknowledged) or a line verify will report
            position = tree.size
            tree.append(leaf_hash(line.data))
            if needle in line.data:
                record = jcs.parse(line.data)
                if isinstance(record, dict) and record.get("request_id") == request_id:
                    found.append((position, line.data))
    if not found:
        raise InvalidQuery(
            f"no record with request id {request_id!r}",
            reason="AUDIT_RECORD_NOT_FOUND",
            metadata={"request_id": request_id},
        )
    last = found[-1][0]
    if checkpoint.size <= last:
        raise InvalidQuery(
            f"record {last} is not yet covered by a signed checkpoint (the latest covers "
            f"{checkpoint.size} records); prove it after the next checkpoint",
            reason="AUDIT_NOT_YET_CHECKPOINTED",
            metadata={"seq": last, "size": checkpoint.size},
        )
    if checkpoint.size > tree.size or tree.root(checkpoint.size) != checkpoint.root:
        raise AuditLogCorrupt(
            f"{CHECKPOINTS_FILE}: the log does not match its latest checkpoint (size "
            f"{checkpoint.size}); run 'silogate audit verify'",
            metadata={"file": CHECKPOINTS_FILE, "size": checkpoint.size},
        )
    entries = []
    for position, data in found:
        proof = tree.inclusion_proof(position, checkpoint.size)
        verify_inclusion(position, checkpoint.size, leaf_hash(data), proof, checkpoint.root)
        entries.append(
            {
                "leaf_index": position,
                "record": data.decode("utf-8"),
                "inclusion_proof": [base64.b64encode(h).decode() for h in proof],
            }
        )
    bundle = {"format": FORMAT, "request_id": request_id, "checkpoint": note, "entries": entries}
    return json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"


@dataclass
class ProofCheck:
    """The outcome of checking a bundle: ``ok`` only if every entry is proved."""

    ok: bool = False
    checkpoint: Checkpoint | None = None
    proved: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = []
        if self.ok and self.checkpoint is not None:
            root = base64.b64encode(self.checkpoint.root).decode()
            lines.append(
                f"OK: {len(self.proved)} record(s) are in the log '{self.checkpoint.origin}' "
                f"at size {self.checkpoint.size} (root {root}), signed by the given key"
            )
            for record in self.proved:
                summary = ", ".join(
                    f"{key} {record[key]}"
                    for key in ("kind", "decision", "consumer", "purpose", "time")
                    if isinstance(record.get(key), str)
                )
                lines.append(f"  seq {record.get('seq')}: {summary}")
        else:
            lines.append("FAILED: the proof does not hold")
            lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines) + "\n"


def _hashes(value: object) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise ValueError("'inclusion_proof' is not a list of base64 hashes")
    decoded = []
    for text in value:
        try:
            digest = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{text[:20]!r} is not base64") from None
        if base64.b64encode(digest).decode() != text:
            raise ValueError(f"{text[:20]!r} is not canonical base64")
        decoded.append(digest)
    return decoded


def check_proof(bundle: object, keys: Sequence[ECC.EccKey]) -> ProofCheck:
    """Check a parsed bundle against the log's public key(s); every problem is listed."""
    result = ProofCheck()
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        result.problems.append(f"not a proof bundle (expected format {FORMAT!r})")
        return result
    note, request_id, entries = (bundle.get(k) for k in ("checkpoint", "request_id", "entries"))
    if not isinstance(note, str) or not isinstance(request_id, str):
        result.problems.append("'checkpoint' and 'request_id' must be text")
        return result
    errors = []
    for key in keys:
        try:
            result.checkpoint = open_checkpoint(note, key)
            break
        except CheckpointError as err:
            errors.append(str(err))
    if result.checkpoint is None:
        result.problems.append(f"checkpoint: {errors[0] if errors else 'no key given'}")
        return result
    checkpoint = result.checkpoint
    if not isinstance(entries, list) or not entries:
        result.problems.append("'entries' must list at least one record")
        return result
    for number, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            index, text = entry.get("leaf_index"), entry.get("record")
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(text, str):
                raise ValueError("'leaf_index' must be a number and 'record' text")
            data = text.encode("utf-8")
            record = jcs.canonical_value(data)
            if not isinstance(record, dict) or record.get("seq") != index:
                raise ValueError(f"the record's sequence number is not its leaf index {index}")
            if record.get("request_id") != request_id:
                raise ValueError(f"the record is not about request {request_id!r}")
            proof = _hashes(entry.get("inclusion_proof"))
            verify_inclusion(index, checkpoint.size, leaf_hash(data), proof, checkpoint.root)
        except (ValueError, UnicodeEncodeError) as err:  # ProofError is a ValueError
            kind = "inclusion proof" if isinstance(err, ProofError) else "record"
            result.problems.append(f"entry {number}: {kind}: {err}")
            continue
        result.proved.append(record)
    result.ok = not result.problems
    return result


def check_proof_file(path: Path, keys: Sequence[Path]) -> ProofCheck:
    """Read and check a bundle file; an unreadable file is a failed check, not an exception."""
    public_keys = [load_verification_key(key) for key in keys]
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_BUNDLE_BYTES + 1)
        if len(data) > MAX_BUNDLE_BYTES:
            raise ValueError(f"larger than {MAX_BUNDLE_BYTES} bytes")
        bundle = json.loads(data)
    except (OSError, ValueError, RecursionError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        return ProofCheck(problems=[f"{Path(path).name}: unreadable ({reason})"])
    return check_proof(bundle, public_keys)
