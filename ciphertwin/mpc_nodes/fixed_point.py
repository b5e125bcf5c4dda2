"""Fixed-point encoding of reals as ring elements (two's complement, ``frac_bits`` fraction bits).

Devices encode measurements (coordinates, temperatures) before splitting them into shares;
the receiver decodes the reconstructed output. Encoding rejects non-finite values and values
that would not fit, instead of wrapping silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.ring import DTYPE, check_bits, to_signed


def encode_fixed(values: Any, frac_bits: int, *, int_bits: int = 62) -> np.ndarray:
    """Round ``values`` to multiples of 2^-frac_bits and map them into Z_2^64.

    ``int_bits`` bounds the magnitude (|v| < 2^int_bits after scaling) so callers can
    guarantee the headroom a later comparison needs.
    """
    check_bits(frac_bits, low=0, high=62)
    check_bits(int_bits, low=1, high=63)
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise MpcValidationError("fixed-point encoding: values must be finite")
    scaled = np.rint(arr * float(1 << frac_bits))
    if np.any(np.abs(scaled) >= float(1 << int_bits)):
        raise MpcValidationError(
            f"fixed-point encoding: a value exceeds 2^{int_bits} after scaling by 2^{frac_bits}"
        )
    return scaled.astype(np.int64).view(DTYPE)


def decode_fixed(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """Inverse of :func:`encode_fixed` (float64; exact for |v| < 2^53)."""
    check_bits(frac_bits, low=0, high=62)
    return to_signed(np.asarray(values, dtype=DTYPE)).astype(np.float64) / float(1 << frac_bits)


def bits_needed(max_abs: int) -> int:
    """Bits of a two's-complement integer holding every value in [-max_abs, max_abs]."""
    if max_abs < 0:
        raise MpcValidationError("bits_needed: max_abs must be non-negative")
    return int(max_abs).bit_length() + 1
