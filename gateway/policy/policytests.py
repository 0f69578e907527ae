"""``silogate policy test``: runs the policy unit tests kept in ``<bundle>/tests/*.yaml``.

Each case is evaluated as the gateway would evaluate the query (see :mod:`gateway.policy.cases`),
spending nothing, and compared with its expectation. A failing case prints the differing fields
as ``- expected`` / ``+ actual`` lines with the decision's reasons below them, so the author sees
at once whether the rule or the test is wrong. A case file that cannot be read counts as a
failure with its ``file:line:col`` problems: a test that silently does not run is worse than
none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from gateway.errors import PolicyProblem
from gateway.policy.cases import (
    Expectation,
    LoadedCase,
    Outcome,
    build_query,
    evaluate,
    load_case_file,
)
from gateway.policy.model import Bundle

TESTS_DIR = "tests"


@dataclass(frozen=True)
class Mismatch:
    field: str
    expected: str
    actual: str


@dataclass(frozen=True)
class CaseResult:
    loaded: LoadedCase
    outcome: Outcome
    mismatches: tuple[Mismatch, ...]

    @property
    def passed(self) -> bool:
        return not self.mismatches


@dataclass
class PolicyTestRun:
    """Results per case file, in file order, and problems of files that could not be read."""

    results: dict[str, list[CaseResult]] = field(default_factory=dict)
    problems: list[PolicyProblem] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(r.passed for rs in self.results.values() for r in rs)

    @property
    def failed(self) -> int:
        return sum(not r.passed for rs in self.results.values() for r in rs)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.problems and self.passed > 0


def _listed(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _decision_text(outcome: Outcome) -> str:
    return outcome.decision + (f" ({outcome.reason_code})" if outcome.reason_code else "")


def compare(expect: Expectation, outcome: Outcome) -> tuple[Mismatch, ...]:
    """The fields of ``expect`` that ``outcome`` does not meet (unset fields are not checked)."""
    out: list[Mismatch] = []
    if expect.decision != outcome.decision:
        out.append(Mismatch("decision", expect.decision, _decision_text(outcome)))
    if expect.rules is not None and sorted(expect.rules) != sorted(outcome.deciding_rules):
        out.append(
            Mismatch("rules", _listed(sorted(expect.rules)), _listed(outcome.deciding_rules))
        )
    if expect.reason_code is not None and expect.reason_code != outcome.reason_code:
        out.append(Mismatch("reason_code", expect.reason_code, outcome.reason_code or "(none)"))
    if expect.reason_contains is not None and not any(
        expect.reason_contains in r for r in outcome.reasons
    ):
        out.append(
            Mismatch(
                "reason_contains",
                repr(expect.reason_contains),
                "; ".join(outcome.reasons) or "(no reasons)",
            )
        )
    if expect.cost_rho is not None:
        wanted = Fraction(expect.cost_rho)
        actual = outcome.cost_rho
        if actual != wanted:
            shown = str(actual) if actual is not None else outcome.cost_note or "no cost"
            out.append(Mismatch("cost_rho", str(wanted), shown))
    if expect.scopes is not None and sorted(expect.scopes) != sorted(outcome.scopes):
        out.append(Mismatch("scopes", _listed(sorted(expect.scopes)), _listed(outcome.scopes)))
    return tuple(out)


def run_case(bundle: Bundle, loaded: LoadedCase) -> CaseResult:
    case = loaded.case
    outcome = evaluate(bundle, case.consumer, build_query(case, bundle))
    return CaseResult(loaded, outcome, compare(case.expect, outcome))


def run_policy_tests(root: Path, bundle: Bundle) -> PolicyTestRun:
    """Every case of ``root/tests/*.yaml`` (and ``*.yml``), files in name order."""
    run = PolicyTestRun()
    folder = Path(root) / TESTS_DIR
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
    for path in files:
        label = path.relative_to(root).as_posix()
        cases, problems = load_case_file(path, label)
        run.problems += problems
        run.results[label] = [run_case(bundle, loaded) for loaded in cases]
    return run


def report(run: PolicyTestRun, write: Callable[[str], object]) -> None:
    """Print one line per case, the differences of failing cases and a summary line."""
    for problem in run.problems:
        write(f"{problem}\n")
    for label, results in run.results.items():
        if not results:
            continue
        write(f"{label}\n")
        for result in results:
            if result.passed:
                write(f"  PASS  {result.loaded.case.name}\n")
                continue
            write(f"  FAIL  {result.loaded.case.name}  ({result.loaded.position})\n")
            for mismatch in result.mismatches:
                write(f"        - {mismatch.field}: {mismatch.expected}\n")
                write(f"        + {mismatch.field}: {mismatch.actual}\n")
            for reason in result.outcome.reasons:
                write(f"          reason: {reason}\n")
            if result.outcome.cost_note:
                write(f"          cost: {result.outcome.cost_note}\n")
    unreadable = f", {len(run.problems)} problem(s) in test files" if run.problems else ""
    write(f"{run.passed} passed, {run.failed} failed{unreadable}\n")
