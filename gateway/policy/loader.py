"""Loads a policy bundle folder and reports every problem with ``file:line:col``.

A bundle is a folder of YAML files; each file holds any of the top-level sections
``populations``, ``key_sets``, ``datasets``, ``consumers`` and ``rules``, each a mapping from a
name to its declaration. Key sets may point at CSV files in the folder. Problems are collected
across all files and raised once as :class:`gateway.errors.PolicyInvalid` (sqlglot style), so a
policy author sees every mistake in one run. The loader never executes anything from the bundle.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gateway.errors import PolicyInvalid, PolicyProblem, SourcePosition
from gateway.policy.model import Bundle, Consumer, Dataset, KeySet, Population, Rule

SECTIONS: dict[str, type[BaseModel]] = {
    "populations": Population,
    "key_sets": KeySet,
    "datasets": Dataset,
    "consumers": Consumer,
    "rules": Rule,
}
# Files that are part of the bundle's identity but not policy declarations.
_NOT_HASHED_DIRS = {"tests"}
_SIGNATURE_FILES = {"bundle.sig", "manifest.txt"}

M = TypeVar("M", bound=BaseModel)


def bundle_files(root: Path) -> list[Path]:
    """Every file that makes up the bundle (policy tests and signatures excluded), sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.relative_to(root).parts[0] not in _NOT_HASHED_DIRS
        and p.name not in _SIGNATURE_FILES
        and not p.name.startswith(".")
    )


def manifest_text(root: Path) -> str:
    """``sha256  relative/path`` per file; its SHA-256 is the policy version."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}"
        for p in bundle_files(root)
    ]
    return "\n".join(lines) + "\n"


def bundle_version(root: Path) -> str:
    return hashlib.sha256(manifest_text(root).encode()).hexdigest()


def _position(
    file: str, node: Any, loc: tuple[int | str, ...], *, at_key: bool = False
) -> SourcePosition:
    """Walk ``loc`` down the ruamel tree and return the deepest position known.

    Intermediate steps and ``at_key`` point at keys (an unknown key is reported where it is
    written); otherwise the last step points at the value. A missing key points at its parent.
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


def _key_position(file: str, mapping: CommentedMap, key: str) -> SourcePosition:
    line, col = mapping.lc.key(key)
    return SourcePosition(file, line + 1, col + 1)


class _Collector:
    def __init__(self) -> None:
        self.problems: list[PolicyProblem] = []

    def add(self, position: SourcePosition | None, message: str) -> None:
        self.problems.append(PolicyProblem(position, message))


def _validate(problems: _Collector, model: type[M], file: str, node: Any, name: str) -> M | None:
    try:
        return model.model_validate(_plain(node))
    except ValidationError as err:
        for e in err.errors():
            loc = tuple(e["loc"])
            where = ".".join(str(p) for p in loc)
            if e["type"] == "extra_forbidden":
                problems.add(
                    _position(file, node, loc, at_key=True), f"{name}: unknown key '{loc[-1]}'"
                )
            elif e["type"] == "missing":
                problems.add(_position(file, node, loc[:-1]), f"{name}: missing key '{loc[-1]}'")
            else:
                msg = e["msg"].removeprefix("Value error, ")
                problems.add(
                    _position(file, node, loc), f"{name}{'.' + where if where else ''}: {msg}"
                )
        return None


def _plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists (scalars as str/int/...)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _read_yaml_files(root: Path, problems: _Collector) -> Iterator[tuple[str, CommentedMap]]:
    yaml = YAML(typ="rt")
    for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
        rel = path.relative_to(root).as_posix()
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"))
        except MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            pos = SourcePosition(rel, mark.line + 1, mark.column + 1) if mark else None
            problems.add(pos, f"YAML: {err.problem or err.context}")
            continue
        if doc is None:
            continue
        if not isinstance(doc, CommentedMap):
            problems.add(SourcePosition(rel, 1, 1), "a policy file must be a mapping of sections")
            continue
        yield rel, doc


def load_bundle(root: Path) -> Bundle:
    """Load and validate a bundle; raises PolicyInvalid listing every problem."""
    root = Path(root)
    if not root.is_dir():
        raise PolicyInvalid([PolicyProblem(None, f"policy bundle folder not found: {root}")])
    problems = _Collector()
    declared: dict[str, dict[str, tuple[Any, str, CommentedMap]]] = {s: {} for s in SECTIONS}
    # Declarations already reported as invalid: references to them are not reported again.
    broken: dict[str, set[str]] = {s: set() for s in SECTIONS}
    for rel, doc in _read_yaml_files(root, problems):
        for section, body in doc.items():
            if section not in SECTIONS:
                known = ", ".join(SECTIONS)
                problems.add(
                    _key_position(rel, doc, section),
                    f"unknown section '{section}' (expected one of: {known})",
                )
                continue
            if not isinstance(body, CommentedMap):
                problems.add(_key_position(rel, doc, section), f"'{section}' must be a mapping")
                continue
            model = SECTIONS[section]
            for name, node in body.items():
                if name in declared[section]:
                    problems.add(
                        _key_position(rel, body, name),
                        f"{section} '{name}' is already declared in {declared[section][name][1]}",
                    )
                    continue
                item = _validate(problems, model, rel, node, f"{section[:-1]} '{name}'")
                if item is None:
                    broken[section].add(str(name))
                else:
                    declared[section][str(name)] = (item, rel, body)

    def items(section: str) -> dict[str, Any]:
        return {name: entry[0] for name, entry in declared[section].items()}

    def where(section: str, name: str) -> SourcePosition:
        _, rel, body = declared[section][name]
        return _key_position(rel, body, name)

    key_sets = _resolve_key_sets(root, items("key_sets"), problems, lambda n: where("key_sets", n))
    bundle = Bundle(
        version=bundle_version(root),
        populations=items("populations"),
        key_sets=key_sets,
        datasets=items("datasets"),
        consumers=items("consumers"),
        rules=items("rules"),
        sources={
            f"{section}/{name}": where(section, name)
            for section, entries in declared.items()
            for name in entries
        },
    )
    broken["key_sets"] |= set(declared["key_sets"]) - set(key_sets)
    _check_references(bundle, problems, where, broken)
    if problems.problems:
        raise PolicyInvalid(problems.problems)
    return bundle


def _resolve_key_sets(
    root: Path,
    declared: dict[str, KeySet],
    problems: _Collector,
    where: Callable[[str], SourcePosition],
) -> dict[str, tuple[str, ...]]:
    resolved: dict[str, tuple[str, ...]] = {}
    for name, key_set in declared.items():
        if key_set.values is not None:
            values = tuple(key_set.values)
        else:
            assert key_set.file is not None
            path = (root / key_set.file).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                problems.add(where(name), f"key set '{name}': file '{key_set.file}' not found")
                continue
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames is None or "key" not in reader.fieldnames:
                    problems.add(where(name), f"key set '{name}': CSV needs a 'key' column")
                    continue
                values = tuple(row["key"] for row in reader)
        if len(set(values)) != len(values):
            problems.add(where(name), f"key set '{name}' has duplicate keys")
        if not values:
            problems.add(where(name), f"key set '{name}' is empty")
        resolved[name] = values
    return resolved


def _check_references(
    bundle: Bundle,
    problems: _Collector,
    where: Callable[[str, str], SourcePosition],
    broken: dict[str, set[str]],
) -> None:
    """Dangling references, grants on undeclared columns and rules that can never match."""
    for name, dataset in bundle.datasets.items():
        if name != f"{dataset.silo}.{dataset.table}":
            problems.add(
                where("datasets", name),
                f"dataset '{name}' must be named '<silo>.<table>' ('{dataset.silo}.{dataset.table}')",
            )
        if dataset.population not in {*bundle.populations, *broken["populations"]}:
            problems.add(
                where("datasets", name),
                f"dataset '{name}': unknown population '{dataset.population}'",
            )
        for column_name, column in dataset.columns.items():
            if column.key_set is not None and column.key_set not in {
                *bundle.key_sets,
                *broken["key_sets"],
            }:
                problems.add(
                    where("datasets", name),
                    f"dataset '{name}' column '{column_name}': unknown key set '{column.key_set}'",
                )
    for rule_id, rule in bundle.rules.items():
        consumers = [c for c in bundle.consumers if rule.applies_to_consumer(c)]
        # A rule that may refer to an invalid declaration is not judged on what it matches.
        refers_to_broken = any(rule.applies_to_consumer(c) for c in broken["consumers"]) or any(
            rule.applies_to_dataset(d) for d in broken["datasets"]
        )
        if refers_to_broken:
            continue
        if not consumers:
            problems.add(where("rules", rule_id), f"rule '{rule_id}' matches no declared consumer")
        datasets = [d for n, d in bundle.datasets.items() if rule.applies_to_dataset(n)]
        if not datasets:
            problems.add(where("rules", rule_id), f"rule '{rule_id}' matches no declared dataset")
        for granted in [*rule.group_by, *rule.filterable]:
            if datasets and not any(granted in d.columns for d in datasets):
                problems.add(
                    where("rules", rule_id),
                    f"rule '{rule_id}' grants column '{granted}' that no matching dataset declares",
                )
        for granted in rule.group_by:
            if any(d.columns[granted].type != "category" for d in datasets if granted in d.columns):
                problems.add(
                    where("rules", rule_id),
                    f"rule '{rule_id}': group-by column '{granted}' is not bound to a key set",
                )
        allowed = {p for c in consumers for p in bundle.consumers[c].purposes}
        if consumers and rule.purposes and not set(rule.purposes) & allowed:
            problems.add(
                where("rules", rule_id),
                f"rule '{rule_id}' can never match: none of its purposes is allowed to its consumers",
            )
