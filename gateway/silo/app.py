"""Assembles a silo agent process: database, policy, release log, servicer, server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.api.v1 import silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.log import AuditLog, open_audit_log
from gateway.crypto.channels import server_credentials
from gateway.errors import ConfigurationError, PolicyInvalid
from gateway.policy.holder import PolicyHolder
from gateway.policy.model import Bundle
from gateway.server.runtime import RunningServer, create_server
from gateway.settings import SiloConfig
from gateway.silo.caps import SiloCaps
from gateway.silo.engine import DuckDbEngine
from gateway.silo.receipt import ReceiptSigner
from gateway.silo.servicer import SiloServicer

SILO_SERVICE = silo_service_pb2.DESCRIPTOR.services_by_name["SiloService"].full_name
log = logging.getLogger("silogate.silo")


@dataclass
class SiloProcess:
    running: RunningServer
    servicer: SiloServicer

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.servicer.policy.stop_watching()
        await self.running.stop(grace)
        self.servicer.engine.close()
        self.servicer.release_log.close()  # signs a last checkpoint
        self.servicer.caps.close()


async def start_silo(config: SiloConfig) -> SiloProcess:
    """Open the database, load the policy (its tables must exist), then listen."""
    credentials = server_credentials(config.tls.files())
    signer = ReceiptSigner.load(config.receipt_key)  # before anything opens: nothing to undo
    engine = DuckDbEngine(
        config.database,
        memory_limit=config.engine.memory_limit,
        threads=config.engine.threads,
        result_cache_entries=config.engine.result_cache_entries,
    )
    release_log = open_audit_log(
        config.release_log, config.audit_log, origin=f"silogate/silo/{config.silo}"
    )
    try:
        policy = PolicyHolder(
            config.policy,
            config.policy_verify_key,
            on_activate=lambda bundle: _activate(release_log, engine, bundle),
            logger=log,
            on_refuse=lambda err: _log_refusal(release_log, policy, err),
            # A bundle declaring a table this database lacks is refused at start-up and on reload.
            check=lambda bundle: _require_tables(config, engine, bundle),
        )
    except BaseException:
        engine.close()
        release_log.close()
        raise
    try:
        caps = SiloCaps(config.caps_ledger_path, time_zone=config.time_zone)
    except BaseException:
        engine.close()
        release_log.close()
        raise
    try:
        bundle = policy.current
        one_row_datasets = await asyncio.to_thread(_prepare_bounding, config, engine, bundle)
        # Uniqueness is a fact about (table, person column): a reload that points a dataset
        # elsewhere does not inherit it.
        one_row_tables = frozenset(
            (bundle.datasets[name].table, bundle.datasets[name].privacy_unit)
            for name in one_row_datasets
        )
    except BaseException:
        engine.close()
        release_log.close()
        caps.close()
        raise
    servicer = SiloServicer(
        config.silo,
        policy,
        engine,
        release_log,
        config.gateway_identity,
        caps=caps,
        signer=signer,
        one_row_tables=one_row_tables,
    )
    running = await create_server(
        config.listen,
        credentials,
        lambda server: silo_service_pb2_grpc.add_SiloServiceServicer_to_server(servicer, server),
        [SILO_SERVICE],
        reflection_enabled=config.reflection,
    )
    # Which key signs the receipts from here on: an auditor sees a rotation in the silo's own log.
    release_log.append("receipt_key_in_use", {"key_id": signer.key_id})
    policy.start_watching(config.policy_reload_seconds)
    release_log.start_checkpoints()
    return SiloProcess(running, servicer)


def _require_tables(config: SiloConfig, engine: DuckDbEngine, bundle: Bundle) -> None:
    tables = engine.tables()
    missing = sorted(
        d.table for d in bundle.datasets_of_silo(config.silo).values() if d.table not in tables
    )
    if missing:
        raise ConfigurationError(
            f"silo '{config.silo}': database {config.database} lacks table(s) {', '.join(missing)}",
            reason="DATA_MISSING",
        )


def _prepare_bounding(config: SiloConfig, engine: DuckDbEngine, bundle: Bundle) -> frozenset[str]:
    """Verify what lets the release SQL skip work; return the datasets with one row per person.

    A dataset declaring ``max_rows_per_person: 1`` whose privacy unit is unique (and never NULL)
    in its table needs no bounding at all. Every other dataset gets its excess rows (the rows of
    persons beyond a bound) stored once, so that each query ranks nothing. Both facts stay true
    while the silo runs: DuckDB holds the lock of the read-only file, so no one can write the
    table. A reload that changes a dataset's bounds finds no excess rows for the new declaration
    and computes them in the query.
    """
    one_row: set[str] = set()
    for name, dataset in sorted(bundle.datasets_of_silo(config.silo).items()):
        if dataset.max_rows_per_person == 1:
            if engine.is_unique(dataset.table, dataset.privacy_unit):
                one_row.add(name)
                continue
            log.warning(
                "dataset %s declares one row per person but %s.%s repeats or is NULL; "
                "its releases bound rows per person",
                name,
                dataset.table,
                dataset.privacy_unit,
            )
        engine.prepare_excess_rows(dataset)
    return frozenset(one_row)


def _activate(release_log: AuditLog, engine: DuckDbEngine, bundle: Bundle) -> None:
    # Exact results computed under the previous bundle are not reused under this one.
    engine.forget_results()
    # The silo operator's own record of which policy version judged the releases that follow.
    release_log.append("policy_activated", {"policy_version": bundle.version})


def _log_refusal(release_log: AuditLog, policy: PolicyHolder, err: PolicyInvalid) -> None:
    release_log.append("policy_refused", policy.refusal_fields(err))
