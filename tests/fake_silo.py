"""A silo that misbehaves on purpose: a real gRPC server (mutual TLS, the silo's own certificate,
port 0) whose Release answers however a test tells it to: refuse, hang, return garbage, or a
well-formed release of made-up numbers for an ungrouped query."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.crypto.channels import server_credentials
from gateway.crypto.dev_ca import DevPki
from gateway.server.runtime import RunningServer, create_server
from gateway.silo.receipt import release_digest

Behaviour = Callable[
    [silo_service_pb2.ReleaseRequest, grpc.aio.ServicerContext],
    Awaitable[silo_service_pb2.ReleaseResponse],
]
SERVICE = silo_service_pb2.DESCRIPTOR.services_by_name["SiloService"].full_name


def well_formed(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    """A release that passes the gateway's checks, for a query without group-by."""
    releases = [
        silo_service_pb2.MeasureRelease(
            measure_id=plan.measure.id,
            scale=plan.scale,
            groups=[
                query_pb2.GroupResult(
                    keys=[],
                    values=[
                        query_pb2.MeasureValue(measure_id=plan.measure.id, value=100.0, error95=3.0)
                    ],
                )
            ],
        )
        for plan in request.plans
    ]
    return silo_service_pb2.ReleaseResponse(
        releases=releases,
        receipt=silo_service_pb2.ReleaseReceipt(
            silo=silo,
            digest=release_digest(request.request_id, request.consumer, releases),
            released_at="2026-01-01T00:00:00.000+00:00",
        ),
    )


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
