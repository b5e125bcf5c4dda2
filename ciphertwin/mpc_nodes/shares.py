"""Replicated secret shares as one party holds them, and a dealer for tests and devices.

Arithmetic: x = x0 + x1 + x2 (mod 2^64); party i holds (x_i, x_{i+1}) — ``own`` and ``nxt``.
Any two parties can reconstruct, any single party sees two uniformly random words.
Boolean: the same with XOR, stored bit-sliced: ``planes[k, w]`` packs bit k of elements
64w..64w+63, so an AND of whole bit positions is one numpy operation and bytes on the wire are
exactly one bit per secret bit.

Shares know nothing about the network: local operations live here, interactive ones in
:mod:`ciphertwin.mpc_nodes.protocols`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.ring import DTYPE, check_array, to_ring

PARTIES = 3


def random_words(shape: tuple[int, ...] | int) -> np.ndarray:
    """Uniform ring elements from the OS CSPRNG (never numpy's generators)."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(os.urandom(8 * count), dtype=DTYPE).reshape(shape).copy()


def check_party(index: int) -> int:
    """Validate a party index (0, 1 or 2)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PARTIES:
        raise MpcValidationError(f"party index must be 0, 1 or 2, got {index!r}")
    return index


@dataclass(frozen=True, slots=True)
class ArithShare:
    """Party ``party``'s replicated share (x_party, x_party+1) of an array over Z_2^64."""

    party: int
    own: np.ndarray
    nxt: np.ndarray

    def __post_init__(self) -> None:
        check_party(self.party)
        check_array(self.own, name="share.own")
        check_array(self.nxt, name="share.nxt")
        if self.own.shape != self.nxt.shape:
            raise MpcValidationError(
                f"share halves differ in shape: {self.own.shape} vs {self.nxt.shape}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.own.shape

    def _like(self, own: np.ndarray, nxt: np.ndarray) -> ArithShare:
        return ArithShare(self.party, own, nxt)

    def _check_peer(self, other: ArithShare) -> None:
        if not isinstance(other, ArithShare) or other.party != self.party:
            raise MpcValidationError("can only combine shares held by the same party")

    def __add__(self, other: ArithShare) -> ArithShare:
        self._check_peer(other)
        return self._like(self.own + other.own, self.nxt + other.nxt)

    def __sub__(self, other: ArithShare) -> ArithShare:
        self._check_peer(other)
        return self._like(self.own - other.own, self.nxt - other.nxt)

    def __neg__(self) -> ArithShare:
        return self._like(-self.own, -self.nxt)

    def scale(self, c: Any) -> ArithShare:
        """Multiply by a public integer (or broadcastable integer array): local."""
        k = to_ring(c, name="scalar")
        return self._like(self.own * k, self.nxt * k)

    def add_public(self, c: Any) -> ArithShare:
        """Add a public constant: it goes into x_0, which parties 0 (own) and 2 (nxt) hold."""
        k = to_ring(c, name="constant")
        own = self.own + k if self.party == 0 else self.own + DTYPE(0) * k
        nxt = self.nxt + k if self.party == 2 else self.nxt + DTYPE(0) * k
        return self._like(own, nxt)

    def sum(self, axis: int | None = None) -> ArithShare:
        """Sum along an axis (or all): local, since sharing is linear."""
        own = np.asarray(self.own.sum(axis=axis, dtype=DTYPE))
        nxt = np.asarray(self.nxt.sum(axis=axis, dtype=DTYPE))
        return self._like(own, nxt)

    def reshape(self, *shape: int) -> ArithShare:
        return self._like(self.own.reshape(*shape), self.nxt.reshape(*shape))

    def __getitem__(self, key: Any) -> ArithShare:
        return self._like(np.asarray(self.own[key]), np.asarray(self.nxt[key]))


@dataclass(frozen=True, slots=True)
class BoolShare:
    """Party ``party``'s replicated XOR share of ``count`` elements, ``planes.shape[0]`` bits each.

    ``own``/``nxt`` have shape (bits, words) with words = ceil(count / 64); bits of padding
    elements are meaningless.
    """

    party: int
    own: np.ndarray
    nxt: np.ndarray
    count: int

    def __post_init__(self) -> None:
        check_party(self.party)
        check_array(self.own, name="bool share.own", ndim=2)
        check_array(self.nxt, name="bool share.nxt", ndim=2)
        if self.own.shape != self.nxt.shape or self.own.shape[1] != words_for(self.count):
            raise MpcValidationError(
                f"bool share shapes {self.own.shape}/{self.nxt.shape} do not fit {self.count}"
            )

    @property
    def bits(self) -> int:
        return self.own.shape[0]

    def __xor__(self, other: BoolShare) -> BoolShare:
        if not isinstance(other, BoolShare) or other.party != self.party:
            raise MpcValidationError("can only combine shares held by the same party")
        return BoolShare(self.party, self.own ^ other.own, self.nxt ^ other.nxt, self.count)

    def invert(self) -> BoolShare:
        """XOR with public all-ones: flips share 0 (party 0's own, party 2's nxt)."""
        ones = DTYPE(0xFFFFFFFFFFFFFFFF)
        own = self.own ^ ones if self.party == 0 else self.own
        nxt = self.nxt ^ ones if self.party == 2 else self.nxt
        return BoolShare(self.party, own, nxt, self.count)

    def plane(self, k: int) -> BoolShare:
        """Bit position ``k`` only."""
        return BoolShare(self.party, self.own[k : k + 1], self.nxt[k : k + 1], self.count)


def words_for(count: int) -> int:
    """Words needed to hold ``count`` bits."""
    return (count + 63) // 64


def split_additive(values: Any) -> list[np.ndarray]:
    """Three additive shares of ``values`` (what a device uploads; share i goes to node i)."""
    x = to_ring(values)
    s0, s1 = random_words(x.shape), random_words(x.shape)
    return [s0, s1, x - s0 - s1]


def split_replicated(values: Any) -> list[ArithShare]:
    """Replicated shares of ``values`` for parties 0, 1, 2 (trusted dealer: tests only)."""
    parts = split_additive(values)
    return [ArithShare(i, parts[i], parts[(i + 1) % PARTIES]) for i in range(PARTIES)]


def reconstruct(shares: list[ArithShare]) -> np.ndarray:
    """Open an arithmetic sharing from all three parties, checking replicas agree."""
    if len(shares) != PARTIES or [s.party for s in shares] != [0, 1, 2]:
        raise MpcValidationError("reconstruct needs the shares of parties 0, 1, 2 in order")
    for i, s in enumerate(shares):
        if not np.array_equal(s.nxt, shares[(i + 1) % PARTIES].own):
            raise MpcValidationError(f"replicas of x_{(i + 1) % PARTIES} disagree")
    return shares[0].own + shares[1].own + shares[2].own


def reconstruct_bool(shares: list[BoolShare]) -> np.ndarray:
    """Open a boolean sharing: planes (bits, words) of the XOR of all three shares."""
    if len(shares) != PARTIES or [s.party for s in shares] != [0, 1, 2]:
        raise MpcValidationError("reconstruct_bool needs the shares of parties 0, 1, 2 in order")
    for i, s in enumerate(shares):
        if not np.array_equal(s.nxt, shares[(i + 1) % PARTIES].own):
            raise MpcValidationError(f"boolean replicas of share {(i + 1) % PARTIES} disagree")
    return shares[0].own ^ shares[1].own ^ shares[2].own
