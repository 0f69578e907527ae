"""The gateway's public QueryService.

RunQuery: identify the caller by certificate, parse, validate, decide, plan, reserve budget in
every scope, ask each silo concurrently within the caller's deadline, merge, commit, audit,
answer. The audit record is written in a ``finally`` so no outcome (released, denied, failed)
escapes it, and a release is returned only after its record is durable. The gateway never sees an
exact aggregate.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import replace
from fractions import Fraction
from typing import Any

import grpc

from gateway.api.v1 import query_pb2, query_service_pb2, query_service_pb2_grpc, silo_service_pb2
from gateway.audit.log import AuditLog
from gateway.budget.ledger import PrivacyLedger
from gateway.crypto.dev_ca import peer_identities
from gateway.errors import (
    FieldViolation,
    InvalidQuery,
    PolicyDenied,
    RequestConflict,
    SilogateError,
    Unauthenticated,
)
from gateway.policy.decision import Decision, decide, scope_keys
from gateway.policy.holder import PolicyHolder
from gateway.policy.model import Bundle
from gateway.query.form import MEASURE_KIND_NUMBERS, QueryForm, parse_query
from gateway.query.validate import group_keys, validate_against_policy
from gateway.server.messages import balance_message, measure_plan_message, privacy_cost
from gateway.server.planning import QueryPlan, plan_query, scope_limit
from gateway.server.silos import SiloClients, SiloFailure
from gateway.server.status import rpc_boundary

log = logging.getLogger("silogate.gateway")
_DEFAULT_PAGE = 50
_DEADLINE_MARGIN = 0.25  # seconds kept back to merge, commit and audit after the silos answer


class QueryServicer(query_service_pb2_grpc.QueryServiceServicer):
    def __init__(
        self,
        policy: PolicyHolder,
        ledger: PrivacyLedger,
        audit: AuditLog,
        silos: SiloClients,
        silo_timeout: float,
    ) -> None:
        # Each request reads `policy.current` once and uses that bundle throughout: a reload in
        # the middle of a request never mixes two versions.
        self.policy = policy
        self.ledger = ledger
        self.audit = audit
        self.silos = silos
        self.silo_timeout = silo_timeout

    # -- identity ---------------------------------------------------------------------------

    def _consumer(self, bundle: Bundle, context: grpc.aio.ServicerContext) -> str:
        identities = peer_identities(context.auth_context())
        if not identities:
            raise Unauthenticated("a client certificate with a SPIFFE identity is required")
        consumer = bundle.consumer_for_identity(identities)
        if consumer is None:
            raise Unauthenticated(
                "the certificate identity is not a known consumer",
                reason="UNKNOWN_CONSUMER",
                metadata={"identity": identities[0]},
            )
        return consumer

    # -- shared steps -----------------------------------------------------------------------

    def _decide(self, bundle: Bundle, consumer: str, query: QueryForm) -> Decision:
        validate_against_policy(query, bundle)
        decision = decide(bundle, consumer, query)
        if not decision.permitted:
            raise PolicyDenied(
                "; ".join(decision.reasons) or "no rule permits this query",
                reason=decision.reason_code,
                metadata={"rules": ",".join(decision.deciding_rules), "consumer": consumer},
            )
        return decision

    def _balances(self, plan: QueryPlan, after: bool = False) -> list[Any]:
        deltas = {s.key: s.delta for s in plan.scopes}
        messages = []
        for balance in self.ledger.balances(plan.limits()):
            shown = (
                replace(balance, spent=balance.spent + plan.charges[balance.scope])
                if after
                else balance
            )
            messages.append(balance_message(shown, deltas[balance.scope]))
        return messages

    # -- RPCs -------------------------------------------------------------------------------

    def _cache_key(self, bundle: Bundle, query: QueryForm, plan: QueryPlan) -> str | None:
        """The answer-cache identity of a query: same consumer (the ledger keys by consumer),
        canonical query, policy version and budget windows."""
        if not plan.cacheable:
            return None
        return self.ledger.cache_key(query.digest, bundle.version, plan.limits())

    @rpc_boundary
    async def RunQuery(
        self, request: query_service_pb2.RunQueryRequest, context: grpc.aio.ServicerContext
    ) -> query_service_pb2.RunQueryResponse:
        # The outcome moves from "rejected"/"denied" (nothing reserved) to "failed" (reserved,
        # not released) to "released"; the record is written in `finally` whatever happens.
        record: dict[str, Any] = {"request_id": request.request_id, "decision": "rejected"}
        written = False
        bundle = self.policy.current
        try:
            consumer = self._consumer(bundle, context)
            record["consumer"] = consumer
            if not 1 <= len(request.request_id) <= 128:
                raise InvalidQuery(
                    "request_id must have 1 to 128 characters",
                    violations=[FieldViolation("request_id", "1 to 128 characters")],
                )
            query = parse_query(request.query)
            record.update(
                purpose=query.purpose,
                query=query.canonical(),
                digest=query.digest,
                policy_version=bundle.version,
            )
            validate_against_policy(query, bundle)
            record["decision"] = "denied"
            decision = self._decide(bundle, consumer, query)
            record["rules"] = list(decision.deciding_rules)
            plan = plan_query(bundle, decision, query)
            cache_key = self._cache_key(bundle, query, plan)
            reservation = self.ledger.reserve(
                consumer,
                request.request_id,
                query.digest,
                plan.ledger_charges(),
                cache_key=cache_key,
            )
            if reservation.is_replay:
                if reservation.state == "committed" and reservation.stored_response:
                    record["decision"] = "replayed"
                    return query_service_pb2.RunQueryResponse.FromString(
                        reservation.stored_response
                    )
                raise RequestConflict(
                    f"request '{request.request_id}' is still in progress or ended without an "
                    "answer; use a new request id",
                    reason="REQUEST_IN_PROGRESS",
                    metadata={"request_id": request.request_id, "state": reservation.state},
                )
            if reservation.cached_answer is not None:
                # Post-processing of an earlier release: the same numbers, at no cost.
                response = query_service_pb2.RunQueryResponse.FromString(reservation.cached_answer)
                record.update(decision="cached", cached_from=response.audit_sequence)
                response.request_id = request.request_id
                response.cached = True
                response.cost.CopyFrom(privacy_cost(Fraction(0)))
                response.audit_sequence = self.audit.append("query", record)
                written = True
                self.ledger.commit(consumer, request.request_id, response.SerializeToString())
                response.budget_left.extend(self._balances(plan))
                return response
            record.update(
                decision="failed",
                rho=str(plan.total_rho),
                scales={m.measure.id: m.noise.scale for m in plan.measures},
            )
            response, receipts = await self._release(
                request, consumer, query, bundle, decision, plan, context
            )
            record.update(decision="released", receipts=receipts)
            record["values"] = [
                [list(g.keys), v.measure_id, v.value, v.suppressed]
                for g in response.groups
                for v in g.values
            ]
            response.audit_sequence = self.audit.append("query", record)
            written = True
            self.ledger.commit(
                consumer, request.request_id, response.SerializeToString(), cache_key=cache_key
            )
            response.budget_left.extend(self._balances(plan))
            return response
        except SilogateError as err:
            record.update(reason=err.reason, message=err.message)
            raise
        finally:
            if not written:
                self.audit.append("query", record)

    async def _release(
        self,
        request: query_service_pb2.RunQueryRequest,
        consumer: str,
        query: QueryForm,
        bundle: Bundle,
        decision: Decision,
        plan: QueryPlan,
        context: grpc.aio.ServicerContext,
    ) -> tuple[query_service_pb2.RunQueryResponse, list[dict[str, str]]]:
        remaining = context.time_remaining()
        timeout = (
            self.silo_timeout if remaining is None else max(remaining - _DEADLINE_MARGIN, 0.05)
        )
        requests = {
            silo: silo_service_pb2.ReleaseRequest(
                request_id=request.request_id,
                consumer=consumer,
                purpose=query.purpose,
                policy_version=bundle.version,
                group_by=query.group_by,
                plans=[
                    silo_service_pb2.ReleasePlan(
                        measure=next(
                            m for m in request.query.measures if m.id == planning.measure.id
                        ),
                        mechanism=measure_plan_message(planning).mechanism,
                        scale=planning.noise.scale,
                        cost=privacy_cost(planning.noise.rho),
                    )
                    for planning in plan.measures
                    if planning.silo == silo
                ],
            )
            for silo in plan.silos
        }
        outcomes = await asyncio.gather(
            *(self.silos.release(silo, req, timeout) for silo, req in requests.items()),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            silo_failures = [f for f in failures if isinstance(f, SiloFailure)]
            released_somewhere = len(failures) < len(outcomes) or any(
                f.may_have_released for f in silo_failures
            )
            if not released_somewhere:
                self.ledger.cancel(consumer, request.request_id)
            if silo_failures:
                first = silo_failures[0]
                first.error.metadata["budget_spent"] = str(released_somewhere).lower()
                raise first.error
            raise failures[0]
        responses = [o for o in outcomes if isinstance(o, silo_service_pb2.ReleaseResponse)]
        releases = {r.measure_id: r for response in responses for r in response.releases}
        receipts = [
            {"silo": r.receipt.silo, "digest": r.receipt.digest, "at": r.receipt.released_at}
            for r in responses
        ]
        return self._merge(request, query, bundle, decision, plan, releases), receipts

    def _merge(
        self,
        request: query_service_pb2.RunQueryRequest,
        query: QueryForm,
        bundle: Bundle,
        decision: Decision,
        plan: QueryPlan,
        releases: dict[str, Any],
    ) -> query_service_pb2.RunQueryResponse:
        keys = group_keys(query, bundle)
        groups = [query_pb2.GroupResult(keys=list(key)) for key in keys]
        for planning in plan.measures:
            release = releases[planning.measure.id]
            for group, released in zip(groups, release.groups, strict=True):
                for value in released.values:
                    # Suppression is post-processing of the noisy count: it costs nothing.
                    suppressed = value.value < planning.min_group_size
                    group.values.append(
                        query_pb2.MeasureValue(
                            measure_id=value.measure_id,
                            value=0.0 if suppressed else value.value,
                            error95=value.error95,
                            suppressed=suppressed,
                        )
                    )
        return query_service_pb2.RunQueryResponse(
            request_id=request.request_id,
            group_by=query.group_by,
            groups=groups,
            measures=[measure_plan_message(m) for m in plan.measures],
            cost=privacy_cost(plan.total_rho),
            policy_version=bundle.version,
            deciding_rules=decision.deciding_rules,
        )

    @rpc_boundary
    async def ExplainQuery(
        self, request: query_service_pb2.ExplainQueryRequest, context: grpc.aio.ServicerContext
    ) -> query_service_pb2.ExplainQueryResponse:
        record: dict[str, Any] = {"decision": "rejected"}
        bundle = self.policy.current
        try:
            consumer = self._consumer(bundle, context)
            record["consumer"] = consumer
            query = parse_query(request.query)
            record.update(
                purpose=query.purpose, query=query.canonical(), policy_version=bundle.version
            )
            validate_against_policy(query, bundle)
            decision = decide(bundle, consumer, query)
            record.update(
                rules=list(decision.deciding_rules),
                decision="permit" if decision.permitted else "deny",
            )
            denial = query_service_pb2.ExplainQueryResponse(
                decision=query_service_pb2.DECISION_DENY,
                deciding_rules=decision.deciding_rules,
                reasons=decision.reasons,
                policy_version=bundle.version,
            )
            if not decision.permitted:
                return denial
            try:
                plan = plan_query(bundle, decision, query)
            except PolicyDenied as err:  # a per-query cap: the preview says so instead of failing
                record.update(decision="deny", reason=err.reason)
                denial.reasons.append(err.message)
                return denial
            return query_service_pb2.ExplainQueryResponse(
                decision=query_service_pb2.DECISION_PERMIT,
                deciding_rules=decision.deciding_rules,
                measures=[measure_plan_message(m) for m in plan.measures],
                cost=privacy_cost(plan.total_rho),
                budget_after=self._balances(plan, after=True),
                would_be_cached=(key := self._cache_key(bundle, query, plan)) is not None
                and self.ledger.cached_answer(consumer, key) is not None,
                policy_version=bundle.version,
            )
        except SilogateError as err:
            record.update(reason=err.reason)
            raise
        finally:
            self.audit.append("explain", record)

    @rpc_boundary
    async def GetBudget(
        self, request: query_service_pb2.GetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> query_service_pb2.GetBudgetResponse:
        bundle = self.policy.current
        consumer = self._consumer(bundle, context)
        scopes = {
            scope.key: scope
            for rule_id, rule in sorted(bundle.rules.items())
            if rule.effect == "permit" and rule.applies_to_consumer(consumer)
            for name in bundle.datasets
            if rule.applies_to_dataset(name)
            for scope in scope_keys(bundle, consumer, rule_id, name)
        }
        balances = self.ledger.balances([scope_limit(s) for s in scopes.values()])
        return query_service_pb2.GetBudgetResponse(
            balances=[balance_message(b, scopes[b.scope].delta) for b in balances]
        )

    @rpc_boundary
    async def ListDatasets(
        self, request: query_service_pb2.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> query_service_pb2.ListDatasetsResponse:
        bundle = self.policy.current
        consumer = self._consumer(bundle, context)
        if request.page_size < 0:
            raise InvalidQuery(
                "page_size must not be negative", metadata={"page_size": request.page_size}
            )
        offset = _decode_page_token(request.page_token)
        size = request.page_size or _DEFAULT_PAGE
        visible = []
        for name, dataset in sorted(bundle.datasets.items()):
            matching = [
                r
                for r in bundle.rules.values()
                if r.applies_to_consumer(consumer) and r.applies_to_dataset(name)
            ]
            rules = [r for r in matching if r.effect == "permit"]
            # A forbid without measure or purpose limits takes the columns it names away, or the
            # whole dataset when it names none: don't offer what would always be denied.
            blanket = [
                r for r in matching if r.effect == "forbid" and not r.measures and not r.purposes
            ]
            if not rules or any(not r.group_by and not r.filterable for r in blanket):
                continue
            hidden = {c for r in blanket for c in (*r.group_by, *r.filterable)}
            group_by = {g for r in rules for g in r.group_by} - hidden
            filterable = {f for r in rules for f in r.filterable} - hidden
            visible.append(
                query_service_pb2.DatasetInfo(
                    name=name,
                    silo=dataset.silo,
                    population=dataset.population,
                    columns=[
                        query_service_pb2.ColumnInfo(
                            name=column_name,
                            type=column.type,
                            key_set=column.key_set or "",
                            groupable=column_name in group_by,
                            filterable=column_name in filterable,
                        )
                        for column_name, column in dataset.columns.items()
                        if column_name in group_by or column_name in filterable
                    ],
                    measures=sorted({MEASURE_KIND_NUMBERS[m] for r in rules for m in r.measures}),
                    purposes=sorted(
                        {
                            p
                            for r in rules
                            for p in (r.purposes or bundle.consumers[consumer].purposes)
                        }
                    ),
                )
            )
        page = visible[offset : offset + size]
        more = offset + size < len(visible)
        return query_service_pb2.ListDatasetsResponse(
            datasets=page, next_page_token=_encode_page_token(offset + size) if more else ""
        )


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
        if kind != "offset" or offset < 0:
            raise ValueError(token)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidQuery(
            "page_token is not a token from a previous response",
            metadata={"page_token": token},
        ) from err
    return offset
