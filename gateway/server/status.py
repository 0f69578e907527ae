"""The one place where domain errors become gRPC status (and back, for the client).

Each error becomes a ``google.rpc.Status`` with exactly one ``ErrorInfo`` (AIP-193) and, for
invalid input, a ``BadRequest`` with field violations. Unexpected exceptions become INTERNAL with
reason ``INTERNAL`` and no detail: tracebacks go to the server log, never to the caller.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.errors import (
    BudgetExhausted,
    ConfigurationError,
    FieldViolation,
    InvalidQuery,
    LedgerUnavailable,
    PolicyDenied,
    ReleaseRefused,
    RequestConflict,
    SilogateError,
    SiloUnavailable,
    Unauthenticated,
)

DOMAIN = "silogate.local"
log = logging.getLogger("silogate.rpc")

_CODES: dict[type[SilogateError], grpc.StatusCode] = {
    InvalidQuery: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PolicyDenied: grpc.StatusCode.PERMISSION_DENIED,
    BudgetExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReleaseRefused: grpc.StatusCode.FAILED_PRECONDITION,
    SiloUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestConflict: grpc.StatusCode.ALREADY_EXISTS,
    LedgerUnavailable: grpc.StatusCode.UNAVAILABLE,
    ConfigurationError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code(err: SilogateError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(err: SilogateError) -> grpc.Status:
    code = status_code(err)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    details = [info]
    if err.violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in err.violations
                ]
            )
        )
        details.append(bad)
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=err.message, details=details)
    )


def internal_status() -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL, message="internal error; see the server log", details=[info]
        )
    )


@dataclass(frozen=True)
class RemoteError:
    """A failed call as the caller sees it: code, reason, message, metadata, field violations."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str]
    violations: tuple[FieldViolation, ...]


def parse_rpc_error(err: grpc.RpcError) -> RemoteError:
    """Read ErrorInfo and BadRequest back from a failed call (clients and the gateway's silo calls)."""
    status = rpc_status.from_call(err)
    reason, metadata, violations = "", {}, []
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    code = err.code()
    return RemoteError(
        code=code,
        reason=reason or code.name,
        message=err.details() or "",
        metadata=metadata,
        violations=tuple(violations),
    )


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc_boundary(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Translate domain errors to status and write one log line per request."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        started = time.perf_counter()
        outcome = "OK"
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            outcome = "ABORTED_BY_HANDLER"
            raise
        except SilogateError as err:
            outcome = err.reason
            await context.abort_with_status(to_status(err))
            raise  # unreachable: abort_with_status raises
        except Exception:
            outcome = "INTERNAL"
            log.exception("unexpected error in %s", method.__name__)
            await context.abort_with_status(internal_status())
            raise
        finally:
            log.info(
                "rpc",
                extra={
                    "rpc": method.__name__,
                    "request_id": getattr(request, "request_id", ""),
                    "status": outcome,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )

    return wrapper
