"""Assembles the gateway process: policy, ledger, audit log, silo connections, servicer, server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.api.v1 import query_service_pb2, query_service_pb2_grpc
from gateway.audit.log import AuditLog
from gateway.budget.ledger import PrivacyLedger
from gateway.crypto.channels import server_credentials
from gateway.errors import PolicyInvalid
from gateway.policy.holder import PolicyHolder
from gateway.policy.model import Bundle
from gateway.server.runtime import RunningServer, create_server
from gateway.server.servicer import QueryServicer
from gateway.server.silos import SiloClients
from gateway.settings import GatewayConfig

QUERY_SERVICE = query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name
log = logging.getLogger("silogate.gateway")


@dataclass
class GatewayProcess:
    running: RunningServer
    servicer: QueryServicer

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.servicer.policy.stop_watching()
        await self.running.stop(grace)
        await self.servicer.silos.close()
        self.servicer.ledger.close()


async def start_gateway(config: GatewayConfig) -> GatewayProcess:
    """Load everything the gateway needs, failing with one clear error, then listen."""
    tls = config.tls.files()
    credentials = server_credentials(tls)
    audit = AuditLog(config.audit)
    policy = PolicyHolder(
        config.policy,
        config.policy_verify_key,
        on_activate=lambda bundle: _audit_activation(audit, bundle),
        logger=log,
        on_refuse=lambda err: _audit_refusal(audit, policy, err),
    )
    ledger = PrivacyLedger(config.ledger, time_zone=config.time_zone)
    servicer = QueryServicer(
        policy, ledger, audit, SiloClients(config.silos, tls), config.silo_timeout_seconds
    )
    running = await create_server(
        config.listen,
        credentials,
        lambda server: query_service_pb2_grpc.add_QueryServiceServicer_to_server(servicer, server),
        [QUERY_SERVICE],
        reflection_enabled=config.reflection,
    )
    policy.start_watching(config.policy_reload_seconds)
    return GatewayProcess(running, servicer)


def _audit_activation(audit: AuditLog, bundle: Bundle) -> None:
    # Every activation, start-up included, so the log says which version decided each record.
    audit.append("policy_activated", {"policy_version": bundle.version})


def _audit_refusal(audit: AuditLog, policy: PolicyHolder, err: PolicyInvalid) -> None:
    audit.append("policy_refused", policy.refusal_fields(err))
