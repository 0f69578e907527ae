"""Assembles the gateway process: policy, ledger, audit log, silo connections, servicer, server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.api.v1 import query_service_pb2, query_service_pb2_grpc
from gateway.audit.log import AuditLog, open_audit_log
from gateway.budget.ledger import PrivacyLedger
from gateway.crypto.channels import server_credentials
from gateway.errors import PolicyInvalid
from gateway.policy.holder import PolicyHolder
from gateway.policy.model import Bundle
from gateway.policy.signing import key_id, read_key
from gateway.server.budget_periods import BudgetPeriodWatcher, declared_scopes
from gateway.server.metrics import GatewayMetrics, MetricsEndpoint
from gateway.server.runtime import RunningServer, create_server
from gateway.server.servicer import QueryServicer
from gateway.server.silos import SiloClients
from gateway.settings import GatewayConfig
from gateway.silo.receipt import receipt_key_id

QUERY_SERVICE = query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name
log = logging.getLogger("silogate.gateway")


@dataclass
class GatewayProcess:
    running: RunningServer
    servicer: QueryServicer
    periods: BudgetPeriodWatcher
    metrics_endpoint: MetricsEndpoint | None = None

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.servicer.policy.stop_watching()
        await self.running.stop(grace)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        await self.servicer.silos.close()
        self.periods.stop()
        self.servicer.ledger.close()
        self.servicer.audit.close()  # signs a last checkpoint


async def start_gateway(config: GatewayConfig) -> GatewayProcess:
    """Load everything the gateway needs, failing with one clear error, then listen."""
    tls = config.tls.files()
    credentials = server_credentials(tls)
    # Refuses to start on a log whose tail it cannot verify (one line naming file and line).
    audit = open_audit_log(config.audit, config.audit_log, origin="silogate/gateway")
    try:
        policy = PolicyHolder(
            config.policy,
            config.policy_verify_key,
            on_activate=lambda bundle: _audit_activation(audit, bundle),
            logger=log,
            on_refuse=lambda err: _audit_refusal(audit, policy, err),
        )
        ledger = PrivacyLedger(config.ledger, time_zone=config.time_zone)
        silos = SiloClients(config.silos, tls)  # loads the silos' receipt keys
        # A refreshing budget period that ended while the gateway was down is logged now.
        periods = BudgetPeriodWatcher(
            config.ledger, ledger, audit, lambda: declared_scopes(policy.current)
        )
        periods.check()
        # The keys this run trusts, so an auditor sees every rotation in the log itself (the
        # checkpoint key's rotation is logged by the audit log).
        audit.append("keys_in_use", _keys_in_use(config, silos))
    except BaseException:
        audit.close()  # frees the log's lock for the next start
        raise
    metrics = GatewayMetrics(ledger)
    servicer = QueryServicer(
        policy,
        ledger,
        audit,
        silos,
        config.silo_timeout_seconds,
        limits=config.limits,
        metrics=metrics,
    )
    endpoint = None
    if config.metrics_listen is not None:
        endpoint = MetricsEndpoint(metrics, config.metrics_listen)
    try:
        running = await create_server(
            config.listen,
            credentials,
            lambda server: query_service_pb2_grpc.add_QueryServiceServicer_to_server(
                servicer, server
            ),
            [QUERY_SERVICE],
            reflection_enabled=config.reflection,
            max_receive_bytes=config.limits.max_request_bytes,
        )
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        audit.close()
        raise
    if endpoint is not None:
        endpoint.start()
    policy.start_watching(config.policy_reload_seconds)
    audit.start_checkpoints()
    periods.start(30.0)
    return GatewayProcess(running, servicer, periods, endpoint)


def _keys_in_use(config: GatewayConfig, silos: SiloClients) -> dict[str, object]:
    return {
        "silo_receipt_keys": {
            name: receipt_key_id(key) for name, key in sorted(silos.receipt_keys.items())
        },
        "policy_verify_key": (
            key_id(read_key(config.policy_verify_key, private=False))
            if config.policy_verify_key is not None
            else None
        ),
    }


def _audit_activation(audit: AuditLog, bundle: Bundle) -> None:
    # Every activation, start-up included, so the log says which version decided each record.
    audit.append("policy_activated", {"policy_version": bundle.version})


def _audit_refusal(audit: AuditLog, policy: PolicyHolder, err: PolicyInvalid) -> None:
    audit.append("policy_refused", policy.refusal_fields(err))
