"""Errors of the audit log, in the domain hierarchy of :mod:`gateway.errors`.

    ConfigurationError
    ├── AuditLogCorrupt        AUDIT_LOG_CORRUPT: a file is not as the log wrote it (file, line)
    ├── AuditUnavailable       AUDIT_UNAVAILABLE: the log cannot make a record durable right now
    └── AuditRecordTooLarge    AUDIT_RECORD_TOO_LARGE: a record above the size limit was refused

All three are raised instead of answering: a caller never gets a release whose record is not
durable. Messages name audit files by their name inside the audit directory, never by full path.
"""

from __future__ import annotations

from gateway.errors import ConfigurationError


class AuditLogCorrupt(ConfigurationError):
    """An audit file cannot be read as the log wrote it; ``metadata`` names file and line."""

    default_reason = "AUDIT_LOG_CORRUPT"


class AuditUnavailable(ConfigurationError):
    """The audit log cannot write durably (disk full, I/O error, closed, or in use elsewhere)."""

    default_reason = "AUDIT_UNAVAILABLE"


class AuditRecordTooLarge(ConfigurationError):
    """A record is larger than the configured limit; it was not written."""

    default_reason = "AUDIT_RECORD_TOO_LARGE"
