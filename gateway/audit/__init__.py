"""The audit log of every decision: records in an RFC 6962 Merkle tree with signed checkpoints.

Modules:

- :mod:`~gateway.audit.log`: :class:`AuditLog`, the one writer (durable appends with group
  commit, segments, checkpoints, tail check at start-up);
- :mod:`~gateway.audit.store`: the files on disk and :func:`iter_records` for readers;
- :mod:`~gateway.audit.jcs`: RFC 8785 canonical JSON, the bytes that are hashed;
- :mod:`~gateway.audit.merkle`: tree hashes, compact state, proofs, RFC 9162 verifiers;
- :mod:`~gateway.audit.checkpoint`: C2SP signed-note checkpoints, Ed25519 keys;
- :mod:`~gateway.audit.records`: the plan and budget fields of query records;
- :mod:`~gateway.audit.verify` and :mod:`~gateway.audit.proofs`: ``silogate audit verify``,
  ``prove`` and ``check-proof``; search, report and reconcile have their own modules;
- :mod:`~gateway.audit.cli`: the ``silogate audit`` command group.

The checkpoint key is an Ed25519 PEM pair made by ``silogate audit keygen`` (the same key format
as policy signing, but a key of its own); servers are configured with the private key
(``audit_log.signing_key``), auditors get the public key (``--key``).

Nothing in this package lets a caller see a release whose record is not durable, and nothing
here reads application logs: they are not the audit log.
"""

from gateway.audit.log import AuditLog, AuditLogOptions, open_audit_log
from gateway.audit.store import iter_records

__all__ = ["AuditLog", "AuditLogOptions", "iter_records", "open_audit_log"]
