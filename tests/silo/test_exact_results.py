"""The silo engine's cache of exact results (``gateway.silo.engine.ExactResultCache``).

The cache only saves re-running identical SQL on a file nobody can write: every release still
draws fresh noise, is charged to the silo's cap, signed and logged, and a policy activation
empties it. Unit tests for the cache, then a real health silo (with a cap) called directly with
the gateway's certificate.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import duckdb
import grpc
import pytest
from support import POLICY, BackgroundLoop, edit_rule, start_silos

from gateway.api.v1 import query_pb2, silo_service_pb2, silo_service_pb2_grpc
from gateway.audit.store import iter_records
from gateway.client import count
from gateway.crypto.channels import channel_credentials
from gateway.silo.engine import MAX_CACHED_ROWS, DuckDbEngine, ExactResultCache
from gateway.silo.sql import CompiledSql

CONSUMER = "health-commission"
PURPOSE = "home-care-planning"
CAP_SCOPE = "dataset:health.visits/year"

# -- the cache on its own ---------------------------------------------------------------------


def test_a_result_is_returned_as_stored_and_copied() -> None:
    cache = ExactResultCache(4)
    query = CompiledSql("SELECT ?", (1,))
    assert cache.get(query) is None
    cache.put(query, [(1, 2)], cache.generation)
    rows = cache.get(query)
    assert rows == [(1, 2)]
    assert rows is not None
    rows.append((3, 4))  # the caller's copy, not the kept rows
    assert cache.get(query) == [(1, 2)]
    assert (cache.hits, cache.misses) == (2, 1)


def test_parameters_are_told_apart_by_type_and_sql_by_text() -> None:
    cache = ExactResultCache(8)
    cache.put(CompiledSql("SELECT ?", (1,)), [(1,)], cache.generation)
    # Equal (and hashing alike) in Python, but not the same bound parameter.
    assert cache.get(CompiledSql("SELECT ?", (True,))) is None
    assert cache.get(CompiledSql("SELECT ?", (Decimal(1),))) is None
    assert cache.get(CompiledSql("SELECT ?", (1.0,))) is None
    assert cache.get(CompiledSql("SELECT ? ", (1,))) is None
    assert cache.get(CompiledSql("SELECT ?", (1,))) == [(1,)]


def test_the_least_recently_used_result_goes_first() -> None:
    cache = ExactResultCache(2)
    a, b, c = (CompiledSql(f"SELECT {n}", ()) for n in "abc")
    cache.put(a, [("a",)], cache.generation)
    cache.put(b, [("b",)], cache.generation)
    assert cache.get(a) == [("a",)]  # a is now the most recent
    cache.put(c, [("c",)], cache.generation)
    assert len(cache) == 2
    assert cache.get(b) is None
    assert cache.get(a) == [("a",)]
    assert cache.get(c) == [("c",)]


def test_invalidation_empties_it_and_drops_results_of_queries_begun_before() -> None:
    cache = ExactResultCache(4)
    query = CompiledSql("SELECT 1", ())
    cache.put(query, [(1,)], cache.generation)
    begun = cache.generation  # a query reads the generation, then runs
    cache.invalidate()
    assert cache.get(query) is None
    assert len(cache) == 0
    cache.put(query, [(1,)], begun)  # finished after the activation: not kept
    assert cache.get(query) is None
    cache.put(query, [(1,)], cache.generation)
    assert cache.get(query) == [(1,)]


def test_large_results_and_a_zero_size_are_not_kept() -> None:
    cache = ExactResultCache(4)
    large = CompiledSql("SELECT large", ())
    cache.put(large, [(i,) for i in range(MAX_CACHED_ROWS + 1)], cache.generation)
    assert cache.get(large) is None
    off = ExactResultCache(0)
    small = CompiledSql("SELECT 1", ())
    off.put(small, [(1,)], off.generation)
    assert off.get(small) is None


def test_the_duckdb_engine_runs_a_query_once_until_its_results_are_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute("CREATE TABLE t AS SELECT range % 3 AS k FROM range(30)")
    engine = DuckDbEngine(path)
    loop = BackgroundLoop()
    try:
        query = CompiledSql("SELECT k, COUNT(*) FROM t WHERE k < ? GROUP BY k ORDER BY k", (2,))
        first = loop.run(engine.fetch(query))
        assert first == [(0, 10), (1, 10)]
        assert loop.run(engine.fetch(query)) == first
        assert (engine.results.hits, engine.results.misses) == (1, 1)
        engine.forget_results()
        assert loop.run(engine.fetch(query)) == first
        assert (engine.results.hits, engine.results.misses) == (1, 2)
    finally:
        loop.close()
        engine.close()


# -- a running silo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def health(tmp_path_factory, data_dir, pki) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("exact-results")
    bundle = root / "policy"
    shutil.copytree(POLICY, bundle, ignore=shutil.ignore_patterns("tests"))
    loop = BackgroundLoop()
    silos = start_silos(loop, pki, data_dir, root, ["health"], policy=bundle)
    yield {"root": root, "bundle": bundle, "silo": silos["health"], "pki": pki}
    loop.run(silos["health"].stop(0))
    loop.close()


def _release(stub: silo_service_pb2_grpc.SiloServiceStub, request_id: str):
    version = stub.Describe(silo_service_pb2.DescribeRequest(), timeout=10).policy_version
    # Sensitivity 12 (12 visits per person): epsilon 1/2 needs a discrete Laplace scale >= 24.
    rho = Fraction(1, 8)
    plan = silo_service_pb2.ReleasePlan(
        measure=count("visits", "health.visits", epsilon="0.5"),
        cost=query_pb2.PrivacyCost(rho=str(rho)),
        components=[
            silo_service_pb2.NoiseComponent(
                name="value",
                mechanism=query_pb2.MECHANISM_DISCRETE_LAPLACE,
                scale=24.5,
                rho=str(rho),
            )
        ],
    )
    request = silo_service_pb2.ReleaseRequest(
        request_id=request_id,
        consumer=CONSUMER,
        purpose=PURPOSE,
        policy_version=version,
        group_by=["community"],
        plans=[plan],
    )
    return stub.Release(request, timeout=30)


def _cap_spent(sums: dict[str, tuple[Fraction, Fraction]]) -> Fraction:
    """What the silo's cap on visits has spent (its yearly windows are keyed "<scope>@<year>")."""
    return sum(
        (spent for key, (spent, _) in sums.items() if key.startswith(f"{CAP_SCOPE}@")), Fraction(0)
    )


def test_repeated_releases_reuse_the_exact_result_but_each_is_noised_charged_signed_and_logged(
    health,
) -> None:
    silo = health["silo"]
    engine = silo.servicer.engine
    cap = silo.servicer.caps.ledger
    spent_before = _cap_spent(cap.scope_sums())
    hits_before = engine.results.hits
    channel = grpc.secure_channel(
        f"127.0.0.1:{silo.port}", channel_credentials(health["pki"].gateway)
    )
    ids = [f"repeat-{i}" for i in range(5)]
    with channel:
        stub = silo_service_pb2_grpc.SiloServiceStub(channel)
        responses = [_release(stub, request_id) for request_id in ids]
    assert engine.results.hits - hits_before >= len(ids) - 1
    values = [tuple(r.releases[0].components[0].values) for r in responses]
    # 200 communities at scale 24.5: five identical noisy vectors would mean reused noise.
    assert len(set(values)) == len(ids)
    assert len({r.receipt.digest for r in responses}) == len(ids)
    logged = {
        r["request_id"]
        for r in iter_records(Path(health["root"]) / "state" / "silo-health")
        if r.get("kind") == "release"
    }
    assert set(ids) <= logged
    spent_after = _cap_spent(cap.scope_sums())
    assert spent_after - spent_before == len(ids) * Fraction(1, 8)


def test_a_policy_activation_forgets_the_exact_results(health) -> None:
    silo = health["silo"]
    engine = silo.servicer.engine
    channel = grpc.secure_channel(
        f"127.0.0.1:{silo.port}", channel_credentials(health["pki"].gateway)
    )
    with channel:
        stub = silo_service_pb2_grpc.SiloServiceStub(channel)
        _release(stub, "before-activation")
        assert len(engine.results) >= 1
        generation = engine.results.generation
        edit_rule(
            Path(health["bundle"]),
            "health-home-care",
            description="Changed so that the bundle gets a new version.",
        )
        assert silo.servicer.policy.reload()
        assert len(engine.results) == 0
        assert engine.results.generation > generation
        misses = engine.results.misses
        _release(stub, "after-activation")  # under the new version: computed again
        assert engine.results.misses == misses + 1
