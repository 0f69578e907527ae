"""Client implementation: a synchronous gRPC channel with mutual TLS.

Every call has a deadline. A RunQuery retried after a transient failure reuses its request id,
so the gateway answers the retry from its ledger instead of spending twice.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from gateway.api.v1 import query_pb2, query_service_pb2, query_service_pb2_grpc
from gateway.crypto.channels import channel_credentials
from gateway.crypto.dev_ca import TlsFiles
from gateway.errors import FieldViolation
from gateway.query.form import FILTER_OP_NUMBERS, MEASURE_KIND_NUMBERS, MeasureKind
from gateway.server.status import parse_rpc_error

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ClientError(Exception):
    """A failed call: status code, machine-readable reason, metadata and field violations."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str],
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata
        self.violations = tuple(violations)


def _literal(value: object) -> query_pb2.Literal:
    if isinstance(value, bool):
        return query_pb2.Literal(bool_value=value)
    if isinstance(value, int):
        return query_pb2.Literal(int_value=value)
    if isinstance(value, Decimal | float):
        return query_pb2.Literal(decimal_value=str(value))
    if isinstance(value, dt.date):
        return query_pb2.Literal(date_value=value.isoformat())
    return query_pb2.Literal(string_value=str(value))


def where(column: str, op: str, *values: object) -> query_pb2.Filter:
    """A filter: ``where("birth_year", "<=", 1966)``, ``where("sex", "in", "F", "M")``."""
    if op not in FILTER_OP_NUMBERS:
        raise ValueError(f"unknown operator {op!r}; use one of {sorted(FILTER_OP_NUMBERS)}")
    return query_pb2.Filter(
        column=column, op=FILTER_OP_NUMBERS[op], values=[_literal(v) for v in values]
    )


def _spend(
    epsilon: str | None, rho: str | None, target_error: str | None
) -> query_pb2.PrivacySpend:
    given = {
        k: v for k, v in (("epsilon", epsilon), ("rho", rho), ("target_error", target_error)) if v
    }
    if len(given) != 1:
        raise ValueError("give exactly one of epsilon, rho or target_error")
    return query_pb2.PrivacySpend(**{k: str(v) for k, v in given.items()})


def _measure(
    kind: MeasureKind,
    measure_id: str,
    dataset: str,
    filters: Iterable[query_pb2.Filter],
    epsilon: str | None,
    rho: str | None,
    target_error: str | None,
    column: str = "",
    bins: Iterable[object] = (),
) -> query_pb2.Measure:
    return query_pb2.Measure(
        id=measure_id,
        dataset=dataset,
        kind=MEASURE_KIND_NUMBERS[kind],
        column=column,
        filters=list(filters),
        spend=_spend(epsilon, rho, target_error),
        bins=[str(edge) for edge in bins],
    )


def count(
    measure_id: str,
    dataset: str,
    *filters: query_pb2.Filter,
    epsilon: str | None = None,
    rho: str | None = None,
    target_error: str | None = None,
) -> query_pb2.Measure:
    """A COUNT of rows, e.g. ``count("members", "org.members", epsilon="0.5")``."""
    return _measure("count", measure_id, dataset, filters, epsilon, rho, target_error)


def count_persons(
    measure_id: str,
    dataset: str,
    *filters: query_pb2.Filter,
    epsilon: str | None = None,
    rho: str | None = None,
    target_error: str | None = None,
) -> query_pb2.Measure:
    """A count of distinct persons."""
    return _measure("count_persons", measure_id, dataset, filters, epsilon, rho, target_error)


def sum_of(
    measure_id: str,
    dataset: str,
    column: str,
    *filters: query_pb2.Filter,
    epsilon: str | None = None,
    rho: str | None = None,
    target_error: str | None = None,
) -> query_pb2.Measure:
    """A SUM of a numeric column, each row clamped to the column's declared bounds."""
    return _measure("sum", measure_id, dataset, filters, epsilon, rho, target_error, column)


def mean_of(
    measure_id: str,
    dataset: str,
    column: str,
    *filters: query_pb2.Filter,
    epsilon: str | None = None,
    rho: str | None = None,
) -> query_pb2.Measure:
    """A MEAN: noisy sum / noisy count, the spend split evenly between the two."""
    return _measure("mean", measure_id, dataset, filters, epsilon, rho, None, column)


def histogram(
    measure_id: str,
    dataset: str,
    column: str,
    *filters: query_pb2.Filter,
    bins: Iterable[object] = (),
    epsilon: str | None = None,
    rho: str | None = None,
    target_error: str | None = None,
) -> query_pb2.Measure:
    """Row counts per bin of a numeric column (``bins``: edges; empty = the policy's bins)."""
    return _measure(
        "histogram", measure_id, dataset, filters, epsilon, rho, target_error, column, bins
    )


@dataclass(frozen=True)
class ResultValue:
    value: float
    error95: float
    suppressed: bool


@dataclass(frozen=True)
class ResultRow:
    keys: dict[str, str]
    values: dict[str, ResultValue]


@dataclass(frozen=True)
class QueryResult:
    request_id: str
    group_by: tuple[str, ...]
    rows: tuple[ResultRow, ...]
    measures: tuple[str, ...]
    epsilon: float
    rho: str
    budget_left: tuple[query_service_pb2.BudgetBalance, ...]
    policy_version: str
    audit_sequence: int
    cached: bool
    raw: query_service_pb2.RunQueryResponse = field(repr=False)

    @classmethod
    def from_response(cls, response: query_service_pb2.RunQueryResponse) -> QueryResult:
        rows = tuple(
            ResultRow(
                keys=dict(zip(response.group_by, g.keys, strict=True)),
                values={
                    v.measure_id + v.bin: ResultValue(v.value, v.error95, v.suppressed)
                    for v in g.values
                },
            )
            for g in response.groups
        )
        return cls(
            request_id=response.request_id,
            group_by=tuple(response.group_by),
            rows=rows,
            measures=tuple(m.measure_id for m in response.measures),
            epsilon=response.cost.epsilon,
            rho=response.cost.rho,
            budget_left=tuple(response.budget_left),
            policy_version=response.policy_version,
            audit_sequence=response.audit_sequence,
            cached=response.cached,
            raw=response,
        )

    def records(self) -> list[dict[str, Any]]:
        """Flat dicts: group keys, then ``<measure>``, ``<measure>_error95``, ``<measure>_suppressed``
        (a histogram's ``<measure>`` is its id and bin, e.g. ``minutes[0,30)``)."""
        out = []
        for row in self.rows:
            record: dict[str, Any] = dict(row.keys)
            for name, value in row.values.items():
                record[name] = value.value
                record[f"{name}_error95"] = value.error95
                record[f"{name}_suppressed"] = value.suppressed
            out.append(record)
        return out

    def to_pandas(self) -> Any:
        """A pandas DataFrame of :meth:`records` (pandas must be installed)."""
        import pandas as pd  # noqa: PLC0415  (optional dependency)

        return pd.DataFrame(self.records())

    def to_polars(self) -> Any:
        """A polars DataFrame of :meth:`records` (polars must be installed)."""
        import polars as pl  # noqa: PLC0415  (optional dependency)

        return pl.DataFrame(self.records())


class SilogateClient:
    """A connection to the gateway's QueryService."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        timeout: float = 30.0,
        retries: int = 2,
    ) -> None:
        self._channel = channel
        self._stub = query_service_pb2_grpc.QueryServiceStub(channel)
        self.timeout = timeout
        self.retries = retries

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        ca: Path | str,
        cert: Path | str,
        key: Path | str,
        timeout: float = 30.0,
        retries: int = 2,
    ) -> SilogateClient:
        """Open a mutual-TLS channel with certificate files (PEM)."""
        credentials = channel_credentials(TlsFiles(ca=Path(ca), cert=Path(cert), key=Path(key)))
        return cls(grpc.secure_channel(address, credentials), timeout=timeout, retries=retries)

    def __enter__(self) -> SilogateClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, *, retry: bool) -> Any:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as err:
                remote = parse_rpc_error(err)
                # A failed query that spent budget (a silo released or may have) keeps its
                # request id charged: a retry would only be told the id is taken.
                spent = remote.metadata.get("budget_spent") == "true"
                if remote.code in _TRANSIENT and not spent and attempt + 1 < attempts:
                    time.sleep(min(0.2 * 2**attempt, 2.0))
                    continue
                raise ClientError(
                    remote.code, remote.reason, remote.message, remote.metadata, remote.violations
                ) from None
        raise AssertionError("unreachable")

    def query(
        self,
        *,
        purpose: str,
        measures: Sequence[query_pb2.Measure],
        group_by: Sequence[str] = (),
        request_id: str | None = None,
    ) -> QueryResult:
        """Run a query (spends budget). Retries reuse ``request_id``, so they never spend twice."""
        request = query_service_pb2.RunQueryRequest(
            request_id=request_id or str(uuid.uuid4()),
            query=query_pb2.Query(purpose=purpose, measures=measures, group_by=group_by),
        )
        return QueryResult.from_response(self._call(self._stub.RunQuery, request, retry=True))

    def explain(
        self, *, purpose: str, measures: Sequence[query_pb2.Measure], group_by: Sequence[str] = ()
    ) -> query_service_pb2.ExplainQueryResponse:
        """Preview decision, noise and cost without spending."""
        request = query_service_pb2.ExplainQueryRequest(
            query=query_pb2.Query(purpose=purpose, measures=measures, group_by=group_by)
        )
        response: query_service_pb2.ExplainQueryResponse = self._call(
            self._stub.ExplainQuery, request, retry=True
        )
        return response

    def budget(self) -> list[query_service_pb2.BudgetBalance]:
        response = self._call(
            self._stub.GetBudget, query_service_pb2.GetBudgetRequest(), retry=True
        )
        return list(response.balances)

    def datasets(self, page_size: int = 50) -> list[query_service_pb2.DatasetInfo]:
        """Every dataset the caller may use (follows page tokens)."""
        out: list[query_service_pb2.DatasetInfo] = []
        token = ""
        while True:
            response = self._call(
                self._stub.ListDatasets,
                query_service_pb2.ListDatasetsRequest(page_size=page_size, page_token=token),
                retry=True,
            )
            out.extend(response.datasets)
            token = response.next_page_token
            if not token:
                return out
