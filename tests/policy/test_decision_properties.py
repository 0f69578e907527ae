"""Properties of the decision engine over generated bundles and queries (Hypothesis).

- A ``forbid`` rule that matches the query wins over any number of ``permit`` rules, even one that
  grants everything.
- The decision is deterministic and does not depend on the order in which rules are written.
- A query that filters or groups by a column its dataset does not declare never comes out
  permitted, even when a rule (wrongly, bypassing the loader) grants that column.

Bundles are built in memory from the model classes (the loader is tested on files elsewhere);
queries are built as a client builds them (``where``, protobuf measures) and parsed with
``parse_query``, so the engine sees exactly what the gateway would pass it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.v1 import query_pb2
from gateway.client.client import where
from gateway.errors import InvalidQuery
from gateway.policy.decision import decide
from gateway.policy.model import (
    BudgetSpec,
    Bundle,
    Column,
    Consumer,
    Dataset,
    Population,
    Rule,
)
from gateway.query.form import MEASURE_KIND_NUMBERS, QueryForm, parse_query
from gateway.query.validate import validate_against_policy

CONSUMER = "planner"
PURPOSES = ("care-planning", "research")
MEASURES = ("count", "count_persons", "sum", "mean", "histogram")
QUERY_MEASURES = ("count", "count_persons")
KEY_SETS = {"communities": ("east", "west", "north"), "sexes": ("F", "M")}
# Both datasets declare the group-by columns with the same key sets, so a query may merge them.
COLUMNS = {
    "civil.residents": {
        "community": Column(type="category", key_set="communities"),
        "sex": Column(type="category", key_set="sexes"),
        "birth_year": Column(type="int", bounds=(1900, 2026), resolution=1),
        "low_income": Column(type="bool"),
    },
    "org.members": {
        "community": Column(type="category", key_set="communities"),
        "sex": Column(type="category", key_set="sexes"),
        "join_year": Column(type="int", bounds=(1940, 2026), resolution=1),
        "floating_member": Column(type="bool"),
    },
}
GROUP_COLUMNS = ("community", "sex")
ALL_COLUMNS = sorted({c for columns in COLUMNS.values() for c in columns})
BUDGET = BudgetSpec(epsilon=10)


def make_bundle(rules: dict[str, Rule]) -> Bundle:
    return Bundle(
        version="0" * 64,
        populations={"residents": Population(budget=BudgetSpec(epsilon=40))},
        key_sets=dict(KEY_SETS),
        datasets={
            name: Dataset(
                silo=name.split(".")[0],
                table=name.split(".")[1],
                population="residents",
                columns=columns,
            )
            for name, columns in COLUMNS.items()
        },
        consumers={
            CONSUMER: Consumer(identity="spiffe://city/planner", purposes=list(PURPOSES)),
            "auditor": Consumer(identity="spiffe://city/auditor", purposes=["audit"]),
        },
        rules=rules,
    )


# A permit that grants this consumer everything the generated queries ask for.
GRANT_ALL = Rule(
    effect="permit",
    consumers=[CONSUMER],
    datasets=["*"],
    measures=list(MEASURES),
    group_by=list(GROUP_COLUMNS),
    filterable=ALL_COLUMNS,
    budget=BUDGET,
)


def subsets(items: tuple[str, ...] | list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(items), unique=True).map(sorted)


@st.composite
def permit_rules(draw: st.DrawFn) -> dict[str, Rule]:
    """Any number of permits of any scope, most of them granting less than GRANT_ALL."""
    rules: dict[str, Rule] = {}
    for i in range(draw(st.integers(0, 6))):
        rules[f"permit-{i}"] = Rule(
            effect="permit",
            consumers=draw(st.sampled_from([[CONSUMER], ["*"], ["plan*"], ["auditor"]])),
            datasets=draw(st.sampled_from([["civil.residents"], ["org.*"], ["*"]])),
            measures=draw(st.lists(st.sampled_from(MEASURES), min_size=1, unique=True)),
            group_by=draw(subsets(GROUP_COLUMNS)),
            filterable=draw(subsets(ALL_COLUMNS)),
            purposes=draw(subsets(PURPOSES)),
            max_epsilon_per_query=draw(st.sampled_from([None, "0.1", "1"])),
            budget=BUDGET,
        )
    return rules


def literal(dataset: str, column: str) -> Any:
    spec = COLUMNS[dataset][column]
    if spec.type == "category":
        assert spec.key_set is not None
        return KEY_SETS[spec.key_set][0]
    if spec.type == "int":
        return 2000
    return True


@st.composite
def queries(draw: st.DrawFn) -> query_pb2.Query:
    """A valid query of this consumer: 1-3 measures, declared filters, a shared group-by."""
    measures = []
    for i in range(draw(st.integers(1, 3))):
        dataset = draw(st.sampled_from(sorted(COLUMNS)))
        filtered = draw(subsets(sorted(COLUMNS[dataset])))
        measures.append(
            query_pb2.Measure(
                id=f"m{i}",
                dataset=dataset,
                kind=MEASURE_KIND_NUMBERS[draw(st.sampled_from(QUERY_MEASURES))],
                filters=[where(c, "=", literal(dataset, c)) for c in filtered],
                spend=query_pb2.PrivacySpend(epsilon=draw(st.sampled_from(["0.05", "0.5"]))),
            )
        )
    return query_pb2.Query(
        purpose=draw(st.sampled_from(PURPOSES)),
        measures=measures,
        group_by=draw(subsets(GROUP_COLUMNS)),
    )


@st.composite
def forbid_matching(draw: st.DrawFn, query: QueryForm) -> Rule:
    """A forbid rule that matches one measure of ``query``, in any of the ways one can match."""
    measure = draw(st.sampled_from(query.measures))
    silo = measure.dataset.split(".")[0]
    columns: dict[str, list[str]] = {}
    used = [("group_by", g) for g in query.group_by] + [
        ("filterable", f.column) for f in measure.filters
    ]
    if used and draw(st.booleans()):  # forbid by a column the query uses
        field, column = draw(st.sampled_from(used))
        columns[field] = [column]
    return Rule(
        effect="forbid",
        consumers=draw(st.sampled_from([[CONSUMER], ["*"], ["plan*"], ["auditor", CONSUMER]])),
        datasets=draw(st.sampled_from([[measure.dataset], [f"{silo}.*"], ["*"]])),
        measures=draw(st.sampled_from([[], [measure.kind], [measure.kind, "sum"]])),
        purposes=draw(st.sampled_from([[], [query.purpose], list(PURPOSES)])),
        **columns,
    )


def permitted_after_validation(bundle: Bundle, query: QueryForm) -> bool:
    """What the gateway does: validate against the policy, then decide."""
    try:
        validate_against_policy(query, bundle)
    except InvalidQuery as err:
        assert err.reason == "INVALID_QUERY"
        return False
    return decide(bundle, CONSUMER, query).permitted


@settings(max_examples=150)
@given(st.data(), permit_rules(), queries())
def test_a_matching_forbid_wins_over_any_permits(
    data: st.DataObject, permits: dict[str, Rule], request: query_pb2.Query
) -> None:
    query = parse_query(request)
    granted = make_bundle({**permits, "grant-all": GRANT_ALL})
    validate_against_policy(query, granted)  # the generated query is valid
    assert decide(granted, CONSUMER, query).permitted

    forbid = data.draw(forbid_matching(query))
    bundle = make_bundle({**permits, "grant-all": GRANT_ALL, "zz-forbid": forbid})
    decision = decide(bundle, CONSUMER, query)
    assert not decision.permitted
    assert decision.reason_code == "POLICY_DENIED"
    assert decision.deciding_rules == ("zz-forbid",)
    assert decision.reasons == ("forbidden by rule 'zz-forbid'",)
    assert decision.grants == {}  # nothing is charged for a forbidden query
    assert decision.scopes == ()
    assert not permitted_after_validation(bundle, query)


@st.composite
def any_rules(draw: st.DrawFn, query: QueryForm) -> dict[str, Rule]:
    rules = draw(permit_rules())
    if draw(st.booleans()):
        rules["grant-all"] = GRANT_ALL
    for i in range(draw(st.integers(0, 2))):
        rules[f"forbid-{i}"] = draw(forbid_matching(query))
    return rules


@given(st.data(), queries())
def test_the_decision_is_deterministic_and_independent_of_rule_order(
    data: st.DataObject, request: query_pb2.Query
) -> None:
    query = parse_query(request)
    rules = data.draw(any_rules(query))
    bundle = make_bundle(rules)
    decision = decide(bundle, CONSUMER, query)
    assert decide(bundle, CONSUMER, query) == decision
    assert decide(bundle, CONSUMER, parse_query(request)) == decision
    shuffled = data.draw(st.permutations(list(rules.items())))
    reordered = dataclasses.replace(bundle, rules=dict(shuffled))
    assert list(reordered.rules) == [rule_id for rule_id, _ in shuffled]
    assert decide(reordered, CONSUMER, query) == decision


UNDECLARED = st.one_of(
    st.sampled_from(["income", "education", "salary", "birth_year", "join_year"]),
    st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True),
)


@settings(max_examples=150)
@given(st.data(), permit_rules(), queries(), UNDECLARED, st.booleans())
def test_a_query_on_an_undeclared_column_is_never_permitted(
    data: st.DataObject,
    permits: dict[str, Rule],
    request: query_pb2.Query,
    column: str,
    as_group_by: bool,
) -> None:
    index = data.draw(st.integers(0, len(request.measures) - 1))
    measure = request.measures[index]
    if column in COLUMNS[measure.dataset]:
        column = f"{column}_x"
        assert column not in COLUMNS[measure.dataset]
    if as_group_by and column not in request.group_by:
        request.group_by.append(column)
    else:
        measure.filters.append(where(column, "=", "yes"))
    query = parse_query(request)
    # Even a rule that grants the column (which the loader would refuse) does not let it through.
    granting = GRANT_ALL.model_copy(
        update={
            "group_by": [*GRANT_ALL.group_by, column],
            "filterable": [*GRANT_ALL.filterable, column],
        }
    )
    bundle = make_bundle({**permits, "grant-all": granting})
    assert not permitted_after_validation(bundle, query)
    try:
        validate_against_policy(query, bundle)
    except InvalidQuery as err:
        assert any(column in v.description for v in err.violations)
    else:
        raise AssertionError(f"a query on undeclared column '{column}' passed validation")
