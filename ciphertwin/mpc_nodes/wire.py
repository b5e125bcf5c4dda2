"""Ring arrays ↔ payload bytes, keeping only the low ℓ bits that a protocol still needs.

When a computation only matters modulo 2^ℓ (a comparison reads the low ℓ bits), sending the
top 64 - ℓ bits would be waste; ``pack_words`` keeps ceil(ℓ / 8) little-endian bytes per word.
The receiver knows the shape from the program, so payloads carry no metadata and any length
mismatch is a protocol error, not something to guess around.
"""

from __future__ import annotations

import numpy as np

from ciphertwin.mpc_nodes.errors import ProtocolError
from ciphertwin.mpc_nodes.ring import DTYPE, check_bits


def bytes_per_word(bits: int) -> int:
    """Bytes kept per word for an ℓ-bit payload."""
    return (check_bits(bits, low=1) + 7) // 8


def _unit(nb: int) -> np.dtype:
    """Widest integer type whose size divides ``nb``: strided copies of wider items are faster."""
    return np.dtype(np.uint32 if nb % 4 == 0 else np.uint16 if nb % 2 == 0 else np.uint8)


def pack_words(values: np.ndarray, bits: int = 64) -> bytes:
    """Little-endian low ceil(ℓ/8) bytes of every word, concatenated."""
    nb = bytes_per_word(bits)
    flat = np.ascontiguousarray(values, dtype=DTYPE).reshape(-1)
    if nb == 8:
        return flat.tobytes()
    unit = _unit(nb)
    return flat.view(unit).reshape(-1, 8 // unit.itemsize)[:, : nb // unit.itemsize].tobytes()


def unpack_words(payload: bytes, shape: tuple[int, ...], bits: int = 64) -> np.ndarray:
    """Inverse of :func:`pack_words`; upper bits of each word are zero."""
    nb = bytes_per_word(bits)
    count = int(np.prod(shape, dtype=np.int64))
    if len(payload) != count * nb:
        raise ProtocolError(
            f"payload has {len(payload)} bytes, expected {count * nb} ({count} words × {nb})"
        )
    if nb == 8:
        return np.frombuffer(payload, dtype=DTYPE).reshape(shape).copy()
    unit = _unit(nb)
    out = np.zeros((count, 8 // unit.itemsize), dtype=unit)
    out[:, : nb // unit.itemsize] = np.frombuffer(payload, dtype=unit).reshape(count, nb // unit.itemsize)
    return out.view(DTYPE).reshape(shape)
