"""The privacy budget ledger: scopes, exact rho arithmetic, reserve/commit/cancel, idempotency."""

from gateway.budget.ledger import Balance, PrivacyLedger, Reservation

__all__ = ["Balance", "PrivacyLedger", "Reservation"]
