"""Failure semantics per silo share: a two-silo query where one silo fails.

The civil silo is the real one (in-process, from the ``system`` fixture); the org silo is a fake
that refuses, hangs or returns garbage. The caller always gets an error and no values; the ledger
keeps charged exactly the shares of the silos that released or may have, and gives back the
shares of silos that definitely released nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from fake_silo import Behaviour, FakeSilo, hang, start_fake_silo, well_formed
from support import gateway_config

from gateway.api.v1 import silo_service_pb2
from gateway.client import ClientError, SilogateClient, count
from gateway.server.app import GatewayProcess, start_gateway
from gateway.server.runtime import RunningServer

GRANT = "consumer:civil-affairs/rule:civil-elderly-care/lifetime"
POPULATION = "population:city-residents/lifetime"
CIVIL_SHARE = Fraction(1, 8)  # epsilon 0.5
ORG_SHARE = Fraction(1, 32)  # epsilon 0.25
MEASURES = [
    count("residents", "civil.residents", epsilon="0.5"),
    count("members", "org.members", epsilon="0.25"),
]


@dataclass
class Setup:
    gateway: GatewayProcess
    org: FakeSilo
    org_server: RunningServer

    def client(self, system, timeout: float = 10) -> SilogateClient:
        tls = system.pki.consumer("civil-affairs")
        return SilogateClient.connect(
            f"127.0.0.1:{self.gateway.port}",
            ca=tls.ca,
            cert=tls.cert,
            key=tls.key,
            retries=0,
            timeout=timeout,
        )

    def charged(self) -> dict[str, tuple[Fraction, Fraction]]:
        """(spent, reserved) per scope, straight from the gateway's ledger."""
        ledger = self.gateway.servicer.ledger
        ledger.verify()  # the running sums agree with the individual charges
        return ledger.scope_sums()


@pytest.fixture
def with_org(system, tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    started: list[Setup] = []
    fakes: list[RunningServer] = []

    def start(behaviour: Behaviour, civil: Behaviour | None = None) -> Setup:
        org, org_server = system.loop.run(start_fake_silo(system.pki, "org", behaviour))
        addresses = {"civil": system.silo_address("civil"), "org": f"127.0.0.1:{org_server.port}"}
        if civil is not None:
            _, civil_server = system.loop.run(start_fake_silo(system.pki, "civil", civil))
            fakes.append(civil_server)
            addresses["civil"] = f"127.0.0.1:{civil_server.port}"
        gateway = system.loop.run(start_gateway(gateway_config(tmp_path, system.pki, addresses)))
        setup = Setup(gateway, org, org_server)
        started.append(setup)
        return setup

    yield start
    for setup in started:
        system.loop.run(setup.gateway.stop(0))
        system.loop.run(setup.org_server.stop(0))
    for fake in fakes:
        system.loop.run(fake.stop(0))


async def refuse(
    request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
) -> silo_service_pb2.ReleaseResponse:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "policy versions differ")
    raise AssertionError("unreachable")


def test_a_silo_that_released_nothing_gets_its_share_back_and_the_other_stays_charged(
    system, with_org
) -> None:
    setup = with_org(refuse)
    with setup.client(system) as client, pytest.raises(ClientError) as caught:
        client.query(purpose="elderly-care-planning", measures=MEASURES, request_id="half")
    error = caught.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.metadata["silo"] == "org"
    assert error.metadata["budget_spent"] == "true"
    assert error.metadata["charged_rho"] == "1/8"
    assert error.metadata["charged_silos"] == "civil"
    assert "1/8" in error.message and "civil" in error.message
    # Civil released: its share stays charged (reserved: the request never got an answer).
    assert setup.charged() == {
        GRANT: (Fraction(0), CIVIL_SHARE),
        POPULATION: (Fraction(0), CIVIL_SHARE),
    }
    # A retry under the same id must not spend again.
    with setup.client(system) as client, pytest.raises(ClientError) as again:
        client.query(purpose="elderly-care-planning", measures=MEASURES, request_id="half")
    assert again.value.reason == "REQUEST_IN_PROGRESS"
    assert setup.charged()[GRANT] == (Fraction(0), CIVIL_SHARE)


def _wrong_measures(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    response = well_formed(silo, request)
    response.releases[0].measure_id = "something_else"
    return response


def _under_noised(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    response = well_formed(silo, request)
    response.releases[0].components[0].scale /= 2
    return response


def _other_silo(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    return well_formed("civil", request)


def _extra_group(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    response = well_formed(silo, request)
    response.releases[0].components[0].values.append(7)
    return response


def _tampered(
    silo: str, request: silo_service_pb2.ReleaseRequest
) -> silo_service_pb2.ReleaseResponse:
    response = well_formed(silo, request)
    response.releases[0].components[0].values[0] = 99  # after the receipt was signed
    return response


@pytest.mark.parametrize(
    ("garbage", "problem"),
    [
        (_wrong_measures, "released measures"),
        (_under_noised, "scale below the planned"),
        (_other_silo, "another silo"),
        (_extra_group, "has 2 values, expected 1"),
        (_tampered, "values digest"),
    ],
)
def test_garbage_from_a_silo_is_a_failure_that_stays_charged(
    system, with_org, garbage, problem: str
) -> None:
    async def answer(
        request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        return garbage("org", request)

    setup = with_org(answer)
    with setup.client(system) as client, pytest.raises(ClientError) as caught:
        client.query(purpose="elderly-care-planning", measures=MEASURES)
    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "SILO_RESPONSE_INVALID"
    assert problem in error.metadata["problem"]
    assert error.metadata["silo"] == "org" and error.metadata["budget_spent"] == "true"
    # The org silo may well have released: both shares stay charged.
    both = CIVIL_SHARE + ORG_SHARE
    assert setup.charged() == {GRANT: (Fraction(0), both), POPULATION: (Fraction(0), both)}


def test_a_silo_that_hangs_past_the_deadline_stays_charged(system, with_org) -> None:
    setup = with_org(hang)
    with setup.client(system, timeout=2) as client, pytest.raises(ClientError) as caught:
        client.query(purpose="elderly-care-planning", measures=MEASURES)
    # The gateway keeps a margin of the caller's deadline to answer with the reason itself.
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "SILO_UNAVAILABLE"
    assert caught.value.metadata["code"] == "DEADLINE_EXCEEDED"
    assert caught.value.metadata["budget_spent"] == "true"
    both = CIVIL_SHARE + ORG_SHARE
    assert setup.charged()[GRANT] == (Fraction(0), both)


def test_when_no_silo_released_nothing_is_charged_and_the_id_can_be_retried(
    system, with_org
) -> None:
    setup = with_org(refuse, civil=refuse)
    with setup.client(system) as client, pytest.raises(ClientError) as caught:
        client.query(purpose="elderly-care-planning", measures=MEASURES, request_id="none")
    assert caught.value.metadata["budget_spent"] == "false"
    assert caught.value.metadata["charged_rho"] == "0"
    assert caught.value.metadata["failed_silos"] == "civil,org"
    assert setup.charged() == {GRANT: (0, 0), POPULATION: (0, 0)}

    async def fine(
        request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        return well_formed("org", request)

    setup.org.behaviour = fine
    # The civil fake still refuses; the retry under the same id runs afresh (nothing replayed).
    with setup.client(system) as client, pytest.raises(ClientError) as retried:
        client.query(purpose="elderly-care-planning", measures=MEASURES, request_id="none")
    assert retried.value.metadata["silo"] == "civil"
    assert retried.value.metadata["charged_rho"] == str(ORG_SHARE)
    assert setup.charged()[GRANT] == (Fraction(0), ORG_SHARE)


def test_all_silos_answering_commits_exactly_the_query_cost(system, with_org) -> None:
    """The control case: the fake's well-formed release passes the gateway's checks."""

    async def fine(
        request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        await asyncio.sleep(0)
        return well_formed("org", request)

    setup = with_org(fine)
    with setup.client(system) as client:
        result = client.query(purpose="elderly-care-planning", measures=MEASURES)
    assert result.rows[0].values["members"].value == 100.0
    both = CIVIL_SHARE + ORG_SHARE
    assert setup.charged() == {GRANT: (both, Fraction(0)), POPULATION: (both, Fraction(0))}


def test_the_client_does_not_retry_a_failure_that_spent_budget(system, with_org) -> None:
    """UNAVAILABLE is transient, but once budget was spent the request id is taken: a retry would
    only replace the silo's error with REQUEST_IN_PROGRESS."""

    async def garbage(
        request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        return _under_noised("org", request)

    setup = with_org(garbage)
    tls = system.pki.consumer("civil-affairs")
    with (
        SilogateClient.connect(
            f"127.0.0.1:{setup.gateway.port}", ca=tls.ca, cert=tls.cert, key=tls.key, retries=2
        ) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.query(purpose="elderly-care-planning", measures=MEASURES)
    assert caught.value.reason == "SILO_RESPONSE_INVALID"
    assert setup.org.calls == 1
