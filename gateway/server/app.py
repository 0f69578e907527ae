"""Assembles the gateway process: policy, ledger, audit log, silo connections, servicer, server."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api.v1 import query_service_pb2, query_service_pb2_grpc
from gateway.audit.log import AuditLog
from gateway.budget.ledger import PrivacyLedger
from gateway.crypto.channels import server_credentials
from gateway.policy.loader import load_bundle
from gateway.server.runtime import RunningServer, create_server
from gateway.server.servicer import QueryServicer
from gateway.server.silos import SiloClients
from gateway.settings import GatewayConfig

QUERY_SERVICE = query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name


@dataclass
class GatewayProcess:
    running: RunningServer
    servicer: QueryServicer

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.running.stop(grace)
        await self.servicer.silos.close()
        self.servicer.ledger.close()


async def start_gateway(config: GatewayConfig) -> GatewayProcess:
    """Load everything the gateway needs, failing with one clear error, then listen."""
    tls = config.tls.files()
    credentials = server_credentials(tls)
    bundle = load_bundle(config.policy)
    ledger = PrivacyLedger(config.ledger)
    audit = AuditLog(config.audit)
    audit.append("policy_activated", {"policy_version": bundle.version})
    servicer = QueryServicer(
        bundle, ledger, audit, SiloClients(config.silos, tls), config.silo_timeout_seconds
    )
    running = await create_server(
        config.listen,
        credentials,
        lambda server: query_service_pb2_grpc.add_QueryServiceServicer_to_server(servicer, server),
        [QUERY_SERVICE],
        reflection_enabled=config.reflection,
    )
    return GatewayProcess(running, servicer)
