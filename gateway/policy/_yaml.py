"""Parses one policy file into ruamel's round-trip tree, and finds positions in that tree.

Policy files are plain data, so the parser refuses every YAML feature that plain data does not
need and that makes a small file dangerous or misleading, each with the position where it is
written:

- anchors and aliases (``&name``, ``*name``): an alias repeats a node without copying it, so a few
  lines can stand for billions of values ("billion laughs") once converted to plain data;
- explicit tags (``!!python/object``, ``!custom``) and merge keys (``<<``);
- nesting deeper than :data:`MAX_DEPTH` levels: the composer recurses once per level, and
  10,000 levels would end in a RecursionError instead of a message;
- integers longer than :data:`MAX_INTEGER_DIGITS` digits (Python refuses to convert very long ones
  and converting long ones is slow);
- text that is not UTF-8, control characters, and escapes of half a character (``"\\ud800"``).

Duplicate keys are all reported, with the line of the first occurrence; the first value is kept
so that the rest of the file is still checked. Dates and times stay text: ``2020-13-45`` would
otherwise fail inside the parser, and whoever expects a date converts and checks it. Never
constructs Python objects from tags.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer, ComposerError
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent, NodeEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode
from ruamel.yaml.reader import ReaderError

from gateway.errors import SourcePosition

MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 40
_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
_STR_TAG = "tag:yaml.org,2002:str"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_SURROGATE = re.compile("[\ud800-\udfff]")

Report = Callable[[SourcePosition, str], None]


class _PolicyComposer(Composer):
    """ruamel's composer, refusing anchors, aliases, tags, merge keys and deep nesting."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.nesting = 0
        # (line, column, key, first line) of every repeated key, 0-based like ruamel's marks.
        self.duplicates: list[tuple[int, int, str, int]] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(event, AliasEvent) or (
            isinstance(event, NodeEvent) and event.anchor is not None
        ):
            raise ComposerError(
                None,
                None,
                "anchors and aliases ('&name', '*name') are not allowed in policy files; "
                "write the value out",
                event.start_mark,
            )
        tag = getattr(event, "ctag", None)
        if tag is not None:
            written = str(tag).replace("tag:yaml.org,2002:", "!!")
            raise ComposerError(
                None, None, f"tags ('{written}') are not allowed in policy files", event.start_mark
            )
        self.nesting += 1
        try:
            if self.nesting > MAX_DEPTH:
                raise ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels; a policy file needs far fewer",
                    event.start_mark,
                )
            node = super().compose_node(parent, index)
        finally:
            self.nesting -= 1
        self._check(node)
        return node

    def _check(self, node: Node) -> None:
        if isinstance(node, ScalarNode):
            self._check_scalar(node)
        if not isinstance(node, MappingNode):
            return
        first_line: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if str(key.tag) == _MERGE_TAG:
                raise ComposerError(
                    None,
                    None,
                    "merge keys ('<<') are not allowed in policy files; write the keys out",
                    key.start_mark,
                )
            if not isinstance(key, ScalarNode):
                continue
            mark, identity = key.start_mark, (str(key.tag), key.value)
            if identity in first_line:
                self.duplicates.append((mark.line, mark.column, key.value, first_line[identity]))
            else:
                first_line[identity] = mark.line

    @staticmethod
    def _check_scalar(node: ScalarNode) -> None:
        if str(node.tag) == _INT_TAG and len(node.value) > MAX_INTEGER_DIGITS:
            raise ComposerError(
                None,
                None,
                f"numbers of more than {MAX_INTEGER_DIGITS} digits are not allowed",
                node.start_mark,
            )
        if str(node.tag) == _TIMESTAMP_TAG:
            # No policy setting is a timestamp; as text, '2020-13-45' cannot fail to construct.
            node.tag = _STR_TAG
        surrogate = _SURROGATE.search(node.value)
        if surrogate:  # text that cannot be written as UTF-8 anywhere later
            raise ComposerError(
                None,
                None,
                f"'\\u{ord(surrogate[0]):04x}' is half of a character (an unpaired surrogate); "
                "write the whole character",
                node.start_mark,
            )


def decode_utf8(file: str, data: bytes, report: Report) -> str | None:
    """The text of a bundle file, or None after reporting where it stops being UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        column = len(data[line_start : err.start].decode("utf-8", errors="replace")) + 1
        line = data.count(b"\n", 0, err.start) + 1
        report(
            SourcePosition(file, line, column),
            f"not UTF-8 text: byte 0x{data[err.start]:02x} cannot be decoded; "
            "save the file as UTF-8",
        )
        return None


def _text_position(file: str, text: str, index: int) -> SourcePosition:
    line_start = text.rfind("\n", 0, index) + 1
    return SourcePosition(file, text.count("\n", 0, index) + 1, index - line_start + 1)


def parse_policy_yaml(file: str, data: bytes, report: Report) -> Any:
    """The round-trip tree of one file, or None after reporting why it cannot be read."""
    text = decode_utf8(file, data, report)
    if text is None:
        return None
    yaml = YAML(typ="rt")
    yaml.Composer = _PolicyComposer
    yaml.allow_duplicate_keys = True  # reported below, every one of them, not only the first
    composer: _PolicyComposer = yaml.composer
    try:
        doc = yaml.load(text)
    except ReaderError as err:
        report(
            _text_position(file, text, err.position),
            f"YAML: character {chr(err.character)!r} (#x{err.character:04x}) is not allowed "
            "in a policy file",
        )
        return None
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        position = SourcePosition(file, mark.line + 1, mark.column + 1) if mark else None
        report(position or SourcePosition(file, 1, 1), f"YAML: {_syntax_message(err)}")
        return None
    except (ValueError, OverflowError) as err:  # a scalar that ruamel cannot construct
        report(SourcePosition(file, 1, 1), f"YAML: a value cannot be read: {err}")
        return None
    for line, column, key, first in composer.duplicates:
        report(
            SourcePosition(file, line + 1, column + 1),
            f"YAML: duplicate key '{key}' (first written on line {first + 1})",
        )
    return doc


def _syntax_message(err: MarkedYAMLError) -> str:
    problem = str(err.problem or err.context)
    if "'\\t'" in problem:
        return "tab characters cannot indent YAML; indent with spaces"
    if "another document" in problem:
        return "a policy file holds one YAML document; remove the second one (after '---')"
    return problem


# --- positions in the round-trip tree -------------------------------------------------------------


def _child(container: Any, part: int | str) -> tuple[Any, int | str] | None:
    """The key or index of ``part`` in ``container`` (keys compared as text), or None."""
    if isinstance(container, CommentedMap):
        for key in container:
            if str(key) == str(part):
                return container, key
    if isinstance(container, CommentedSeq) and isinstance(part, int) and 0 <= part < len(container):
        return container, part
    return None


def position(
    file: str,
    parent: CommentedMap,
    key: Any,
    loc: tuple[int | str, ...] = (),
    *,
    at_key: bool = False,
) -> SourcePosition:
    """Where ``parent[key]`` followed by ``loc`` is written, or the deepest part that exists.

    The result points at the value, or at its key with ``at_key`` (an unknown key is reported
    where the key is written). Empty values point at their key: ruamel places them on the next
    line. A part ``"[key]"`` (pydantic's marker for a mapping key) points at the key before it.
    """
    container, step = parent, key
    for part in loc:
        if part == "[key]":
            at_key = True
            break
        found = _child(container[step], part)
        if found is None:
            break
        container, step = found
    if isinstance(container, CommentedSeq):
        line, column = container.lc.item(step)
    elif at_key or container[step] is None:
        line, column = container.lc.key(step)
    else:
        line, column = container.lc.value(step)
    return SourcePosition(file, line + 1, column + 1)
