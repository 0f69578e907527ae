"""The gateway's connections to the silo agents (mutual TLS, one channel per silo).

Classifies every failure by whether the silo may have released: a silo that could not be reached
released nothing (its budget share may be cancelled); a call that failed after it was sent
(deadline, broken connection) may have released, so its share stays charged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import grpc

from gateway.api.v1 import silo_service_pb2, silo_service_pb2_grpc
from gateway.crypto.channels import channel_credentials
from gateway.crypto.dev_ca import TlsFiles, silo_server_name
from gateway.errors import ReleaseRefused, SilogateError, SiloUnavailable
from gateway.server.status import parse_rpc_error
from gateway.settings import SiloEndpoint

# Codes with which a silo tells that it refused the plan before computing anything.
_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class SiloFailure(Exception):
    """A silo call failed; ``may_have_released`` decides whether its budget share stays charged."""

    def __init__(self, silo: str, error: SilogateError, *, may_have_released: bool) -> None:
        super().__init__(error.message)
        self.silo = silo
        self.error = error
        self.may_have_released = may_have_released


class SiloClients:
    def __init__(self, endpoints: Mapping[str, SiloEndpoint], tls: TlsFiles) -> None:
        credentials = channel_credentials(tls)
        self._channels = {
            name: grpc.aio.secure_channel(
                endpoint.address,
                credentials,
                # Verify the silo's own name, not the address: any server certificate from the CA
                # would match 127.0.0.1, only silo `name`'s carries this name.
                options=[
                    (
                        "grpc.ssl_target_name_override",
                        endpoint.server_name or silo_server_name(name),
                    )
                ],
            )
            for name, endpoint in endpoints.items()
        }
        self._stubs = {
            name: silo_service_pb2_grpc.SiloServiceStub(channel)
            for name, channel in self._channels.items()
        }

    async def release(
        self, silo: str, request: silo_service_pb2.ReleaseRequest, timeout: float
    ) -> silo_service_pb2.ReleaseResponse:
        """Ask one silo for a release; raises SiloFailure classifying the outcome."""
        if silo not in self._stubs:
            raise SiloFailure(
                silo,
                SiloUnavailable(f"no silo '{silo}' is configured", metadata={"silo": silo}),
                may_have_released=False,
            )
        try:
            await asyncio.wait_for(self._channels[silo].channel_ready(), min(timeout, 5.0))
        except TimeoutError:
            raise SiloFailure(
                silo,
                SiloUnavailable(
                    f"silo '{silo}' is unreachable; no budget was spent on it",
                    metadata={"silo": silo, "budget_spent": "false"},
                ),
                may_have_released=False,
            ) from None
        try:
            response: silo_service_pb2.ReleaseResponse = await self._stubs[silo].Release(
                request, timeout=timeout
            )
            return response
        except grpc.RpcError as err:
            remote = parse_rpc_error(err)
            if remote.code in _REFUSALS:
                raise SiloFailure(
                    silo,
                    ReleaseRefused(
                        f"silo '{silo}' refused the release: {remote.message}",
                        reason=remote.reason,
                        metadata={**remote.metadata, "silo": silo, "budget_spent": "false"},
                    ),
                    may_have_released=False,
                ) from err
            raise SiloFailure(
                silo,
                SiloUnavailable(
                    f"silo '{silo}' failed after the request was sent ({remote.code.name}); "
                    "its share of the budget stays charged",
                    metadata={"silo": silo, "budget_spent": "true", "code": remote.code.name},
                ),
                may_have_released=True,
            ) from err

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
