"""SUM, MEAN and HISTOGRAM end to end: real gateway and silos, values checked against DuckDB."""

from __future__ import annotations

import math

import duckdb
import grpc
import pytest

from gateway.client import ClientError, count, histogram, mean_of, sum_of, where

HOME_CARE = "home-care-planning"
ELDERLY = "elderly-care-planning"
# Discrete Laplace: P(|noise| > 30 scale) < 2e-13 per value; a miss over every value tested here
# has probability < 1e-9.
WIDTH = 30


def exact(system, silo: str, sql: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(system.data / f"{silo}.duckdb"), read_only=True) as db:
        return db.execute(sql).fetchall()


def test_sum_of_visit_minutes_per_community_is_near_the_clamped_truth(system) -> None:
    # Rows beyond a person's first 12 (max_rows_per_person) are dropped; the synthetic visits
    # stay below that cap, so the bounded sum is the plain sum of minutes clamped to [0, 120].
    truth = {
        str(k): int(v)
        for k, v in exact(
            system,
            "health",
            "SELECT community, sum(least(greatest(minutes, 0), 120)) FROM visits GROUP BY community",
        )
    }
    with system.client("health-commission") as client:
        result = client.query(
            purpose=HOME_CARE,
            measures=[sum_of("minutes", "health.visits", "minutes", epsilon="1")],
            group_by=["community"],
        )
    plan = result.raw.measures[0]
    assert plan.sensitivity == 12 * 120  # rows per person x largest |value| in resolution units
    assert plan.scale == pytest.approx(12 * 120, rel=1e-9)
    for row in result.rows:
        value = row.values["minutes"]
        assert not value.suppressed  # a SUM has no count of its own to suppress on
        assert abs(value.value - truth.get(row.keys["community"], 0)) <= WIDTH * plan.scale
        assert value.error95 == pytest.approx(plan.error95)


def test_mean_is_noisy_sum_over_noisy_count_and_costs_the_spend(system) -> None:
    rows = exact(
        system,
        "civil",
        "SELECT district, avg(household_size), count(*) FROM residents GROUP BY district",
    )
    truth = {str(d): (float(m), int(n)) for d, m, n in rows}
    with system.client("civil-affairs") as client:
        result = client.query(
            purpose=ELDERLY,
            measures=[mean_of("household", "civil.residents", "household_size", epsilon="1")],
            group_by=["district"],
        )
    # The spend is split evenly: two discrete Laplace releases at epsilon 1/2, rho 1/8 each.
    assert result.rho == "1/4"
    for row in result.rows:
        value = row.values["household"]
        mean, n = truth[row.keys["district"]]
        assert not value.suppressed and 1 <= value.value <= 8
        # Noisy sum error <= 30 * 16 (scale: sensitivity 8 / epsilon 1/2), count error <= 30 * 2.
        worst = (mean * n + WIDTH * 16) / (n - WIDTH * 2) - mean
        assert abs(value.value - mean) <= worst
        assert 0 < value.error95 < worst


def test_histogram_of_birth_years_uses_the_policy_bins_or_the_callers(system) -> None:
    with system.client("civil-affairs") as client:
        default = client.query(
            purpose=ELDERLY,
            measures=[histogram("born", "civil.residents", "birth_year", epsilon="1")],
            group_by=["district"],
        )
        custom = client.query(
            purpose=ELDERLY,
            measures=[
                histogram(
                    "born", "civil.residents", "birth_year", bins=[1920, 1966, 2026], epsilon="1"
                )
            ],
            group_by=["district"],
        )
    labels = [v.bin for v in default.raw.groups[0].values]
    assert labels[0] == "[1920,1936)" and labels[-1] == "[2016,2026]" and len(labels) == 10
    truth = {
        (str(d), int(b)): int(n)
        for d, b, n in exact(
            system,
            "civil",
            "SELECT district, CASE WHEN birth_year < 1966 THEN 0 ELSE 1 END, count(*) "
            "FROM residents WHERE birth_year BETWEEN 1920 AND 2026 GROUP BY ALL",
        )
    }
    for group in custom.raw.groups:
        assert [v.bin for v in group.values] == ["[1920,1966)", "[1966,2026]"]
        for index, value in enumerate(group.values):
            assert abs(value.value - truth[(group.keys[0], index)]) <= WIDTH * 1.0


def test_measures_are_granted_per_column(system) -> None:
    # civil-elderly-care grants mean and histogram on birth_year and household_size only.
    with system.client("civil-affairs") as client, pytest.raises(ClientError) as caught:
        client.query(
            purpose=ELDERLY,
            measures=[mean_of("joined", "org.members", "join_year", epsilon="0.5")],
            group_by=["community"],
        )
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "join_year" in caught.value.message


@pytest.mark.parametrize(
    ("bins", "field"),
    [
        (["1980", "1970"], "query.measures[0].bins"),
        (["1980"], "query.measures[0].bins"),
        (["1980", "NaN"], "query.measures[0].bins[1]"),
        (["1980", "1e400"], "query.measures[0].bins[1]"),
    ],
)
def test_bad_bins_are_refused_before_anything_runs(system, bins, field) -> None:
    with system.client("civil-affairs") as client:
        before = {b.scope: b.spent.rho for b in client.budget()}
        with pytest.raises(ClientError) as caught:
            client.query(
                purpose=ELDERLY,
                measures=[
                    histogram("born", "civil.residents", "birth_year", bins=bins, epsilon="0.5")
                ],
                group_by=["district"],
            )
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in caught.value.violations] == [field]
        assert {b.scope: b.spent.rho for b in client.budget()} == before


def test_a_filtered_mean_with_a_tiny_count_is_suppressed_not_divided(system) -> None:
    with system.client("civil-affairs") as client:
        result = client.query(
            purpose=ELDERLY,
            measures=[
                mean_of(
                    "household",
                    "civil.residents",
                    "household_size",
                    where("birth_year", "<", 1921),
                    epsilon="1",
                ),
                count("n", "civil.residents", where("birth_year", "<", 1921), epsilon="1"),
            ],
            group_by=["community"],
        )
    for row in result.rows:
        value = row.values["household"]
        assert value.suppressed or math.isfinite(value.value)
        if value.suppressed:
            assert value.value == 0 and value.error95 == 0
    assert sum(r.values["household"].suppressed for r in result.rows) >= 150
