"""BLS12-381 pairing layer: the only module that touches ``pymcl``.

Everything the schemes need from the pairing group lives here so another backend could be
slotted in behind the same functions.  Every point read from bytes goes through a
``*_from_bytes`` function that checks length, canonical encoding, subgroup membership and
non-identity; points created in-process are trusted and never re-validated (that would cost a
scalar multiplication per point).

mcl (as initialised by pymcl) already refuses G1/G2 encodings that are off the curve or
outside the order-r subgroup; GT elements, however, are accepted for any Fp12 value, so
``gt_from_bytes`` adds an explicit x^r = 1 test (see ``_in_gt``).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import pymcl

from pymcl import G1, G2, GT, Fr, pairing
from pymcl import g1 as _g1
from pymcl import g2 as _g2
from pymcl import r as _r

from ciphertwin.errors import ValidationError

__all__ = [
    "G1",
    "G2",
    "GT",
    "Fr",
    "G1_BYTES",
    "G2_BYTES",
    "GT_BYTES",
    "ORDER",
    "SCALAR_BYTES",
    "Z",
    "g1",
    "g2",
    "pair",
    "pair_product",
    "MULTI_PAIRING",
    "hash_to_g2",
    "random_scalar",
    "scalar",
    "scalar_to_int",
    "scalar_to_bytes",
    "scalar_from_bytes",
    "g1_to_bytes",
    "g1_from_bytes",
    "g2_to_bytes",
    "g2_from_bytes",
    "gt_to_bytes",
    "gt_from_bytes",
]

ORDER: int = _r
"""r, the prime order of G1, G2 and GT (255 bits)."""

G1_BYTES, G2_BYTES, GT_BYTES, SCALAR_BYTES = 48, 96, 576, 32

g1: G1 = _g1
g2: G2 = _g2
Z: GT = pairing(_g1, _g2)
"""Z = e(g1, g2), computed once: every encapsulation needs Z^s."""

ATTRIBUTE_HASH_TAG = b"ciphertwin/v1/attr\x00"
"""Domain-separation tag for H: {0,1}* -> G2 so attribute hashes collide with no other use."""

# The BLS parameter u (x in some papers): r = u^4 - u^2 + 1.  Used for the GT membership test.
_BLS_U_ABS = 0xD201000000010000


def pair(p: G1, q: G2) -> GT:
    """The optimal-ate pairing e(p, q)."""
    return pairing(p, q)


# --- multi-pairing ----------------------------------------------------------------------
#
# pymcl exposes only full pairings, but its extension module also exports mcl's C API.  A
# product of k pairings via mclBn_millerLoopVec + one mclBn_finalExp costs about
# 0.24·k + 0.4 ms instead of 0.70·k ms.  The C structs are reached through pybind11's instance
# layout (the value pointer follows the PyObject header); this is checked against pymcl's own
# pairing at import and silently replaced by the product of pairings if anything differs.
# Set CIPHERTWIN_NO_MULTIPAIRING=1 to force the fallback.

_G1_STRUCT, _G2_STRUCT = 3 * G1_BYTES, 3 * G2_BYTES  # Jacobian (x, y, z) in Fp / Fp2
_VALUE_PTR_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)  # after ob_refcnt, ob_type


def _struct_address(obj: object) -> int:
    return ctypes.c_void_p.from_address(id(obj) + _VALUE_PTR_OFFSET).value or 0


def _load_mcl() -> ctypes.CDLL | None:
    if os.environ.get("CIPHERTWIN_NO_MULTIPAIRING"):
        return None
    try:
        lib = ctypes.CDLL(pymcl._pymcl.__file__)
        if lib.mclBn_getOpUnitSize() != 6 or lib.mclBn_getG1ByteSize() != G1_BYTES:
            return None
        lib.mclBn_millerLoopVec.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_size_t]
        lib.mclBn_millerLoopVec.restype = None
        lib.mclBn_finalExp.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.mclBn_finalExp.restype = None
        return lib
    except (OSError, AttributeError):
        return None


_MCL = _load_mcl()


def _multi_pairing(pairs: Sequence[tuple[G1, G2]]) -> GT:
    assert _MCL is not None
    n = len(pairs)
    xs = ctypes.create_string_buffer(_G1_STRUCT * n)
    ys = ctypes.create_string_buffer(_G2_STRUCT * n)
    x0, y0 = ctypes.addressof(xs), ctypes.addressof(ys)
    for i, (p, q) in enumerate(pairs):
        if not (isinstance(p, G1) and isinstance(q, G2)):
            raise TypeError("pair_product needs (G1, G2) pairs")
        ctypes.memmove(x0 + i * _G1_STRUCT, _struct_address(p), _G1_STRUCT)
        ctypes.memmove(y0 + i * _G2_STRUCT, _struct_address(q), _G2_STRUCT)
    out = GT()
    target = _struct_address(out)
    _MCL.mclBn_millerLoopVec(target, x0, y0, n)
    _MCL.mclBn_finalExp(target, target)
    return out


def _product_of_pairings(pairs: Sequence[tuple[G1, G2]]) -> GT:
    out = GT()
    for p, q in pairs:
        out = out * pairing(p, q)
    return out


def _multi_pairing_works() -> bool:
    if _MCL is None:
        return False
    try:
        for k in (1, 2, 3, 5):
            pairs = [(_g1 * random_scalar(), _g2 * random_scalar()) for _ in range(k)]
            pairs.append((G1.deserialize((_g1 * random_scalar()).serialize()), _g2))
            if _multi_pairing(pairs) != _product_of_pairings(pairs):
                return False
        return True
    except Exception:  # any surprise in the foreign layout means: do not use it
        return False


def pair_product(pairs: Sequence[tuple[G1, G2]]) -> GT:
    """Π e(p_i, q_i) with one shared final exponentiation when available."""
    if not pairs:
        return GT()
    if MULTI_PAIRING:
        return _multi_pairing(pairs)
    return _product_of_pairings(pairs)


@lru_cache(maxsize=8192)
def hash_to_g2(attribute: str) -> G2:
    """H(w): an attribute string hashed to G2 under a domain tag (cached: 0.2 ms each)."""
    return G2.hash(ATTRIBUTE_HASH_TAG + attribute.encode("utf-8"))


# --- scalars -----------------------------------------------------------------------------


def scalar(n: int) -> Fr:
    """n mod r as an Fr (``Fr(int)`` only takes 64-bit values, so go through decimal text)."""
    return Fr(str(n % ORDER), 10)


def random_scalar() -> Fr:
    """A uniform non-zero scalar from os.urandom (512 bits reduced mod r: bias < 2^-256)."""
    while True:
        n = int.from_bytes(os.urandom(64), "big") % ORDER
        if n:
            return scalar(n)


def random_scalar_int() -> int:
    """Like ``random_scalar`` but as a Python int (for LSSS arithmetic)."""
    while True:
        n = int.from_bytes(os.urandom(64), "big") % ORDER
        if n:
            return n


def scalar_to_int(x: Fr) -> int:
    return int(str(x))


def scalar_to_bytes(x: Fr) -> bytes:
    return scalar_to_int(x).to_bytes(SCALAR_BYTES, "big")


def scalar_from_bytes(data: bytes, what: str = "scalar") -> Fr:
    """Parse a 32-byte big-endian scalar; must be in [1, r)."""
    _check_len(data, SCALAR_BYTES, what)
    n = int.from_bytes(data, "big")
    if not 0 < n < ORDER:
        raise ValidationError(f"{what} is out of range (must be in [1, r))")
    return scalar(n)


# --- points ------------------------------------------------------------------------------


def _check_len(data: object, length: int, what: str) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise ValidationError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) != length:
        raise ValidationError(f"{what} must be {length} bytes, got {len(data)}")


def g1_to_bytes(p: G1) -> bytes:
    return p.serialize()


def g2_to_bytes(p: G2) -> bytes:
    return p.serialize()


def gt_to_bytes(x: GT) -> bytes:
    return x.serialize()


def _point_from_bytes(group: Any, name: str, size: int, data: bytes, what: str) -> Any:
    _check_len(data, size, what)
    try:
        p = group.deserialize(bytes(data))
    except (ValueError, RuntimeError) as exc:
        raise ValidationError(f"{what} is not a point of the BLS12-381 {name} subgroup") from exc
    if p.is_zero():
        raise ValidationError(f"{what} is the identity element")
    if p.serialize() != bytes(data):
        raise ValidationError(f"{what} is not canonically encoded")
    return p


def g1_from_bytes(data: bytes, what: str = "G1 point") -> G1:
    """Parse a compressed G1 point; rejects off-curve, non-subgroup, identity, non-canonical."""
    return _point_from_bytes(G1, "G1", G1_BYTES, data, what)


def g2_from_bytes(data: bytes, what: str = "G2 point") -> G2:
    """Parse a compressed G2 point; rejects off-curve, non-subgroup, identity, non-canonical."""
    return _point_from_bytes(G2, "G2", G2_BYTES, data, what)


def _pow_abs_u_python(x: GT) -> GT:
    """x^|u| by square-and-multiply with generic Fp12 products (the reference).

    ``GT.__pow__`` uses GLV (Frobenius) tricks that are only correct *inside* GT, so it
    cannot be used to test membership; plain multiplication is correct for any Fp12 value.
    """
    acc = x
    for bit in bin(_BLS_U_ABS)[3:]:
        acc = acc * acc
        if bit == "1":
            acc = acc * x
    return acc


_ABS_U = scalar(_BLS_U_ABS)


def _pow_abs_u_native(x: GT) -> GT:
    """x^|u| in one call of mcl's ``mclBnGT_powGeneric`` (plain square-and-multiply in C, no
    GLV: correct for any Fp12 value) — every receiver and node checks every re-capsule's T,
    and the Python loop above made that check 0.8 ms of a 1 ms decapsulation."""
    assert _MCL is not None
    out = GT()
    _MCL.mclBnGT_powGeneric(_struct_address(out), _struct_address(x), _struct_address(_ABS_U))
    return out


def _native_pow_works() -> bool:
    """Use the C exponentiation only if it equals the reference on elements inside *and*
    outside GT (a foreign-layout surprise, or a GLV shortcut, would show here)."""
    if _MCL is None or not hasattr(_MCL, "mclBnGT_powGeneric"):
        return False
    try:
        _MCL.mclBnGT_powGeneric.argtypes = [ctypes.c_void_p] * 3
        _MCL.mclBnGT_powGeneric.restype = None
        outside = GT(" ".join(str(3**i + i) for i in range(1, 13)), 10)  # not in GT
        inside = Z ** random_scalar()
        return all(_pow_abs_u_native(x) == _pow_abs_u_python(x) for x in (outside, inside, Z))
    except Exception:  # noqa: BLE001 - any surprise in the foreign layout: do not use it
        return False


_pow_abs_u = _pow_abs_u_native if _native_pow_works() else _pow_abs_u_python


def _in_gt(x: GT) -> bool:
    """x^r == 1, evaluated as x^(u^4) * x == x^(u^2) because r = u^4 - u^2 + 1."""
    u2 = _pow_abs_u(_pow_abs_u(x))
    u4 = _pow_abs_u(_pow_abs_u(u2))
    return u4 * x == u2


def gt_from_bytes(data: bytes, what: str = "GT element") -> GT:
    """Parse a GT element and check it lies in the order-r subgroup.

    Without the check a malicious proxy could send T·u with u of small order and use the
    receiver as an oracle on 1/b mod ord(u) (small-subgroup attack).
    """
    _check_len(data, GT_BYTES, what)
    try:
        x = GT.deserialize(bytes(data))
    except (ValueError, RuntimeError) as exc:
        raise ValidationError(f"{what} is not an Fp12 element") from exc
    if x.serialize() != bytes(data):
        raise ValidationError(f"{what} is not canonically encoded")
    if x.is_one() or x.is_zero():
        raise ValidationError(f"{what} is degenerate")
    if not _in_gt(x):
        raise ValidationError(f"{what} is not in the order-r subgroup GT")
    return x


MULTI_PAIRING: bool = _multi_pairing_works()
"""Whether ``pair_product`` uses mcl's Miller-loop vector (checked at import)."""
