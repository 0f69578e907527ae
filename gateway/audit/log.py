"""Append-only audit records as JSON Lines, durable before the caller gets an answer.

Each record gets the next sequence number and is written with ``fsync`` before ``append``
returns. The Merkle tree, checkpoints and proofs (RFC 6962/9162) build on this stream without
changing the record format. Application logs are not the audit log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.errors import ConfigurationError


class AuditLog:
    """One file ``audit.jsonl`` in a directory; sequence numbers start at 0."""

    FILE_NAME = "audit.jsonl"

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.FILE_NAME
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as handle:
                handle.seek(0)
                self._next = sum(1 for _ in handle)
        except OSError as err:
            raise ConfigurationError(
                f"cannot open the audit log: {err.strerror}", reason="AUDIT_UNAVAILABLE"
            ) from err

    def append(self, kind: str, fields: Mapping[str, Any]) -> int:
        """Write one record durably and return its sequence number."""
        with self._lock:
            sequence = self._next
            record = {
                "seq": sequence,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "kind": kind,
                **fields,
            }
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
            with self.path.open("ab") as handle:
                handle.write(line.encode() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._next += 1
            return sequence
