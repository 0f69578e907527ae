"""The one hierarchy of Silogate's domain errors.

Every error carries a machine-readable ``reason`` (UPPER_SNAKE, AIP-193) and ``metadata`` holding
every value that appears in its message, so callers never parse prose. The mapping to gRPC status
codes lives in exactly one place, :mod:`gateway.server.status`. Messages never contain SQL, rows,
file-system paths of a server or stack traces.

    SilogateError
    ├── InvalidQuery             INVALID_QUERY, UNKNOWN_DATASET, ... (+ field violations)
    ├── Unauthenticated          CERTIFICATE_REQUIRED, UNKNOWN_CONSUMER, CALLER_NOT_GATEWAY
    ├── PolicyDenied             POLICY_DENIED, PURPOSE_NOT_ALLOWED, EPSILON_CAP_EXCEEDED
    ├── DeadlineTooShort         DEADLINE_TOO_SHORT (the caller's deadline cannot fit a silo round trip)
    ├── BudgetExhausted          PRIVACY_BUDGET_EXHAUSTED
    ├── TooManyRequests          TOO_MANY_REQUESTS (per-consumer concurrency limit)
    ├── ReleaseRefused           PLAN_REFUSED, PLAN_INVALID, NOISE_TOO_SMALL, SILO_CAP_EXHAUSTED,
    │                            POLICY_VERSION_MISMATCH (a silo refused the plan)
    ├── SiloUnavailable          SILO_UNAVAILABLE, SILO_RESPONSE_INVALID (with whether budget was spent)
    ├── LedgerUnavailable        LEDGER_UNAVAILABLE, LEDGER_CLOCK_BEHIND, RESERVATION_NOT_OPEN,
    │                            LEDGER_INCONSISTENT (all fail closed: no release)
    ├── RequestConflict          REQUEST_ID_REUSED
    └── ConfigurationError       CONFIG_INVALID, POLICY_INVALID, CERTIFICATE_UNREADABLE, DATA_MISSING, PORT_IN_USE
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One wrong field of a request, as in google.rpc.BadRequest."""

    field: str
    description: str


class SilogateError(Exception):
    """Base of every domain error."""

    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        self.violations: tuple[FieldViolation, ...] = tuple(violations)


class InvalidQuery(SilogateError):
    """The request is malformed or names things the policy does not declare."""

    default_reason = "INVALID_QUERY"


class Unauthenticated(SilogateError):
    """The caller has no acceptable certificate identity."""

    default_reason = "CERTIFICATE_REQUIRED"


class PolicyDenied(SilogateError):
    """The policy does not allow the query."""

    default_reason = "POLICY_DENIED"


class DeadlineTooShort(SilogateError):
    """The caller's remaining deadline cannot fit the silo round trip; nothing was reserved."""

    default_reason = "DEADLINE_TOO_SHORT"


class TooManyRequests(SilogateError):
    """The caller already has as many requests in flight as it may; nothing was reserved."""

    default_reason = "TOO_MANY_REQUESTS"


class BudgetExhausted(SilogateError):
    """A budget scope cannot cover the cost; nothing was spent."""

    default_reason = "PRIVACY_BUDGET_EXHAUSTED"


class ReleaseRefused(SilogateError):
    """A silo refused the release plan after its own checks."""

    default_reason = "PLAN_REFUSED"


class SiloUnavailable(SilogateError):
    """A silo could not be reached or failed."""

    default_reason = "SILO_UNAVAILABLE"


class LedgerUnavailable(SilogateError):
    """The budget ledger cannot record safely (locked, full, clock behind); nothing was spent."""

    default_reason = "LEDGER_UNAVAILABLE"


class RequestConflict(SilogateError):
    """A request id was reused with a different query."""

    default_reason = "REQUEST_ID_REUSED"


class ConfigurationError(SilogateError):
    """A configuration, policy, certificate or data file is missing or wrong (start-up errors)."""

    default_reason = "CONFIG_INVALID"


@dataclass(frozen=True)
class SourcePosition:
    """A place in a policy file, 1-based, for ``file:line:col`` messages."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class PolicyProblem:
    """One problem found while loading a policy bundle."""

    position: SourcePosition | None
    message: str

    def __str__(self) -> str:
        return f"{self.position}: {self.message}" if self.position else self.message


class PolicyInvalid(ConfigurationError):
    """Every problem found in a bundle, collected before raising once."""

    def __init__(self, problems: Sequence[PolicyProblem]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"policy bundle has {len(self.problems)} problem(s):\n"
            + "\n".join(str(p) for p in self.problems),
            reason="POLICY_INVALID",
            metadata={"problems": len(self.problems)},
        )
