"""The privacy budget ledger on a real SQLite file: exact sums, refusals, crashes, idempotency.

Every ledger here is a file in a temporary folder; "crash" means closing the ledger without
finishing a reservation and opening the same file again, as a restarted gateway does.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.budget.ledger import Balance, PrivacyLedger
from gateway.errors import BudgetExhausted, RequestConflict

CONSUMER = "civil-affairs"
GRANT = "consumer:civil-affairs/rule:civil-elderly-care/lifetime"
POPULATION = "population:city-residents/lifetime"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[PrivacyLedger]:
    opened = PrivacyLedger(ledger_path)
    yield opened
    opened.close()


def balance(ledger: PrivacyLedger, scope: str, total: Fraction) -> Balance:
    [found] = ledger.balances({scope: total})
    return found


def test_reserve_then_commit_moves_the_cost_from_reserved_to_spent(
    ledger: PrivacyLedger, ledger_path: Path
) -> None:
    charges = {GRANT: (Fraction(50), Fraction(1, 8)), POPULATION: (Fraction(800), Fraction(1, 8))}
    reservation = ledger.reserve(CONSUMER, "r1", "digest-1", charges)
    assert ledger_path.is_file()
    assert reservation.request_id == "r1"
    assert reservation.state == "new"
    assert not reservation.is_replay
    assert ledger.balances({GRANT: Fraction(50), POPULATION: Fraction(800)}) == [
        Balance(GRANT, Fraction(50), spent=Fraction(0), reserved=Fraction(1, 8)),
        Balance(POPULATION, Fraction(800), spent=Fraction(0), reserved=Fraction(1, 8)),
    ]
    ledger.commit(CONSUMER, "r1", b"answer")
    after = balance(ledger, GRANT, Fraction(50))
    assert (after.spent, after.reserved) == (Fraction(1, 8), Fraction(0))
    assert after.remaining == Fraction(399, 8)


def test_refusal_names_the_short_scope_and_charges_nothing(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r1", "d1", {GRANT: (Fraction(1), Fraction(3, 4))})
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(
            CONSUMER,
            "r2",
            "d2",
            {POPULATION: (Fraction(800), Fraction(1, 2)), GRANT: (Fraction(1), Fraction(1, 2))},
        )
    err = info.value
    assert err.reason == "PRIVACY_BUDGET_EXHAUSTED"
    assert err.metadata == {"scope": GRANT, "requested_rho": "1/2", "remaining_rho": "1/4"}
    assert GRANT in err.message
    # All or nothing: the population scope, which had room, was not charged either.
    assert balance(ledger, POPULATION, Fraction(800)).reserved == 0
    assert balance(ledger, GRANT, Fraction(1)).reserved == Fraction(3, 4)
    # The refused request id was not recorded: it can be used again.
    assert not ledger.reserve(
        CONSUMER, "r2", "d2", {POPULATION: (Fraction(8), Fraction(1))}
    ).is_replay


def test_spending_exactly_the_total_passes_and_a_hair_more_is_refused(
    ledger: PrivacyLedger,
) -> None:
    two = Fraction(2)
    ledger.reserve(CONSUMER, "exact", "d", {"scope-a": (two, two)})
    ledger.commit(CONSUMER, "exact", b"")
    assert balance(ledger, "scope-a", two).remaining == 0
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(CONSUMER, "hair", "d", {"scope-a": (two, Fraction(1, 10**18))})
    assert info.value.metadata["remaining_rho"] == "0/1"

    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(CONSUMER, "over", "d", {"scope-b": (two, Fraction("2.000000001"))})
    assert info.value.metadata == {
        "scope": "scope-b",
        "requested_rho": "2000000001/1000000000",
        "remaining_rho": "2/1",
    }
    assert balance(ledger, "scope-b", two).reserved == 0


def test_sums_are_exact_where_floats_are_not(ledger: PrivacyLedger) -> None:
    # 0.1 + 0.2 > 0.3 in floats; three thirds are not 1 in floats either.
    tenths = Fraction(3, 10)
    ledger.reserve(CONSUMER, "a", "d", {"tenths": (tenths, Fraction(1, 10))})
    ledger.reserve(CONSUMER, "b", "d", {"tenths": (tenths, Fraction(2, 10))})
    assert balance(ledger, "tenths", tenths).remaining == 0
    for i in range(3):
        ledger.reserve(CONSUMER, f"third-{i}", "d", {"thirds": (Fraction(1), Fraction(1, 3))})
        ledger.commit(CONSUMER, f"third-{i}", b"")
    thirds = balance(ledger, "thirds", Fraction(1))
    assert thirds.spent == 1
    assert thirds.remaining == 0


def test_an_unfinished_reservation_stays_charged_after_a_crash(ledger_path: Path) -> None:
    first = PrivacyLedger(ledger_path)
    first.reserve(CONSUMER, "in-flight", "d", {GRANT: (Fraction(1), Fraction(3, 5))})
    first.close()  # the gateway died before commit or cancel

    reopened = PrivacyLedger(ledger_path)
    try:
        assert balance(reopened, GRANT, Fraction(1)) == Balance(
            GRANT, Fraction(1), spent=Fraction(0), reserved=Fraction(3, 5)
        )
        with pytest.raises(BudgetExhausted):
            reopened.reserve(CONSUMER, "next", "d", {GRANT: (Fraction(1), Fraction(1, 2))})
        # Its outcome is still known to the ledger: a replay is recognised, not charged again.
        replay = reopened.reserve(CONSUMER, "in-flight", "d", {GRANT: (Fraction(1), Fraction(1))})
        assert replay.is_replay
        assert replay.state == "reserved"
        assert replay.stored_response is None
        assert balance(reopened, GRANT, Fraction(1)).reserved == Fraction(3, 5)
    finally:
        reopened.close()


def test_committed_spending_survives_a_restart(ledger_path: Path) -> None:
    first = PrivacyLedger(ledger_path)
    first.reserve(CONSUMER, "r", "d", {GRANT: (Fraction(5), Fraction(7, 3))})
    first.commit(CONSUMER, "r", b"stored answer")
    first.close()
    reopened = PrivacyLedger(ledger_path)
    try:
        assert balance(reopened, GRANT, Fraction(5)).spent == Fraction(7, 3)
        replay = reopened.reserve(CONSUMER, "r", "d", {GRANT: (Fraction(5), Fraction(7, 3))})
        assert replay.stored_response == b"stored answer"
    finally:
        reopened.close()


def test_cancel_releases_the_reservation(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r1", "d", {GRANT: (Fraction(1), Fraction(1))})
    ledger.cancel(CONSUMER, "r1")
    assert balance(ledger, GRANT, Fraction(1)) == Balance(
        GRANT, Fraction(1), Fraction(0), Fraction(0)
    )
    assert not ledger.reserve(CONSUMER, "r2", "d", {GRANT: (Fraction(1), Fraction(1))}).is_replay


def test_retry_of_a_cancelled_request_starts_afresh(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r", "d", {GRANT: (Fraction(1), Fraction(1, 2))})
    ledger.cancel(CONSUMER, "r")
    retry = ledger.reserve(CONSUMER, "r", "d", {GRANT: (Fraction(1), Fraction(1, 4))})
    assert not retry.is_replay
    assert balance(ledger, GRANT, Fraction(1)).reserved == Fraction(1, 4)
    ledger.commit(CONSUMER, "r", b"ok")
    assert balance(ledger, GRANT, Fraction(1)).spent == Fraction(1, 4)


def test_a_finished_reservation_cannot_be_finished_again(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r", "d", {GRANT: (Fraction(1), Fraction(1, 2))})
    ledger.commit(CONSUMER, "r", b"ok")
    with pytest.raises(RuntimeError, match="no open reservation"):
        ledger.cancel(CONSUMER, "r")  # cancelling after a release would under-charge
    with pytest.raises(RuntimeError, match="no open reservation"):
        ledger.commit(CONSUMER, "r", b"other")
    with pytest.raises(RuntimeError, match="no open reservation"):
        ledger.commit(CONSUMER, "never-reserved", b"")
    assert balance(ledger, GRANT, Fraction(1)).spent == Fraction(1, 2)


def test_replay_after_commit_returns_the_stored_response_without_charging(
    ledger: PrivacyLedger,
) -> None:
    charges = {GRANT: (Fraction(1), Fraction(1, 3))}
    ledger.reserve(CONSUMER, "r", "digest", charges)
    ledger.commit(CONSUMER, "r", b"the answer")
    for _ in range(3):
        replay = ledger.reserve(CONSUMER, "r", "digest", charges)
        assert replay.is_replay
        assert replay.state == "committed"
        assert replay.stored_response == b"the answer"
    assert balance(ledger, GRANT, Fraction(1)) == Balance(
        GRANT, Fraction(1), spent=Fraction(1, 3), reserved=Fraction(0)
    )


def test_replay_is_recognised_even_when_the_budget_is_gone(ledger: PrivacyLedger) -> None:
    charges = {GRANT: (Fraction(1), Fraction(1))}
    ledger.reserve(CONSUMER, "r", "digest", charges)
    ledger.commit(CONSUMER, "r", b"answer")
    assert ledger.reserve(CONSUMER, "r", "digest", charges).stored_response == b"answer"


@pytest.mark.parametrize("finish", ["open", "commit", "cancel"])
def test_same_request_id_with_another_query_is_a_conflict(
    ledger: PrivacyLedger, finish: str
) -> None:
    charges = {GRANT: (Fraction(1), Fraction(1, 4))}
    ledger.reserve(CONSUMER, "r", "digest-a", charges)
    if finish == "commit":
        ledger.commit(CONSUMER, "r", b"a")
    elif finish == "cancel":
        ledger.cancel(CONSUMER, "r")
    before = balance(ledger, GRANT, Fraction(1))
    with pytest.raises(RequestConflict) as info:
        ledger.reserve(CONSUMER, "r", "digest-b", charges)
    assert info.value.reason == "REQUEST_ID_REUSED"
    assert info.value.metadata == {"request_id": "r"}
    assert balance(ledger, GRANT, Fraction(1)) == before


def test_request_ids_are_per_consumer(ledger: PrivacyLedger) -> None:
    charges = {POPULATION: (Fraction(1), Fraction(1, 4))}
    ledger.reserve("civil-affairs", "r", "digest-a", charges)
    other = ledger.reserve("org-department", "r", "digest-b", charges)
    assert not other.is_replay
    assert balance(ledger, POPULATION, Fraction(1)).reserved == Fraction(1, 2)


@pytest.mark.parametrize(
    ("total", "cost"), [(Fraction(1), Fraction(-1, 10)), (Fraction(-1), Fraction(0))]
)
def test_negative_amounts_are_refused(
    ledger: PrivacyLedger, total: Fraction, cost: Fraction
) -> None:
    with pytest.raises(ValueError, match="negative amount for scope"):
        ledger.reserve(CONSUMER, "r", "d", {GRANT: (total, cost)})
    assert balance(ledger, GRANT, Fraction(1)).reserved == 0
    # Nothing was recorded under the request id either.
    assert not ledger.reserve(CONSUMER, "r", "d", {GRANT: (Fraction(1), Fraction(1))}).is_replay


def test_concurrent_reservations_never_overspend(ledger_path: Path) -> None:
    """Two ledger objects on one file (two gateway replicas) and many threads race for a
    budget of 1 in steps of 1/10: exactly ten win."""
    ledgers = [PrivacyLedger(ledger_path), PrivacyLedger(ledger_path)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        try:
            ledgers[i % 2].reserve(CONSUMER, f"r{i}", "d", {GRANT: (Fraction(1), Fraction(1, 10))})
            result = "reserved"
        except BudgetExhausted:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert sorted(outcomes) == ["refused"] * 14 + ["reserved"] * 10
        assert balance(ledgers[0], GRANT, Fraction(1)).reserved == 1
    finally:
        for opened in ledgers:
            opened.close()


# --- any sequence of operations -------------------------------------------------------------------

TOTALS = {"grant": Fraction(1), "population": Fraction(5, 3), "silo": Fraction(2)}
costs = st.fractions(min_value=0, max_value=Fraction(3, 4), max_denominator=12)


@dataclass
class Request:
    digest: str
    charges: dict[str, Fraction]
    state: str = "reserved"
    response: bytes | None = None


@dataclass
class Model:
    requests: dict[str, Request] = field(default_factory=dict)

    def sums(self, scope: str, state: str) -> Fraction:
        return sum(
            (r.charges.get(scope, Fraction(0)) for r in self.requests.values() if r.state == state),
            Fraction(0),
        )

    def remaining(self, scope: str) -> Fraction:
        return TOTALS[scope] - self.sums(scope, "committed") - self.sums(scope, "reserved")

    def ids(self, state: str) -> list[str]:
        return sorted(i for i, r in self.requests.items() if r.state == state)


class LedgerMachine(RuleBasedStateMachine):
    """Reserve, commit, cancel, replay, retry and crash in any order; the ledger's balances
    always equal an exact model and never exceed any scope's total."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.path = Path(self.folder.name) / "ledger.sqlite"
        self.ledger = PrivacyLedger(self.path)
        self.model = Model()
        self.next_id = 0

    @initialize()
    def start_empty(self) -> None:
        assert self.ledger.balances(TOTALS) == [
            Balance(s, t, Fraction(0), Fraction(0)) for s, t in TOTALS.items()
        ]

    def _reserve(self, request_id: str, digest: str, charges: dict[str, Fraction]) -> None:
        fits = all(cost <= self.model.remaining(scope) for scope, cost in charges.items())
        try:
            reservation = self.ledger.reserve(
                CONSUMER, request_id, digest, {s: (TOTALS[s], c) for s, c in charges.items()}
            )
        except BudgetExhausted as err:
            assert not fits
            scope = err.metadata["scope"]
            assert Fraction(err.metadata["requested_rho"]) == charges[scope]
            assert Fraction(err.metadata["remaining_rho"]) == max(
                self.model.remaining(scope), Fraction(0)
            )
            assert charges[scope] > self.model.remaining(scope)
            return
        assert fits
        assert not reservation.is_replay
        self.model.requests[request_id] = Request(digest, charges)

    @rule(
        scopes=st.sets(st.sampled_from(sorted(TOTALS)), min_size=1),
        cost=costs,
    )
    def reserve_new(self, scopes: set[str], cost: Fraction) -> None:
        self.next_id += 1
        request_id = f"r{self.next_id}"
        self._reserve(request_id, f"digest-{request_id}", dict.fromkeys(scopes, cost))

    @precondition(lambda self: bool(self.model.ids("reserved")))
    @rule(pick=st.integers(0, 1000))
    def commit(self, pick: int) -> None:
        open_ids = self.model.ids("reserved")
        request_id = open_ids[pick % len(open_ids)]
        response = f"answer-{request_id}".encode()
        self.ledger.commit(CONSUMER, request_id, response)
        self.model.requests[request_id].state = "committed"
        self.model.requests[request_id].response = response

    @precondition(lambda self: bool(self.model.ids("reserved")))
    @rule(pick=st.integers(0, 1000))
    def cancel(self, pick: int) -> None:
        open_ids = self.model.ids("reserved")
        request_id = open_ids[pick % len(open_ids)]
        self.ledger.cancel(CONSUMER, request_id)
        self.model.requests[request_id].state = "cancelled"

    @precondition(lambda self: bool(self.model.ids("cancelled")))
    @rule(pick=st.integers(0, 1000), cost=costs)
    def retry_cancelled(self, pick: int, cost: Fraction) -> None:
        cancelled = self.model.ids("cancelled")
        request_id = cancelled[pick % len(cancelled)]
        request = self.model.requests[request_id]
        before = dict(self.model.requests)
        del self.model.requests[request_id]
        self._reserve(request_id, request.digest, dict.fromkeys(request.charges, cost))
        if request_id not in self.model.requests:  # refused: the cancelled attempt stays
            self.model.requests = before

    @precondition(lambda self: bool(self.model.ids("reserved") or self.model.ids("committed")))
    @rule(pick=st.integers(0, 1000))
    def replay(self, pick: int) -> None:
        known = self.model.ids("reserved") + self.model.ids("committed")
        request_id = known[pick % len(known)]
        request = self.model.requests[request_id]
        reservation = self.ledger.reserve(
            CONSUMER,
            request_id,
            request.digest,
            {s: (TOTALS[s], c) for s, c in request.charges.items()},
        )
        assert reservation.is_replay
        assert reservation.state == request.state
        assert reservation.stored_response == request.response

    @precondition(lambda self: bool(self.model.requests))
    @rule(pick=st.integers(0, 1000))
    def reuse_id_for_another_query(self, pick: int) -> None:
        ids = sorted(self.model.requests)
        request_id = ids[pick % len(ids)]
        with pytest.raises(RequestConflict):
            self.ledger.reserve(
                CONSUMER, request_id, "another-digest", {"grant": (TOTALS["grant"], Fraction(0))}
            )

    @rule()
    def crash_and_reopen(self) -> None:
        self.ledger.close()
        self.ledger = PrivacyLedger(self.path)

    @invariant()
    def balances_are_exact_and_within_totals(self) -> None:
        for found in self.ledger.balances(TOTALS):
            assert found.spent == self.model.sums(found.scope, "committed")
            assert found.reserved == self.model.sums(found.scope, "reserved")
            assert found.spent + found.reserved <= found.total
            assert found.remaining >= 0

    def teardown(self) -> None:
        self.ledger.close()
        self.folder.cleanup()


LedgerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestLedgerSequences = LedgerMachine.TestCase
