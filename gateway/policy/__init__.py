"""Policy bundles: the rule-file model, its loader and the decision engine.

- :mod:`gateway.policy.model`: pydantic models of populations, key sets, datasets, consumers, rules.
- :mod:`gateway.policy.loader`: reads a bundle folder, reports every problem as ``file:line:col``.
- :mod:`gateway.policy.decision`: the pure decision function (default deny, forbid overrides permit).
"""

from gateway.policy.decision import Decision, decide
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

__all__ = ["Bundle", "Decision", "decide", "load_bundle"]
