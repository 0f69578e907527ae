"""Partial cancels: a multi-silo query where some silos released nothing and others released or
may have. The ledger gives back exactly the shares of the former, in one transaction, and keeps
the rest charged."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.errors import BudgetExhausted, LedgerUnavailable

CONSUMER = "civil-affairs"
GRANT = ScopeLimit(
    "consumer:civil-affairs/rule:civil-elderly-care/lifetime", "lifetime", Fraction(1)
)
POPULATION = ScopeLimit("population:city-residents/lifetime", "lifetime", Fraction(2))
MONTHLY = ScopeLimit("consumer:civil-affairs/rule:monthly/month", "month", Fraction(1))
# Two measures of 1/8 and 1/3 (two silos): each scope is charged their sum.
CIVIL, ORG = Fraction(1, 8), Fraction(1, 3)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PrivacyLedger]:
    opened = PrivacyLedger(
        tmp_path / "ledger.sqlite", clock=lambda: dt.datetime(2026, 3, 15, tzinfo=dt.UTC)
    )
    yield opened
    opened.close()


def _reserve(ledger: PrivacyLedger, request_id: str = "r") -> None:
    ledger.reserve(
        CONSUMER,
        request_id,
        "digest",
        [ScopeCharge(limit, CIVIL + ORG) for limit in (GRANT, POPULATION, MONTHLY)],
    )


def _charged(ledger: PrivacyLedger) -> list[tuple[Fraction, Fraction]]:
    return [(b.spent, b.reserved) for b in ledger.balances([GRANT, POPULATION, MONTHLY])]


def test_the_share_of_a_silo_that_released_nothing_goes_back_exactly(
    ledger: PrivacyLedger,
) -> None:
    _reserve(ledger)
    ledger.cancel_share(
        CONSUMER, "r", {GRANT.scope: ORG, POPULATION.scope: ORG, MONTHLY.scope: ORG}
    )
    assert _charged(ledger) == [(Fraction(0), CIVIL)] * 3
    # The rest stays reserved until commit, which spends exactly the remaining share.
    ledger.commit(CONSUMER, "r", b"answer")
    assert _charged(ledger) == [(CIVIL, Fraction(0))] * 3
    assert ledger.verify() == {
        GRANT.scope: (CIVIL, Fraction(0)),
        POPULATION.scope: (CIVIL, Fraction(0)),
        f"{MONTHLY.scope}@month:2026-03": (CIVIL, Fraction(0)),
    }


def test_an_unfinished_partial_cancel_stays_charged_and_frees_only_its_share(
    ledger: PrivacyLedger,
) -> None:
    _reserve(ledger)
    ledger.cancel_share(CONSUMER, "r", {GRANT.scope: ORG})
    assert _charged(ledger) == [
        (Fraction(0), CIVIL),
        (Fraction(0), CIVIL + ORG),
        (Fraction(0), CIVIL + ORG),
    ]
    # The grant has exactly 1 - 1/8 left now: that much fits, a hair more does not.
    with pytest.raises(BudgetExhausted):
        ledger.reserve(CONSUMER, "next", "d", [ScopeCharge(GRANT, 1 - CIVIL + Fraction(1, 10**9))])
    ledger.reserve(CONSUMER, "next", "d", [ScopeCharge(GRANT, 1 - CIVIL)])
    ledger.verify()


def test_cancelling_every_share_leaves_nothing_charged(ledger: PrivacyLedger) -> None:
    _reserve(ledger)
    ledger.cancel_share(CONSUMER, "r", {GRANT.scope: CIVIL})
    ledger.cancel_share(CONSUMER, "r", {GRANT.scope: ORG})
    assert _charged(ledger)[0] == (Fraction(0), Fraction(0))
    ledger.cancel(CONSUMER, "r")
    assert _charged(ledger) == [(Fraction(0), Fraction(0))] * 3
    assert all(sums == (0, 0) for sums in ledger.verify().values())


@pytest.mark.parametrize(
    "shares",
    [
        {GRANT.scope: CIVIL, POPULATION.scope: CIVIL + ORG + Fraction(1, 10**12)},  # too much
        {GRANT.scope: CIVIL, "population:nobody/lifetime": CIVIL},  # not charged
        {GRANT.scope: CIVIL, POPULATION.scope: -CIVIL},  # negative
    ],
)
def test_a_wrong_share_changes_nothing(ledger: PrivacyLedger, shares: dict[str, Fraction]) -> None:
    _reserve(ledger)
    with pytest.raises(ValueError):
        ledger.cancel_share(CONSUMER, "r", shares)
    # The valid first share was not applied either: one transaction.
    assert _charged(ledger) == [(Fraction(0), CIVIL + ORG)] * 3
    ledger.verify()


def test_only_an_open_reservation_can_be_partly_cancelled(ledger: PrivacyLedger) -> None:
    _reserve(ledger, "committed")
    ledger.commit(CONSUMER, "committed", b"answer")
    for request_id in ("committed", "never-reserved"):
        with pytest.raises(LedgerUnavailable) as info:
            ledger.cancel_share(CONSUMER, request_id, {GRANT.scope: CIVIL})
        assert info.value.reason == "RESERVATION_NOT_OPEN"
    assert _charged(ledger) == [(CIVIL + ORG, Fraction(0))] * 3


def test_a_partly_cancelled_reservation_is_still_a_replay(ledger: PrivacyLedger) -> None:
    """A retry of the same request id must not spend again: the released share stays."""
    _reserve(ledger)
    ledger.cancel_share(CONSUMER, "r", {GRANT.scope: ORG})
    replay = ledger.reserve(CONSUMER, "r", "digest", [ScopeCharge(GRANT, CIVIL + ORG)])
    assert replay.is_replay and replay.state == "reserved"
    assert _charged(ledger)[0] == (Fraction(0), CIVIL)
