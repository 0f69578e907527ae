"""Hostile or accidental bad input: every such bundle is refused whole, with a clear problem.

Huge files are refused from their size before they are read (memory traced during the load
stays far below the file's size), aliases before anything is expanded, deep nesting before the
parser recurses. No test measures time; each asserts the problem reported and, where memory is
the danger, the peak memory the load allocated (``tracemalloc``, deterministic for one input).
"""

from __future__ import annotations

import shutil
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.errors import PolicyInvalid
from gateway.policy import _files, _yaml, loader
from gateway.policy.loader import MAX_FILE_BYTES, bundle_version, load_bundle

MiB = 1 << 20
BROKEN = Path(__file__).resolve().parent / "broken"
# A valid bundle of one file (a golden case with its one mistake fixed by the test that needs it).
VALID_POLICY = (BROKEN / "permit-without-budget" / "policy.yaml").read_text(
    encoding="utf-8"
) + '    budget: {epsilon: "1"}\n'


def problems(root: Path) -> list[str]:
    with pytest.raises(PolicyInvalid) as info:
        load_bundle(root)
    return [str(p) for p in info.value.problems]


@contextmanager
def peak_memory() -> Iterator[Callable[[], int]]:
    """The peak of memory allocated by Python inside the block, in bytes."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "policy.yaml").write_text(VALID_POLICY, encoding="utf-8")
    assert load_bundle(root).rules  # valid until a test breaks it
    return root


def never_parse(file: str, data: bytes, report: _yaml.Report) -> None:
    raise AssertionError(f"{file} was parsed although the bundle is over a size limit")


# --- sizes -----------------------------------------------------------------------------------------


def test_a_10_mb_policy_file_is_refused_before_it_is_read(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (bundle / "huge.yaml").open("wb") as handle:
        handle.truncate(10 * MiB)  # sparse: ten megabytes of NUL bytes on no disk space
    monkeypatch.setattr(loader, "parse_policy_yaml", never_parse)
    with peak_memory() as peak:
        reported = problems(bundle)
        assert peak() < MiB  # the file was never read, let alone parsed
    assert reported == [
        "huge.yaml:1:1: the file is 10.0 MiB, over the limit of 1.0 MiB per file",
        "the policy files total 10.0 MiB, over the limit of 1.0 MiB for all policy files together",
    ]


def test_a_file_of_exactly_the_limit_is_accepted(bundle: Path) -> None:
    (bundle / "keysets").mkdir()
    rows = (MAX_FILE_BYTES - 4) // 9 - 1  # "key\n", then keys of nine bytes and a longer last one
    last = MAX_FILE_BYTES - 4 - 9 * rows
    text = "key\n" + "".join(f"k{i:07d}\n" for i in range(rows)) + "z" * (last - 1) + "\n"
    (bundle / "keysets" / "big.csv").write_text(text, encoding="utf-8")
    assert (bundle / "keysets" / "big.csv").stat().st_size == MAX_FILE_BYTES
    (bundle / "more.yaml").write_text("key_sets:\n  big: {file: keysets/big.csv}\n")
    assert len(load_bundle(bundle).key_sets["big"]) == rows + 1


def test_the_bundle_as_a_whole_has_a_size_limit(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (bundle / "keysets").mkdir()
    for i in range(3):
        (bundle / "keysets" / f"part{i}.csv").write_bytes(b"key\n" + b"x\n" * 300_000)
    monkeypatch.setattr(_files, "MAX_BUNDLE_BYTES", 1 * MiB)
    monkeypatch.setattr(loader, "parse_policy_yaml", never_parse)
    assert problems(bundle) == ["the bundle's files total 1.7 MiB, over the limit of 1.0 MiB"]


def test_the_policy_files_together_have_a_size_limit(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(2):
        (bundle / f"notes{i}.yaml").write_text("# " + "x" * 600_000 + "\n", encoding="utf-8")
    monkeypatch.setattr(loader, "parse_policy_yaml", never_parse)
    assert problems(bundle) == [
        "the policy files total 1.1 MiB, over the limit of 1.0 MiB for all policy files together"
    ]


# --- YAML that expands or nests --------------------------------------------------------------------


def laughs(levels: int) -> str:
    """'Billion laughs': each level is a list of ten aliases of the level before."""
    lines = ["key_sets:", "  lol:", "    values: &l0 [lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels + 1):
        aliases = ", ".join([f"*l{level - 1}"] * 10)
        lines += [f"  lol{level}:", f"    values: &l{level} [{aliases}]"]
    return "\n".join(lines) + "\n"


def test_aliases_are_refused_before_anything_is_expanded(bundle: Path) -> None:
    # Ten to the sixth lists of eight strings if the aliases were expanded.
    (bundle / "laughs.yaml").write_text(laughs(6), encoding="utf-8")
    with peak_memory() as peak:
        reported = problems(bundle)
        assert peak() < 2 * MiB
    assert reported == [
        "laughs.yaml:3:13: YAML: anchors and aliases ('&name', '*name') are not allowed in "
        "policy files; write the value out"
    ]


def test_an_alias_without_its_anchor_is_refused_at_the_alias(bundle: Path) -> None:
    (bundle / "alias.yaml").write_text("key_sets:\n  lol: {values: *l0}\n", encoding="utf-8")
    assert problems(bundle) == [
        "alias.yaml:2:17: YAML: anchors and aliases ('&name', '*name') are not allowed in "
        "policy files; write the value out"
    ]


@pytest.mark.parametrize(
    ("shape", "text", "position"),
    [
        ("flow lists", "[" * 10_000 + "]" * 10_000, "1:33"),
        ("flow mappings", "{a: " * 10_000 + "1" + "}" * 10_000, "1:126"),
        ("block lists", "- " * 10_000 + "x", "1:65"),
        # A thousand levels of block mappings; ten thousand would be over the size limit.
        (
            "block mappings",
            "".join(" " * i + "a:\n" for i in range(1_000)) + " " * 1_000 + "x",
            "32:32",
        ),
    ],
)
def test_deep_nesting_is_refused_with_a_message_not_a_recursion_error(
    bundle: Path, shape: str, text: str, position: str
) -> None:
    (bundle / "deep.yaml").write_text(text + "\n", encoding="utf-8")
    assert problems(bundle) == [
        f"deep.yaml:{position}: YAML: nested deeper than 32 levels; a policy file needs far fewer"
    ]


def test_nesting_up_to_the_limit_is_accepted(bundle: Path) -> None:
    # The document, its section, the key set, 'values', then lists down to level 32.
    depth = _yaml.MAX_DEPTH - 4
    text = "key_sets:\n  deep:\n    values: " + "[" * depth + "x" + "]" * depth + "\n"
    (bundle / "deep.yaml").write_text(text, encoding="utf-8")
    reported = problems(bundle)  # accepted by the parser, refused by the model: keys are text
    assert all("nested deeper" not in p for p in reported)
    assert reported[0].startswith("deep.yaml:3:14: key set 'deep'.values[0]: expected text")


# --- encodings and empty bundles -------------------------------------------------------------------


def test_a_utf16_file_is_refused_at_its_first_byte(bundle: Path) -> None:
    (bundle / "wide.yaml").write_text("consumers: {}\n", encoding="utf-16")
    assert problems(bundle) == [
        "wide.yaml:1:1: not UTF-8 text: byte 0xff cannot be decoded; save the file as UTF-8"
    ]


def test_a_utf8_byte_order_mark_is_accepted(bundle: Path) -> None:
    text = (bundle / "policy.yaml").read_text(encoding="utf-8")
    (bundle / "policy.yaml").write_text("\ufeff" + text, encoding="utf-8")
    assert sorted(load_bundle(bundle).rules) == ["care-planning"]


def test_an_empty_folder_is_not_a_bundle(tmp_path: Path) -> None:
    assert problems(tmp_path) == ["the bundle folder has no policy files (*.yaml or *.yml)"]


def test_an_oversized_csv_field_is_reported_at_its_line(bundle: Path) -> None:
    (bundle / "keysets").mkdir()
    (bundle / "keysets" / "long.csv").write_text("key\nok\n" + "x" * 200_000 + "\n")
    (bundle / "more.yaml").write_text("key_sets:\n  long: {file: keysets/long.csv}\n")
    assert problems(bundle) == [
        "keysets/long.csv:3:1: key set 'long': CSV: field larger than field limit (131072)"
    ]


# --- what the version covers -----------------------------------------------------------------------


def test_hidden_folders_are_not_part_of_the_bundle(bundle: Path) -> None:
    before = load_bundle(bundle).version
    (bundle / ".git" / "objects").mkdir(parents=True)
    (bundle / ".git" / "objects" / "ab").write_bytes(b"\x00" * 2 * MAX_FILE_BYTES)
    (bundle / ".git" / "HEAD.yaml").write_text("not: [a policy\n", encoding="utf-8")
    assert load_bundle(bundle).version == before == bundle_version(bundle)


def test_a_hidden_policy_file_is_neither_loaded_nor_hashed(bundle: Path) -> None:
    """A file outside the signed manifest must not be able to change the policy."""
    before = load_bundle(bundle)
    (bundle / ".extra.yaml").write_text(
        "consumers:\n  intruder:\n    identity: spiffe://x\n    purposes: [care-planning]\n",
        encoding="utf-8",
    )
    after = load_bundle(bundle)
    assert "intruder" not in after.consumers
    assert after.version == before.version


def test_the_version_hashes_the_bytes_that_were_parsed(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    assert load_bundle(copy).version == bundle_version(copy) == bundle_version(bundle)
