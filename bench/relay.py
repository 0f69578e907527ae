"""The load benchmark's baseline: a bare two-hop gRPC relay, client -> relay -> echo server.

Two processes, each a ``grpc.aio`` server with the same mutual TLS as the real system: the relay
serves ``QueryService.RunQuery`` with the gateway's certificate and, for each call, sends one
``SiloService.Release`` to the echo server (which holds a silo's certificate and is checked by its
silo name, as the gateway checks a silo). The echo answers with a release of the same shape a silo
would send (one group per district, made-up numbers); the relay turns it into a RunQueryResponse.
No policy, budget, audit, SQL or noise: what is left is the transport and protobuf work that any
gateway must do, so the ratio against it shows what Silogate adds.

Run as ``python -m bench.relay {echo,relay} --certs DIR --port-file FILE [--upstream ADDR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc

from gateway.api.v1 import (
    query_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
    silo_service_pb2,
    silo_service_pb2_grpc,
)
from gateway.crypto.channels import channel_credentials, server_credentials
from gateway.crypto.dev_ca import TlsFiles, silo_server_name
from gateway.server.runtime import write_port_file

ECHO_SILO = "civil"
DISTRICTS = ("D1", "D2", "D3", "D4")


def _tls(certs: Path, name: str) -> TlsFiles:
    return TlsFiles(ca=certs / "ca.pem", cert=certs / f"{name}.pem", key=certs / f"{name}.key")


class Echo(silo_service_pb2_grpc.SiloServiceServicer):
    async def Release(
        self, request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        return silo_service_pb2.ReleaseResponse(
            releases=[
                silo_service_pb2.MeasureRelease(
                    measure_id=plan.measure.id,
                    components=[
                        silo_service_pb2.ComponentRelease(
                            name="value",
                            values=[1000] * len(DISTRICTS),
                            mechanism=query_pb2.MECHANISM_DISCRETE_LAPLACE,
                            scale=2.0,
                        )
                    ],
                )
                for plan in request.plans
            ],
            receipt=silo_service_pb2.ReleaseReceipt(silo=ECHO_SILO, digest="0" * 64),
        )


class Relay(query_service_pb2_grpc.QueryServiceServicer):
    def __init__(self, upstream: str, tls: TlsFiles) -> None:
        self.channel = grpc.aio.secure_channel(
            upstream,
            channel_credentials(tls),
            options=[("grpc.ssl_target_name_override", silo_server_name(ECHO_SILO))],
        )
        self.stub = silo_service_pb2_grpc.SiloServiceStub(self.channel)

    async def RunQuery(
        self, request: query_service_pb2.RunQueryRequest, context: grpc.aio.ServicerContext
    ) -> query_service_pb2.RunQueryResponse:
        remaining = context.time_remaining()
        release = await self.stub.Release(
            silo_service_pb2.ReleaseRequest(
                request_id=request.request_id,
                purpose=request.query.purpose,
                group_by=request.query.group_by,
                plans=[silo_service_pb2.ReleasePlan(measure=m) for m in request.query.measures],
            ),
            timeout=remaining if remaining is not None else 10.0,
        )
        groups = [query_pb2.GroupResult(keys=[d]) for d in DISTRICTS]
        for measure in release.releases:
            values = measure.components[0].values
            for group, value in zip(groups, values, strict=True):
                group.values.append(
                    query_pb2.MeasureValue(measure_id=measure.measure_id, value=value, error95=3.0)
                )
        return query_service_pb2.RunQueryResponse(
            request_id=request.request_id, group_by=request.query.group_by, groups=groups
        )


async def _serve(role: str, certs: Path, port_file: Path, upstream: str) -> None:
    server = grpc.aio.server()
    if role == "echo":
        silo_service_pb2_grpc.add_SiloServiceServicer_to_server(Echo(), server)
        tls = _tls(certs, f"silo-{ECHO_SILO}")
    else:
        tls = _tls(certs, "gateway")
        query_service_pb2_grpc.add_QueryServiceServicer_to_server(Relay(upstream, tls), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    await server.start()
    write_port_file(port_file, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("role", choices=["echo", "relay"])
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args()
    asyncio.run(_serve(args.role, args.certs, args.port_file, args.upstream))


if __name__ == "__main__":
    main()
