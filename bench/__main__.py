"""Run every benchmark: ``python -m bench`` (``make bench``). ``BENCH_RELEASE_PEOPLE`` sets the
city of the release-SQL benchmark (default 10,000,000: issue 4 measures at 10 million rows);
``BENCH_PEOPLE`` the city of the others;
``BENCH_LOAD_PEOPLE`` that of the load benchmark (default 20,000: a small count, so that the silo's
SQL does not dominate what the load benchmark compares with the bare relay)."""

from __future__ import annotations

import os

from bench import audit, ledger, load, query_latency, release_sql


def main() -> None:
    people = int(os.environ.get("BENCH_PEOPLE", "1000000"))
    release_sql.run(int(os.environ.get("BENCH_RELEASE_PEOPLE", "10000000")))
    ledger.run()
    audit.run()
    query_latency.run(min(people, 200_000))
    load.run(int(os.environ.get("BENCH_LOAD_PEOPLE", "20000")))


if __name__ == "__main__":
    main()
