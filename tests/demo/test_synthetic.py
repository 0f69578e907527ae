"""The synthetic department generator: schemas, determinism, cross-silo consistency, realism.

One small city (``PEOPLE`` residents, seed ``SEED``) is generated once per module; most tests query
it through one DuckDB connection with all four silo databases attached read-only.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.demo import synthetic
from gateway.demo.geography import (
    ACTIVITY_TYPES,
    BRANCH_OF_STREET,
    BRANCHES,
    CASE_CATEGORIES,
    COMMUNITIES,
    CONDITIONS,
    DISTRICTS,
    EDUCATION_LEVELS,
    KEY_SETS,
    SEXES,
    STREETS,
    SUBSIDY_TYPES,
    VISIT_TYPES,
    write_key_set_csvs,
)
from gateway.demo.synthetic import generate_departments

PEOPLE = 12_000
SEED = 20260501

EXPECTED_COLUMNS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "org": {
        "members": [
            ("person_key", "VARCHAR"),
            ("branch", "VARCHAR"),
            ("community", "VARCHAR"),
            ("join_year", "INTEGER"),
            ("birth_year", "INTEGER"),
            ("sex", "VARCHAR"),
            ("education", "VARCHAR"),
            ("floating_member", "BOOLEAN"),
        ],
        "activities": [
            ("person_key", "VARCHAR"),
            ("branch", "VARCHAR"),
            ("activity_type", "VARCHAR"),
            ("activity_date", "DATE"),
            ("hours", "DOUBLE"),
        ],
    },
    "civil": {
        "residents": [
            ("person_key", "VARCHAR"),
            ("community", "VARCHAR"),
            ("street", "VARCHAR"),
            ("district", "VARCHAR"),
            ("birth_year", "INTEGER"),
            ("sex", "VARCHAR"),
            ("household_size", "INTEGER"),
            ("low_income", "BOOLEAN"),
            ("lives_alone_elderly", "BOOLEAN"),
            ("disability", "BOOLEAN"),
        ],
        "subsidies": [
            ("person_key", "VARCHAR"),
            ("community", "VARCHAR"),
            ("month", "DATE"),
            ("subsidy_type", "VARCHAR"),
            ("amount", "DOUBLE"),
        ],
    },
    "health": {
        "chronic": [
            ("person_key", "VARCHAR"),
            ("community", "VARCHAR"),
            ("condition", "VARCHAR"),
            ("diagnosed_year", "INTEGER"),
            ("birth_year", "INTEGER"),
        ],
        "visits": [
            ("person_key", "VARCHAR"),
            ("community", "VARCHAR"),
            ("visit_date", "DATE"),
            ("visit_type", "VARCHAR"),
            ("minutes", "INTEGER"),
        ],
    },
    "events": {
        "cases": [
            ("person_key", "VARCHAR"),
            ("community", "VARCHAR"),
            ("street", "VARCHAR"),
            ("category", "VARCHAR"),
            ("opened", "DATE"),
            ("closed", "DATE"),
            ("days_to_close", "INTEGER"),
            ("handler", "VARCHAR"),
        ],
    },
}
DATASETS = [f"{silo}.{table}" for silo, tables in EXPECTED_COLUMNS.items() for table in tables]
AGE = "(2026 - birth_year)"


def _attach(paths: dict[str, Path]) -> Any:
    connection = duckdb.connect()
    for silo, path in paths.items():
        connection.execute(f"ATTACH '{path}' AS {silo} (READ_ONLY)")
    return connection


def _digests(paths: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of each dataset's rows in stored order: equal digests mean equal rows, same order."""
    connection = _attach(paths)
    try:
        return {
            dataset: hashlib.sha256(
                repr(
                    connection.execute(f"SELECT * FROM {dataset} ORDER BY rowid").fetchall()
                ).encode()
            ).hexdigest()
            for dataset in DATASETS
        }
    finally:
        connection.close()


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_departments(tmp_path_factory.mktemp("city"), PEOPLE, SEED)


@pytest.fixture(scope="module")
def db(city: dict[str, Path]) -> Iterator[Any]:
    connection = _attach(city)
    yield connection
    connection.close()


def _scalar(db: Any, sql: str) -> Any:
    return db.execute(sql).fetchone()[0]


def _values(db: Any, dataset: str, column: str) -> set[Any]:
    return {row[0] for row in db.execute(f"SELECT DISTINCT {column} FROM {dataset}").fetchall()}


def test_one_database_per_silo(city: dict[str, Path]) -> None:
    assert set(city) == {"org", "civil", "health", "events"}
    for silo, path in city.items():
        assert path.name == f"{silo}.duckdb"
        assert path.is_file()
    leftovers = sorted(p.name for p in next(iter(city.values())).parent.iterdir())
    assert leftovers == sorted(p.name for p in city.values())


def test_tables_have_exactly_the_documented_columns_and_types(db: Any) -> None:
    for silo, tables in EXPECTED_COLUMNS.items():
        rows = db.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_catalog = ? ORDER BY table_name, ordinal_position",
            [silo],
        ).fetchall()
        found: dict[str, list[tuple[str, str]]] = {}
        for table, column, data_type in rows:
            found.setdefault(table, []).append((column, data_type))
        assert found == tables, silo
    for dataset in DATASETS:
        assert _scalar(db, f"SELECT count(*) FROM {dataset}") > 0, dataset


def test_same_seed_gives_identical_rows_and_overwrites_existing_files(
    city: dict[str, Path], tmp_path: Path
) -> None:
    # Stale files of an earlier database, including a write-ahead log, must not leak into the new
    # one.
    (tmp_path / "org.duckdb").write_bytes(b"not a database")
    (tmp_path / "org.duckdb.wal").write_bytes(b"not a log")
    again = generate_departments(tmp_path, PEOPLE, SEED)
    assert _digests(again) == _digests(city)
    assert not (tmp_path / "org.duckdb.wal").exists()
    # Generating into the same folder twice replaces the rows instead of appending to them.
    assert _digests(generate_departments(tmp_path, PEOPLE, SEED)) == _digests(city)


def test_another_seed_changes_every_table_and_every_key(
    city: dict[str, Path], db: Any, tmp_path: Path
) -> None:
    other = generate_departments(tmp_path, PEOPLE, SEED + 1)
    ours, theirs = _digests(city), _digests(other)
    assert all(ours[dataset] != theirs[dataset] for dataset in DATASETS)
    connection = _attach({"other": other["civil"]})
    try:
        other_keys = _values(connection, "other.residents", "person_key")
    finally:
        connection.close()
    assert not other_keys & _values(db, "civil.residents", "person_key")


def test_progress_bar_does_not_change_the_rows(
    city: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = generate_departments(tmp_path, PEOPLE, SEED, progress=True)
    assert _digests(shown) == _digests(city)
    assert f"{PEOPLE}/{PEOPLE}" in capsys.readouterr().out


def test_person_keys_are_unique_hex_and_shared_across_silos(db: Any) -> None:
    keys = _values(db, "civil.residents", "person_key")
    assert len(keys) == PEOPLE == _scalar(db, "SELECT count(*) FROM civil.residents")
    assert all(re.fullmatch(r"[0-9a-f]{16}", key) for key in keys)
    for dataset in DATASETS:
        assert _values(db, dataset, "person_key") <= keys, dataset
    assert _values(db, "org.activities", "person_key") <= _values(db, "org.members", "person_key")


def test_a_person_has_the_same_facts_in_every_silo(db: Any) -> None:
    for dataset, columns in {
        "org.members": ("community", "birth_year", "sex"),
        "civil.subsidies": ("community",),
        "health.chronic": ("community", "birth_year"),
        "health.visits": ("community",),
        "events.cases": ("community", "street"),
    }.items():
        differ = " OR ".join(f"d.{column} IS DISTINCT FROM r.{column}" for column in columns)
        mismatched = _scalar(
            db,
            f"SELECT count(*) FROM {dataset} d JOIN civil.residents r USING (person_key) "
            f"WHERE {differ}",
        )
        assert mismatched == 0, dataset
    wrong_branch = _scalar(
        db,
        "SELECT count(*) FROM org.activities a JOIN org.members m USING (person_key) "
        "WHERE a.branch <> m.branch",
    )
    assert wrong_branch == 0


def test_members_are_about_eight_percent_of_adults_and_older_than_average(db: Any) -> None:
    members = _scalar(db, "SELECT count(*) FROM org.members")
    adults = _scalar(db, f"SELECT count(*) FROM civil.residents WHERE {AGE} >= 18")
    assert 0.06 <= members / adults <= 0.10
    assert _scalar(db, f"SELECT min({AGE}) FROM org.members") >= 18
    member_age = _scalar(db, f"SELECT avg({AGE}) FROM org.members")
    adult_age = _scalar(db, f"SELECT avg({AGE}) FROM civil.residents WHERE {AGE} >= 18")
    assert member_age > adult_age + 1.0
    floating = _scalar(db, "SELECT avg(floating_member::INTEGER) FROM org.members")
    assert 0.02 <= floating <= 0.09


def test_join_year_is_between_eighteenth_birthday_and_reference_year(db: Any) -> None:
    early_or_late = _scalar(
        db, "SELECT count(*) FROM org.members WHERE join_year < birth_year + 18 OR join_year > 2026"
    )
    assert early_or_late == 0


def test_chronic_prevalence_rises_with_age(db: Any) -> None:
    rows = db.execute(
        f"""
        SELECT CASE WHEN {AGE} < 40 THEN 0 WHEN {AGE} < 60 THEN 1 WHEN {AGE} < 70 THEN 2 ELSE 3 END,
               avg((person_key IN (SELECT person_key FROM health.chronic))::INTEGER)
        FROM civil.residents GROUP BY 1 ORDER BY 1
        """
    ).fetchall()
    prevalence = [share for _, share in rows]
    assert len(prevalence) == 4
    assert prevalence == sorted(prevalence)
    assert len(set(prevalence)) == 4
    assert prevalence[0] < 0.10
    assert prevalence[3] > 0.45


def test_lives_alone_elderly_means_sixty_plus_in_a_one_person_household(db: Any) -> None:
    disagreeing = _scalar(
        db,
        f"SELECT count(*) FROM civil.residents "
        f"WHERE lives_alone_elderly <> ({AGE} >= 60 AND household_size = 1)",
    )
    assert disagreeing == 0
    alone = _scalar(
        db, f"SELECT avg(lives_alone_elderly::INTEGER) FROM civil.residents WHERE {AGE} >= 60"
    )
    assert 0.10 <= alone <= 0.15


def test_resident_attributes_are_realistic(db: Any) -> None:
    low, high, mean_size = db.execute(
        "SELECT min(household_size), max(household_size), avg(household_size) FROM civil.residents"
    ).fetchone()
    assert low >= 1 and high <= 8
    assert 2.3 <= mean_size <= 3.0
    oldest, youngest = db.execute(f"SELECT max({AGE}), min({AGE}) FROM civil.residents").fetchone()
    assert youngest == 0 and 90 <= oldest <= 100
    low_income = _scalar(db, "SELECT avg(low_income::INTEGER) FROM civil.residents")
    assert 0.04 <= low_income <= 0.08
    disabled_young, disabled_old, disabled = db.execute(
        f"SELECT avg(disability::INTEGER) FILTER (WHERE {AGE} < 40), "
        f"avg(disability::INTEGER) FILTER (WHERE {AGE} >= 70), avg(disability::INTEGER) "
        "FROM civil.residents"
    ).fetchone()
    assert 0.025 <= disabled <= 0.055
    assert disabled_old > 3 * disabled_young


@pytest.mark.parametrize(
    ("dataset", "limit"),
    [("org.activities", 30), ("civil.subsidies", 4 * 22), ("health.visits", 60)],
)
def test_repeated_records_have_several_rows_per_person(db: Any, dataset: str, limit: int) -> None:
    most, mean = db.execute(
        f"SELECT max(n), avg(n) FROM (SELECT count(*) AS n FROM {dataset} GROUP BY person_key)"
    ).fetchone()
    assert 1 < most <= limit
    assert mean > 2


def test_activities_average_about_six_per_member(db: Any) -> None:
    per_member = _scalar(
        db, "SELECT (SELECT count(*) FROM org.activities) / (SELECT count(*) FROM org.members)"
    )
    assert 4.5 <= per_member <= 7.5


def test_subsidies_go_to_the_eligible_monthly(db: Any) -> None:
    ineligible = _scalar(
        db,
        """
        SELECT count(*) FROM civil.subsidies s JOIN civil.residents r USING (person_key)
        WHERE (subsidy_type = 'minimum_living' AND NOT low_income)
           OR (subsidy_type = 'disability' AND NOT disability)
           OR (subsidy_type = 'elderly_care' AND NOT lives_alone_elderly)
           OR (subsidy_type = 'senior_allowance' AND 2026 - r.birth_year < 80)
        """,
    )
    assert ineligible == 0
    low_income_unpaid = _scalar(
        db,
        "SELECT count(*) FROM civil.residents WHERE low_income AND person_key NOT IN "
        "(SELECT person_key FROM civil.subsidies WHERE subsidy_type = 'minimum_living')",
    )
    assert low_income_unpaid == 0
    first, last, not_first_day, duplicated = db.execute(
        "SELECT min(month), max(month), count(*) FILTER (WHERE day(month) <> 1), "
        "count(*) - count(DISTINCT (person_key, subsidy_type, month)) FROM civil.subsidies"
    ).fetchone()
    assert (str(first), str(last), not_first_day, duplicated) == ("2025-01-01", "2026-10-01", 0, 0)
    low, high, off_cents = db.execute(
        "SELECT min(amount), max(amount), "
        "count(*) FILTER (WHERE abs(amount * 100 - round(amount * 100)) > 1e-6) "
        "FROM civil.subsidies"
    ).fetchone()
    assert low >= 200 and high <= 2000 and off_cents == 0


def test_home_care_visits_are_for_chronic_patients_aged_sixty_or_more(db: Any) -> None:
    outside = _scalar(
        db,
        "SELECT count(*) FROM health.visits v JOIN civil.residents r USING (person_key) "
        "WHERE 2026 - r.birth_year < 60 "
        "OR v.person_key NOT IN (SELECT person_key FROM health.chronic)",
    )
    assert outside == 0
    low, high = db.execute("SELECT min(minutes), max(minutes) FROM health.visits").fetchone()
    assert low >= 10 and high <= 120
    impossible = _scalar(
        db,
        "SELECT count(*) FROM health.chronic WHERE diagnosed_year NOT BETWEEN birth_year AND 2026",
    )
    assert impossible == 0
    repeated = _scalar(
        db,
        "SELECT count(*) - count(DISTINCT (person_key, condition)) FROM health.chronic",
    )
    assert repeated == 0


def test_dated_records_fall_in_the_period_and_hours_are_half_hours(db: Any) -> None:
    for dataset, column in [
        ("org.activities", "activity_date"),
        ("health.visits", "visit_date"),
        ("events.cases", "opened"),
        ("events.cases", "closed"),
    ]:
        first, last = db.execute(f"SELECT min({column}), max({column}) FROM {dataset}").fetchone()
        assert str(first) >= "2025-01-01" and str(last) <= "2026-10-31", dataset
    off_grid = _scalar(
        db,
        "SELECT count(*) FROM org.activities "
        "WHERE hours NOT IN (SELECT range / 2 FROM range(1, 17))",
    )
    assert off_grid == 0


def test_cases_close_after_skewed_delays_and_some_stay_open(db: Any) -> None:
    inconsistent = _scalar(
        db,
        "SELECT count(*) FROM events.cases WHERE (closed IS NULL) <> (days_to_close IS NULL) "
        "OR closed - opened <> days_to_close OR days_to_close NOT BETWEEN 0 AND 90",
    )
    assert inconsistent == 0
    still_open, median, mean = db.execute(
        "SELECT avg((closed IS NULL)::INTEGER), median(days_to_close), avg(days_to_close) "
        "FROM events.cases"
    ).fetchone()
    assert 0.06 <= still_open <= 0.15
    assert median < mean
    reporters = _scalar(db, "SELECT count(DISTINCT person_key) FROM events.cases")
    assert 0 < reporters < PEOPLE / 4


def test_every_community_has_residents_and_sizes_vary(db: Any) -> None:
    sizes = dict(
        db.execute("SELECT community, count(*) FROM civil.residents GROUP BY 1").fetchall()
    )
    assert set(sizes) == {community.code for community in COMMUNITIES}
    assert max(sizes.values()) >= 2 * min(sizes.values())


def test_every_category_comes_from_the_public_vocabularies(db: Any) -> None:
    geography = {(c.code, c.street, c.district) for c in COMMUNITIES}
    triples = set(
        db.execute("SELECT DISTINCT community, street, district FROM civil.residents").fetchall()
    )
    assert triples <= geography
    assert set(db.execute("SELECT DISTINCT community, street FROM events.cases").fetchall()) <= {
        (code, street) for code, street, _ in geography
    }
    communities = {c.code for c in COMMUNITIES}
    for dataset in DATASETS:
        if dataset != "org.activities":
            assert _values(db, dataset, "community") <= communities, dataset
    vocabularies: dict[tuple[str, str], tuple[str, ...]] = {
        ("civil.residents", "street"): STREETS,
        ("civil.residents", "district"): DISTRICTS,
        ("civil.residents", "sex"): SEXES,
        ("org.members", "sex"): SEXES,
        ("org.members", "education"): EDUCATION_LEVELS,
        ("org.members", "branch"): BRANCHES,
        ("org.activities", "branch"): BRANCHES,
        ("org.activities", "activity_type"): ACTIVITY_TYPES,
        ("civil.subsidies", "subsidy_type"): SUBSIDY_TYPES,
        ("health.chronic", "condition"): CONDITIONS,
        ("health.visits", "visit_type"): VISIT_TYPES,
        ("events.cases", "category"): CASE_CATEGORIES,
    }
    for (dataset, column), vocabulary in vocabularies.items():
        used = _values(db, dataset, column)
        assert used <= set(vocabulary), (dataset, column)
        # Small vocabularies are used in full, or the demo would never show their keys.
        if len(vocabulary) <= 10:
            assert used == set(vocabulary), (dataset, column)
    street_of = {c.code: c.street for c in COMMUNITIES}
    for community, branch in db.execute(
        "SELECT DISTINCT community, branch FROM org.members"
    ).fetchall():
        assert branch == BRANCH_OF_STREET[street_of[community]]


def test_chunks_cover_everyone_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Three chunks (3000, 3000, 1000): keys stay unique across chunks and no community is empty.
    monkeypatch.setattr(synthetic, "CHUNK_PEOPLE", 3_000)
    paths = generate_departments(tmp_path, 7_000, SEED)
    connection = _attach(paths)
    try:
        total, distinct, communities = connection.execute(
            "SELECT count(*), count(DISTINCT person_key), count(DISTINCT community) "
            "FROM civil.residents"
        ).fetchone()
        orphans = _scalar(
            connection,
            "SELECT count(*) FROM org.members WHERE person_key NOT IN "
            "(SELECT person_key FROM civil.residents)",
        )
    finally:
        connection.close()
    assert (total, distinct, communities, orphans) == (7_000, 7_000, len(COMMUNITIES), 0)


def test_a_failed_run_keeps_the_previous_databases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = _digests(generate_departments(tmp_path, 1_000, SEED))

    def broken(people: Any, rng: Any) -> dict[str, Any]:
        raise RuntimeError("disk full")

    events = synthetic.DEPARTMENTS[-1]
    failing = (*synthetic.DEPARTMENTS[:-1], replace(events, build=broken))
    monkeypatch.setattr(synthetic, "DEPARTMENTS", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_departments(tmp_path, 2_000, SEED + 1)
    monkeypatch.undo()
    paths = {silo: tmp_path / f"{silo}.duckdb" for silo in EXPECTED_COLUMNS}
    assert _digests(paths) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


@pytest.mark.parametrize(
    ("people", "seed"), [(len(COMMUNITIES) - 1, 1), (1_000, -1), (1_000, 2**64)]
)
def test_rejects_too_few_people_and_out_of_range_seeds(
    tmp_path: Path, people: int, seed: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        generate_departments(tmp_path, people, seed)
    assert list(tmp_path.iterdir()) == []


def test_geography_is_four_districts_forty_streets_two_hundred_communities() -> None:
    assert DISTRICTS == ("D01", "D02", "D03", "D04")
    assert tuple(f"S{n:02d}" for n in range(1, 41)) == STREETS
    assert tuple(f"B{n:02d}" for n in range(1, 41)) == BRANCHES
    assert [c.code for c in COMMUNITIES] == [f"C{n:03d}" for n in range(1, 201)]
    assert COMMUNITIES[0].street == "S01" and COMMUNITIES[4].street == "S01"
    assert COMMUNITIES[5].street == "S02" and COMMUNITIES[-1].street == "S40"
    for street in STREETS:
        assert sum(c.street == street for c in COMMUNITIES) == 5
    for district in DISTRICTS:
        assert len({c.street for c in COMMUNITIES if c.district == district}) == 10
    assert {c.street: c.district for c in COMMUNITIES}["S10"] == "D01"
    assert {c.street: c.district for c in COMMUNITIES}["S11"] == "D02"


def test_key_set_csvs_match_the_geography(tmp_path: Path) -> None:
    written = write_key_set_csvs(tmp_path / "keys")
    names = [path.name for path in written]
    assert names == ["communities.csv", *(f"{name}.csv" for name in KEY_SETS)]
    assert set(names) == {
        "communities.csv",
        "streets.csv",
        "districts.csv",
        "sexes.csv",
        "education_levels.csv",
        "branches.csv",
        "activity_types.csv",
        "subsidy_types.csv",
        "conditions.csv",
        "visit_types.csv",
        "case_categories.csv",
    }
    with written[0].open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["key", "street", "district"]
    assert rows[1:] == [[c.code, c.street, c.district] for c in COMMUNITIES]
    for path in written[1:]:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["key"]
        assert tuple(row[0] for row in rows[1:]) == KEY_SETS[path.stem]
        assert all(len(row) == 1 for row in rows)
