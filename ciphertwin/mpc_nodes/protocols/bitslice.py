"""Bit-slicing: n ring elements ↔ ℓ bit planes of ceil(n / 64) words.

Plane k, word w, bit j holds bit k of element 64·w + j. Boolean circuits then process one
bit position of all elements per numpy operation, and payloads carry one bit per secret bit.

The conversion is a 64×64 bit-matrix transpose per block of 64 elements, done for all blocks
at once by the classic six-step swap network (swap 32-bit halves, then 16, …, 1), i.e. a
few whole-array numpy operations instead of a per-bit unpack.
"""

from __future__ import annotations

import numpy as np

from ciphertwin.mpc_nodes.ring import DTYPE, check_bits
from ciphertwin.mpc_nodes.shares import words_for

_STEPS = tuple(
    (np.uint64(j), np.uint64(m))
    for j, m in (
        (32, 0x00000000FFFFFFFF),
        (16, 0x0000FFFF0000FFFF),
        (8, 0x00FF00FF00FF00FF),
        (4, 0x0F0F0F0F0F0F0F0F),
        (2, 0x3333333333333333),
        (1, 0x5555555555555555),
    )
)


_CHUNK = 2048
"""Blocks transposed together: 2048 × 512 bytes = 1 MiB stays in cache for all six steps."""


def transpose64(blocks: np.ndarray) -> np.ndarray:
    """Transpose each 64×64 bit matrix in ``blocks`` (shape (B, 64), rows = words), in place.

    Row r, bit c becomes row c, bit r. Returns ``blocks``. Works chunk by chunk with one
    preallocated scratch buffer: the six passes hit the cache, and nothing is allocated per step.
    """
    count = blocks.shape[0]
    scratch = np.empty(min(count, _CHUNK) * 32, dtype=DTYPE)
    for start in range(0, count, _CHUNK):
        chunk = blocks[start : start + _CHUNK]
        n = chunk.shape[0]
        for shift, mask in _STEPS:
            j = int(shift)
            view = chunk.reshape(n, 64 // (2 * j), 2, j)
            lo, hi = view[:, :, 0, :], view[:, :, 1, :]
            t = scratch[: n * 32].reshape(n, 64 // (2 * j), j)
            np.right_shift(lo, shift, out=t)
            t ^= hi
            t &= mask
            hi ^= t
            t <<= shift
            lo ^= t
    return blocks


def bitslice(values: np.ndarray, bits: int, plus: np.ndarray | None = None) -> np.ndarray:
    """Low ``bits`` bits of each element of ``values`` (+ ``plus``) as planes (bits, words).

    Bits above ``bits`` never reach the result, so callers need not mask; the optional sum is
    written straight into the transpose buffer (one pass instead of add, mask, copy).
    """
    check_bits(bits, low=1)
    flat = np.asarray(values, dtype=DTYPE).reshape(-1)
    words = words_for(flat.size)
    blocks = np.empty((words, 64), dtype=DTYPE)
    dest = blocks.reshape(-1)
    if plus is None:
        dest[: flat.size] = flat
    else:
        np.add(flat, np.asarray(plus, dtype=DTYPE).reshape(-1), out=dest[: flat.size])
    dest[flat.size :] = 0
    return np.ascontiguousarray(transpose64(blocks)[:, :bits].T)


def unslice_bit(plane: np.ndarray, count: int) -> np.ndarray:
    """One plane (words,) → ``count`` ring elements equal to 0 or 1."""
    raw = np.ascontiguousarray(plane, dtype=DTYPE).reshape(-1).view(np.uint8)
    return np.unpackbits(raw, bitorder="little", count=count).astype(DTYPE)


def unslice(planes: np.ndarray, count: int) -> np.ndarray:
    """Planes (bits, words) → ``count`` ring elements (inverse of :func:`bitslice`)."""
    bits, words = planes.shape
    blocks = np.zeros((words, 64), dtype=DTYPE)
    blocks[:, :bits] = planes.T
    return transpose64(blocks).reshape(-1)[:count].copy()
