"""RFC 6962 / 9162 Merkle trees: every conformance vector, and proofs against a naive tree."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MerkleTree,
    MissingLeaves,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# A copy of the workspace's shared/testdata/rfc9162 (transparency-dev/merkle vectors, Apache-2.0,
# see its README), kept in the repository so a clone anywhere runs the whole suite.
VECTORS = Path(__file__).resolve().parent / "testdata" / "rfc9162"
CASES = sorted(VECTORS.rglob("*.json"))


def test_the_vector_suite_is_there() -> None:
    # Guards against running zero cases: the suite has inclusion and consistency cases and both
    # outcomes.
    kinds = {case.relative_to(VECTORS).parts[0] for case in CASES}
    assert kinds == {"inclusion", "consistency"} and len(CASES) >= 190
    outcomes = {json.loads(case.read_text())["wantErr"] for case in CASES}
    assert outcomes == {True, False}


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


@pytest.mark.parametrize("case", CASES, ids=lambda p: str(p.relative_to(VECTORS)))
def test_rfc9162_vector(case: Path) -> None:
    data = json.loads(case.read_text())
    proof = [_b64(p) for p in data["proof"] or []]
    if "leafIdx" in data:
        run = lambda: verify_inclusion(  # noqa: E731
            data["leafIdx"], data["treeSize"], _b64(data["leafHash"]), proof, _b64(data["root"])
        )
    else:
        run = lambda: verify_consistency(  # noqa: E731
            data["size1"], data["size2"], _b64(data["root1"]), _b64(data["root2"]), proof
        )
    if data["wantErr"]:
        with pytest.raises(ProofError):
            run()
    else:
        run()  # raises ProofError if the verifier wrongly refuses


def _naive_root(leaves: list[bytes]) -> bytes:
    """MTH as RFC 6962 section 2.1 defines it, recursively."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(_naive_root(leaves[:k]), _naive_root(leaves[k:]))


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_rfc6962_reference_root() -> None:
    # The root of the 8 test leaves of RFC 6962 (as used by certificate-transparency-go).
    data = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43"]
    data += [
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    tree = MerkleTree()
    tree.extend(leaf_hash(d) for d in data)
    assert tree.root().hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=70), st.data())
def test_generated_proofs_verify_and_match_the_naive_tree(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size)
    tree = MerkleTree()
    tree.extend(leaves)
    frontier = Frontier(0)
    for leaf in leaves:
        frontier = frontier.append(leaf)
    assert tree.root() == frontier.root() == _naive_root(leaves)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = tree.inclusion_proof(index, size)
    verify_inclusion(index, size, leaves[index], proof, tree.root())
    old = data.draw(st.integers(min_value=1, max_value=size))
    assert tree.root(old) == _naive_root(leaves[:old])
    verify_consistency(old, size, tree.root(old), tree.root(), tree.consistency_proof(old, size))
    # A proof never holds for another leaf or for a root that differs in one bit.
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaf_hash(b"other"), proof, tree.root())
    flipped = bytes([tree.root()[0] ^ 1]) + tree.root()[1:]
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaves[index], proof, flipped)
    if old < size:
        with pytest.raises(ProofError):
            verify_consistency(
                old, size, tree.root(old), flipped, tree.consistency_proof(old, size)
            )


@pytest.mark.parametrize("start", [1, 3, 4, 5, 13, 32, 33])
def test_a_tree_started_from_a_frontier_proves_everything_after_it(start: int) -> None:
    # What archiving relies on: the segment's frontier replaces every leaf before it.
    leaves = _leaves(70)
    frontier = Frontier(0)
    for leaf in leaves[:start]:
        frontier = frontier.append(leaf)
    tree = MerkleTree(frontier)
    tree.extend(leaves[start:])
    for size in range(start, 71):
        root = _naive_root(leaves[:size])
        assert tree.root(size) == root
        for index in range(start, size):
            verify_inclusion(index, size, leaves[index], tree.inclusion_proof(index, size), root)
        for old in range(start, size + 1):
            proof = tree.consistency_proof(old, size)
            verify_consistency(old, size, _naive_root(leaves[:old]), root, proof)
    if start > 1:
        with pytest.raises(MissingLeaves):
            tree.inclusion_proof(0, 70)


def test_frontier_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="hashes"):
        Frontier(3, (EMPTY_ROOT,))
    with pytest.raises(ValueError, match="32 bytes"):
        Frontier(1, (b"short",))
