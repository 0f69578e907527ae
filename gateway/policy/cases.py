"""Policy test cases and query files: their YAML format and their evaluation, spending nothing.

A case names a consumer and a query (purpose, measures, group-by) as a department system would
send it, and what the policy should answer::

    cases:
      - name: civil affairs counts elderly people living alone per community
        consumer: civil-affairs
        purpose: elderly-care-planning
        group_by: [community]
        measures:
          - id: alone
            dataset: civil.residents
            kind: count
            filters: [{column: lives_alone_elderly, op: "=", value: true}]
            spend: {epsilon: "0.5"}
        expect:
          decision: allow
          rules: [civil-elderly-care]
          cost_rho: "1/8"

``silogate policy explain`` reads one such mapping (``consumer`` and ``expect`` optional) as its
query file. Queries are built as protobuf messages and go through the gateway's own parsing,
validation, decision and planning, so a case answers exactly what the gateway would.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml.comments import CommentedMap

from gateway.api.v1 import query_pb2
from gateway.errors import InvalidQuery, PolicyDenied, PolicyProblem, SourcePosition
from gateway.policy._yaml import parse_policy_yaml
from gateway.policy.decision import Decision, decide
from gateway.policy.model import Bundle, Column, MeasureName
from gateway.policy.sourcemap import plain, position_in
from gateway.query.form import (
    FILTER_OP_NUMBERS,
    MEASURE_KIND_NUMBERS,
    FilterOp,
    QueryForm,
    parse_query,
)
from gateway.query.validate import validate_against_policy
from gateway.server.planning import QueryPlan, plan_query


def _amount_text(value: object) -> object:
    """Amounts may be written as YAML numbers; they become the decimal strings the API takes."""
    if isinstance(value, bool):
        return value  # rejected by the str type below
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, int):
        return str(value)
    return value


Amount = Annotated[str, BeforeValidator(_amount_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilterSpec(_Strict):
    """``column op value``; ``in`` and ``between`` take ``values``, ``is null`` takes none."""

    column: str
    op: FilterOp = "="
    value: Any = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _arity(self) -> FilterSpec:
        if self.op == "is null":
            if self.value is not None or self.values is not None:
                raise ValueError("'is null' takes no value")
        elif (self.value is None) == (self.values is None):
            raise ValueError("give exactly one of 'value' or 'values'")
        return self

    @property
    def literals(self) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        return [] if self.value is None else [self.value]


class SpendSpec(_Strict):
    """Exactly one of an epsilon, a rho or a target 95% error, as in the API."""

    epsilon: Amount | None = None
    rho: Amount | None = None
    target_error: Amount | None = None

    @model_validator(mode="after")
    def _one(self) -> SpendSpec:
        if sum(v is not None for v in (self.epsilon, self.rho, self.target_error)) != 1:
            raise ValueError("give exactly one of 'epsilon', 'rho' or 'target_error'")
        return self


class MeasureSpec(_Strict):
    id: str | None = None
    dataset: str
    kind: MeasureName = "count"
    column: str = ""
    filters: list[FilterSpec] = Field(default_factory=list)
    spend: SpendSpec


class Expectation(_Strict):
    """What the policy should answer; fields left out are not checked."""

    decision: Literal["allow", "deny", "invalid"]
    rules: list[str] | None = None
    reason_code: str | None = None
    reason_contains: str | None = None
    cost_rho: Amount | None = None
    scopes: list[str] | None = None

    @model_validator(mode="after")
    def _cost_is_exact(self) -> Expectation:
        if self.cost_rho is not None:
            try:
                Fraction(self.cost_rho)
            except (ValueError, ZeroDivisionError):
                raise ValueError(
                    f"cost_rho must be a fraction or decimal, got '{self.cost_rho}'"
                ) from None
        return self


class QuerySpec(_Strict):
    """A query as a case or query file writes it."""

    name: str = ""
    consumer: str | None = None
    purpose: str
    group_by: list[str] = Field(default_factory=list)
    measures: list[MeasureSpec] = Field(min_length=1)
    expect: Expectation | None = None


class PolicyCase(QuerySpec):
    """A policy unit test: a named query for a consumer and its expected answer."""

    name: str
    consumer: str
    expect: Expectation


class CaseFile(_Strict):
    cases: list[PolicyCase] = Field(min_length=1)


@dataclass(frozen=True)
class LoadedCase:
    case: PolicyCase
    position: SourcePosition


def _problems(err: ValidationError, file: str, document: Any) -> list[PolicyProblem]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            out.append(
                PolicyProblem(
                    position_in(file, document, loc, at_key=True), f"unknown key '{loc[-1]}'"
                )
            )
        elif e["type"] == "missing":
            out.append(
                PolicyProblem(position_in(file, document, loc[:-1]), f"{where}: missing key")
            )
        else:
            message = e["msg"].removeprefix("Value error, ")
            out.append(PolicyProblem(position_in(file, document, loc), f"{where}: {message}"))
    return out


def _read(path: Path, label: str) -> tuple[Any, list[PolicyProblem]]:
    """The file's tree, parsed as strictly as policy files (no aliases, tags or deep nesting)."""
    problems: list[PolicyProblem] = []
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, [PolicyProblem(None, f"cannot read {label}: {err.strerror}")]
    document = parse_policy_yaml(
        label, data, lambda position, message: problems.append(PolicyProblem(position, message))
    )
    return (None if problems else document), problems


def load_case_file(path: Path, label: str) -> tuple[list[LoadedCase], list[PolicyProblem]]:
    """The cases of one file, or every problem found in it (positions use ``label``)."""
    document, problems = _read(path, label)
    if problems:
        return [], problems
    try:
        parsed = CaseFile.model_validate(plain(document))
    except ValidationError as err:
        return [], _problems(err, label, document)
    cases = [
        LoadedCase(case, position_in(label, document, ("cases", i), at_key=True))
        for i, case in enumerate(parsed.cases)
    ]
    return cases, []


def load_query_file(path: Path, label: str) -> tuple[QuerySpec | None, list[PolicyProblem]]:
    """One query mapping (a case without the list around it) for ``policy explain``."""
    document, problems = _read(path, label)
    if problems:
        return None, problems
    if not isinstance(document, CommentedMap):
        return None, [PolicyProblem(SourcePosition(label, 1, 1), "a query file is a mapping")]
    try:
        return QuerySpec.model_validate(plain(document)), []
    except ValidationError as err:
        return None, _problems(err, label, document)


# --- from YAML to the API's protobuf query ----------------------------------------------------


def _literal(value: Any, column: Column | None) -> query_pb2.Literal:
    """A YAML value as the literal the column's type needs, when it is unambiguous.

    Decimals and dates are written naturally in YAML (``0.5``, ``2025-01-01``); other values keep
    their YAML type, so a type mistake is reported by the gateway's validation as it would be.
    """
    kind = column.type if column is not None else None
    if kind == "decimal" and isinstance(value, int | float | str) and not isinstance(value, bool):
        text = repr(float(value)) if isinstance(value, float) else str(value)
        return query_pb2.Literal(decimal_value=text)
    if kind == "date" and isinstance(value, str):
        return query_pb2.Literal(date_value=value)
    if isinstance(value, bool):
        return query_pb2.Literal(bool_value=value)
    if isinstance(value, int):
        return query_pb2.Literal(int_value=value)
    if isinstance(value, float | Decimal):
        return query_pb2.Literal(decimal_value=repr(float(value)))
    if isinstance(value, dt.date):
        return query_pb2.Literal(date_value=value.isoformat())
    return query_pb2.Literal(string_value=str(value))


def build_query(spec: QuerySpec, bundle: Bundle) -> query_pb2.Query:
    """The protobuf query a department system would send for ``spec``."""
    measures = []
    for i, m in enumerate(spec.measures):
        dataset = bundle.datasets.get(m.dataset)
        columns = dataset.columns if dataset is not None else {}
        filters = [
            query_pb2.Filter(
                column=f.column,
                op=FILTER_OP_NUMBERS[f.op],
                values=[_literal(v, columns.get(f.column)) for v in f.literals],
            )
            for f in m.filters
        ]
        spend = query_pb2.PrivacySpend(
            **{k: v for k, v in m.spend.model_dump().items() if v is not None}
        )
        measures.append(
            query_pb2.Measure(
                id=m.id or f"m{i + 1}",
                dataset=m.dataset,
                kind=MEASURE_KIND_NUMBERS[m.kind],
                column=m.column,
                filters=filters,
                spend=spend,
            )
        )
    return query_pb2.Query(purpose=spec.purpose, measures=measures, group_by=spec.group_by)


# --- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the gateway would answer, without spending: invalid, denied, or allowed and its cost.

    ``plan`` is None when the query is allowed but cannot be planned (``cost_note`` says why,
    e.g. a measure that the release engine does not support yet).
    """

    decision: Literal["allow", "deny", "invalid"]
    deciding_rules: tuple[str, ...] = ()
    reason_code: str = ""
    reasons: tuple[str, ...] = ()
    detail: Decision | None = None
    query: QueryForm | None = None
    plan: QueryPlan | None = None
    cost_note: str = ""

    @property
    def cost_rho(self) -> Fraction | None:
        return self.plan.total_rho if self.plan is not None else None

    @property
    def scopes(self) -> tuple[str, ...]:
        """The budget scopes the query is charged to (known from the decision alone)."""
        if self.decision != "allow" or self.detail is None:
            return ()
        return tuple(s.key for s in self.detail.scopes)


def evaluate(bundle: Bundle, consumer: str, query: query_pb2.Query) -> Outcome:
    """Parse, validate, decide and plan as RunQuery does, up to (not including) the ledger."""
    if consumer not in bundle.consumers:
        return Outcome(
            "invalid",
            reason_code="UNKNOWN_CONSUMER",
            reasons=(f"consumer '{consumer}' is not declared in the bundle",),
        )
    try:
        form = parse_query(query)
        validate_against_policy(form, bundle)
    except InvalidQuery as err:
        reasons = tuple(f"{v.field}: {v.description}" for v in err.violations) or (err.message,)
        return Outcome("invalid", reason_code=err.reason, reasons=reasons)
    decision = decide(bundle, consumer, form)
    if not decision.permitted:
        return Outcome(
            "deny",
            decision.deciding_rules,
            decision.reason_code,
            decision.reasons,
            detail=decision,
            query=form,
        )
    try:
        plan = plan_query(bundle, decision, form)
    except PolicyDenied as err:
        # A cap that only the planned noise can check (a spend given as a target error).
        rule = err.metadata.get("rule", "")
        return Outcome(
            "deny",
            (rule,) if rule else (),
            err.reason,
            (err.message,),
            detail=decision,
            query=form,
        )
    except InvalidQuery as err:
        return Outcome(
            "allow",
            decision.deciding_rules,
            detail=decision,
            query=form,
            cost_note=f"{err.reason}: {err.message}",
        )
    return Outcome("allow", decision.deciding_rules, detail=decision, query=form, plan=plan)
