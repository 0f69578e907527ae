"""The gateway's public QueryService.

RunQuery: identify the caller by certificate, admit it under its concurrency limit, check the
request's size, parse, validate, decide, plan, check the deadline, reserve budget in every scope,
ask each silo concurrently within the caller's deadline, check and merge the silos' answers,
commit, audit, answer. Every refusal comes before the reservation. When a silo fails, the charges
are settled per silo (see ``_settle_failure``) and the caller gets no values. The audit record is
written in a ``finally`` so no outcome (released, denied, failed) escapes it, and a release is
returned only after its record is durable. The gateway never sees an exact aggregate.

Ledger and audit calls run in worker threads (``asyncio.to_thread``): both wait for their disk
syncs, and the event loop keeps serving other requests meanwhile (concurrent audit appends also
share one sync). Each is still awaited before the next step, so the order of the steps is the
same as if they ran inline. A released query takes two hand-offs: the reservation (which also
returns the balances it left, for the record), and the audit append followed by the commit
(which returns the balances for the answer) in one thread, in that order.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import defaultdict
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import replace
from fractions import Fraction
from typing import Any

import grpc

from gateway.api.v1 import query_service_pb2, query_service_pb2_grpc, silo_service_pb2
from gateway.audit.log import AuditLog
from gateway.audit.records import budget_left_fields, plan_fields
from gateway.budget.ledger import Balance, PrivacyLedger
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
from gateway.privacy.noise import MECHANISM_NUMBERS
from gateway.query.form import MEASURE_KIND_NUMBERS, QueryForm, parse_query
from gateway.query.validate import group_keys, validate_against_policy
from gateway.server.limits import (
    ConsumerAdmission,
    check_answer_size,
    check_deadline,
    check_known_fields,
    check_query_shape,
)
from gateway.server.merge import merge_releases
from gateway.server.messages import (
    balance_message,
    exact_text,
    measure_plan_message,
    privacy_cost,
    remaining_message,
)
from gateway.server.metrics import GatewayMetrics
from gateway.server.planning import QueryPlan, key_delta_limit, plan_query, scope_limit
from gateway.server.silos import SiloClients, SiloFailure
from gateway.server.status import request_facts, rpc_boundary
from gateway.settings import GatewayLimits
from gateway.silo.receipt import receipt_to_record

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
        limits: GatewayLimits | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        # Each request reads `policy.current` once and uses that bundle throughout: a reload in
        # the middle of a request never mixes two versions.
        self.policy = policy
        self.ledger = ledger
        self.audit = audit
        self.silos = silos
        self.silo_timeout = silo_timeout
        self.limits = limits or GatewayLimits()
        self.admission = ConsumerAdmission(self.limits.max_in_flight_per_consumer)
        # Read by `rpc_boundary` too, which counts every request it sees here.
        self.metrics = metrics

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
        request_facts().consumer = consumer
        return consumer

    # -- shared steps -----------------------------------------------------------------------

    def _decide(self, bundle: Bundle, consumer: str, query: QueryForm) -> Decision:
        """Decide a query already validated against ``bundle``; PolicyDenied unless permitted."""
        decision = decide(bundle, consumer, query)
        if not decision.permitted:
            raise PolicyDenied(
                "; ".join(decision.reasons) or "no rule permits this query",
                reason=decision.reason_code,
                metadata={"rules": ",".join(decision.deciding_rules), "consumer": consumer},
            )
        return decision

    async def _balances(self, plan: QueryPlan, after: bool = False) -> list[Any]:
        """Each scope's balance (and, for keys from the data, its key delta's). ``after``: as if
        this plan's charges were spent (what a preview shows)."""
        balances = await asyncio.to_thread(self.ledger.balances, plan.balance_limits())
        if after:
            balances = [
                replace(balance, spent=balance.spent + plan.charge_of(balance.scope))
                for balance in balances
            ]
        return self._balance_messages(plan, balances)

    @staticmethod
    def _balance_messages(
        plan: QueryPlan, balances: Iterable[Balance]
    ) -> list[query_service_pb2.BudgetBalance]:
        by_scope = {balance.scope: balance for balance in balances}
        return [
            balance_message(by_scope[s.key], s.delta, by_scope.get(s.delta_key))
            for s in plan.scopes
            if s.key in by_scope
        ]

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
        facts = request_facts()
        facts.cost_rho = Fraction(0)  # until a reservation is made
        if self.metrics is not None:
            self.metrics.enter()
        with ExitStack() as admitted:
            try:
                consumer = self._consumer(bundle, context)
                record["consumer"] = consumer
                admitted.enter_context(self.admission.admitted(consumer))
                if not 1 <= len(request.request_id) <= 128:
                    raise InvalidQuery(
                        "request_id must have 1 to 128 characters",
                        violations=[FieldViolation("request_id", "1 to 128 characters")],
                    )
                check_query_shape(request.query, self.limits)
                check_known_fields(request)
                query = parse_query(request.query)
                record.update(
                    purpose=query.purpose,
                    query=query.canonical(),
                    digest=query.digest,
                    policy_version=bundle.version,
                )
                validate_against_policy(query, bundle)
                check_answer_size(query, bundle, self.limits)
                record["decision"] = "denied"
                decision = self._decide(bundle, consumer, query)
                record["rules"] = list(decision.deciding_rules)
                plan = plan_query(bundle, decision, query)
                check_deadline(context.time_remaining(), _DEADLINE_MARGIN, self.limits)
                cache_key = self._cache_key(bundle, query, plan)
                reservation = await asyncio.to_thread(
                    self.ledger.reserve,
                    consumer,
                    request.request_id,
                    query.digest,
                    plan.ledger_charges(),
                    cache_key=cache_key,
                )
                if reservation.is_replay:
                    if reservation.state == "committed" and reservation.stored_response:
                        record["decision"] = "replayed"
                        facts.cost_rho = Fraction(0)
                        replay = query_service_pb2.RunQueryResponse.FromString(
                            reservation.stored_response
                        )
                        replay.budget_left.extend(await self._balances(plan))  # as of now
                        return replay
                    raise RequestConflict(
                        f"request '{request.request_id}' is still in progress or ended without "
                        "an answer; use a new request id",
                        reason="REQUEST_IN_PROGRESS",
                        metadata={"request_id": request.request_id, "state": reservation.state},
                    )
                if reservation.cached_answer is not None:
                    # Post-processing of an earlier release: the same numbers, at no cost.
                    response = query_service_pb2.RunQueryResponse.FromString(
                        reservation.cached_answer
                    )
                    record.update(decision="cached", cached_from=response.audit_sequence)
                    response.request_id = request.request_id
                    response.cached = True
                    response.cost.CopyFrom(privacy_cost(Fraction(0)))
                    facts.cost_rho = Fraction(0)
                    answer_cache_key = None  # already cached under the original release
                else:
                    record.update(decision="failed", **plan_fields(plan))
                    # Until the silos answer, the whole reservation counts as the request's cost.
                    facts.cost_rho = plan.total_rho
                    response = await self._release(
                        request, consumer, query, bundle, decision, plan, context, record
                    )
                    record["decision"] = "released"
                    record["values"] = [
                        [
                            list(g.keys),
                            v.measure_id,
                            v.value,
                            v.suppressed,
                            *([v.bin] if v.bin else []),
                        ]
                        for g in response.groups
                        for v in g.values
                    ]
                    # As the reservation left each scope, read in its own transaction.
                    deltas = {s.key: s.delta for s in plan.scopes}
                    record["budget_left"] = budget_left_fields(
                        remaining_message(b, deltas[b.scope])
                        for b in reservation.balances
                        if b.scope in deltas  # not the parallel #key_delta scopes
                    )
                    answer_cache_key = cache_key

                def record_then_commit() -> list[Balance]:
                    # One worker thread, in this order: the record is durable before the commit
                    # and before the answer leaves (a crash in between leaves the reservation
                    # charged and the release logged); the stored answer carries its sequence.
                    nonlocal written
                    response.audit_sequence = self.audit.append("query", record)
                    written = True
                    return self.ledger.commit(
                        consumer,
                        request.request_id,
                        response.SerializeToString(),
                        cache_key=answer_cache_key,
                        balances_of=plan.balance_limits(),
                    )

                balances = await asyncio.to_thread(record_then_commit)
                response.budget_left.extend(self._balance_messages(plan, balances))
                return response
            except SilogateError as err:
                record.update(reason=err.reason, message=err.message)
                raise
            finally:
                if self.metrics is not None:
                    self.metrics.leave()
                if not written:
                    await asyncio.to_thread(self.audit.append, "query", record)

    async def _release(
        self,
        request: query_service_pb2.RunQueryRequest,
        consumer: str,
        query: QueryForm,
        bundle: Bundle,
        decision: Decision,
        plan: QueryPlan,
        context: grpc.aio.ServicerContext,
        record: dict[str, Any],
    ) -> query_service_pb2.RunQueryResponse:
        """Ask every silo concurrently; merge when all answered, else settle the budget.

        A multi-silo query returns all its measures or none. When a silo fails, the budget is
        settled per silo: the share of a silo that definitely released nothing is cancelled,
        the share of a silo that released (or may have) stays charged.
        """
        remaining = context.time_remaining()
        timeout = (
            self.silo_timeout if remaining is None else max(remaining - _DEADLINE_MARGIN, 0.05)
        )
        # Data-dependent keys: the silo's release lists them; else every public key, in order.
        keys = [] if plan.from_data else group_keys(query, bundle)
        bins = {m.measure.id: m.cells_per_key for m in plan.measures if m.bins}
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
                        cost=privacy_cost(planning.rho, key_delta=planning.key_delta),
                        key_threshold=(
                            silo_service_pb2.KeyThreshold(
                                threshold=planning.threshold.threshold,
                                delta=exact_text(planning.key_delta),
                                # One value per key: within both answer caps.
                                max_keys=min(self.limits.max_groups, self.limits.max_values),
                            )
                            if planning.threshold
                            else None
                        ),
                        components=[
                            silo_service_pb2.NoiseComponent(
                                name=c.name,
                                mechanism=MECHANISM_NUMBERS[c.noise.mechanism],
                                scale=c.noise.scale,
                                rho=privacy_cost(c.noise.rho).rho,
                            )
                            for c in planning.components
                        ],
                    )
                    for planning in plan.measures
                    if planning.silo == silo
                ],
            )
            for silo in plan.silos
        }
        outcomes = dict(
            zip(
                requests,
                await asyncio.gather(
                    *(
                        self.silos.release(silo, req, timeout, keys, bins)
                        for silo, req in requests.items()
                    ),
                    return_exceptions=True,
                ),
                strict=True,
            )
        )
        responses = {
            silo: o
            for silo, o in outcomes.items()
            if isinstance(o, silo_service_pb2.ReleaseResponse)
        }
        record["receipts"] = [receipt_to_record(r.receipt) for _, r in sorted(responses.items())]
        failures = {s: o for s, o in outcomes.items() if isinstance(o, BaseException)}
        if failures:
            raise await self._settle_failure(consumer, request.request_id, plan, failures, record)
        releases = {r.measure_id: r for response in responses.values() for r in response.releases}
        return self._merge(request, query, bundle, decision, plan, releases)

    async def _settle_failure(
        self,
        consumer: str,
        request_id: str,
        plan: QueryPlan,
        failures: dict[str, BaseException],
        record: dict[str, Any],
    ) -> BaseException:
        """Make the charges match what the silos released; return the error for the caller."""
        released_nothing = sorted(
            silo
            for silo, failure in failures.items()
            if isinstance(failure, SiloFailure) and not failure.may_have_released
        )
        # Silos that answered, failed after the request was sent, or failed unexpectedly.
        charged = [silo for silo in plan.silos if silo not in released_nothing]
        kept = sum((m.rho for m in plan.measures if m.silo in charged), start=Fraction(0))
        if not charged:
            await asyncio.to_thread(self.ledger.cancel, consumer, request_id)
        elif released_nothing:
            shares: dict[str, Fraction] = defaultdict(Fraction)
            for silo in released_nothing:
                for scope, share in plan.silo_share(silo).items():
                    shares[scope] += share
            await asyncio.to_thread(self.ledger.cancel_share, consumer, request_id, shares)
        request_facts().cost_rho = kept
        record["charged_rho"] = str(kept)
        for silo, failure in sorted(failures.items()):
            if self.metrics is not None:
                self.metrics.observe_silo_failure(
                    silo, not isinstance(failure, SiloFailure) or failure.may_have_released
                )
        silo_failures = [f for _, f in sorted(failures.items()) if isinstance(f, SiloFailure)]
        if not silo_failures:  # a bug, not a silo: INTERNAL for the caller, traceback in the log
            return next(iter(failures.values()))
        error = silo_failures[0].error
        summary = (
            f"rho {kept} stays charged for the silos that released or may have "
            f"({', '.join(charged)})"
            if charged
            else "no budget was spent"
        )
        error.message = f"{error.message}. The query returns no values; {summary}"
        error.metadata.update(
            budget_spent=str(bool(charged)).lower(),
            charged_rho=str(kept),
            charged_silos=",".join(charged),
            failed_silos=",".join(sorted(failures)),
        )
        return error

    def _merge(
        self,
        request: query_service_pb2.RunQueryRequest,
        query: QueryForm,
        bundle: Bundle,
        decision: Decision,
        plan: QueryPlan,
        releases: dict[str, Any],
    ) -> query_service_pb2.RunQueryResponse:
        keys = (
            [tuple(key.values) for key in releases[plan.measures[0].measure.id].keys]
            if plan.from_data
            else group_keys(query, bundle)
        )
        groups = merge_releases(plan, keys, releases, bundle)
        return query_service_pb2.RunQueryResponse(
            request_id=request.request_id,
            group_by=query.group_by,
            groups=groups,
            measures=[measure_plan_message(m) for m in plan.measures],
            cost=privacy_cost(plan.total_rho, key_delta=plan.key_delta),
            policy_version=bundle.version,
            deciding_rules=decision.deciding_rules,
        )

    @rpc_boundary
    async def ExplainQuery(
        self, request: query_service_pb2.ExplainQueryRequest, context: grpc.aio.ServicerContext
    ) -> query_service_pb2.ExplainQueryResponse:
        record: dict[str, Any] = {"decision": "rejected"}
        bundle = self.policy.current
        request_facts().cost_rho = Fraction(0)  # a preview never spends
        with ExitStack() as admitted:
            try:
                consumer = self._consumer(bundle, context)
                record["consumer"] = consumer
                admitted.enter_context(self.admission.admitted(consumer))
                check_query_shape(request.query, self.limits)
                check_known_fields(request)
                query = parse_query(request.query)
                record.update(
                    purpose=query.purpose, query=query.canonical(), policy_version=bundle.version
                )
                validate_against_policy(query, bundle)
                check_answer_size(query, bundle, self.limits)
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
                except PolicyDenied as err:
                    # A per-query cap: the preview says so instead of failing.
                    record.update(decision="deny", reason=err.reason)
                    denial.reasons.append(err.message)
                    return denial
                return query_service_pb2.ExplainQueryResponse(
                    decision=query_service_pb2.DECISION_PERMIT,
                    deciding_rules=decision.deciding_rules,
                    measures=[measure_plan_message(m) for m in plan.measures],
                    cost=privacy_cost(plan.total_rho, key_delta=plan.key_delta),
                    budget_after=await self._balances(plan, after=True),
                    would_be_cached=(key := self._cache_key(bundle, query, plan)) is not None
                    and await asyncio.to_thread(self.ledger.cached_answer, consumer, key)
                    is not None,
                    policy_version=bundle.version,
                )
            except SilogateError as err:
                record.update(reason=err.reason)
                raise
            finally:
                await asyncio.to_thread(self.audit.append, "explain", record)

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
        delta_scopes = {s.delta_key: s for s in scopes.values() if s.key_delta}
        balances = await asyncio.to_thread(
            self.ledger.balances,
            [scope_limit(s) for s in scopes.values()]
            + [key_delta_limit(s) for s in delta_scopes.values()],
        )
        key_deltas = {delta_scopes[b.scope].key: b for b in balances if b.scope in delta_scopes}
        return query_service_pb2.GetBudgetResponse(
            balances=[
                balance_message(b, scopes[b.scope].delta, key_deltas.get(b.scope))
                for b in balances
                if b.scope in scopes
            ]
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
