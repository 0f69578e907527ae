"""The gateway's caps on one request and on each consumer's requests in flight.

Every check here runs before any budget is reserved and before any silo is asked, so a refused
request costs nothing but the check. The shape checks run before the query is parsed: a request
with a million IN values or a megabyte purpose is refused by counting, not by building its
internal form. Nothing here echoes request strings back: a violation names the field only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from math import prod

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from gateway.api.v1 import query_pb2
from gateway.errors import DeadlineTooShort, FieldViolation, InvalidQuery, TooManyRequests
from gateway.policy.model import Bundle
from gateway.privacy.sensitivity import histogram_bins
from gateway.query.form import QueryForm
from gateway.settings import GatewayLimits

# Longer than any name a policy can declare or a caller needs; checked before parsing, so an
# error message never carries a huge string.
MAX_NAME = 128
MAX_TEXT_LITERAL = 256
MAX_GROUP_BY = 8


def _text_too_long(text: str, limit: int, field: str, out: list[FieldViolation]) -> None:
    if len(text) > limit:
        out.append(FieldViolation(field, f"at most {limit} characters, got {len(text)}"))


def check_query_shape(query: query_pb2.Query, limits: GatewayLimits) -> None:
    """Refuse (INVALID_QUERY) a query with more measures, filters, IN values, group-by columns or
    longer strings than the caps allow; every violation is listed."""
    out: list[FieldViolation] = []
    if len(query.measures) > limits.max_measures:
        out.append(
            FieldViolation(
                "query.measures",
                f"at most {limits.max_measures} measures, got {len(query.measures)}",
            )
        )
    if len(query.group_by) > MAX_GROUP_BY:
        out.append(
            FieldViolation(
                "query.group_by", f"at most {MAX_GROUP_BY} columns, got {len(query.group_by)}"
            )
        )
    _text_too_long(query.purpose, MAX_NAME, "query.purpose", out)
    for i, column in enumerate(query.group_by):
        _text_too_long(column, MAX_NAME, f"query.group_by[{i}]", out)
    for i, measure in enumerate(query.measures[: limits.max_measures]):
        field = f"query.measures[{i}]"
        for name in ("id", "dataset", "column"):
            _text_too_long(getattr(measure, name), MAX_NAME, f"{field}.{name}", out)
        spend = measure.spend.WhichOneof("spend")
        if spend is not None:
            _text_too_long(getattr(measure.spend, spend), MAX_NAME, f"{field}.spend.{spend}", out)
        if len(measure.filters) > limits.max_filters_per_measure:
            out.append(
                FieldViolation(
                    f"{field}.filters",
                    f"at most {limits.max_filters_per_measure} filters, got {len(measure.filters)}",
                )
            )
        for j, condition in enumerate(measure.filters[: limits.max_filters_per_measure]):
            _text_too_long(condition.column, MAX_NAME, f"{field}.filters[{j}].column", out)
            if len(condition.values) > limits.max_in_values:
                out.append(
                    FieldViolation(
                        f"{field}.filters[{j}].values",
                        f"at most {limits.max_in_values} values, got {len(condition.values)}",
                    )
                )
                continue
            for k, literal in enumerate(condition.values):
                kind = literal.WhichOneof("kind")
                if kind in ("string_value", "decimal_value", "date_value"):
                    limit = MAX_TEXT_LITERAL if kind == "string_value" else MAX_NAME
                    _text_too_long(
                        getattr(literal, kind), limit, f"{field}.filters[{j}].values[{k}]", out
                    )
    if out:
        raise InvalidQuery(
            f"the query exceeds the gateway's limits: {out[0].field}: {out[0].description}",
            reason="INVALID_QUERY",
            metadata={"violations": len(out)},
            violations=out,
        )


def _unknown_fields(message: Message, path: str, out: list[FieldViolation]) -> None:
    unknown = unknown_fields.UnknownFieldSet(message)
    numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
    if numbers:
        out.append(FieldViolation(path or "request", f"unknown field number(s) {numbers[:5]}"))
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        name = f"{path}.{descriptor.name}" if path else descriptor.name
        if descriptor.is_repeated:
            for i, item in enumerate(value):
                _unknown_fields(item, f"{name}[{i}]", out)
        else:
            _unknown_fields(value, name, out)


def check_known_fields(request: Message) -> None:
    """Refuse (INVALID_ARGUMENT, UNKNOWN_FIELD) a request carrying fields this gateway does not
    know, e.g. from a newer version of the API: ignoring one could change what the caller meant
    to spend or ask. Run after :func:`check_query_shape`, which bounds the walk."""
    out: list[FieldViolation] = []
    _unknown_fields(request, "", out)
    if out:
        raise InvalidQuery(
            f"the request has fields this gateway does not know: {out[0].field}: "
            f"{out[0].description}",
            reason="UNKNOWN_FIELD",
            metadata={"violations": len(out)},
            violations=out,
        )


def check_answer_size(query: QueryForm, bundle: Bundle, limits: GatewayLimits) -> None:
    """Refuse (INVALID_QUERY) a policy-valid query whose answer would have more groups (the
    product of its key-set sizes) or values (groups x measures, a histogram counting its bins)
    than the caps allow."""
    dataset = bundle.datasets[query.measures[0].dataset]
    sizes = []
    for column in query.group_by:
        key_set = dataset.columns[column].key_set
        # Keys from the data: the silo releases at most min(max_groups, max_values) of them
        # (those with the largest noisy counts), so they count as one here.
        sizes.append(len(bundle.key_sets[key_set]) if key_set is not None else 1)
    groups = prod(sizes)
    # A histogram releases one value per bin in every group.
    cells = sum(
        len(histogram_bins(bundle.datasets[m.dataset], m)) - 1 if m.kind == "histogram" else 1
        for m in query.measures
    )
    values = groups * cells
    if groups > limits.max_groups:
        raise InvalidQuery(
            f"the answer would have {groups} groups; at most {limits.max_groups} are allowed",
            metadata={"groups": groups, "max_groups": limits.max_groups},
            violations=[FieldViolation("query.group_by", f"at most {limits.max_groups} groups")],
        )
    if values > limits.max_values:
        raise InvalidQuery(
            f"the answer would have {values} values (groups x measures); at most "
            f"{limits.max_values} are allowed",
            metadata={"values": values, "max_values": limits.max_values},
            violations=[
                FieldViolation("query.measures", f"at most {limits.max_values} values in all")
            ],
        )


def check_deadline(remaining: float | None, margin: float, limits: GatewayLimits) -> None:
    """Refuse a call whose remaining time, less the gateway's own ``margin``, is shorter than a
    silo round trip: it would reserve budget and then most likely time out."""
    if remaining is None:
        return
    needed = margin + limits.min_silo_seconds
    if remaining < needed:
        raise DeadlineTooShort(
            f"the call has {remaining:.3f} s left; a query needs at least {needed:.3f} s "
            "(raise the client's deadline)",
            metadata={
                "remaining_seconds": f"{remaining:.3f}",
                "minimum_seconds": f"{needed:.3f}",
            },
        )


class ConsumerAdmission:
    """Counts each consumer's requests in flight and refuses beyond the limit.

    Used from the server's event loop only (one thread), so the counter needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: Counter[str] = Counter()

    def in_flight(self, consumer: str) -> int:
        return self._in_flight[consumer]

    @contextmanager
    def admitted(self, consumer: str) -> Iterator[None]:
        if self._in_flight[consumer] >= self.limit:
            raise TooManyRequests(
                f"consumer '{consumer}' already has {self.limit} requests in flight; wait for "
                "one to finish",
                metadata={"consumer": consumer, "limit": self.limit},
            )
        self._in_flight[consumer] += 1
        try:
            yield
        finally:
            self._in_flight[consumer] -= 1
            if not self._in_flight[consumer]:
                del self._in_flight[consumer]
