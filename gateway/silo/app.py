"""Assembles a silo agent process: policy, database, release log, servicer, server."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api.v1 import silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.log import AuditLog
from gateway.crypto.channels import server_credentials
from gateway.errors import ConfigurationError
from gateway.policy.loader import load_bundle
from gateway.server.runtime import RunningServer, create_server
from gateway.settings import SiloConfig
from gateway.silo.engine import DuckDbEngine
from gateway.silo.servicer import SiloServicer

SILO_SERVICE = silo_service_pb2.DESCRIPTOR.services_by_name["SiloService"].full_name


@dataclass
class SiloProcess:
    running: RunningServer
    servicer: SiloServicer

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.running.stop(grace)
        self.servicer.engine.close()


async def start_silo(config: SiloConfig) -> SiloProcess:
    """Load policy and database, check the declared tables exist, then listen."""
    credentials = server_credentials(config.tls.files())
    bundle = load_bundle(config.policy)
    engine = DuckDbEngine(config.database)
    missing = sorted(
        d.table
        for d in bundle.datasets_of_silo(config.silo).values()
        if d.table not in engine.tables()
    )
    if missing:
        engine.close()
        raise ConfigurationError(
            f"silo '{config.silo}': database {config.database} lacks table(s) {', '.join(missing)}",
            reason="DATA_MISSING",
        )
    servicer = SiloServicer(
        config.silo, bundle, engine, AuditLog(config.release_log), config.gateway_identity
    )
    running = await create_server(
        config.listen,
        credentials,
        lambda server: silo_service_pb2_grpc.add_SiloServiceServicer_to_server(servicer, server),
        [SILO_SERVICE],
        reflection_enabled=config.reflection,
    )
    return SiloProcess(running, servicer)
