"""The policy loader: the demo bundle loads; broken bundles are reported with ``file:line:col``.

Broken bundles are copies of the demo bundle in ``tmp_path`` with one file edited. Positions are
computed from the edited text (the line holding the mistake, the column of its token), so the
tests pin the exact place without depending on the demo bundle's line numbers.

The CLI output of ``silogate policy check`` for one broken bundle is a golden file,
``golden/policy_check_several_problems.txt``; refresh it with ``SILOGATE_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import PolicyInvalid, SourcePosition
from gateway.policy.loader import bundle_version, load_bundle, manifest_text
from gateway.policy.model import Bundle

Edit = Callable[[Path, str, str], None]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "policies"


def locate(path: Path, line_part: str, token: str) -> SourcePosition:
    """1-based position of ``token`` on the one line of ``path`` that contains ``line_part``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    matches = [i for i, line in enumerate(lines) if line_part in line]
    assert len(matches) == 1, f"{line_part!r} is on lines {matches} of {path.name}"
    line = lines[matches[0]]
    return SourcePosition(path.name, matches[0] + 1, line.index(token) + 1)


def problems(root: Path) -> list[str]:
    with pytest.raises(PolicyInvalid) as info:
        load_bundle(root)
    assert info.value.reason == "POLICY_INVALID"
    assert info.value.metadata == {"problems": str(len(info.value.problems))}
    return [str(p) for p in info.value.problems]


# --- the demo bundle ------------------------------------------------------------------------------


def test_demo_bundle_declares_datasets_consumers_rules_and_key_sets(demo_bundle: Bundle) -> None:
    # The demo bundle grows with new rules and consumers; these are the ones the tests rely on.
    assert sorted(demo_bundle.datasets) == [
        "civil.residents",
        "civil.subsidies",
        "events.cases",
        "health.chronic",
        "health.visits",
        "org.activities",
        "org.members",
    ]
    assert {"civil-affairs", "grid-centre", "org-department"} <= set(demo_bundle.consumers)
    assert {
        "civil-elderly-care",
        "grid-casework",
        "no-health-data-to-org",
        "org-volunteer-planning",
    } <= set(demo_bundle.rules)
    communities = demo_bundle.key_sets["communities"]
    assert len(communities) == 200
    assert len(set(communities)) == 200
    assert demo_bundle.key_sets["sexes"] == ("F", "M")


def test_demo_bundle_converts_budgets_to_exact_rho(demo_bundle: Bundle) -> None:
    population = demo_bundle.populations["city-residents"]
    assert population.budget.rho_total == 800  # epsilon 40 -> rho 40^2 / 2
    budget = demo_bundle.rules["civil-elderly-care"].budget
    assert budget is not None
    assert budget.rho_total == 50


def test_version_is_the_sha256_of_the_manifest(demo_bundle: Bundle) -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", demo_bundle.version)
    manifest = manifest_text(DEMO_BUNDLE)
    assert demo_bundle.version == hashlib.sha256(manifest.encode()).hexdigest()
    assert "  keysets/communities.csv\n" in manifest
    assert "  rules.yaml\n" in manifest


def test_version_does_not_depend_on_where_the_bundle_lives(
    demo_bundle: Bundle, tmp_path: Path
) -> None:
    elsewhere = shutil.copytree(DEMO_BUNDLE, tmp_path / "somewhere" / "else")
    assert load_bundle(elsewhere).version == demo_bundle.version


@pytest.mark.parametrize("file", ["rules.yaml", "keysets/sexes.csv"])
def test_version_changes_when_a_bundle_file_changes(
    demo_bundle: Bundle, bundle_copy: Path, file: str
) -> None:
    with (bundle_copy / file).open("a", encoding="utf-8") as handle:
        handle.write("# an edit\n" if file.endswith(".yaml") else "X\n")
    assert bundle_version(bundle_copy) != demo_bundle.version
    if file.endswith(".yaml"):  # a comment changes the version but the bundle stays valid
        assert load_bundle(bundle_copy).version == bundle_version(bundle_copy)


def test_version_ignores_policy_tests_signatures_and_hidden_files(
    demo_bundle: Bundle, bundle_copy: Path
) -> None:
    (bundle_copy / "tests").mkdir(exist_ok=True)
    (bundle_copy / "tests" / "decisions.yaml").write_text("cases: []\n", encoding="utf-8")
    (bundle_copy / "bundle.sig").write_bytes(b"signature")
    (bundle_copy / ".DS_Store").write_bytes(b"editor litter")
    assert load_bundle(bundle_copy).version == demo_bundle.version


# --- broken bundles, one problem each --------------------------------------------------------------


def test_unknown_key_is_reported_at_the_key(bundle_copy: Path, edit: Edit) -> None:
    datasets = bundle_copy / "datasets.yaml"
    edit(
        datasets, "    max_rows_per_person: 20\n", "    max_rows_per_person: 20\n    max_rows: 3\n"
    )
    text = datasets.read_text(encoding="utf-8").splitlines()
    line = text.index("    max_rows: 3") + 1
    # The rejected dataset is then missing for the rules (see the cascade test below).
    assert problems(bundle_copy)[0] == (
        f"datasets.yaml:{line}:5: dataset 'org.activities': unknown key 'max_rows' "
        "(did you mean 'max_rows_per_person'?)"
    )


def test_unknown_key_inside_a_flow_mapping_is_reported_at_the_key(
    bundle_copy: Path, edit: Edit
) -> None:
    datasets = bundle_copy / "datasets.yaml"
    edit(
        datasets,
        "      floating_member: {type: bool}",
        "      floating_member: {type: bool, colour: red}",
    )
    where = locate(datasets, "floating_member: {type: bool, colour", "colour")
    assert (where.line, where.column) != (0, 0)
    assert problems(bundle_copy)[0] == (
        f"{where}: dataset 'org.members'.columns.floating_member: unknown key 'colour' "
        "(expected one of: type, key_set, bounds, resolution, bins)"
    )


def test_wrong_type_is_reported_at_the_value(bundle_copy: Path, edit: Edit) -> None:
    datasets = bundle_copy / "datasets.yaml"
    edit(datasets, "max_rows_per_person: 12", "max_rows_per_person: many")
    where = locate(datasets, "max_rows_per_person: many", "many")
    assert problems(bundle_copy) == [
        f"{where}: dataset 'health.visits'.max_rows_per_person: expected an integer, got 'many'"
    ]


def test_yaml_syntax_error_has_a_position(bundle_copy: Path) -> None:
    (bundle_copy / "extra.yaml").write_text(
        "key_sets:\n  extra: {values: [a, b}\n", encoding="utf-8"
    )
    [problem] = problems(bundle_copy)
    match = re.fullmatch(r"extra\.yaml:(\d+):(\d+): YAML: (.+)", problem)
    assert match is not None, problem
    assert int(match[1]) == 2  # the flow sequence that is closed with '}'
    assert int(match[2]) >= 1
    assert "expected ',' or ']'" in match[3]


def test_duplicate_name_across_files(bundle_copy: Path) -> None:
    (bundle_copy / "zz_more.yaml").write_text(
        "consumers:\n  civil-affairs:\n    identity: spiffe://x\n    purposes: [anything]\n",
        encoding="utf-8",
    )
    first = locate(bundle_copy / "consumers.yaml", "  civil-affairs:", "civil")
    assert problems(bundle_copy) == [
        f"zz_more.yaml:2:3: consumer 'civil-affairs' is already declared at {first}"
    ]


def test_duplicate_key_within_a_mapping_is_a_yaml_error(bundle_copy: Path, edit: Edit) -> None:
    consumers = bundle_copy / "consumers.yaml"
    edit(
        consumers,
        "    purposes: [casework-monitoring]\n",
        "    purposes: [casework-monitoring]\n    identity: again\n",
    )
    where = locate(consumers, "identity: again", "identity")
    first = locate(consumers, "consumer/grid-centre", "identity")
    assert problems(bundle_copy) == [
        f"{where}: YAML: duplicate key 'identity' (first written on line {first.line})"
    ]


def test_dangling_population_reference(bundle_copy: Path, edit: Edit) -> None:
    datasets = bundle_copy / "datasets.yaml"
    edit(
        datasets,
        "population: city-residents\n    max_rows_per_person: 24",
        "population: nobody\n    max_rows_per_person: 24",
    )
    where = locate(datasets, "population: nobody", "nobody")
    assert problems(bundle_copy) == [
        f"{where}: dataset 'civil.subsidies': unknown population 'nobody'"
    ]


def test_dangling_key_set_reference(bundle_copy: Path, edit: Edit) -> None:
    datasets = bundle_copy / "datasets.yaml"
    edit(
        datasets,
        "community: {type: category, key_set: communities}\n      condition",
        "community: {type: category, key_set: comunities}\n      condition",
    )
    where = locate(datasets, "key_set: comunities", "comunities")
    assert problems(bundle_copy) == [
        f"{where}: dataset 'health.chronic' column 'community': unknown key set 'comunities' "
        "(did you mean 'communities'?)"
    ]


def test_rule_that_matches_no_consumer(bundle_copy: Path, edit: Edit) -> None:
    rules = bundle_copy / "rules.yaml"
    edit(rules, "consumers: [grid-centre]", "consumers: [grid-center]")
    where = locate(rules, "consumers: [grid-center]", "grid-center")
    assert problems(bundle_copy) == [
        f"{where}: rule 'grid-casework': 'grid-center' matches no declared consumer "
        "(did you mean 'grid-centre'?)"
    ]


def test_rule_that_matches_no_dataset(bundle_copy: Path, edit: Edit) -> None:
    rules = bundle_copy / "rules.yaml"
    edit(rules, 'datasets: ["health.*"]', 'datasets: ["hospital.*"]')
    where = locate(rules, 'datasets: ["hospital.*"]', '"hospital')
    assert problems(bundle_copy) == [
        f"{where}: rule 'no-health-data-to-org': 'hospital.*' matches no declared dataset"
    ]


def test_rule_granting_an_undeclared_column(bundle_copy: Path, edit: Edit) -> None:
    rules = bundle_copy / "rules.yaml"
    edit(rules, "filterable: [category, opened]", "filterable: [category, opened, salary]")
    where = locate(rules, "filterable: [category, opened, salary]", "salary")
    assert problems(bundle_copy) == [
        f"{where}: rule 'grid-casework': no dataset it matches declares column 'salary'"
    ]


def test_permit_rule_without_budget(bundle_copy: Path, edit: Edit) -> None:
    rules = bundle_copy / "rules.yaml"
    edit(rules, '    budget: {epsilon: "6", period: lifetime}\n', "")
    # Reported at 'effect: permit', the reason why the rule needs a budget.
    lines = rules.read_text(encoding="utf-8").splitlines()
    effect = lines.index("  grid-casework:") + 3
    assert lines[effect - 1] == "    effect: permit"
    assert problems(bundle_copy) == [
        f"rules.yaml:{effect}:5: rule 'grid-casework': a permit rule needs a 'budget'"
    ]


def test_budget_with_both_epsilon_and_rho(bundle_copy: Path, edit: Edit) -> None:
    populations = bundle_copy / "populations.yaml"
    edit(populations, 'budget: {epsilon: "40",', 'budget: {epsilon: "40", rho: "2",')
    where = locate(populations, "budget: {epsilon", "rho")
    assert problems(bundle_copy) == [
        f"{where}: population 'city-residents'.budget: "
        "give exactly one of 'epsilon' or 'rho', not both"
    ]


def test_a_rejected_declaration_causes_no_false_reports_about_its_users(
    bundle_copy: Path, edit: Edit
) -> None:
    """One mistake, one report: rules that use a rejected dataset are not wrong themselves.

    An unknown key in ``org.activities`` makes the loader drop the dataset, and then report
    that rule 'org-volunteer-planning' grants columns 'activity_type' "that no matching
    dataset declares", which is false: the dataset as written declares them.
    """
    datasets = bundle_copy / "datasets.yaml"
    edit(
        datasets, "    max_rows_per_person: 20\n", "    max_rows_per_person: 20\n    max_rows: 3\n"
    )
    assert problems(bundle_copy) == [
        f"{locate(datasets, '    max_rows: 3', 'max_rows')}: "
        "dataset 'org.activities': unknown key 'max_rows' (did you mean 'max_rows_per_person'?)"
    ]


def test_every_duplicate_key_is_reported_and_the_rest_of_the_file_still_checked(
    bundle_copy: Path, edit: Edit
) -> None:
    consumers = bundle_copy / "consumers.yaml"
    edit(
        consumers,
        "    purposes: [casework-monitoring]\n",
        "    purposes: [casework-monitoring]\n    identity: again\n    purposes: [again]\n"
        "    colour: red\n",
    )
    first = locate(consumers, "consumer/grid-centre", "identity").line
    assert problems(bundle_copy) == [
        f"{locate(consumers, 'identity: again', 'identity')}: "
        f"YAML: duplicate key 'identity' (first written on line {first})",
        f"{locate(consumers, 'purposes: [again]', 'purposes')}: "
        f"YAML: duplicate key 'purposes' (first written on line {first + 1})",
        f"{locate(consumers, 'colour: red', 'colour')}: "
        "consumer 'grid-centre': unknown key 'colour' (expected one of: description, identity, "
        "purposes)",
    ]


def test_sources_point_at_each_declaration_name(demo_bundle: Bundle) -> None:
    """Tools (warnings, explanations) point into the files through ``Bundle.sources``."""
    assert set(demo_bundle.sources) == {
        f"{section}/{name}"
        for section, names in (
            ("populations", demo_bundle.populations),
            ("key_sets", demo_bundle.key_sets),
            ("datasets", demo_bundle.datasets),
            ("consumers", demo_bundle.consumers),
            ("rules", demo_bundle.rules),
        )
        for name in names
    }
    rules = DEMO_BUNDLE / "rules.yaml"
    assert demo_bundle.sources["rules/grid-casework"] == locate(rules, "  grid-casework:", "grid")
    communities = locate(DEMO_BUNDLE / "key_sets.yaml", "  communities:", "communities")
    assert demo_bundle.sources["key_sets/communities"] == communities


def test_missing_folder_is_one_problem(tmp_path: Path) -> None:
    assert problems(tmp_path / "absent") == [
        f"policy bundle folder not found: {tmp_path / 'absent'}"
    ]


# --- several problems at once ----------------------------------------------------------------------


def break_in_several_places(root: Path, edit: Edit) -> list[str]:
    """Make nine independent mistakes in a copy of the demo bundle; return the expected report.

    The mistakes are chosen so that none hides or causes another (no cascade), and listed in the
    loader's order: files in name order while reading, then key sets, then references.
    """
    datasets, rules = root / "datasets.yaml", root / "rules.yaml"
    edit(
        datasets, "    max_rows_per_person: 20\n", "    max_rows_per_person: 20\n    max_rows: 3\n"
    )
    edit(
        datasets,
        "population: city-residents\n    max_rows_per_person: 24",
        "population: nobody\n    max_rows_per_person: 24",
    )
    edit(
        datasets,
        "community: {type: category, key_set: communities}\n      condition",
        "community: {type: category, key_set: comunities}\n      condition",
    )
    edit(rules, "consumers: [grid-centre]", "consumers: [grid-center]")
    edit(rules, 'datasets: ["health.*"]', 'datasets: ["hospital.*"]')
    edit(rules, "filterable: [lives_alone_elderly, low_income,", "filterable: [income, low_income,")
    edit(rules, 'budget: {epsilon: "8",', 'budget: {epsilon: "8", rho: "1",')
    (root / "extra.yaml").write_text("key_sets:\n  extra: {values: [a, b}\n", encoding="utf-8")
    (root / "zz_more.yaml").write_text(
        "consumers:\n  civil-affairs:\n    identity: spiffe://x\n    purposes: [anything]\n",
        encoding="utf-8",
    )
    unknown_key = locate(datasets, "    max_rows: 3", "max_rows")
    both_amounts = locate(rules, 'budget: {epsilon: "8", rho', "rho")
    first_civil_affairs = locate(root / "consumers.yaml", "  civil-affairs:", "civil")
    hospital = locate(rules, 'datasets: ["hospital.*"]', '"hospital')
    return [
        f"{unknown_key}: dataset 'org.activities': unknown key 'max_rows' "
        "(did you mean 'max_rows_per_person'?)",
        "extra.yaml:2:24: YAML: expected ',' or ']', but got '}'",
        f"{both_amounts}: rule 'org-volunteer-planning'.budget: "
        "give exactly one of 'epsilon' or 'rho', not both",
        f"zz_more.yaml:2:3: consumer 'civil-affairs' is already declared at {first_civil_affairs}",
        f"{locate(datasets, 'population: nobody', 'nobody')}: "
        "dataset 'civil.subsidies': unknown population 'nobody'",
        f"{locate(datasets, 'key_set: comunities', 'comunities')}: "
        "dataset 'health.chronic' column 'community': unknown key set 'comunities' "
        "(did you mean 'communities'?)",
        f"{locate(rules, 'filterable: [income, low_income', 'income')}: "
        "rule 'civil-elderly-care': no dataset it matches declares column 'income' "
        "(did you mean 'low_income'?)",
        f"{locate(rules, 'consumers: [grid-center]', 'grid')}: "
        "rule 'grid-casework': 'grid-center' matches no declared consumer "
        "(did you mean 'grid-centre'?)",
        f"{hospital}: rule 'no-health-data-to-org': 'hospital.*' matches no declared dataset",
    ]


def test_every_problem_is_reported_in_one_error(bundle_copy: Path, edit: Edit) -> None:
    expected = break_in_several_places(bundle_copy, edit)
    with pytest.raises(PolicyInvalid) as info:
        load_bundle(bundle_copy)
    err = info.value
    assert len(err.problems) == 9
    assert [str(p) for p in err.problems] == expected
    assert err.metadata == {"problems": "9"}
    assert err.message.startswith("policy bundle has 9 problem(s):\n")
    assert all(line in err.message for line in expected)


# --- silogate policy check -------------------------------------------------------------------------


def test_cli_policy_check_accepts_the_demo_bundle(
    demo_bundle: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "check", str(DEMO_BUNDLE)]) == 0
    out, err = capsys.readouterr()
    counts = (len(demo_bundle.datasets), len(demo_bundle.consumers), len(demo_bundle.rules))
    assert out == (
        f"ok: {counts[0]} datasets, {counts[1]} consumers, {counts[2]} rules; "
        f"policy version {demo_bundle.version}\n"
    )
    assert err == ""


def test_cli_policy_check_lists_every_problem_and_fails(
    bundle_copy: Path, edit: Edit, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = break_in_several_places(bundle_copy, edit)
    assert main(["policy", "check", str(bundle_copy)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [*expected, "9 problem(s)"]
    assert err == ""


def test_cli_policy_check_output_matches_golden_file(
    bundle_copy: Path,
    edit: Edit,
    capsys: pytest.CaptureFixture[str],
    golden: Callable[[str, str], None],
) -> None:
    break_in_several_places(bundle_copy, edit)
    assert main(["policy", "check", str(bundle_copy)]) == 1
    out, _ = capsys.readouterr()
    assert str(bundle_copy) not in out  # positions are relative to the bundle
    golden("policy_check_several_problems.txt", out)


def test_cli_policy_check_of_a_missing_folder_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "check", str(tmp_path / "absent")]) == 1
    out, _ = capsys.readouterr()
    assert out.endswith("1 problem(s)\n")
