"""RFC 6962 / RFC 9162 Merkle trees: hashes, compact state, proofs and their verification.

Leaf hash ``SHA-256(0x00 || data)``, interior node ``SHA-256(0x01 || left || right)``, the tree of
``n`` leaves split at the largest power of two below ``n`` (RFC 9162 section 2.1.1).

- :class:`Frontier` is the compact state of a log: the roots of the perfect subtrees that make up
  a tree of ``size`` leaves (one per set bit of ``size``), enough to append in O(log n) and to
  compute the root, and small enough to persist beside every segment.
- :class:`MerkleTree` keeps every perfect subtree hash of the leaves it was given (about two
  hashes per leaf) so that roots, inclusion proofs and consistency proofs for any size come in
  O(log n) lookups. It can start from a :class:`Frontier` when older leaves were archived.
- :func:`verify_inclusion` and :func:`verify_consistency` are the RFC 9162 verifiers (sections
  2.1.3.2 and 2.1.4.2).

The verifiers never return normally unless the proof holds: every failure, including malformed
input (wrong hash lengths, sizes out of range, proofs too long or too short), raises
:class:`ProofError`. Nothing here reads or writes files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not hold, or its input is malformed."""


class MissingLeaves(LookupError):
    """A hash depends on leaves the tree does not hold (they were archived before its start)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two strictly below ``size`` (``size`` >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


# -- compact state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Frontier:
    """The perfect-subtree roots of a tree of ``size`` leaves, largest (leftmost) first."""

    size: int
    hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 0 or len(self.hashes) != self.size.bit_count():
            raise ValueError(f"a frontier of size {self.size} has {self.size.bit_count()} hashes")
        if any(len(h) != HASH_SIZE for h in self.hashes):
            raise ValueError("frontier hashes are 32 bytes")

    def append(self, leaf: bytes) -> Frontier:
        """The frontier after one more leaf hash: O(log n) node hashes."""
        hashes = list(self.hashes)
        merged = leaf
        # Each trailing one bit of `size` is a perfect subtree that the new leaf completes.
        size = self.size
        while size & 1:
            merged = node_hash(hashes.pop(), merged)
            size >>= 1
        hashes.append(merged)
        return Frontier(self.size + 1, tuple(hashes))

    def root(self) -> bytes:
        """The RFC 6962 root: the subtree roots folded from the right."""
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            root = node_hash(left, root)
        return root

    def subtrees(self) -> list[tuple[int, int, bytes]]:
        """``(start, end, hash)`` of each perfect subtree, left to right."""
        ranges = []
        start = 0
        for level in reversed(range(self.size.bit_length())):
            if self.size >> level & 1:
                ranges.append((start, start + (1 << level)))
                start += 1 << level
        return [(a, b, h) for (a, b), h in zip(ranges, self.hashes, strict=True)]


class CompactAppender:
    """A mutable :class:`Frontier` for the writer's hot path (no tuple copy per leaf)."""

    def __init__(self, frontier: Frontier) -> None:
        self.size = frontier.size
        self._hashes = list(frontier.hashes)

    def append(self, leaf: bytes) -> None:
        merged = leaf
        size = self.size
        while size & 1:
            merged = node_hash(self._hashes.pop(), merged)
            size >>= 1
        self._hashes.append(merged)
        self.size += 1

    def frontier(self) -> Frontier:
        return Frontier(self.size, tuple(self._hashes))

    def root(self) -> bytes:
        return self.frontier().root()


# -- the full tree ---------------------------------------------------------------------------


class MerkleTree:
    """Every perfect subtree hash from leaf ``start`` on; roots and proofs for any size.

    ``levels[k]`` holds, back to back, the 32-byte hashes of the perfect subtrees of ``2**k``
    leaves numbered ``start >> k`` onwards (a subtree that straddles ``start`` is completed from
    the frontier). Subtrees wholly before ``start`` are known only when they are frontier nodes.
    """

    def __init__(self, start: Frontier | None = None) -> None:
        start = start or Frontier(0)
        self.start = start.size
        self._known = {(a, b): h for a, b, h in start.subtrees()}
        self._stack: list[tuple[int, bytes]] = [
            ((b - a).bit_length() - 1, h) for a, b, h in start.subtrees()
        ]
        self._levels: list[bytearray] = []
        self.size = start.size

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def append(self, leaf: bytes) -> None:
        self._store(0, leaf)
        level, merged = 0, leaf
        size = self.size
        while size & 1:
            _, left = self._stack.pop()
            merged = node_hash(left, merged)
            level += 1
            self._store(level, merged)
            size >>= 1
        self._stack.append((level, merged))
        self.size += 1

    def _store(self, level: int, digest: bytes) -> None:
        if level == len(self._levels):
            self._levels.append(bytearray())
        self._levels[level] += digest

    def _perfect(self, start: int, level: int) -> bytes:
        """The hash of the perfect subtree of ``2**level`` leaves beginning at leaf ``start``."""
        end = start + (1 << level)
        if end > self.size:
            raise MissingLeaves(f"leaves {start}..{end - 1} are beyond the tree size {self.size}")
        first = self.start >> level
        index = start >> level
        if index >= first and level < len(self._levels):
            offset = (index - first) * HASH_SIZE
            stored = self._levels[level]
            if offset + HASH_SIZE <= len(stored):
                return bytes(stored[offset : offset + HASH_SIZE])
        known = self._known.get((start, end))
        if known is None:
            raise MissingLeaves(f"leaves {start}..{end - 1} were archived")
        return known

    def subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range of the RFC 6962 decomposition (``start`` aligned)."""
        size = end - start
        if size <= 0:
            raise ValueError("an empty range has no subtree hash")
        if size & (size - 1) == 0:
            return self._perfect(start, size.bit_length() - 1)
        k = _split(size)
        return node_hash(self._perfect(start, k.bit_length() - 1), self.subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise MissingLeaves(f"the tree has {self.size} leaves, not {size}")
        return EMPTY_ROOT if size == 0 else self.subtree(0, size)

    def frontier(self, size: int | None = None) -> Frontier:
        """The compact state of the tree of ``size`` leaves (from ``start`` on, any size)."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise MissingLeaves(f"the tree has {self.size} leaves, not {size}")
        hashes, start = [], 0
        for level in reversed(range(size.bit_length())):
            if size >> level & 1:
                hashes.append(self._perfect(start, level))
                start += 1 << level
        return Frontier(size, tuple(hashes))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162 section 2.1.3.1, deepest hash first."""
        if not 0 <= index < size <= self.size:
            raise ValueError(f"no inclusion proof for leaf {index} in a tree of {size}")
        proof: list[bytes] = []
        start, end = 0, size
        # Walk down from the root, remembering each sibling; the proof lists them bottom-up.
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self.subtree(start + k, end))
                end = start + k
            else:
                proof.append(self.subtree(start, start + k))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """PROOF(size1, D[0:size2]) of RFC 9162 section 2.1.4.1."""
        if not 0 < size1 <= size2 <= self.size:
            raise ValueError(f"no consistency proof from size {size1} to {size2}")
        if size1 == size2:
            return []
        proof: list[bytes] = []
        start, end, whole = 0, size2, True
        m = size1
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                proof.append(self.subtree(start + k, end))
                end = start + k
            else:
                proof.append(self.subtree(start, start + k))
                start += k
                m -= k
                whole = False
        if not whole:
            proof.append(self.subtree(start, end))
        proof.reverse()
        return proof


# -- verification (RFC 9162 section 2.1.3.2 and 2.1.4.2) ------------------------------------


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} has {len(value)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` implies for ``leaf`` at ``leaf_index`` (ProofError if malformed)."""
    if not 0 <= leaf_index < tree_size:
        raise ProofError(f"leaf index {leaf_index} is not below the tree size {tree_size}")
    _check_hash("the leaf hash", leaf)
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for position, p in enumerate(proof):
        _check_hash(f"proof hash {position}", p)
        if sn == 0:
            raise ProofError(f"the proof has {len(proof)} hashes, more than the path is long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # The node is the last of its level: skip the levels where it has no sibling.
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"the proof has {len(proof)} hashes, fewer than the path is long")
    return r


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise :class:`ProofError` unless ``proof`` shows ``leaf_hash`` at ``leaf_index`` under ``root``."""
    computed = root_from_inclusion_proof(leaf_index, tree_size, leaf_hash, proof)
    if computed != root:
        raise ProofError("the inclusion proof leads to a different root")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Raise :class:`ProofError` unless ``proof`` shows the tree of ``size1`` is a prefix of ``size2``."""
    if size1 < 0 or size2 < 0:
        raise ProofError("tree sizes are not negative")
    if size1 > size2:
        raise ProofError(f"the first size {size1} is larger than the second {size2}")
    if size1 == 0:
        # Every tree extends the empty one: such a "proof" proves nothing and is refused.
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if size1 == size2:
        if proof:
            raise ProofError("equal sizes need an empty proof")
        if root1 != root2:
            raise ProofError("equal sizes with different roots")
        return
    if not proof:
        raise ProofError("the proof is empty")
    for position, p in enumerate(proof):
        _check_hash(f"proof hash {position}", p)
    path = list(proof)
    # A first tree whose size is a power of two is itself a node of the second: it starts the path.
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"the proof has {len(proof)} hashes, more than the path is long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"the proof has {len(proof)} hashes, fewer than the path is long")
    if fr != root1:
        raise ProofError("the consistency proof does not lead to the first root")
    if sr != root2:
        raise ProofError("the consistency proof does not lead to the second root")
