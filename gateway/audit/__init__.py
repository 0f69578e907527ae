"""The audit log of every decision (Merkle tree and checkpoints are built on this record stream)."""

from gateway.audit.log import AuditLog

__all__ = ["AuditLog"]
