"""The digest of a release, as a silo's receipt states it and the gateway checks it.

One function for both sides, so that the gateway recomputes exactly what the silo hashed: the
request id, the consumer and every released value in order. The values are the noisy floats the
silo sends (JSON keeps a float's shortest round-trip form, so both sides hash the same text).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from gateway.api.v1 import silo_service_pb2


def release_digest(
    request_id: str, consumer: str, releases: Iterable[silo_service_pb2.MeasureRelease]
) -> str:
    """SHA-256 (hex) of the canonical release content."""
    content = json.dumps(
        {
            "request_id": request_id,
            "consumer": consumer,
            "releases": [
                {"measure": r.measure_id, "values": [g.values[0].value for g in r.groups]}
                for r in releases
            ],
        },
        sort_keys=True,
    )
    return hashlib.sha256(content.encode()).hexdigest()
