"""The gateway's connections to the silo agents (mutual TLS, one channel per silo).

Classifies every failure by whether the silo may have released: a silo that could not be reached
released nothing (its budget share may be cancelled); a call that failed after it was sent
(deadline, broken connection) may have released, so its share stays charged. A response is
checked before the gateway uses it (the planned measures, one group per public key in key order,
finite values, the receipt's silo name and digest); a response that fails the check is a failure
after the silo may have released.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence

import grpc

from gateway.api.v1 import silo_service_pb2, silo_service_pb2_grpc
from gateway.crypto.channels import channel_credentials
from gateway.crypto.dev_ca import TlsFiles, silo_server_name
from gateway.errors import ReleaseRefused, SilogateError, SiloUnavailable
from gateway.server.status import parse_rpc_error
from gateway.settings import SiloEndpoint
from gateway.silo.receipt import release_digest

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
        self,
        silo: str,
        request: silo_service_pb2.ReleaseRequest,
        timeout: float,
        keys: Sequence[tuple[str, ...]],
    ) -> silo_service_pb2.ReleaseResponse:
        """Ask one silo for a release of every public group ``keys``; raises SiloFailure
        classifying the outcome."""
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
        problem = release_problem(silo, request, response, keys)
        if problem is not None:
            raise SiloFailure(
                silo,
                SiloUnavailable(
                    f"silo '{silo}' returned an invalid release ({problem}); its share of the "
                    "budget stays charged",
                    reason="SILO_RESPONSE_INVALID",
                    metadata={"silo": silo, "budget_spent": "true", "problem": problem},
                ),
                may_have_released=True,
            )
        return response

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def release_problem(
    silo: str,
    request: silo_service_pb2.ReleaseRequest,
    response: silo_service_pb2.ReleaseResponse,
    keys: Sequence[tuple[str, ...]],
) -> str | None:
    """What is wrong with a silo's response to ``request``, or None when it is well formed.

    The description names measures and counts only, never a released value.
    """
    planned = [plan.measure.id for plan in request.plans]
    released = [r.measure_id for r in response.releases]
    if sorted(released) != sorted(planned):
        return f"released measures {sorted(released)}, planned {sorted(planned)}"
    for release in response.releases:
        if len(release.groups) != len(keys):
            return f"measure '{release.measure_id}' has {len(release.groups)} groups, expected {len(keys)}"
        for group, key in zip(release.groups, keys, strict=True):
            if tuple(group.keys) != key:
                return f"measure '{release.measure_id}' has a group out of key-set order"
            if len(group.values) != 1 or group.values[0].measure_id != release.measure_id:
                return f"measure '{release.measure_id}' has a group without exactly its one value"
            value = group.values[0]
            if not (math.isfinite(value.value) and math.isfinite(value.error95)):
                return f"measure '{release.measure_id}' has a value that is not finite"
            if value.error95 < 0:
                return f"measure '{release.measure_id}' has a negative error"
    if response.receipt.silo != silo:
        return "the receipt names another silo"
    if response.receipt.digest != release_digest(
        request.request_id, request.consumer, response.releases
    ):
        return "the receipt's digest does not match the released values"
    return None
