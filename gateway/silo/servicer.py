"""The silo's SiloService: re-checks every plan, runs bounded SQL, adds noise, logs and signs.

Trusts nothing from the gateway but its certificate: the policy decision, the sensitivity and the
minimum noise scale are recomputed here from the silo's own bundle. Never returns an exact
aggregate, a row, or SQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from fractions import Fraction
from typing import Any

import grpc

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.log import AuditLog
from gateway.crypto.dev_ca import peer_identities
from gateway.errors import InvalidQuery, PolicyDenied, ReleaseRefused
from gateway.policy.decision import decide
from gateway.policy.holder import PolicyHolder
from gateway.policy.model import Bundle, Rule
from gateway.query.form import QueryForm, parse_query
from gateway.query.validate import group_keys, validate_against_policy
from gateway.server.status import request_facts, rpc_boundary
from gateway.silo.caps import SiloCaps
from gateway.silo.engine import Engine
from gateway.silo.receipt import ReceiptSigner, release_log_entry
from gateway.silo.release import CheckedMeasure, check_plan, release_measure


class SiloServicer(silo_service_pb2_grpc.SiloServiceServicer):
    def __init__(
        self,
        silo: str,
        policy: PolicyHolder,
        engine: Engine,
        release_log: AuditLog,
        gateway_identity: str,
        *,
        one_row_tables: frozenset[tuple[str, str]] = frozenset(),
        caps: SiloCaps,
        signer: ReceiptSigner,
    ) -> None:
        self.silo = silo
        # Each request reads `policy.current` once: a reload never mixes two versions in one
        # release, and the version checked against the plan is the one that computes it.
        self.policy = policy
        self.engine = engine
        self.release_log = release_log
        self.gateway_identity = gateway_identity
        # (table, person column) pairs this silo verified unique at start-up: released without
        # per-person bounding (see gateway.silo.sql).
        self.one_row_tables = one_row_tables
        self.caps = caps
        self.signer = signer

    def _require_gateway(self, context: grpc.aio.ServicerContext) -> None:
        if self.gateway_identity not in peer_identities(context.auth_context()):
            raise PolicyDenied(
                "only the gateway may call the silo service", reason="CALLER_NOT_GATEWAY"
            )

    @rpc_boundary
    async def Describe(
        self, request: silo_service_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.DescribeResponse:
        self._require_gateway(context)
        bundle = self.policy.current
        return silo_service_pb2.DescribeResponse(
            silo=self.silo,
            policy_version=bundle.version,
            datasets=sorted(bundle.datasets_of_silo(self.silo)),
            engine=self.engine.name,
        )

    @rpc_boundary
    async def Release(
        self, request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        self._require_gateway(context)
        request_facts().consumer = request.consumer  # for the silo's request log line
        bundle = self.policy.current
        if request.policy_version != bundle.version:
            raise ReleaseRefused(
                "the gateway decided under another policy version than this silo holds",
                reason="POLICY_VERSION_MISMATCH",
                metadata={"silo_version": bundle.version, "plan_version": request.policy_version},
            )
        if request.consumer not in bundle.consumers:
            raise ReleaseRefused(
                f"unknown consumer '{request.consumer}'", metadata={"consumer": request.consumer}
            )
        query = parse_query(
            query_pb2.Query(
                purpose=request.purpose,
                measures=[plan.measure for plan in request.plans],
                group_by=request.group_by,
            )
        )
        validate_against_policy(query, bundle)
        foreign = [
            m.dataset for m in query.measures if bundle.datasets[m.dataset].silo != self.silo
        ]
        if foreign:
            raise InvalidQuery(
                f"dataset '{foreign[0]}' is not held by silo '{self.silo}'",
                reason="UNKNOWN_DATASET",
                metadata={"dataset": foreign[0], "silo": self.silo},
            )
        decision = decide(bundle, request.consumer, query)
        if not decision.permitted:
            raise PolicyDenied(
                "the silo's policy does not allow this release: " + "; ".join(decision.reasons),
                reason=decision.reason_code,
                metadata={"rules": ",".join(decision.deciding_rules)},
            )
        # Every plan is checked before any SQL runs: one bad plan refuses the whole release.
        checked = [
            check_plan(
                plan,
                measure,
                bundle.datasets[measure.dataset],
                query.group_by,
                key_delta=_key_delta(decision.grants[measure.id].rule),
            )
            for plan, measure in zip(request.plans, query.measures, strict=True)
        ]
        charges = self.caps.charges(bundle, checked)
        # No worker thread when no dataset of the release has a cap (nothing to reserve).
        reserved = bool(charges) and await asyncio.to_thread(
            self.caps.reserve, request.consumer, request.request_id, query.digest, charges
        )
        logged = False

        def log_then_commit(entry: dict[str, Any]) -> None:
            # One worker thread for both, in this order: the cap is committed only once the
            # release is in the silo's log. The append waits for its disk sync; the silo keeps
            # serving other releases meanwhile (concurrent appends share one sync).
            nonlocal logged
            self.release_log.append("release", entry)
            logged = True
            if reserved:
                self.caps.commit(request.consumer, request.request_id)

        try:
            response, entry = await self._release(request, query, bundle, checked)
            await asyncio.to_thread(log_then_commit, entry)
        except BaseException:
            if reserved and not logged:  # nothing left the silo: the cap is not charged
                await asyncio.to_thread(self.caps.cancel, request.consumer, request.request_id)
            raise
        return response

    async def _release(
        self,
        request: silo_service_pb2.ReleaseRequest,
        query: QueryForm,
        bundle: Bundle,
        checked: list[CheckedMeasure],
    ) -> tuple[silo_service_pb2.ReleaseResponse, dict[str, Any]]:
        """The noisy, signed response and its release log record (not yet written)."""
        # Keys from the data: the threshold release finds them (group_keys lists public ones).
        keys = [] if any(m.threshold for m in checked) else group_keys(query, bundle)
        releases = [
            await release_measure(
                measure,
                self.engine,
                query.group_by,
                keys,
                one_row_per_person=(measure.dataset.table, measure.dataset.privacy_unit)
                in self.one_row_tables,
            )
            for measure in checked
        ]
        released_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        receipt = self.signer.sign(
            silo=self.silo,
            request_id=request.request_id,
            query_digest=query.digest,
            datasets=list(query.datasets),
            rho=sum((m.rho for m in checked), Fraction(0)),
            key_delta=sum((m.threshold.delta for m in checked if m.threshold), Fraction(0)),
            releases=releases,
            released_at=released_at,
        )
        entry = release_log_entry(
            receipt, request, policy_version=bundle.version, query=query, releases=releases
        )
        return silo_service_pb2.ReleaseResponse(releases=releases, receipt=receipt), entry


def _key_delta(rule: Rule) -> Fraction | None:
    """The delta per release the rule allows for keys from the data; None when it allows none."""
    if not rule.allow_data_dependent_keys or rule.key_delta is None:
        return None
    return Fraction(rule.key_delta)
