"""The gateway's connections to the silo agents (mutual TLS, one channel per silo).

Classifies every failure by whether the silo may have released: a silo that could not be reached
released nothing (its budget share may be cancelled); a call that failed after it was sent
(deadline, broken connection) may have released, so its share stays charged. A response is
checked before the gateway uses it (the planned measures and components, one value per public
key, or per key and bin, the planned mechanism at no less than the planned scale, and the silo's
signed receipt: its silo, request, query, datasets, cost, values digest and signature by the
silo's configured receipt key); a response that fails the check is a failure after the silo may
have released. Receipt keys are loaded when the clients are built, so a missing or unreadable
key stops the gateway at start-up.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence

import grpc
from Crypto.PublicKey import ECC

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.crypto.channels import channel_credentials
from gateway.crypto.dev_ca import TlsFiles, silo_server_name
from gateway.errors import ConfigurationError, ReleaseRefused, SilogateError, SiloUnavailable
from gateway.server.status import parse_rpc_error
from gateway.settings import SiloEndpoint
from gateway.silo.receipt import (
    load_receipt_public_key,
    receipt_problem,
    request_key_delta,
    request_query,
    request_rho,
)

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


def load_receipt_keys(endpoints: Mapping[str, SiloEndpoint]) -> dict[str, ECC.EccKey]:
    """Each silo's public receipt key; ConfigurationError naming the silo and file otherwise."""
    keys = {}
    for name, endpoint in endpoints.items():
        try:
            keys[name] = load_receipt_public_key(endpoint.receipt_key)
        except ConfigurationError as err:
            raise ConfigurationError(
                f"silo '{name}': {err.message}", reason=err.reason, metadata=err.metadata
            ) from err
    return keys


class SiloClients:
    def __init__(self, endpoints: Mapping[str, SiloEndpoint], tls: TlsFiles) -> None:
        # First: a missing key refuses the start before any channel is opened.
        self.receipt_keys = load_receipt_keys(endpoints)
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
        bins: Mapping[str, int] | None = None,
    ) -> silo_service_pb2.ReleaseResponse:
        """Ask one silo for a release of every public group ``keys``; raises SiloFailure
        classifying the outcome. ``bins``: the number of bins of each HISTOGRAM measure (by
        measure id) whose bins the policy declares (the request does not carry them)."""
        if silo not in self._stubs:
            raise SiloFailure(
                silo,
                SiloUnavailable(f"no silo '{silo}' is configured", metadata={"silo": silo}),
                may_have_released=False,
            )
        channel = self._channels[silo]
        try:
            # The usual case, a connected channel, without a timer and a task per release.
            if channel.get_state() != grpc.ChannelConnectivity.READY:
                await asyncio.wait_for(channel.channel_ready(), min(timeout, 5.0))
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
        problem = release_problem(
            silo, request, response, keys, public_key=self.receipt_keys[silo], bins=bins
        )
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


def _expected_values(
    plan: silo_service_pb2.ReleasePlan, groups: int, bins: Mapping[str, int]
) -> int | None:
    """Values per component: one per group, or per (group, bin) for a histogram; None when a
    histogram's bins are not known here (then any whole number of bins per group is accepted)."""
    if plan.measure.kind != query_pb2.MEASURE_KIND_HISTOGRAM:
        return groups
    if plan.measure.bins:
        return groups * (len(plan.measure.bins) - 1)
    if plan.measure.id in bins:
        return groups * bins[plan.measure.id]
    return None


def _component_problem(
    measure_id: str,
    planned: silo_service_pb2.NoiseComponent,
    released: silo_service_pb2.ComponentRelease,
    expected: int | None,
    groups: int,
) -> str | None:
    where = f"measure '{measure_id}' component '{planned.name}'"
    count = len(released.values)
    if expected is not None and count != expected:
        return f"{where} has {count} values, expected {expected}"
    if expected is None and (groups == 0 or count == 0 or count % groups):
        return f"{where} has {count} values, not a whole number of bins for {groups} groups"
    if released.mechanism != planned.mechanism:
        return f"{where} was released with another mechanism than planned"
    # More noise than planned is allowed (never less private); the gateway reports the error of
    # the scale actually used.
    if not math.isfinite(released.scale) or released.scale < planned.scale:
        return f"{where} was released at a scale below the planned {planned.scale}"
    return None


def _released_keys_problem(
    plan: silo_service_pb2.ReleasePlan, release: silo_service_pb2.MeasureRelease, columns: int
) -> str | None:
    """Data-dependent keys: one value per group-by column, each key once, at most max_keys."""
    where = f"measure '{release.measure_id}'"
    if len(release.keys) > plan.key_threshold.max_keys:
        return f"{where} released {len(release.keys)} keys, at most {plan.key_threshold.max_keys}"
    if any(len(key.values) != columns for key in release.keys):
        return f"{where} has a key without exactly {columns} values"
    if len({tuple(key.values) for key in release.keys}) != len(release.keys):
        return f"{where} released a key twice"
    threshold = plan.key_threshold.threshold
    if any(v <= threshold for component in release.components for v in component.values):
        return f"{where} released a key whose noisy count is not above the threshold {threshold}"
    return None


def release_problem(
    silo: str,
    request: silo_service_pb2.ReleaseRequest,
    response: silo_service_pb2.ReleaseResponse,
    keys: Sequence[tuple[str, ...]],
    *,
    public_key: ECC.EccKey | Sequence[ECC.EccKey],
    bins: Mapping[str, int] | None = None,
) -> str | None:
    """What is wrong with a silo's response to ``request``, or None when it is well formed and
    its receipt is signed by ``public_key`` for exactly this request and these values.

    The description names measures, components and counts only, never a released value.
    """
    planned = [plan.measure.id for plan in request.plans]
    released = [r.measure_id for r in response.releases]
    if released != planned:
        return f"released measures {released}, planned {planned} (in plan order)"
    for plan, release in zip(request.plans, response.releases, strict=True):
        names = [c.name for c in plan.components]
        got = [c.name for c in release.components]
        if got != names:
            return f"measure '{release.measure_id}' has components {got}, planned {names}"
        if plan.HasField("key_threshold"):
            problem = _released_keys_problem(plan, release, len(request.group_by))
            if problem is not None:
                return problem
            groups = len(release.keys)
        elif release.keys:
            return f"measure '{release.measure_id}' lists group keys, but its keys are public"
        else:
            groups = len(keys)
        expected = _expected_values(plan, groups, bins or {})
        for component, released_component in zip(plan.components, release.components, strict=True):
            problem = _component_problem(
                release.measure_id, component, released_component, expected, groups
            )
            if problem is not None:
                return problem
    try:
        query = request_query(request)
    except SilogateError:  # the silo would have refused it: no receipt can match
        return "the request's query does not parse, so no receipt can match it"
    return receipt_problem(
        response.receipt,
        silo=silo,
        request_id=request.request_id,
        releases=response.releases,
        public_key=public_key,
        query_digest=query.digest,
        datasets=query.datasets,
        rho=request_rho(request),
        key_delta=request_key_delta(request),
    )
