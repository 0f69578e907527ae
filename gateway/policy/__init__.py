"""Policy bundles: the rule-file model, its loader and the decision engine.

- :mod:`gateway.policy.model`: pydantic models of populations, key sets, datasets, consumers, rules.
- :mod:`gateway.policy.loader`: reads a bundle folder, reports every problem as ``file:line:col``.
- :mod:`gateway.policy.decision`: the pure decision function (default deny, forbid overrides permit)
  and its clause-by-clause trace.

Author tooling (``silogate policy ...``), never used to serve queries:

- :mod:`gateway.policy.lint`: warnings about risky settings for ``policy check``.
- :mod:`gateway.policy.cases`: the policy test / query file format and its spend-free evaluation.
- :mod:`gateway.policy.policytests`: ``policy test``; :mod:`gateway.policy.explain`: ``policy
  explain``; :mod:`gateway.policy.diff`: ``policy diff``; :mod:`gateway.policy.schema`: ``policy
  schema``; :mod:`gateway.policy.sourcemap`: positions inside YAML files for their messages.
"""

from gateway.policy.decision import Decision, decide
from gateway.policy.loader import load_bundle
from gateway.policy.model import Bundle

__all__ = ["Bundle", "Decision", "decide", "load_bundle"]
