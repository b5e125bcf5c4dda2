"""Additive secret sharing over Z_2^64 and fixed-point encoding (pure Python, no numpy).

This runs on devices (a Raspberry Pi) before upload: each value x becomes n shares with
x = x_0 + … + x_{n-1} mod 2^64; any n-1 shares are uniformly random and reveal nothing.
Randomness comes from os.urandom in one call per split.
"""

from __future__ import annotations

import math
import os
import sys
from array import array
from collections.abc import Sequence

from ciphertwin.errors import ValidationError

__all__ = ["RING_BITS", "encode_fixed", "decode_fixed", "split_additive", "combine_additive"]

RING_BITS = 64
_MASK = (1 << RING_BITS) - 1
_MAX_VALUES = 1 << 20


def encode_fixed(x: float, frac_bits: int) -> int:
    """round(x · 2^frac_bits) as an element of Z_2^64 (two's complement for negatives)."""
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits < 63:
        raise ValidationError("frac_bits must be an integer in [0, 62]")
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValidationError(f"value must be a finite number, got {x!r}")
    scaled = round(x * (1 << frac_bits))
    if not -(1 << 63) <= scaled < (1 << 63):
        raise ValidationError(f"{x} does not fit in 64-bit fixed point with {frac_bits} bits")
    return scaled & _MASK


def decode_fixed(v: int, frac_bits: int) -> float:
    """Inverse of ``encode_fixed`` (signed interpretation)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MASK:
        raise ValidationError("ring element must be an integer in [0, 2^64)")
    signed = v - (1 << RING_BITS) if v >> 63 else v
    return signed / (1 << frac_bits)


def _ring_values(values: Sequence[int]) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValidationError("values must be a sequence of integers")
    if len(values) > _MAX_VALUES:
        raise ValidationError(f"more than {_MAX_VALUES} values in one split")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValidationError(f"ring values must be integers, got {type(v).__name__}")
        if not -(1 << 63) <= v <= _MASK:
            raise ValidationError(f"{v} is outside the 64-bit ring")
        out.append(v & _MASK)
    return out


def _random_words(count: int) -> array:
    words = array("Q", os.urandom(8 * count))
    if sys.byteorder != "little":
        words.byteswap()  # keep bytes → integers identical on every platform
    return words


def split_additive(values: Sequence[int], n: int = 3) -> list[list[int]]:
    """n additive shares of each value: ``result[i][k]`` is share i of ``values[k]``."""
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 16:
        raise ValidationError("number of shares must be in [2, 16]")
    ring = _ring_values(values)
    m = len(ring)
    words = _random_words(m * (n - 1))
    shares = [words[i * m:(i + 1) * m].tolist() for i in range(n - 1)]
    last = [(v - sum(col)) & _MASK for v, col in zip(ring, zip(*shares), strict=True)] if m else []
    shares.append(last)
    return shares


def combine_additive(shares: Sequence[Sequence[int]]) -> list[int]:
    """Σ_i shares[i][k] mod 2^64 for every k."""
    if isinstance(shares, (str, bytes)) or not isinstance(shares, Sequence) or len(shares) < 2:
        raise ValidationError("need at least two share vectors")
    columns = [_ring_values(s) for s in shares]
    if len({len(c) for c in columns}) != 1:
        raise ValidationError("share vectors have different lengths")
    return [sum(col) & _MASK for col in zip(*columns, strict=True)]
