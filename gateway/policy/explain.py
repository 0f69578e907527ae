"""``silogate policy explain``: why a query is allowed or denied, and what it would cost.

Renders an :class:`gateway.policy.cases.Outcome` as text: the decision and its reasons, then per
measure every rule that applies to the consumer and dataset with each clause marked ``pass`` or
``fail`` (for a forbid rule, ``pass`` means the condition matches), the rules that do not apply
on one line, and the planned cost per measure and budget scope. It reads no ledger and spends
nothing; the budget left is for ``silogate budget`` against a running gateway.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.policy.cases import Outcome
from gateway.policy.decision import RuleCheck
from gateway.policy.model import Bundle

_LABEL_WIDTH = 14
_SCOPE = ("consumer", "dataset")


def _rule_outcome(check: RuleCheck, granting: str | None) -> str:
    if check.effect == "forbid":
        return "forbids this measure" if check.matches else "does not match"
    if check.matches:
        return "grants this measure" if check.rule_id == granting else "would also grant"
    return "does not grant"


def _where(bundle: Bundle, rule_id: str) -> str:
    position = bundle.sources.get(f"rules/{rule_id}")
    return f", {position}" if position is not None else ""


def _trace(bundle: Bundle, outcome: Outcome, write: Callable[[str], object]) -> None:
    decision = outcome.detail
    if decision is None:
        return
    assert outcome.query is not None
    for measure in sorted(outcome.query.measures, key=lambda m: m.id):
        checks = [c for c in decision.trace if c.measure_id == measure.id]
        grant = decision.grants.get(measure.id)
        granting = grant.rule_id if grant is not None else None
        write(f"\nmeasure '{measure.id}': {measure.kind} on {measure.dataset}\n")
        applicable = [c for c in checks if c.applies]
        if not applicable:
            write("  no rule applies to this consumer and dataset (default deny)\n")
        for check in applicable:
            write(
                f"  rule '{check.rule_id}' ({check.effect}{_where(bundle, check.rule_id)}): "
                f"{_rule_outcome(check, granting)}\n"
            )
            for clause in check.clauses:
                mark = "pass" if clause.passed else "fail"
                write(f"    {mark}  {clause.clause:<{_LABEL_WIDTH}} {clause.message}\n")
        others = [c for c in checks if not c.applies]
        if others:
            write("  not applicable:\n")
            for check in others:
                failed = " and ".join(
                    c.clause for c in check.clauses if c.clause in _SCOPE and not c.passed
                )
                verb = "differs" if " and " not in failed else "differ"
                write(f"    {check.rule_id} ({failed} {verb})\n")


def _cost(outcome: Outcome, write: Callable[[str], object]) -> None:
    if outcome.decision != "allow":
        return
    plan = outcome.plan
    if plan is None:
        write(f"\ncost: not available: {outcome.cost_note}\n")
        return
    rho = plan.total_rho
    write(f"\ncost: rho {rho} (~{float(rho):.6g})\n")
    for m in plan.measures:
        write(
            f"  measure '{m.measure.id}' ({m.measure.kind}): silo {m.silo}, rho {m.rho}, "
            f"by rule '{m.rule_id}' (min group size {m.min_group_size})\n"
        )
        for c in m.components:
            write(
                f"    {c.name}: {c.noise.mechanism}, sensitivity {c.sensitivity:g}, "
                f"scale {c.noise.scale:.6g}, 95% error ±{c.error95:.4g}, rho {c.noise.rho}\n"
            )
    write("  charged to:\n")
    for scope in plan.scopes:
        write(
            f"    {scope.key}: rho {plan.charges[scope.key]} of {scope.total_rho} "
            f"(period {scope.period})\n"
        )
    write("nothing was spent (explain never touches the ledger)\n")


def render_explanation(
    bundle: Bundle, consumer: str, outcome: Outcome, write: Callable[[str], object]
) -> None:
    """Print the decision, the rules considered clause by clause, and the planned cost."""
    write(f"consumer: {consumer}\npolicy version: {bundle.version}\n")
    code = f" ({outcome.reason_code})" if outcome.reason_code else ""
    write(f"decision: {outcome.decision.upper()}{code}\n")
    rules = ", ".join(outcome.deciding_rules) or "(none: default deny)"
    if outcome.decision == "invalid":
        rules = "(none: the query is invalid)"
    write(f"deciding rules: {rules}\n")
    for reason in outcome.reasons:
        write(f"  reason: {reason}\n")
    _trace(bundle, outcome, write)
    _cost(outcome, write)
