"""The Python client for department systems: typed results, deadlines and safe retries.

from gateway.client import SilogateClient, count, where
with SilogateClient.connect("127.0.0.1:50051", ca=..., cert=..., key=...) as client:
    result = client.query(
        purpose="elderly-care-planning",
        measures=[count("elderly_alone", "civil.residents",
                        where("lives_alone_elderly", "=", True), epsilon="0.5")],
        group_by=["community"],
    )
"""

from gateway.client.client import (
    ClientError,
    QueryResult,
    ResultRow,
    ResultValue,
    SilogateClient,
    count,
    count_persons,
    histogram,
    mean_of,
    sum_of,
    where,
)

__all__ = [
    "ClientError",
    "QueryResult",
    "ResultRow",
    "ResultValue",
    "SilogateClient",
    "count",
    "count_persons",
    "histogram",
    "mean_of",
    "sum_of",
    "where",
]
