"""The silo's own caps: what may be released from each dataset, over every consumer.

A dataset's ``silo_budget`` (policy) is the silo's limit whatever the gateway decides. The silo
keeps a small durable ledger of its own (the same exact, fail-closed SQLite ledger as the gateway's,
:class:`gateway.budget.ledger.PrivacyLedger`) and reserves a release's cost in it before any SQL
runs, commits after the release is in its release log, and cancels when the release fails before
anything left the silo. Datasets without a ``silo_budget`` are not charged here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.errors import BudgetExhausted, ReleaseRefused
from gateway.policy.decision import dataset_scope
from gateway.policy.model import Bundle
from gateway.silo.release import CheckedMeasure


class SiloCaps:
    def __init__(self, path: Path, *, time_zone: str = "UTC") -> None:
        self.ledger = PrivacyLedger(path, time_zone=time_zone)

    def charges(self, bundle: Bundle, measures: Iterable[CheckedMeasure]) -> list[ScopeCharge]:
        costs: dict[str, Fraction] = defaultdict(Fraction)
        limits: dict[str, ScopeLimit] = {}
        for m in measures:
            scope = dataset_scope(bundle, m.measure.dataset)
            if scope is None:
                continue
            limits[scope.key] = ScopeLimit(scope.key, scope.period, scope.total_rho)
            costs[scope.key] += m.rho
            if m.threshold is not None:  # keys from the data also spend the cap's key_delta
                limits[scope.delta_key] = ScopeLimit(scope.delta_key, scope.period, scope.key_delta)
                costs[scope.delta_key] += m.threshold.delta
        return [ScopeCharge(limits[key], cost) for key, cost in sorted(costs.items())]

    def reserve(
        self, consumer: str, request_id: str, query_digest: str, charges: list[ScopeCharge]
    ) -> bool:
        """Reserve, or raise ReleaseRefused (reason ``SILO_CAP_EXHAUSTED``); False when there is
        nothing to charge (no dataset of the release has a cap)."""
        if not charges:
            return False
        try:
            reservation = self.ledger.reserve(consumer, request_id, query_digest, charges)
        except BudgetExhausted as err:
            raise ReleaseRefused(
                f"the silo's own cap refuses this release: {err.message}",
                reason="SILO_CAP_EXHAUSTED",
                metadata=dict(err.metadata),
            ) from err
        if reservation.is_replay:
            raise ReleaseRefused(
                f"request '{request_id}' was already released by this silo",
                reason="REQUEST_ALREADY_RELEASED",
                metadata={"request_id": request_id, "state": reservation.state},
            )
        return True

    def commit(self, consumer: str, request_id: str) -> None:
        self.ledger.commit(consumer, request_id, b"")

    def cancel(self, consumer: str, request_id: str) -> None:
        self.ledger.cancel(consumer, request_id)

    def close(self) -> None:
        self.ledger.close()
