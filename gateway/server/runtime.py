"""Process lifecycle shared by the gateway and the silo agents.

``create_server`` binds (port 0 in tests) and returns the bound port, separately from ``serve``
so tests can run servers in-process. Every server has the standard health service; reflection
only when asked for. SIGTERM and SIGINT drain: health goes NOT_SERVING, then ``stop(grace)``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.errors import ConfigurationError

log = logging.getLogger("silogate.server")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: tuple[str, ...]

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def create_server(
    address: str,
    credentials: grpc.ServerCredentials,
    register: Callable[[grpc.aio.Server], None],
    services: Sequence[str],
    *,
    reflection_enabled: bool = False,
    max_receive_bytes: int | None = None,
) -> RunningServer:
    """Bind and start a server with the given services, health and (opt-in) reflection.

    ``max_receive_bytes`` caps a request message: gRPC refuses a larger one with
    RESOURCE_EXHAUSTED before any handler (or parser of ours) sees it.
    """
    options: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]
    if max_receive_bytes is not None:
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    server = grpc.aio.server(options=options)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*services, health.SERVICE_NAME)
    if reflection_enabled:
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise ConfigurationError(
            f"cannot listen on {address}: the port is in use or the address is not local",
            reason="PORT_IN_USE",
            metadata={"address": address},
        ) from err
    if port == 0:
        raise ConfigurationError(
            f"cannot listen on {address}", reason="PORT_IN_USE", metadata={"address": address}
        )
    await server.start()
    for name in (*services, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, tuple(services))


def write_port_file(path: Path | None, port: int) -> None:
    """Tell a supervising process (the demo) which port was bound, atomically."""
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


class Stoppable(Protocol):
    """A process (gateway or silo) that drains its server and closes what it holds."""

    @property
    def port(self) -> int: ...

    async def stop(self, grace: float = 5.0) -> None: ...


async def serve_until_signalled(process: Stoppable, grace: float = 5.0) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully: drain in-flight calls, then close
    the ledger, the logs and the channels the process holds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # What start-up loaded (modules, OpenDP, the policy bundle) lives as long as the process:
    # moved out of the cyclic collector's reach, so its collections scan only what requests
    # allocate. Nothing is ever freed by this; it only stops re-scanning.
    gc.freeze()
    await stop.wait()
    log.info("shutting down", extra={"port": process.port})
    await process.stop(grace)
