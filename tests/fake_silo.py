"""A silo that misbehaves on purpose: a real gRPC server (mutual TLS, the silo's own certificate,
port 0) whose Release answers however a test tells it to: refuse, hang, return garbage, or a
well-formed, signed release of made-up numbers for an ungrouped query."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from gateway.api.v1 import silo_service_pb2, silo_service_pb2_grpc
from gateway.crypto.channels import server_credentials
from gateway.crypto.dev_ca import DevPki
from gateway.server.runtime import RunningServer, create_server
from gateway.silo.receipt import ReceiptSigner, request_query, request_rho

Behaviour = Callable[
    [silo_service_pb2.ReleaseRequest, grpc.aio.ServicerContext],
    Awaitable[silo_service_pb2.ReleaseResponse],
]
SERVICE = silo_service_pb2.DESCRIPTOR.services_by_name["SiloService"].full_name


# The receipt keys of the session's silos, registered when a fake silo starts.
_SIGNERS: dict[str, ReceiptSigner] = {}


def well_formed(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    """A release that passes the gateway's checks, for a query without group-by: 100 for every
    value, signed with ``silo``'s receipt key."""
    releases = [
        silo_service_pb2.MeasureRelease(
            measure_id=plan.measure.id,
            components=[
                silo_service_pb2.ComponentRelease(
                    name=c.name, values=[100], mechanism=c.mechanism, scale=c.scale
                )
                for c in plan.components
            ],
        )
        for plan in request.plans
    ]
    query = request_query(request)
    receipt = _SIGNERS[silo].sign(
        silo=silo,
        request_id=request.request_id,
        query_digest=query.digest,
        datasets=list(query.datasets),
        rho=request_rho(request),
        releases=releases,
        released_at="2026-01-01T00:00:00.000+00:00",
    )
    return silo_service_pb2.ReleaseResponse(releases=releases, receipt=receipt)


class FakeSilo(silo_service_pb2_grpc.SiloServiceServicer):
    def __init__(self, silo: str, behaviour: Behaviour) -> None:
        self.silo = silo
        self.behaviour = behaviour
        self.calls = 0

    async def Release(
        self, request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        self.calls += 1
        return await self.behaviour(request, context)


async def start_fake_silo(
    pki: DevPki, silo: str, behaviour: Behaviour
) -> tuple[FakeSilo, RunningServer]:
    for name, keys in pki.receipt_key_paths.items():
        _SIGNERS.setdefault(name, ReceiptSigner.load(keys.private))
    servicer = FakeSilo(silo, behaviour)
    running = await create_server(
        "127.0.0.1:0",
        server_credentials(pki.silo(silo)),
        lambda server: silo_service_pb2_grpc.add_SiloServiceServicer_to_server(servicer, server),
        [SERVICE],
    )
    return servicer, running


async def hang(
    request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
) -> silo_service_pb2.ReleaseResponse:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")
