"""The silo's SiloService: re-checks every plan, runs bounded SQL, adds noise, logs and signs.

Trusts nothing from the gateway but its certificate: the policy decision, the sensitivity and the
minimum noise scale are recomputed here from the silo's own bundle. Never returns an exact
aggregate, a row, or SQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from fractions import Fraction

import grpc

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.log import AuditLog
from gateway.crypto.dev_ca import peer_identities
from gateway.errors import InvalidQuery, PolicyDenied, ReleaseRefused
from gateway.policy.decision import decide
from gateway.policy.holder import PolicyHolder
from gateway.privacy.noise import MechanismName, add_noise, error95, satisfies
from gateway.privacy.sensitivity import l1_sensitivity
from gateway.query.form import parse_query
from gateway.query.validate import group_keys, validate_against_policy
from gateway.server.status import request_facts, rpc_boundary
from gateway.silo.engine import DuckDbEngine
from gateway.silo.receipt import release_digest
from gateway.silo.sql import compile_release_sql

MECHANISMS: dict[int, MechanismName] = {
    query_pb2.MECHANISM_DISCRETE_LAPLACE: "discrete_laplace",
    query_pb2.MECHANISM_DISCRETE_GAUSSIAN: "discrete_gaussian",
}


class SiloServicer(silo_service_pb2_grpc.SiloServiceServicer):
    def __init__(
        self,
        silo: str,
        policy: PolicyHolder,
        engine: DuckDbEngine,
        release_log: AuditLog,
        gateway_identity: str,
    ) -> None:
        self.silo = silo
        # Each request reads `policy.current` once: a reload never mixes two versions in one
        # release, and the version checked against the plan is the one that computes it.
        self.policy = policy
        self.engine = engine
        self.release_log = release_log
        self.gateway_identity = gateway_identity

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
        keys = group_keys(query, bundle)
        releases = []
        for plan, measure in zip(request.plans, query.measures, strict=True):
            dataset = bundle.datasets[measure.dataset]
            sensitivity = l1_sensitivity(dataset, measure.kind)
            mechanism = MECHANISMS.get(plan.mechanism)
            rho = Fraction(plan.cost.rho) if plan.cost.rho else Fraction(0)
            if mechanism is None or not satisfies(mechanism, plan.scale, sensitivity, rho):
                raise ReleaseRefused(
                    f"measure '{measure.id}': the planned noise is too small for the stated cost",
                    metadata={"measure": measure.id, "scale": plan.scale, "rho": plan.cost.rho},
                )
            compiled = compile_release_sql(measure, dataset, query.group_by)
            exact = {
                tuple(str(v) for v in row[:-1]): int(str(row[-1]))
                for row in await self.engine.fetch(compiled)
            }
            # Every public key in key-set order; keys absent from the data count 0, values outside
            # the key set are dropped. The vector's shape never depends on the data.
            noisy = add_noise([exact.get(key, 0) for key in keys], mechanism, plan.scale)
            error = error95(mechanism, plan.scale)
            releases.append(
                silo_service_pb2.MeasureRelease(
                    measure_id=measure.id,
                    scale=plan.scale,
                    groups=[
                        query_pb2.GroupResult(
                            keys=list(key),
                            values=[
                                query_pb2.MeasureValue(
                                    measure_id=measure.id, value=float(value), error95=error
                                )
                            ],
                        )
                        for key, value in zip(keys, noisy, strict=True)
                    ],
                )
            )
        released_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        digest = release_digest(request.request_id, request.consumer, releases)
        # In a worker thread: the append waits for its disk sync, and the silo keeps serving other
        # releases meanwhile (concurrent appends share one sync). Awaited before answering.
        await asyncio.to_thread(
            self.release_log.append,
            "release",
            {
                "request_id": request.request_id,
                "consumer": request.consumer,
                "purpose": request.purpose,
                "policy_version": bundle.version,
                "query": query.canonical(),
                "rho": [plan.cost.rho for plan in request.plans],
                "scales": [plan.scale for plan in request.plans],
                "digest": digest,
            },
        )
        return silo_service_pb2.ReleaseResponse(
            releases=releases,
            receipt=silo_service_pb2.ReleaseReceipt(
                silo=self.silo, digest=digest, released_at=released_at
            ),
        )
