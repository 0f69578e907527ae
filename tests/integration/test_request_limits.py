"""Bad input at the gateway: oversized messages and queries, answers with too many groups,
deadlines too short for a silo round trip, and a consumer flooding requests. Every refusal comes
before any budget is reserved, and the gateway keeps serving."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from fake_silo import start_fake_silo, well_formed
from support import gateway_config

from gateway.api.v1 import query_pb2, query_service_pb2, query_service_pb2_grpc, silo_service_pb2
from gateway.client import ClientError, SilogateClient, count, where
from gateway.crypto.channels import channel_credentials
from gateway.server.app import start_gateway
from gateway.server.status import parse_rpc_error
from gateway.settings import GatewayLimits

ELDERLY = "elderly-care-planning"


def charged(system) -> dict[str, tuple[Fraction, Fraction]]:
    return system.gateway.servicer.ledger.scope_sums()


def refused(system, consumer: str = "civil-affairs", **query: object) -> ClientError:
    """Run a query that must be refused; check that nothing was reserved or spent."""
    before = charged(system)
    with system.client(consumer) as client, pytest.raises(ClientError) as caught:
        client.query(**query)  # type: ignore[arg-type]
    assert charged(system) == before
    return caught.value


def test_too_many_measures_are_refused_before_parsing(system) -> None:
    error = refused(
        system,
        purpose=ELDERLY,
        measures=[count(f"m{i}", "civil.residents", epsilon="0.01") for i in range(17)],
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_QUERY"
    assert [v.field for v in error.violations] == ["query.measures"]
    assert "at most 16 measures, got 17" in error.violations[0].description


def test_an_answer_with_too_many_groups_is_refused(system) -> None:
    # 200 communities x 40 streets x 2 sexes = 16,000 groups: more than the 10,000 allowed.
    error = refused(
        system,
        purpose=ELDERLY,
        measures=[count("n", "civil.residents", epsilon="0.5")],
        group_by=["community", "street", "sex"],
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_QUERY"
    assert error.metadata == {"groups": "16000", "max_groups": "10000"}
    assert error.violations[0].field == "query.group_by"


def test_an_answer_with_too_many_values_is_refused(system) -> None:
    # 8,000 groups are allowed, but not three measures over them (24,000 values).
    error = refused(
        system,
        purpose=ELDERLY,
        measures=[count(f"n{i}", "civil.residents", epsilon="0.1") for i in range(3)],
        group_by=["community", "street"],
    )
    assert error.metadata == {"values": "24000", "max_values": "20000"}


def test_long_in_lists_and_strings_are_refused_naming_the_field_only(system) -> None:
    long_purpose = "p" * 5000
    error = refused(
        system,
        purpose=long_purpose,
        measures=[
            count(
                "n",
                "civil.residents",
                where("birth_year", "in", *range(1001)),
                where("sex", "=", "x" * 300),
                epsilon="0.5",
            )
        ],
    )
    fields = {v.field: v.description for v in error.violations}
    assert fields == {
        "query.purpose": "at most 128 characters, got 5000",
        "query.measures[0].filters[0].values": "at most 1000 values, got 1001",
        "query.measures[0].filters[1].values[0]": "at most 256 characters, got 300",
    }
    assert long_purpose not in error.message


def test_thousands_of_violations_still_arrive_as_one_small_status(system) -> None:
    """Every wrong literal is a violation; the status carries the first few and the count, so it
    fits in the trailers (a status too large for them would reach the caller as a transport
    error instead of its reason)."""
    measures = [
        count(
            f"n{i}",
            "civil.residents",
            *[where("birth_year", "in", *(["x"] * 250)) for _ in range(20)],
            epsilon="0.5",
        )
        for i in range(16)
    ]
    error = refused(system, purpose=ELDERLY, measures=measures)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert int(error.metadata["violations"]) == 16 * 20 * 250
    assert len(error.violations) == 5


def test_a_message_over_the_size_cap_is_refused_and_the_gateway_keeps_serving(system) -> None:
    request = query_service_pb2.RunQueryRequest(
        request_id="huge",
        query=query_pb2.Query(purpose="x" * (1024 * 1024 + 1), measures=[]),
    )
    tls = system.pki.consumer("civil-affairs")
    with grpc.secure_channel(system.address, channel_credentials(tls)) as channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RunQuery(request, timeout=10)
    assert parse_rpc_error(caught.value).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with system.client("civil-affairs") as client:
        assert client.datasets()


def test_a_deadline_too_short_for_a_silo_round_trip_is_refused_before_reserving(system) -> None:
    tls = system.pki.consumer("civil-affairs")
    before = charged(system)
    with (
        SilogateClient.connect(
            system.address, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=0.4, retries=0
        ) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.query(
            purpose=ELDERLY,
            measures=[count("short_deadline", "civil.residents", epsilon="0.5")],
        )
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "DEADLINE_TOO_SHORT"
    assert float(error.metadata["remaining_seconds"]) < 0.4
    assert error.metadata["minimum_seconds"] == "0.450"  # 0.25 s margin + 0.2 s round trip
    assert charged(system) == before


def test_a_consumer_flooding_requests_is_refused_beyond_its_limit(system, tmp_path: Path) -> None:
    """Two requests of org-department wait in a silo that holds them; the third is refused with
    TOO_MANY_REQUESTS, another consumer is still served, and the held two then succeed."""
    release = asyncio.Event()
    arrived = threading.Semaphore(0)

    async def held(
        request: silo_service_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> silo_service_pb2.ReleaseResponse:
        arrived.release()
        await release.wait()
        return well_formed("org", request)

    _, org = system.loop.run(start_fake_silo(system.pki, "org", held))
    addresses = {"civil": system.silo_address("civil"), "org": f"127.0.0.1:{org.port}"}
    gateway = system.loop.run(
        start_gateway(
            gateway_config(
                tmp_path,
                system.pki,
                addresses,
                limits=GatewayLimits(max_in_flight_per_consumer=2),
            )
        )
    )

    def client(consumer: str) -> SilogateClient:
        tls = system.pki.consumer(consumer)
        return SilogateClient.connect(
            f"127.0.0.1:{gateway.port}", ca=tls.ca, cert=tls.cert, key=tls.key, retries=0
        )

    def ask(consumer: str, purpose: str, measure: str) -> float:
        with client(consumer) as c:
            result = c.query(
                purpose=purpose, measures=[count(measure, "org.members", epsilon="0.5")]
            )
        return result.rows[0].values[measure].value

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            held_queries = [
                pool.submit(ask, "org-department", "volunteer-planning", f"held{i}")
                for i in range(2)
            ]
            for _ in range(2):
                assert arrived.acquire(timeout=20)
            with pytest.raises(ClientError) as caught:
                ask("org-department", "volunteer-planning", "third")
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.reason == "TOO_MANY_REQUESTS"
            assert caught.value.metadata == {"consumer": "org-department", "limit": "2"}
            # The limit is per consumer: civil affairs is not held up by org's flood (its query
            # also waits in the held silo, so it is only checked to get past admission).
            with client("civil-affairs") as other:
                assert (
                    other.explain(
                        purpose=ELDERLY, measures=[count("m", "org.members", epsilon="0.5")]
                    ).decision
                    == query_service_pb2.DECISION_PERMIT
                )
            system.loop.loop.call_soon_threadsafe(release.set)
            assert [q.result(20) for q in held_queries] == [100.0, 100.0]
        # Slots are given back: the next request is admitted.
        assert ask("org-department", "volunteer-planning", "after") == 100.0
    finally:
        system.loop.run(gateway.stop(0))
        system.loop.run(org.stop(0))


def test_unknown_fields_are_refused_naming_where_they_are(system) -> None:
    """A field this gateway does not know (say, from a newer API version) could change what the
    caller meant to spend: the request is refused rather than the field silently dropped."""
    measure = query_pb2.Measure(
        id="n",
        dataset="civil.residents",
        kind=query_pb2.MEASURE_KIND_COUNT,
        spend=query_pb2.PrivacySpend(epsilon="0.5"),
    ).SerializeToString() + bytes([0xA0, 0x06, 0x01])  # field 100, varint 1
    query = query_pb2.Query(purpose=ELDERLY).SerializeToString()
    query += bytes([0x12, len(measure)]) + measure  # field 2: measures
    request = bytes([0x0A, 1]) + b"u" + bytes([0x12, len(query)]) + query
    request += bytes([0x98, 0x06, 0x01])  # field 99 of the request itself
    tls = system.pki.consumer("civil-affairs")
    before = charged(system)
    with grpc.secure_channel(system.address, channel_credentials(tls)) as channel:
        run_query = channel.unary_unary("/gateway.api.v1.QueryService/RunQuery")
        with pytest.raises(grpc.RpcError) as caught:
            run_query(request, timeout=10)
    error = parse_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "UNKNOWN_FIELD"
    assert {v.field: v.description for v in error.violations} == {
        "request": "unknown field number(s) [99]",
        "query.measures[0]": "unknown field number(s) [100]",
    }
    assert charged(system) == before
