"""Loads a policy bundle folder and reports every problem with ``file:line:col``.

A bundle is a folder of YAML files; each file holds any of the top-level sections
``populations``, ``key_sets``, ``datasets``, ``consumers`` and ``rules``, each a mapping from a
name to its declaration. Key sets may point at CSV files in the folder. Problems are collected
across all files and raised once as :class:`gateway.errors.PolicyInvalid` (sqlglot style), so a
policy author sees every mistake in one run. The loader never executes anything from the bundle.

Limits, checked on the file sizes before anything is read or parsed, so that a huge or hostile
bundle is refused without spending memory on it (see :mod:`gateway.policy._files`):

- :data:`MAX_FILE_BYTES` (1 MiB) for any one file of the bundle;
- :data:`MAX_POLICY_BYTES` (1 MiB) for all policy (YAML) files together: ruamel's round-trip
  parser, which keeps the positions, needs about 10 s and 150 MB per MiB;
- :data:`MAX_BUNDLE_BYTES` (16 MiB) for all files together (key set CSVs included).

Inside a file, anchors, aliases, tags, merge keys, nesting deeper than 32 levels and text that is
not UTF-8 are refused (see :mod:`gateway.policy._yaml`). The bundle's files are read once: the
version is the hash of exactly the bytes that were parsed.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml.comments import CommentedMap

from gateway.errors import PolicyInvalid, PolicyProblem, SourcePosition
from gateway.policy._files import (
    MAX_BUNDLE_BYTES,
    MAX_FILE_BYTES,
    MAX_POLICY_BYTES,
    POLICY_SUFFIXES,
    bundle_files,
    bundle_version,
    is_policy_file,
    manifest_text,
    read_bundle_files,
    version_of,
)
from gateway.policy._messages import did_you_mean, explain, shown, unknown
from gateway.policy._yaml import decode_utf8, parse_policy_yaml, position
from gateway.policy.model import (
    NAME_PATTERN,
    Bundle,
    Consumer,
    Dataset,
    KeySet,
    Population,
    Rule,
)

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_FILE_BYTES",
    "MAX_POLICY_BYTES",
    "SECTIONS",
    "bundle_files",
    "bundle_version",
    "load_bundle",
    "manifest_text",
]

SECTIONS: dict[str, type[BaseModel]] = {
    "populations": Population,
    "key_sets": KeySet,
    "datasets": Dataset,
    "consumers": Consumer,
    "rules": Rule,
}
# What one declaration of each section is called in messages.
_KINDS = {
    "populations": "population",
    "key_sets": "key set",
    "datasets": "dataset",
    "consumers": "consumer",
    "rules": "rule",
}
_NAME = re.compile(NAME_PATTERN)

M = TypeVar("M", bound=BaseModel)


class _Collector:
    def __init__(self) -> None:
        self.problems: list[PolicyProblem] = []

    def add(self, position: SourcePosition | None, message: str) -> None:
        self.problems.append(PolicyProblem(position, message))

    def fail_if_any(self) -> None:
        if self.problems:
            raise PolicyInvalid(self.problems)


@dataclass(frozen=True)
class _Declared:
    """A valid declaration and where it is written (``body[name]`` in ``file``)."""

    item: Any
    file: str
    body: CommentedMap
    name: Any

    def at(self, *loc: int | str, at_key: bool = False) -> SourcePosition:
        return position(self.file, self.body, self.name, loc, at_key=at_key)


def load_bundle(root: Path) -> Bundle:
    """Load and validate a bundle; raises PolicyInvalid listing every problem."""
    root = Path(root)
    if not root.is_dir():
        raise PolicyInvalid([PolicyProblem(None, f"policy bundle folder not found: {root}")])
    files = read_bundle_files(root)
    problems = _Collector()
    policy_files = [rel for rel in files if is_policy_file(rel)]
    for rel in files:
        if rel.endswith(POLICY_SUFFIXES) and not is_policy_file(rel):
            problems.add(
                SourcePosition(rel, 1, 1),
                "policy files are read only from the top of the bundle folder "
                "(policy tests go under tests/); this file would be ignored",
            )
    if not policy_files:
        problems.add(None, "the bundle folder has no policy files (*.yaml or *.yml)")
    declared: dict[str, dict[str, _Declared]] = {s: {} for s in SECTIONS}
    # Declarations already reported as invalid: references to them are not reported again.
    broken: dict[str, set[str]] = {s: set() for s in SECTIONS}
    seen: dict[str, dict[str, SourcePosition]] = {s: {} for s in SECTIONS}
    for rel in policy_files:
        doc = parse_policy_yaml(rel, files[rel], problems.add)
        if doc is None:
            continue
        if not isinstance(doc, CommentedMap):
            line, column = (doc.lc.line, doc.lc.col) if hasattr(doc, "lc") else (0, 0)
            problems.add(
                SourcePosition(rel, line + 1, column + 1),
                f"a policy file must be a mapping of sections ({', '.join(SECTIONS)}), "
                f"got {shown(_plain(doc))}",
            )
            continue
        for section, body in doc.items():
            if section not in SECTIONS:
                problems.add(
                    position(rel, doc, section, at_key=True),
                    f"unknown section '{section}'{unknown(str(section), SECTIONS)}",
                )
            elif body is not None and not isinstance(body, CommentedMap):
                problems.add(
                    position(rel, doc, section),
                    f"section '{section}' must be a mapping from names to declarations, "
                    f"got {shown(_plain(body))}",
                )
            elif body is not None:
                _read_section(section, rel, body, problems, declared, broken, seen)

    key_sets = _resolve_key_sets(root, declared["key_sets"], files, problems)
    broken["key_sets"] |= set(declared["key_sets"]) - set(key_sets)
    bundle = Bundle(
        version=version_of(files),
        populations={n: d.item for n, d in declared["populations"].items()},
        key_sets=key_sets,
        datasets={n: d.item for n, d in declared["datasets"].items()},
        consumers={n: d.item for n, d in declared["consumers"].items()},
        rules={n: d.item for n, d in declared["rules"].items()},
        sources={
            f"{section}/{name}": entry.at(at_key=True)
            for section, entries in declared.items()
            for name, entry in entries.items()
        },
    )
    _check_references(bundle, declared, broken, problems)
    problems.fail_if_any()
    return bundle


def _read_section(
    section: str,
    rel: str,
    body: CommentedMap,
    problems: _Collector,
    declared: dict[str, dict[str, _Declared]],
    broken: dict[str, set[str]],
    seen: dict[str, dict[str, SourcePosition]],
) -> None:
    kind = _KINDS[section]
    for key in body:
        name = str(key)
        where = position(rel, body, key, at_key=True)
        if name in seen[section]:
            problems.add(where, f"{kind} '{name}' is already declared at {seen[section][name]}")
            continue
        seen[section][name] = where
        valid_name = _check_name(section, name, where, problems)
        item = _validate(SECTIONS[section], f"{kind} '{name}'", rel, body, key, problems)
        if isinstance(item, Dataset) and name != f"{item.silo}.{item.table}":
            problems.add(
                where,
                f"dataset '{name}' must be named after its silo and table: "
                f"'{item.silo}.{item.table}'",
            )
            item = None
        if item is None or not valid_name:
            broken[section].add(name)
        else:
            declared[section][name] = _Declared(item, rel, body, key)


def _check_name(section: str, name: str, where: SourcePosition, problems: _Collector) -> bool:
    if section == "datasets":  # '<silo>.<table>', checked against both once they are valid
        return True
    if _NAME.fullmatch(name) and len(name) <= 64:
        return True
    problems.add(
        where,
        f"'{name}' is not a valid {_KINDS[section]} name: use lowercase letters, digits, '-' and "
        "'_', starting with a letter, at most 64 characters",
    )
    return False


def _validate(
    model: type[M], subject: str, rel: str, body: CommentedMap, key: Any, problems: _Collector
) -> M | None:
    try:
        return model.model_validate(_plain(body[key]))
    except ValidationError as err:
        found: list[tuple[SourcePosition, str]] = []
        for error in err.errors():
            why = explain(error, model, subject)
            found.append((position(rel, body, key, why.loc, at_key=why.at_key), why.message))
        # In the order they are written, not in the order of the model's fields.
        for where, message in sorted(found, key=lambda f: (f[0].line, f[0].column)):
            problems.add(where, message)
        return None


def _plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists (scalars as str/int/...).

    Safe to recurse: the YAML parser refuses nesting deeper than 32 levels and aliases.
    """
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


# --- key sets --------------------------------------------------------------------------------------


def _resolve_key_sets(
    root: Path, declared: dict[str, _Declared], files: dict[str, bytes], problems: _Collector
) -> dict[str, tuple[str, ...]]:
    resolved: dict[str, tuple[str, ...]] = {}
    for name, entry in declared.items():
        key_set: KeySet = entry.item
        if key_set.values is not None:
            values = _inline_keys(name, entry, key_set.values, problems)
        else:
            assert key_set.file is not None
            values = _csv_keys(root, name, entry, key_set.file, files, problems)
        if values is not None:
            resolved[name] = values
    return resolved


def _inline_keys(
    name: str, entry: _Declared, values: list[str], problems: _Collector
) -> tuple[str, ...] | None:
    ok = bool(values)
    if not values:
        problems.add(entry.at("values"), f"key set '{name}' is empty")
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            problems.add(entry.at("values", i), f"key set '{name}': duplicate key '{value}'")
            ok = False
        seen.add(value)
    return tuple(values) if ok else None


def _csv_keys(
    root: Path,
    name: str,
    entry: _Declared,
    file: str,
    files: dict[str, bytes],
    problems: _Collector,
) -> tuple[str, ...] | None:
    rel = posixpath.normpath(file)
    if rel not in files:
        if posixpath.isabs(rel) or rel == ".." or rel.startswith("../"):
            why = "not found (key set files must be inside the bundle folder)"
        elif (root / rel).is_file():
            why = "is not part of the signed bundle (files under tests/ and hidden files are not)"
        else:
            why = "not found"
        problems.add(entry.at("file"), f"key set '{name}': file '{file}' {why}")
        return None
    text = decode_utf8(rel, files[rel], problems.add)
    if text is None:
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        if "key" not in header:
            columns = f"its columns are: {', '.join(header)}" if header else "the file is empty"
            problems.add(
                SourcePosition(rel, 1, 1),
                f"key set '{name}': the CSV file needs a 'key' column ({columns})",
            )
            return None
        column = header.index("key")
        first_line: dict[str, int] = {}
        ok = True
        for row in reader:
            if not row:
                continue
            where = SourcePosition(rel, reader.line_num, 1)
            if column >= len(row):
                problems.add(where, f"key set '{name}': the row has no value in the 'key' column")
                ok = False
            elif row[column] in first_line:
                problems.add(
                    where,
                    f"key set '{name}': duplicate key '{row[column]}' "
                    f"(first on line {first_line[row[column]]})",
                )
                ok = False
            else:
                first_line[row[column]] = reader.line_num
    except csv.Error as err:
        problems.add(SourcePosition(rel, reader.line_num, 1), f"key set '{name}': CSV: {err}")
        return None
    if not first_line and ok:
        problems.add(
            SourcePosition(rel, 1, 1),
            f"key set '{name}' is empty: the CSV file has a header but no keys",
        )
        return None
    return tuple(first_line) if ok else None


# --- references between declarations --------------------------------------------------------------


def _check_references(
    bundle: Bundle,
    declared: dict[str, dict[str, _Declared]],
    broken: dict[str, set[str]],
    problems: _Collector,
) -> None:
    """Dangling references, grants on undeclared columns and rules that can never match."""
    populations = {*bundle.populations, *broken["populations"]}
    key_sets = {*bundle.key_sets, *broken["key_sets"]}
    for name, dataset in bundle.datasets.items():
        entry = declared["datasets"][name]
        if dataset.population not in populations:
            problems.add(
                entry.at("population"),
                f"dataset '{name}': unknown population '{dataset.population}'"
                + did_you_mean(dataset.population, populations),
            )
        for column_name, column in dataset.columns.items():
            if column.key_set is not None and column.key_set not in key_sets:
                problems.add(
                    entry.at("columns", column_name, "key_set"),
                    f"dataset '{name}' column '{column_name}': unknown key set "
                    f"'{column.key_set}'" + did_you_mean(column.key_set, key_sets),
                )
    identities: dict[str, str] = {}
    for name, consumer in bundle.consumers.items():
        other = identities.setdefault(consumer.identity, name)
        if other != name:
            problems.add(
                declared["consumers"][name].at("identity"),
                f"consumer '{name}': identity '{consumer.identity}' is already the identity "
                f"of consumer '{other}'",
            )
    for rule_id, rule in bundle.rules.items():
        _check_rule(bundle, rule_id, rule, declared["rules"][rule_id], broken, problems)


def _check_rule(
    bundle: Bundle,
    rule_id: str,
    rule: Rule,
    entry: _Declared,
    broken: dict[str, set[str]],
    problems: _Collector,
) -> None:
    """Every pattern of the rule matches something, and what it grants exists."""
    for section, patterns in (("consumers", rule.consumers), ("datasets", rule.datasets)):
        names = {*getattr(bundle, section), *broken[section]}
        for i, pattern in enumerate(patterns):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                problems.add(
                    entry.at(section, i),
                    f"rule '{rule_id}': '{pattern}' matches no declared {_KINDS[section]}"
                    + did_you_mean(pattern, names),
                )
    # A rule that may refer to an invalid declaration is not judged on what it grants.
    if any(rule.applies_to_consumer(c) for c in broken["consumers"]) or any(
        rule.applies_to_dataset(d) for d in broken["datasets"]
    ):
        return
    consumers = [c for c in bundle.consumers if rule.applies_to_consumer(c)]
    datasets = {n: d for n, d in bundle.datasets.items() if rule.applies_to_dataset(n)}
    declared_columns = {c for d in datasets.values() for c in d.columns}
    for field in ("group_by", "filterable", "measurable"):
        for i, column in enumerate(getattr(rule, field)):
            if datasets and column not in declared_columns:
                problems.add(
                    entry.at(field, i),
                    f"rule '{rule_id}': no dataset it matches declares column '{column}'"
                    + did_you_mean(column, declared_columns),
                )
    for i, column in enumerate(rule.group_by):
        for name, dataset in datasets.items():
            if column in dataset.columns and dataset.columns[column].type != "category":
                problems.add(
                    entry.at("group_by", i),
                    f"rule '{rule_id}': cannot group by '{column}': its type in '{name}' is "
                    f"{dataset.columns[column].type}; only category columns (bound to a key "
                    "set) can be grouped by",
                )
                break
    for i, column in enumerate(rule.measurable):
        for name, dataset in datasets.items():
            declared = dataset.columns.get(column)
            if declared is not None and (
                declared.type not in ("int", "decimal") or not declared.bounds
            ):
                problems.add(
                    entry.at("measurable", i),
                    f"rule '{rule_id}': cannot aggregate '{column}': in '{name}' it is not a "
                    "numeric column with declared bounds",
                )
                break
    allowed = {p for c in consumers for p in bundle.consumers[c].purposes}
    for i, purpose in enumerate(rule.purposes):
        if consumers and purpose not in allowed:
            problems.add(
                entry.at("purposes", i),
                f"rule '{rule_id}': purpose '{purpose}' is allowed to none of its consumers "
                f"({', '.join(consumers)}), so the rule never applies to it"
                + did_you_mean(purpose, allowed),
            )
