"""The privacy budget ledger on a real SQLite file: exact sums, refusals, crashes, idempotency.

Every ledger here is a file in a temporary folder; "crash" means closing the ledger without
finishing a reservation and opening the same file again, as a restarted gateway does. Scopes here
are ``lifetime`` unless a test is about periods (see ``test_periods.py`` for the calendar).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

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

from gateway.budget.ledger import Balance, PrivacyLedger, ScopeCharge, ScopeLimit
from gateway.errors import BudgetExhausted, LedgerUnavailable, RequestConflict

CONSUMER = "civil-affairs"
GRANT = "consumer:civil-affairs/rule:civil-elderly-care"
POPULATION = "population:city-residents"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[PrivacyLedger]:
    opened = PrivacyLedger(ledger_path)
    yield opened
    opened.close()


def charge(scope: str, total: Fraction, cost: Fraction, period: str = "lifetime") -> ScopeCharge:
    return ScopeCharge(ScopeLimit(scope, period, total), cost)


def balance(ledger: PrivacyLedger, scope: str, total: Fraction) -> Balance:
    [found] = ledger.balances([ScopeLimit(scope, "lifetime", total)])
    return found


def lifetime(scope: str, total: Fraction, spent: Fraction, reserved: Fraction) -> Balance:
    """A lifetime scope's balance: its one window is named after the scope and never ends."""
    return Balance(scope, scope, total, spent, reserved, period_end=None)


def test_reserve_then_commit_moves_the_cost_from_reserved_to_spent(
    ledger: PrivacyLedger, ledger_path: Path
) -> None:
    charges = [
        charge(GRANT, Fraction(50), Fraction(1, 8)),
        charge(POPULATION, Fraction(800), Fraction(1, 8)),
    ]
    reservation = ledger.reserve(CONSUMER, "r1", "digest-1", charges)
    assert ledger_path.is_file()
    assert reservation.request_id == "r1"
    assert reservation.state == "new"
    assert not reservation.is_replay
    assert reservation.windows == f"{GRANT}|{POPULATION}"
    assert ledger.balances([c.limit for c in charges]) == [
        lifetime(GRANT, Fraction(50), spent=Fraction(0), reserved=Fraction(1, 8)),
        lifetime(POPULATION, Fraction(800), spent=Fraction(0), reserved=Fraction(1, 8)),
    ]
    ledger.commit(CONSUMER, "r1", b"answer")
    after = balance(ledger, GRANT, Fraction(50))
    assert (after.spent, after.reserved) == (Fraction(1, 8), Fraction(0))
    assert after.remaining == Fraction(399, 8)
    assert ledger.verify() == {
        GRANT: (Fraction(1, 8), Fraction(0)),
        POPULATION: (Fraction(1, 8), Fraction(0)),
    }


def test_reserve_and_commit_return_the_balances_they_left(ledger: PrivacyLedger) -> None:
    """The balances a reservation and a commit return are what ``balances`` reads right after
    them (the gateway records and answers them without reading the ledger again)."""
    monthly = charge(GRANT, Fraction(50), Fraction(1, 8), period="month")
    population = charge(POPULATION, Fraction(800), Fraction(1, 4))
    untouched = ScopeLimit("dataset:civil.residents/lifetime", "lifetime", Fraction(7))
    ledger.reserve(CONSUMER, "earlier", "digest-0", [population])
    reservation = ledger.reserve(CONSUMER, "r1", "digest-1", [monthly, population])
    assert list(reservation.balances) == ledger.balances([monthly.limit, population.limit])
    assert reservation.balances[0].window.startswith(f"{GRANT}@")
    assert reservation.balances[0].period_end is not None
    assert [b.reserved for b in reservation.balances] == [Fraction(1, 8), Fraction(1, 2)]
    limits = [untouched, population.limit, monthly.limit]
    committed = ledger.commit(CONSUMER, "r1", b"answer", balances_of=limits)
    assert committed == ledger.balances(limits)
    assert [(b.spent, b.reserved) for b in committed] == [
        (Fraction(0), Fraction(0)),
        (Fraction(1, 4), Fraction(1, 4)),
        (Fraction(1, 8), Fraction(0)),
    ]
    assert ledger.commit(CONSUMER, "earlier", b"answer") == []
    # A replay or a cached answer charges nothing and carries no balances.
    assert ledger.reserve(CONSUMER, "r1", "digest-1", [monthly, population]).balances == ()


def test_refusal_names_the_short_scope_and_charges_nothing(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r1", "d1", [charge(GRANT, Fraction(1), Fraction(3, 4))])
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(
            CONSUMER,
            "r2",
            "d2",
            [
                charge(POPULATION, Fraction(800), Fraction(1, 2)),
                charge(GRANT, Fraction(1), Fraction(1, 2)),
            ],
        )
    err = info.value
    assert err.reason == "PRIVACY_BUDGET_EXHAUSTED"
    assert err.metadata == {"scope": GRANT, "requested_rho": "1/2", "remaining_rho": "1/4"}
    assert GRANT in err.message
    # All or nothing: the population scope, which had room, was not charged either.
    assert balance(ledger, POPULATION, Fraction(800)).reserved == 0
    assert balance(ledger, GRANT, Fraction(1)).reserved == Fraction(3, 4)
    assert POPULATION not in ledger.verify()
    # The refused request id was not recorded: it can be used again.
    assert not ledger.reserve(
        CONSUMER, "r2", "d2", [charge(POPULATION, Fraction(8), Fraction(1))]
    ).is_replay


def test_spending_exactly_the_total_passes_and_a_hair_more_is_refused(
    ledger: PrivacyLedger,
) -> None:
    two = Fraction(2)
    ledger.reserve(CONSUMER, "exact", "d", [charge("scope-a", two, two)])
    ledger.commit(CONSUMER, "exact", b"")
    assert balance(ledger, "scope-a", two).remaining == 0
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(CONSUMER, "hair", "d", [charge("scope-a", two, Fraction(1, 10**18))])
    assert info.value.metadata["remaining_rho"] == "0/1"

    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(CONSUMER, "over", "d", [charge("scope-b", two, Fraction("2.000000001"))])
    assert info.value.metadata == {
        "scope": "scope-b",
        "requested_rho": "2000000001/1000000000",
        "remaining_rho": "2/1",
    }
    assert balance(ledger, "scope-b", two).reserved == 0


def test_sums_are_exact_where_floats_are_not(ledger: PrivacyLedger) -> None:
    # 0.1 + 0.2 > 0.3 in floats; three thirds are not 1 in floats either.
    tenths = Fraction(3, 10)
    ledger.reserve(CONSUMER, "a", "d", [charge("tenths", tenths, Fraction(1, 10))])
    ledger.reserve(CONSUMER, "b", "d", [charge("tenths", tenths, Fraction(2, 10))])
    assert balance(ledger, "tenths", tenths).remaining == 0
    for i in range(3):
        ledger.reserve(CONSUMER, f"third-{i}", "d", [charge("thirds", Fraction(1), Fraction(1, 3))])
        ledger.commit(CONSUMER, f"third-{i}", b"")
    thirds = balance(ledger, "thirds", Fraction(1))
    assert thirds.spent == 1
    assert thirds.remaining == 0
    assert ledger.verify()["thirds"] == (Fraction(1), Fraction(0))


def test_an_unfinished_reservation_stays_charged_after_a_crash(ledger_path: Path) -> None:
    first = PrivacyLedger(ledger_path)
    first.reserve(CONSUMER, "in-flight", "d", [charge(GRANT, Fraction(1), Fraction(3, 5))])
    first.close()  # the gateway died before commit or cancel

    reopened = PrivacyLedger(ledger_path)
    try:
        assert balance(reopened, GRANT, Fraction(1)) == lifetime(
            GRANT, Fraction(1), spent=Fraction(0), reserved=Fraction(3, 5)
        )
        with pytest.raises(BudgetExhausted):
            reopened.reserve(CONSUMER, "next", "d", [charge(GRANT, Fraction(1), Fraction(1, 2))])
        # Its outcome is still known to the ledger: a replay is recognised, not charged again.
        replay = reopened.reserve(
            CONSUMER, "in-flight", "d", [charge(GRANT, Fraction(1), Fraction(1))]
        )
        assert replay.is_replay
        assert replay.state == "reserved"
        assert replay.stored_response is None
        assert balance(reopened, GRANT, Fraction(1)).reserved == Fraction(3, 5)
        assert reopened.verify() == {GRANT: (Fraction(0), Fraction(3, 5))}
    finally:
        reopened.close()


def test_committed_spending_survives_a_restart(ledger_path: Path) -> None:
    first = PrivacyLedger(ledger_path)
    first.reserve(CONSUMER, "r", "d", [charge(GRANT, Fraction(5), Fraction(7, 3))])
    first.commit(CONSUMER, "r", b"stored answer")
    first.close()
    reopened = PrivacyLedger(ledger_path)
    try:
        assert balance(reopened, GRANT, Fraction(5)).spent == Fraction(7, 3)
        replay = reopened.reserve(CONSUMER, "r", "d", [charge(GRANT, Fraction(5), Fraction(7, 3))])
        assert replay.stored_response == b"stored answer"
    finally:
        reopened.close()


def test_cancel_releases_the_reservation(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r1", "d", [charge(GRANT, Fraction(1), Fraction(1))])
    ledger.cancel(CONSUMER, "r1")
    assert balance(ledger, GRANT, Fraction(1)) == lifetime(
        GRANT, Fraction(1), Fraction(0), Fraction(0)
    )
    assert not ledger.reserve(
        CONSUMER, "r2", "d", [charge(GRANT, Fraction(1), Fraction(1))]
    ).is_replay


def test_retry_of_a_cancelled_request_starts_afresh(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r", "d", [charge(GRANT, Fraction(1), Fraction(1, 2))])
    ledger.cancel(CONSUMER, "r")
    retry = ledger.reserve(CONSUMER, "r", "d", [charge(GRANT, Fraction(1), Fraction(1, 4))])
    assert not retry.is_replay
    assert balance(ledger, GRANT, Fraction(1)).reserved == Fraction(1, 4)
    ledger.commit(CONSUMER, "r", b"ok")
    assert balance(ledger, GRANT, Fraction(1)).spent == Fraction(1, 4)
    assert ledger.verify() == {GRANT: (Fraction(1, 4), Fraction(0))}


def test_a_finished_reservation_cannot_be_finished_again(ledger: PrivacyLedger) -> None:
    ledger.reserve(CONSUMER, "r", "d", [charge(GRANT, Fraction(1), Fraction(1, 2))])
    ledger.commit(CONSUMER, "r", b"ok")
    attempts: list[Callable[[], None]] = [
        lambda: ledger.cancel(CONSUMER, "r"),  # cancelling after a release would under-charge
        lambda: ledger.commit(CONSUMER, "r", b"other"),
        lambda: ledger.commit(CONSUMER, "never-reserved", b""),
        lambda: ledger.cancel(CONSUMER, "never-reserved"),
    ]
    for attempt in attempts:
        with pytest.raises(LedgerUnavailable, match="no open reservation") as info:
            attempt()
        assert info.value.reason == "RESERVATION_NOT_OPEN"
    assert balance(ledger, GRANT, Fraction(1)).spent == Fraction(1, 2)
    assert ledger.reserve(CONSUMER, "r", "d", []).stored_response == b"ok"


def test_replay_after_commit_returns_the_stored_response_without_charging(
    ledger: PrivacyLedger,
) -> None:
    charges = [charge(GRANT, Fraction(1), Fraction(1, 3))]
    ledger.reserve(CONSUMER, "r", "digest", charges)
    ledger.commit(CONSUMER, "r", b"the answer")
    for _ in range(3):
        replay = ledger.reserve(CONSUMER, "r", "digest", charges)
        assert replay.is_replay
        assert replay.state == "committed"
        assert replay.stored_response == b"the answer"
        assert replay.windows == GRANT
    assert balance(ledger, GRANT, Fraction(1)) == lifetime(
        GRANT, Fraction(1), spent=Fraction(1, 3), reserved=Fraction(0)
    )


def test_replay_is_recognised_even_when_the_budget_is_gone(ledger: PrivacyLedger) -> None:
    charges = [charge(GRANT, Fraction(1), Fraction(1))]
    ledger.reserve(CONSUMER, "r", "digest", charges)
    ledger.commit(CONSUMER, "r", b"answer")
    assert ledger.reserve(CONSUMER, "r", "digest", charges).stored_response == b"answer"


@pytest.mark.parametrize("finish", ["open", "commit", "cancel"])
def test_same_request_id_with_another_query_is_a_conflict(
    ledger: PrivacyLedger, finish: str
) -> None:
    charges = [charge(GRANT, Fraction(1), Fraction(1, 4))]
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
    charges = [charge(POPULATION, Fraction(1), Fraction(1, 4))]
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
        ledger.reserve(CONSUMER, "r", "d", [charge(GRANT, total, cost)])
    assert balance(ledger, GRANT, Fraction(1)).reserved == 0
    # Nothing was recorded under the request id either.
    assert not ledger.reserve(
        CONSUMER, "r", "d", [charge(GRANT, Fraction(1), Fraction(1))]
    ).is_replay


def test_a_scope_named_twice_in_one_query_is_never_charged_past_its_total(
    ledger: PrivacyLedger,
) -> None:
    """Each of the two charges fits alone, together they do not: the query must be refused
    (whatever the error) and charge nothing."""
    twice = [charge(GRANT, Fraction(1), Fraction(3, 4)), charge(GRANT, Fraction(1), Fraction(3, 4))]
    with pytest.raises((ValueError, BudgetExhausted, LedgerUnavailable)):
        ledger.reserve(CONSUMER, "r", "d", twice)
    assert balance(ledger, GRANT, Fraction(1)).reserved == 0
    assert ledger.verify() == {}


def test_concurrent_reservations_never_overspend(ledger_path: Path) -> None:
    """Two ledger objects on one file (two gateway replicas) and many threads race for a
    budget of 1 in steps of 1/10, charged together with a monthly population scope: exactly
    ten win, in both scopes."""
    ledgers = [PrivacyLedger(ledger_path), PrivacyLedger(ledger_path)]
    grant = ScopeLimit(GRANT, "lifetime", Fraction(1))
    population = ScopeLimit(POPULATION, "month", Fraction(2))
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        try:
            ledgers[i % 2].reserve(
                CONSUMER,
                f"r{i}",
                "d",
                [ScopeCharge(grant, Fraction(1, 10)), ScopeCharge(population, Fraction(1, 10))],
            )
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
        found = {b.scope: b for b in ledgers[1].balances([grant, population])}
        assert found[GRANT].reserved == 1
        assert found[POPULATION].reserved == 1
        assert ledgers[0].verify() == {
            GRANT: (Fraction(0), Fraction(1)),
            found[POPULATION].window: (Fraction(0), Fraction(1)),
        }
    finally:
        for opened in ledgers:
            opened.close()


def test_verify_reads_one_snapshot_while_another_replica_writes(ledger_path: Path) -> None:
    """``verify()`` on one replica while another reserves between verify's reads.

    ``verify()`` must read the charges and the running sums in one snapshot: with two separate
    autocommit statements (before 917ba13), a reservation committed by another connection in
    between made them disagree, and a consistent ledger was reported as LEDGER_INCONSISTENT
    (about 1 call in 300 with a writer alongside). SQLite's statement trace on the verifying
    connection places the write between the reads deterministically.
    """
    writer, auditor = PrivacyLedger(ledger_path), PrivacyLedger(ledger_path)
    charges = [charge(GRANT, Fraction(1), Fraction(1, 4))]
    writer.reserve(CONSUMER, "before", "d", charges)
    selects: list[str] = []
    written: list[bool] = []

    def write_before_the_second_read(sql: str) -> None:
        if not sql.lstrip().upper().startswith("SELECT"):
            return
        selects.append(sql)
        if len(selects) == 2:
            try:
                writer.reserve(CONSUMER, "between", "d", charges)
                written.append(True)
            except LedgerUnavailable:  # a verify() that holds the write lock: also consistent
                written.append(False)

    auditor._db.set_trace_callback(write_before_the_second_read)
    try:
        recomputed = auditor.verify()
        auditor._db.set_trace_callback(None)
        assert len(selects) >= 2
        assert recomputed in (
            {GRANT: (Fraction(0), Fraction(1, 4))},
            {GRANT: (Fraction(0), Fraction(1, 2))},
        )
        reserved = Fraction(1, 2) if written == [True] else Fraction(1, 4)
        assert auditor.verify() == {GRANT: (Fraction(0), reserved)}
    finally:
        writer.close()
        auditor.close()


def test_balances_of_several_scopes_come_from_one_snapshot(ledger_path: Path) -> None:
    """``balances()`` (GetBudget) while another replica reserves one query in both scopes
    between the reads of the first and the second scope.

    Fails today: ``balances()`` reads each scope in its own autocommit statement, so it reports
    the grant without the query and the population with it, a state the ledger never had.
    Reading all scopes in one read transaction (as ``verify()`` now does) makes this pass.
    """
    writer, reader = PrivacyLedger(ledger_path), PrivacyLedger(ledger_path)
    grant = ScopeLimit(GRANT, "lifetime", Fraction(1))
    population = ScopeLimit(POPULATION, "month", Fraction(2))
    query = [ScopeCharge(grant, Fraction(1, 4)), ScopeCharge(population, Fraction(1, 4))]
    selects: list[str] = []

    def write_before_the_second_read(sql: str) -> None:
        if not sql.lstrip().upper().startswith("SELECT"):
            return
        selects.append(sql)
        if len(selects) == 2:
            # A reader that holds the write lock makes this fail: also consistent.
            with contextlib.suppress(LedgerUnavailable):
                writer.reserve(CONSUMER, "between", "d", query)

    reader._reader.set_trace_callback(write_before_the_second_read)
    try:
        found = reader.balances([grant, population])
        reader._reader.set_trace_callback(None)
        assert len(selects) >= 2
        assert found[0].reserved == found[1].reserved
    finally:
        writer.close()
        reader.close()


# --- any sequence of operations -------------------------------------------------------------------

# Three scopes with three periods, in a zone with daylight saving time; the clock starts the day
# before Berlin leaves summer time and a week before the month ends.
ZONE = ZoneInfo("Europe/Berlin")
TOLERANCE = dt.timedelta(seconds=5)
START = dt.datetime(2026, 10, 24, 12, 0, tzinfo=dt.UTC)
LIMITS = {
    "grant": ScopeLimit("grant", "month", Fraction(1)),
    "population": ScopeLimit("population", "lifetime", Fraction(5, 3)),
    "silo": ScopeLimit("silo", "day", Fraction(2)),
}
NOTHING = (Fraction(0), Fraction(0))  # (spent, reserved)
costs = st.fractions(min_value=0, max_value=Fraction(3, 4), max_denominator=12)
clock_steps = st.one_of(
    st.integers(-12, 12),  # jitter around the clock-behind tolerance
    st.integers(0, 3 * 24 * 3600),  # days
    st.integers(0, 40 * 24 * 3600),  # into the next month
).map(lambda seconds: dt.timedelta(seconds=seconds))


def window_key(scope: str, now: dt.datetime) -> str:
    """The ledger key of ``scope`` at ``now``, computed independently of ``periods.window``."""
    local = now.astimezone(ZONE)
    period = LIMITS[scope].period
    if period == "lifetime":
        return scope
    if period == "month":
        return f"{scope}@month:{local:%Y-%m}"
    return f"{scope}@day:{local:%Y-%m-%d}"


def total_of(key: str) -> Fraction:
    return LIMITS[key.split("@", maxsplit=1)[0]].total


class ManualClock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Request:
    digest: str
    charges: dict[str, Fraction]  # window key -> cost
    state: str = "reserved"
    response: bytes | None = None


@dataclass
class Model:
    requests: dict[str, Request] = field(default_factory=dict)
    latest: dt.datetime | None = None  # the latest clock reading the ledger recorded

    def sums(self, key: str, state: str) -> Fraction:
        return sum(
            (r.charges.get(key, Fraction(0)) for r in self.requests.values() if r.state == state),
            Fraction(0),
        )

    def remaining(self, key: str) -> Fraction:
        return total_of(key) - self.sums(key, "committed") - self.sums(key, "reserved")

    def ids(self, state: str) -> list[str]:
        return sorted(i for i, r in self.requests.items() if r.state == state)

    def clock_is_behind(self, now: dt.datetime) -> bool:
        return self.latest is not None and now < self.latest - TOLERANCE

    def recorded(self, now: dt.datetime) -> None:
        self.latest = now if self.latest is None else max(self.latest, now)

    def windows(self) -> dict[str, tuple[Fraction, Fraction]]:
        keys = {k for r in self.requests.values() for k in r.charges}
        sums = {k: (self.sums(k, "committed"), self.sums(k, "reserved")) for k in keys}
        return {k: v for k, v in sums.items() if v != NOTHING}


class LedgerMachine(RuleBasedStateMachine):
    """Reserve, commit, cancel, replay, retry, record free answers, move the clock (forwards
    across days and months, backwards around the tolerance) and crash, in any order. The
    ledger's balances always equal an exact model, every window stays within its total, and
    ``verify()`` agrees with both."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.path = Path(self.folder.name) / "ledger.sqlite"
        self.clock = ManualClock(START)
        self.ledger = self._open()
        self.model = Model()
        self.next_id = 0

    def _open(self) -> PrivacyLedger:
        return PrivacyLedger(
            self.path, time_zone=ZONE.key, clock=self.clock, clock_tolerance=TOLERANCE
        )

    @initialize()
    def start_empty(self) -> None:
        found = self.ledger.balances(list(LIMITS.values()))
        assert [(b.scope, b.window, b.total, b.spent, b.reserved) for b in found] == [
            (scope, window_key(scope, START), limit.total, *NOTHING)
            for scope, limit in LIMITS.items()
        ]
        assert self.ledger.verify() == {}

    def _fresh_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def _reserve(self, request_id: str, digest: str, costs: dict[str, Fraction]) -> bool:
        now = self.clock.now
        keyed = {window_key(scope, now): cost for scope, cost in costs.items()}
        behind = self.model.clock_is_behind(now)
        fits = all(cost <= self.model.remaining(key) for key, cost in keyed.items())
        try:
            reservation = self.ledger.reserve(
                CONSUMER,
                request_id,
                digest,
                [ScopeCharge(LIMITS[scope], cost) for scope, cost in costs.items()],
            )
        except LedgerUnavailable as err:
            assert behind
            assert err.reason == "LEDGER_CLOCK_BEHIND"
            return False
        except BudgetExhausted as err:
            assert not behind
            assert not fits
            key = err.metadata["scope"]
            assert Fraction(err.metadata["requested_rho"]) == keyed[key]
            assert Fraction(err.metadata["remaining_rho"]) == max(
                self.model.remaining(key), Fraction(0)
            )
            assert keyed[key] > self.model.remaining(key)
            return False
        assert not behind
        assert fits
        assert not reservation.is_replay
        assert reservation.windows == "|".join(sorted(keyed))
        self.model.requests[request_id] = Request(digest, keyed)
        self.model.recorded(now)
        return True

    @rule(scopes=st.sets(st.sampled_from(sorted(LIMITS)), min_size=1), cost=costs)
    def reserve_new(self, scopes: set[str], cost: Fraction) -> None:
        request_id = self._fresh_id()
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

    @precondition(lambda self: bool(self.model.ids("reserved")))
    @rule(pick=st.integers(0, 1000), parts=st.lists(st.fractions(0, 1, max_denominator=6)))
    def cancel_share(self, pick: int, parts: list[Fraction]) -> None:
        """A silo that released nothing: part of each scope's charge (0 to all of it) goes back,
        possibly in a later window than the one charged; the rest stays reserved."""
        open_ids = self.model.ids("reserved")
        request_id = open_ids[pick % len(open_ids)]
        request = self.model.requests[request_id]
        keys = sorted(request.charges)
        shares = {
            key.split("@")[0]: request.charges[key] * part
            for key, part in zip(keys, parts, strict=False)
        }
        self.ledger.cancel_share(CONSUMER, request_id, shares)
        for key in keys:
            request.charges[key] -= shares.get(key.split("@")[0], Fraction(0))

    @precondition(lambda self: bool(self.model.ids("cancelled")))
    @rule(pick=st.integers(0, 1000), cost=costs)
    def retry_cancelled(self, pick: int, cost: Fraction) -> None:
        cancelled = self.model.ids("cancelled")
        request_id = cancelled[pick % len(cancelled)]
        request = self.model.requests.pop(request_id)
        scopes = {key.split("@")[0] for key in request.charges}
        if not self._reserve(request_id, request.digest, dict.fromkeys(scopes, cost)):
            self.model.requests[request_id] = request  # refused: the cancelled attempt stays

    @rule()
    def answer_from_cache(self) -> None:
        """A charge-free query under one cache key: the first stores the answer, later ones get
        it back; either way nothing is charged and the request is committed with its response."""
        request_id = self._fresh_id()
        now = self.clock.now
        response = f"cached-{request_id}".encode()
        try:
            reservation = self.ledger.reserve(
                CONSUMER, request_id, "cached-query", [], cache_key="cached-query-key"
            )
        except LedgerUnavailable as err:
            assert self.model.clock_is_behind(now)
            assert err.reason == "LEDGER_CLOCK_BEHIND"
            return
        assert not self.model.clock_is_behind(now)
        assert not reservation.is_replay
        self.ledger.commit(CONSUMER, request_id, response, cache_key="cached-query-key")
        self.model.requests[request_id] = Request("cached-query", {}, "committed", response)
        self.model.recorded(now)

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
            [ScopeCharge(limit, limit.total) for limit in LIMITS.values()],
        )
        assert reservation.is_replay
        assert reservation.state == request.state
        assert reservation.stored_response == request.response
        assert reservation.windows == "|".join(sorted(request.charges))

    @precondition(lambda self: bool(self.model.requests))
    @rule(pick=st.integers(0, 1000))
    def reuse_id_for_another_query(self, pick: int) -> None:
        ids = sorted(self.model.requests)
        request_id = ids[pick % len(ids)]
        with pytest.raises(RequestConflict):
            self.ledger.reserve(
                CONSUMER, request_id, "another-digest", [ScopeCharge(LIMITS["grant"], Fraction(0))]
            )

    @rule(step=clock_steps)
    def move_clock(self, step: dt.timedelta) -> None:
        self.clock.now += step

    @rule()
    def crash_and_reopen(self) -> None:
        self.ledger.close()
        self.ledger = self._open()

    @invariant()
    def balances_are_exact_and_within_totals(self) -> None:
        for found in self.ledger.balances(list(LIMITS.values())):
            key = window_key(found.scope, self.clock.now)
            assert found.window == key
            assert (found.period_end is None) == (LIMITS[found.scope].period == "lifetime")
            assert found.spent == self.model.sums(key, "committed")
            assert found.reserved == self.model.sums(key, "reserved")
            assert found.spent + found.reserved <= found.total
            assert found.remaining >= 0

    @invariant()
    def running_sums_agree_with_the_charges(self) -> None:
        recomputed = self.ledger.verify()
        assert {k: v for k, v in recomputed.items() if v != NOTHING} == self.model.windows()
        for key, (spent, reserved) in recomputed.items():
            assert spent + reserved <= total_of(key)

    def teardown(self) -> None:
        self.ledger.close()
        self.folder.cleanup()


LedgerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestLedgerSequences = LedgerMachine.TestCase
