"""The ring Z_2^64 on numpy ``uint64`` arrays, and ℓ-bit views of it.

numpy's uint64 arithmetic wraps modulo 2^64, which is exactly the ring the protocols need;
these helpers only validate inputs and move between signed integers and ring elements.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError

RING_BITS = 64
DTYPE = np.uint64
MAX_ELEMENTS = 1 << 28  # 2 GiB of words: a hard cap against absurd requests


def check_bits(bits: int, *, low: int = 2, high: int = RING_BITS) -> int:
    """Validate a bit length ℓ (an ``int`` in [low, high])."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise MpcValidationError(f"bit length must be an integer in [{low}, {high}], got {bits!r}")
    return bits


def low_mask(bits: int) -> np.uint64:
    """Mask keeping the low ``bits`` bits of a ring element."""
    check_bits(bits, low=1)
    return DTYPE((1 << bits) - 1) if bits < RING_BITS else DTYPE(0xFFFFFFFFFFFFFFFF)


def to_ring(values: Any, *, name: str = "values") -> np.ndarray:
    """Map integers (signed or unsigned, any shape) to ring elements (two's complement).

    Python ints must lie in [-2^63, 2^64); numpy integer arrays are reinterpreted bit-wise.
    Anything else (floats, objects, bools) is rejected: silent rounding would corrupt data.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.dtype == DTYPE:
            return values
        if values.dtype.kind == "i":
            return values.astype(np.int64).view(DTYPE)
        return values.astype(DTYPE)
    if isinstance(values, np.ndarray) and values.dtype.kind != "O":
        raise MpcValidationError(f"{name}: expected an integer array, got dtype {values.dtype}")
    try:
        arr = np.asarray(values, dtype=object)
    except Exception as exc:  # pragma: no cover - numpy rejects exotic inputs
        raise MpcValidationError(f"{name}: not an array of integers") from exc
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, dtype=DTYPE)
    for i, v in enumerate(flat):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise MpcValidationError(f"{name}: element {i} is not an integer ({type(v).__name__})")
        v = int(v)
        if not -(1 << 63) <= v < (1 << 64):
            raise MpcValidationError(f"{name}: element {i} = {v} is outside [-2^63, 2^64)")
        out[i] = v & 0xFFFFFFFFFFFFFFFF
    return out.reshape(arr.shape)


def to_signed(values: np.ndarray, bits: int = RING_BITS) -> np.ndarray:
    """Interpret the low ``bits`` bits of ring elements as signed integers (int64)."""
    check_bits(bits, low=1)
    v = np.asarray(values, dtype=DTYPE) & low_mask(bits)
    if bits == RING_BITS:
        return v.view(np.int64)
    sign = DTYPE(1 << (bits - 1))
    return (v ^ sign).view(np.int64) - np.int64(1 << (bits - 1))


def check_array(values: Any, *, name: str, ndim: int | None = None) -> np.ndarray:
    """Validate a ring array (uint64, bounded size, optional rank) and return it."""
    if not isinstance(values, np.ndarray) or values.dtype != DTYPE:
        got = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise MpcValidationError(f"{name}: expected a numpy uint64 array, got {got}")
    if ndim is not None and values.ndim != ndim:
        raise MpcValidationError(f"{name}: expected {ndim} dimensions, got shape {values.shape}")
    if values.size > MAX_ELEMENTS:
        raise MpcValidationError(f"{name}: {values.size} elements exceed the cap {MAX_ELEMENTS}")
    return values
