"""Run every benchmark: ``python -m bench`` (``make bench``). ``BENCH_PEOPLE`` sets the city size."""

from __future__ import annotations

import os

from bench import ledger, query_latency, release_sql


def main() -> None:
    people = int(os.environ.get("BENCH_PEOPLE", "1000000"))
    release_sql.run(people)
    ledger.run()
    query_latency.run(min(people, 200_000))


if __name__ == "__main__":
    main()
