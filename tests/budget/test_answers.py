"""The answer cache and free answers: identical queries in the same window under the same policy
are answered from a stored release at zero cost, and still honour request-id idempotency."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from gateway.budget.ledger import PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.errors import RequestConflict

CONSUMER = "civil-affairs"
MONTHLY = ScopeLimit("consumer:civil-affairs/rule:monthly", "month", Fraction(1))
FOREVER = ScopeLimit("population:city-residents", "lifetime", Fraction(3))
DIGEST = "3f5a" * 16
POLICY_V1 = "a1" * 32
POLICY_V2 = "b2" * 32


class ManualClock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(dt.datetime(2026, 11, 10, 9, tzinfo=dt.UTC))


@pytest.fixture
def ledger(tmp_path: Path, clock: ManualClock) -> Iterator[PrivacyLedger]:
    opened = PrivacyLedger(tmp_path / "ledger.sqlite", time_zone="Asia/Shanghai", clock=clock)
    yield opened
    opened.close()


def test_cache_key_names_the_query_the_policy_and_the_windows(
    ledger: PrivacyLedger, clock: ManualClock
) -> None:
    key = ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY, FOREVER])
    assert key == ledger.cache_key(DIGEST, POLICY_V1, [FOREVER, MONTHLY])  # order is irrelevant
    assert key != ledger.cache_key(DIGEST, POLICY_V2, [MONTHLY, FOREVER])
    assert key != ledger.cache_key("9c" * 32, POLICY_V1, [MONTHLY, FOREVER])
    assert key != ledger.cache_key(DIGEST, POLICY_V1, [FOREVER])

    clock.now = dt.datetime(2026, 11, 30, 15, 59, 59, tzinfo=dt.UTC)  # still November locally
    assert ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY, FOREVER]) == key
    lifetime_key = ledger.cache_key(DIGEST, POLICY_V1, [FOREVER])

    clock.now = dt.datetime(2026, 11, 30, 16, tzinfo=dt.UTC)  # December in Shanghai
    assert ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY, FOREVER]) != key
    # A lifetime scope has one window: its answers never expire by period.
    clock.now = dt.datetime(2031, 5, 1, tzinfo=dt.UTC)
    assert ledger.cache_key(DIGEST, POLICY_V1, [FOREVER]) == lifetime_key


def test_commit_with_a_cache_key_stores_the_answer_for_that_consumer_only(
    ledger: PrivacyLedger, clock: ManualClock
) -> None:
    key = ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY])
    assert ledger.cached_answer(CONSUMER, key) is None
    ledger.reserve(CONSUMER, "r1", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 4))])
    assert ledger.cached_answer(CONSUMER, key) is None  # nothing is cached before the release
    ledger.commit(CONSUMER, "r1", b"released answer", cache_key=key)

    assert ledger.cached_answer(CONSUMER, key) == b"released answer"
    assert ledger.cached_answer("org-department", key) is None
    assert ledger.cached_answer(CONSUMER, ledger.cache_key(DIGEST, POLICY_V2, [MONTHLY])) is None
    clock.now = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)
    assert ledger.cached_answer(CONSUMER, ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY])) is None


def test_commit_without_a_cache_key_caches_nothing(ledger: PrivacyLedger) -> None:
    key = ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY])
    ledger.reserve(CONSUMER, "r1", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 4))])
    ledger.commit(CONSUMER, "r1", b"released answer")
    assert ledger.cached_answer(CONSUMER, key) is None
    assert ledger.reserve(CONSUMER, "r1", DIGEST, []).stored_response == b"released answer"


def _cache_one_answer(ledger: PrivacyLedger) -> str:
    key = ledger.cache_key(DIGEST, POLICY_V1, [MONTHLY])
    ledger.reserve(CONSUMER, "r1", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 4))], cache_key=key)
    ledger.commit(CONSUMER, "r1", b"released answer", cache_key=key)
    return key


def test_a_cached_answer_charges_nothing_and_replays(ledger: PrivacyLedger) -> None:
    key = _cache_one_answer(ledger)
    first = ledger.reserve(
        CONSUMER, "r2", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 4))], cache_key=key
    )
    assert (first.state, first.is_replay, first.cached_answer) == ("new", False, b"released answer")
    assert ledger.balances([MONTHLY])[0].spent == Fraction(1, 4)  # only the release was charged
    assert ledger.balances([MONTHLY])[0].reserved == 0
    ledger.commit(CONSUMER, "r2", b"cached copy")
    again = ledger.reserve(
        CONSUMER, "r2", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 4))], cache_key=key
    )
    assert again.is_replay and again.stored_response == b"cached copy"
    assert again.cached_answer is None
    assert ledger.verify() == {f"{MONTHLY.scope}@month:2026-11": (Fraction(1, 4), Fraction(0))}


def test_a_cached_answer_under_a_used_request_id_with_another_query_is_a_conflict(
    ledger: PrivacyLedger,
) -> None:
    key = _cache_one_answer(ledger)
    with pytest.raises(RequestConflict) as info:
        ledger.reserve(CONSUMER, "r1", "another-digest", [], cache_key=key)
    assert info.value.metadata == {"request_id": "r1"}
    # Another consumer's answers are not shared.
    other = ledger.reserve("org-department", "r9", DIGEST, [], cache_key=key)
    assert other.cached_answer is None


def test_a_cached_answer_after_a_cancelled_attempt_leaves_the_ledger_consistent(
    ledger: PrivacyLedger,
) -> None:
    """A query reserved, then cancelled (no silo released), then retried under the same request
    id and answered from the cache: the cancelled attempt's charges must not linger."""
    key = _cache_one_answer(ledger)
    ledger.reserve(CONSUMER, "r4", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 2))])
    ledger.cancel(CONSUMER, "r4")
    retried = ledger.reserve(
        CONSUMER, "r4", DIGEST, [ScopeCharge(MONTHLY, Fraction(1, 2))], cache_key=key
    )
    assert retried.cached_answer == b"released answer"
    ledger.commit(CONSUMER, "r4", b"cached copy")
    assert ledger.balances([MONTHLY])[0].remaining == Fraction(3, 4)
    assert ledger.verify() == {f"{MONTHLY.scope}@month:2026-11": (Fraction(1, 4), Fraction(0))}
