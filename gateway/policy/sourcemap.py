"""Positions of keys and values in YAML files, for ``file:line:col`` messages of the author tools.

The loader keeps only where each declaration starts (``Bundle.sources``); warnings and policy-test
errors point at the exact key or value, so these helpers re-read a file with ruamel's round-trip
loader, which records line and column of every node. They never construct arbitrary objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gateway.errors import SourcePosition


def read_yaml(path: Path) -> Any:
    """The document of ``path`` with positions; raises ruamel's MarkedYAMLError on bad YAML."""
    return YAML(typ="rt").load(path.read_text(encoding="utf-8"))


def position_in(
    file: str, node: Any, loc: Sequence[int | str], *, at_key: bool = False
) -> SourcePosition:
    """The deepest position of ``loc`` below ``node`` that exists in the file.

    Intermediate steps, and the last one when ``at_key``, point at keys; otherwise the last step
    points at the value. A step that is not there leaves the position at its parent, so a
    missing setting is reported where it should have been written.
    """
    line, col = (node.lc.line, node.lc.col) if hasattr(node, "lc") else (0, 0)
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, CommentedMap) and part in node:
            line, col = node.lc.value(part) if last and not at_key else node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = node.lc.item(part)
            node = node[part]
        else:
            break
    return SourcePosition(file, line + 1, col + 1)


def plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists, for pydantic validation."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node
