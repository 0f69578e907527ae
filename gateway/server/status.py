"""The one place where domain errors become gRPC status (and back, for the client).

Each error becomes a ``google.rpc.Status`` with exactly one ``ErrorInfo`` (AIP-193) and, for
invalid input, a ``BadRequest`` with field violations. Unexpected exceptions become INTERNAL with
reason ``INTERNAL`` and no detail: tracebacks go to the server log, never to the caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.errors import (
    BudgetExhausted,
    ConfigurationError,
    DeadlineTooShort,
    FieldViolation,
    InvalidQuery,
    LedgerUnavailable,
    PolicyDenied,
    ReleaseRefused,
    RequestConflict,
    SilogateError,
    SiloUnavailable,
    TooManyRequests,
    Unauthenticated,
)

DOMAIN = "silogate.local"
log = logging.getLogger("silogate.rpc")

_CODES: dict[type[SilogateError], grpc.StatusCode] = {
    InvalidQuery: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PolicyDenied: grpc.StatusCode.PERMISSION_DENIED,
    BudgetExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyRequests: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The deadline is part of what the caller sent: the same call with the same deadline would
    # fail again, so it is not a transient error the client should retry.
    DeadlineTooShort: grpc.StatusCode.INVALID_ARGUMENT,
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


# The status travels in the trailers, which gRPC clients cap (8 KiB by default). A status that
# echoed a long request string or listed thousands of violations would reach the caller as a
# transport error instead of its reason, so each part is clipped; the full count of violations
# stays in the metadata (``violations``).
_MAX_MESSAGE = 400
_MAX_VALUE = 200
_MAX_VIOLATIONS = 5


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def to_status(err: SilogateError) -> grpc.Status:
    code = status_code(err)
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=err.reason,
            domain=DOMAIN,
            metadata={k: _clip(v, _MAX_VALUE) for k, v in err.metadata.items()},
        )
    )
    details = [info]
    if err.violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_clip(v.field, _MAX_VALUE),
                        description=_clip(v.description, _MAX_VALUE),
                    )
                    for v in err.violations[:_MAX_VIOLATIONS]
                ]
            )
        )
        details.append(bad)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code.value[0], message=_clip(err.message, _MAX_MESSAGE), details=details
        )
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


@dataclass
class RequestFacts:
    """What a handler learns about its request that the log line and the metrics report: the
    consumer once identified, the privacy cost once charged (exact rho)."""

    consumer: str = ""
    cost_rho: Fraction | None = None


_FACTS: ContextVar[RequestFacts | None] = ContextVar("silogate_request_facts", default=None)


def request_facts() -> RequestFacts:
    """The facts of the request being handled (a throwaway object outside ``rpc_boundary``)."""
    return _FACTS.get() or RequestFacts()


class RequestObserver(Protocol):
    """Receives every finished request (the gateway's metrics)."""

    def observe_request(self, method: str, code: str, reason: str, seconds: float) -> None: ...


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc_boundary(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Translate domain errors to status and write one log line per request.

    The line holds the request id, the consumer and cost the handler recorded in
    :func:`request_facts`, the method, status code and reason, and the latency. A servicer with
    a ``metrics`` attribute (a :class:`RequestObserver`) also gets every request counted.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        started = time.perf_counter()
        facts = RequestFacts()
        token = _FACTS.set(facts)
        code, reason = grpc.StatusCode.OK, "OK"
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            code, reason = grpc.StatusCode.UNKNOWN, "ABORTED_BY_HANDLER"
            raise
        except asyncio.CancelledError:
            # The caller went away (or its deadline passed) while the handler waited.
            code, reason = grpc.StatusCode.CANCELLED, "CANCELLED"
            raise
        except SilogateError as err:
            code, reason = status_code(err), err.reason
            await context.abort_with_status(to_status(err))
            raise  # unreachable: abort_with_status raises
        except Exception:
            code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
            log.exception("unexpected error in %s", method.__name__)
            await context.abort_with_status(internal_status())
            raise
        finally:
            _FACTS.reset(token)
            seconds = time.perf_counter() - started
            cost = facts.cost_rho
            log.info(
                "rpc",
                extra={
                    "rpc": method.__name__,
                    "request_id": getattr(request, "request_id", ""),
                    "consumer": facts.consumer,
                    "status": code.name,
                    "reason": reason,
                    "latency_ms": round(seconds * 1000, 2),
                    "cost_rho": "" if cost is None else str(cost),
                },
            )
            observer: RequestObserver | None = getattr(self, "metrics", None)
            if observer is not None:
                observer.observe_request(method.__name__, code.name, reason, seconds)

    return wrapper
