"""``silogate policy diff``, ``schema``, ``keygen`` and ``sign``: output and exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from gateway.policy.diff import access
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

Edit = Callable[[Path, str, str], None]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"

# --- diff --------------------------------------------------------------------------------------


def test_diff_of_a_bundle_with_itself_reports_no_change(cli: Any, demo_bundle: Bundle) -> None:
    run = cli("policy", "diff", DEMO_BUNDLE, DEMO_BUNDLE)
    assert run.code == 0
    assert run.out == (
        f"old policy version {demo_bundle.version}\nnew policy version {demo_bundle.version}\n"
        "no change in access, budgets, limits, consumers or datasets\n"
    )


def test_a_comment_changes_the_version_but_nothing_that_matters(
    bundle_copy: Path, cli: Any
) -> None:
    with (bundle_copy / "rules.yaml").open("a", encoding="utf-8") as handle:
        handle.write("# reviewed\n")
    run = cli("policy", "diff", DEMO_BUNDLE, bundle_copy)
    assert run.code == 0
    assert run.out.endswith("no change in access, budgets, limits, consumers or datasets\n")


def test_diff_lists_access_budget_and_declaration_changes(
    bundle_copy: Path, edit: Edit, cli: Any, golden: Callable[[str, str], None]
) -> None:
    rules, consumers = bundle_copy / "rules.yaml", bundle_copy / "consumers.yaml"
    edit(rules, "group_by: [community, street, district, sex]", "group_by: [community, street]")
    edit(rules, 'budget: {epsilon: "2", period: month}', 'budget: {epsilon: "3", period: month}')
    edit(rules, 'max_epsilon_per_query: "0.5"', 'max_epsilon_per_query: "0.8"')
    # The forbid on subsidies now covers distinct-person counts only: counts become allowed.
    edit(
        rules,
        "    datasets: [civil.subsidies]\n",
        "    datasets: [civil.subsidies]\n    measures: [count_persons]\n",
    )
    edit(bundle_copy / "populations.yaml", 'epsilon: "40"', 'epsilon: "30"')
    edit(
        consumers,
        "identity: spiffe://silogate.local/consumer/grid-centre",
        "identity: spiffe://silogate.local/consumer/grid-centre-v2",
    )
    old, new = load_bundle(DEMO_BUNDLE), load_bundle(bundle_copy)
    run = cli("policy", "diff", DEMO_BUNDLE, bundle_copy)
    assert run.code == 0
    assert run.out.splitlines()[2:] == [
        "access (per consumer / dataset):",
        "  civil-affairs / civil.residents:",
        "    - group-by: district, sex",
        "  civil-affairs / org.members:",
        "    - group-by: sex",
        "  health-commission / civil.subsidies: now allowed",
        "    + purposes: home-care-planning; measures: count, histogram, mean, sum; group-by: "
        "community; filter: -",
        "budgets and limits:",
        "  rule 'org-activity-hours': budget: epsilon 2 per month -> epsilon 3 per month",
        "  rule 'org-activity-hours': max_epsilon_per_query: 0.5 -> 0.8",
        "  population 'city-residents': budget: epsilon 40 lifetime -> epsilon 30 lifetime",
        "declarations:",
        "  consumer 'grid-centre': identity: spiffe://silogate.local/consumer/grid-centre -> "
        "spiffe://silogate.local/consumer/grid-centre-v2",
    ]
    text = run.out.replace(old.version, "<old>").replace(new.version, "<new>")
    golden("policy_diff.txt", text)
    # Reversed, the same changes read the other way round.
    back = cli("policy", "diff", bundle_copy, DEMO_BUNDLE).out
    assert "  health-commission / civil.subsidies: now denied\n" in back
    assert "    + group-by: district, sex\n" in back


def test_diff_shows_added_rules_consumers_and_datasets(
    bundle_copy: Path, edit: Edit, cli: Any
) -> None:
    edit(
        bundle_copy / "consumers.yaml",
        "consumers:\n",
        "consumers:\n"
        "  statistics-bureau:\n    identity: spiffe://x/stats\n    purposes: [statistics]\n",
    )
    with (bundle_copy / "rules.yaml").open("a", encoding="utf-8") as handle:
        handle.write(
            "\n  stats-districts:\n    effect: permit\n    consumers: [statistics-bureau]\n"
            "    datasets: [civil.residents]\n    measures: [count]\n    group_by: [district]\n"
            '    max_epsilon_per_query: "1"\n    budget: {epsilon: "1", period: year}\n'
            "    min_group_size: 20\n"
        )
    out = cli("policy", "diff", DEMO_BUNDLE, bundle_copy).out
    assert (
        "  statistics-bureau / civil.residents: now allowed\n"
        "    + purposes: statistics; measures: count; group-by: district; filter: -\n"
    ) in out
    assert "  rule 'stats-districts': added (permit, budget epsilon 1 per year)\n" in out
    assert "  + consumer 'statistics-bureau' (spiffe://x/stats)\n" in out


def test_access_applies_forbids_per_purpose_and_measure(demo_bundle: Bundle) -> None:
    members = access(demo_bundle, "civil-affairs", "org.members")
    assert members.measures == {"count", "count_persons", "mean", "histogram"}
    assert "branch" not in members.group_by and "education" not in members.filterable
    assert access(demo_bundle, "org-department", "health.chronic").measures == frozenset()
    hours = access(demo_bundle, "org-department", "org.activities")
    assert hours.measures == {"count", "count_persons", "sum", "mean"}


def test_diff_of_an_invalid_bundle_fails(bundle_copy: Path, edit: Edit, cli: Any) -> None:
    edit(bundle_copy / "rules.yaml", "consumers: [grid-centre]", "consumers: [grid-center]")
    run = cli("policy", "diff", DEMO_BUNDLE, bundle_copy)
    assert run.code == 1
    assert run.out.endswith("1 problem(s)\n")


# --- schema ------------------------------------------------------------------------------------


def _properties(schema: dict[str, Any], ref: str) -> set[str]:
    return set(schema["$defs"][ref]["properties"])


def test_schema_describes_every_key_the_demo_bundle_uses(cli: Any) -> None:
    run = cli("policy", "schema")
    assert run.code == 0
    schema = json.loads(run.out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "populations",
        "key_sets",
        "datasets",
        "consumers",
        "rules",
    }
    assert schema["$defs"]["Rule"]["additionalProperties"] is False
    assert schema["$defs"]["Rule"]["properties"]["effect"]["enum"] == ["permit", "forbid"]
    models = {
        "rules": "Rule",
        "datasets": "Dataset",
        "consumers": "Consumer",
        "key_sets": "KeySet",
        "populations": "Population",
    }
    yaml = YAML(typ="safe", pure=True)
    for path in DEMO_BUNDLE.glob("*.yaml"):
        for section, entries in yaml.load(path.read_text(encoding="utf-8")).items():
            for entry in entries.values():
                assert set(entry) <= _properties(schema, models[section]), (path.name, entry)


def test_schema_of_test_files_describes_the_demo_cases(cli: Any) -> None:
    run = cli("policy", "schema", "--tests")
    assert run.code == 0
    schema = json.loads(run.out)
    assert set(schema["properties"]) == {"cases"}
    case_keys = _properties(schema, "PolicyCase")
    expect_keys = _properties(schema, "Expectation")
    yaml = YAML(typ="safe", pure=True)
    for path in (DEMO_BUNDLE / "tests").glob("*.yaml"):
        for case in yaml.load(path.read_text(encoding="utf-8"))["cases"]:
            assert set(case) <= case_keys
            assert set(case["expect"]) <= expect_keys


# --- keygen and sign ---------------------------------------------------------------------------


def test_keygen_then_sign_writes_a_verifiable_signature(
    bundle_copy: Path, tmp_path: Path, cli: Any
) -> None:
    from gateway.policy.signing import verify_bundle

    private, public = tmp_path / "keys" / "policy.key", tmp_path / "keys" / "policy.pub"
    run = cli("policy", "keygen", private, public)
    assert run.code == 0
    assert run.out.startswith("signing key ")
    assert f"private key {private}" in run.out and f"public key {public}" in run.out
    assert private.stat().st_mode & 0o077 == 0
    signed = cli("policy", "sign", bundle_copy, "--key", private)
    assert signed.code == 0
    assert signed.out == f"signed: {bundle_copy / 'bundle.sig'}\n"
    assert verify_bundle(bundle_copy, public) == load_bundle(bundle_copy).version


def test_keygen_keeps_existing_keys(tmp_path: Path, cli: Any) -> None:
    private, public = tmp_path / "policy.key", tmp_path / "policy.pub"
    assert cli("policy", "keygen", private, public).code == 0
    before = private.read_bytes()
    run = cli("policy", "keygen", private, public)
    assert run.code == 1
    assert run.err.startswith("silogate: KEY_EXISTS: ")
    assert private.read_bytes() == before
    assert cli("policy", "keygen", private, public, "--overwrite").code == 0
    assert private.read_bytes() != before


def test_an_invalid_bundle_is_not_signed(
    bundle_copy: Path, edit: Edit, tmp_path: Path, cli: Any
) -> None:
    private, public = tmp_path / "policy.key", tmp_path / "policy.pub"
    assert cli("policy", "keygen", private, public).code == 0
    edit(bundle_copy / "rules.yaml", "consumers: [grid-centre]", "consumers: [grid-center]")
    run = cli("policy", "sign", bundle_copy, "--key", private)
    assert run.code == 1
    assert run.out.endswith("1 problem(s); the bundle was not signed\n")
    assert not (bundle_copy / "bundle.sig").exists()


def test_signing_with_the_public_key_is_refused(
    bundle_copy: Path, tmp_path: Path, cli: Any
) -> None:
    private, public = tmp_path / "policy.key", tmp_path / "policy.pub"
    assert cli("policy", "keygen", private, public).code == 0
    run = cli("policy", "sign", bundle_copy, "--key", public)
    assert run.code == 1
    assert run.err.startswith("silogate: KEY_UNREADABLE: ")
    assert not (bundle_copy / "bundle.sig").exists()
