"""Arithmetic protocols: resharing, multiplication, inputs and outputs.

Multiplication (Araki et al.): with x = Σx_i, y = Σy_i and party i holding (x_i, x_{i+1}),
    z_i = x_i·y_i + x_i·y_{i+1} + x_{i+1}·y_i + α_i          (α a sharing of zero)
sums to x·y over the parties, so each party computes a 3-out-of-3 share locally, and one
"reshare" round — z_i sent to party i-1 — restores the replicated form. Sums of products
(an inner product, x² + y²) are computed locally first and reshared once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.ring import DTYPE, check_array, check_bits, low_mask, to_ring
from ciphertwin.mpc_nodes.shares import ArithShare


def product_terms(x: ArithShare, y: ArithShare) -> np.ndarray:
    """x_i·y_i + x_i·y_{i+1} + x_{i+1}·y_i: this party's part of x·y, not yet masked."""
    if x.party != y.party:
        raise MpcValidationError("cannot multiply shares of different parties")
    out = y.own + y.nxt
    out *= x.own
    out += x.nxt * y.own
    return out


def square_terms(x: ArithShare) -> np.ndarray:
    """Party's part of x², one multiplication cheaper than :func:`product_terms`."""
    out = x.own + x.nxt
    out += x.nxt
    out *= x.own
    return out


def mask_additive(party: Party, z: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Add a fresh sharing of zero, making a 3-out-of-3 share uniformly random on its own.

    ``in_place`` adds into ``z`` (for temporaries: one pass, no new array).
    """
    z = check_array(np.asarray(z), name="additive share")
    zero = party.zero_arith(z.size).reshape(z.shape)
    if in_place:
        z += zero
        return z
    return z + zero


async def reshare(party: Party, z: np.ndarray, *, bits: int = 64) -> ArithShare:
    """3-out-of-3 additive share (already masked) → replicated share. One round.

    With ``bits`` < 64 only z mod 2^bits travels, and the result is correct modulo 2^bits.
    ``z`` is consumed: it becomes the ``own`` half (its top bits cleared in place).
    """
    check_bits(bits, low=1)
    received = await party.exchange(z, z.shape, bits=bits)
    assert received is not None
    if bits < 64:
        z &= low_mask(bits)
    return ArithShare(party.index, z, received)


async def mul(party: Party, x: ArithShare, y: ArithShare, *, bits: int = 64) -> ArithShare:
    """Elementwise x·y (numpy broadcasting). One round."""
    return await reshare(party, mask_additive(party, product_terms(x, y), in_place=True), bits=bits)


async def inner(
    party: Party,
    pairs: Sequence[tuple[ArithShare, ArithShare]],
    weights: Sequence[int] | None = None,
    *,
    bits: int = 64,
) -> ArithShare:
    """Σ_k w_k · x_k · y_k (elementwise over arrays), public weights. One round for all k."""
    if not pairs:
        raise MpcValidationError("inner needs at least one pair")
    ws = [1] * len(pairs) if weights is None else list(weights)
    if len(ws) != len(pairs):
        raise MpcValidationError("one weight per pair")
    acc: np.ndarray | None = None
    for (x, y), w in zip(pairs, ws, strict=True):
        t = square_terms(x) if x is y else product_terms(x, y)
        if w != 1:
            t *= to_ring(w, name="weight")
        if acc is None:
            acc = t
        else:
            acc += t
    assert acc is not None
    return await reshare(party, mask_additive(party, acc, in_place=True), bits=bits)


async def from_additive(party: Party, share: np.ndarray, *, bits: int = 64) -> ArithShare:
    """Node i's uploaded additive share x_i → replicated (x'_i, x'_{i+1}). One round.

    The share is re-randomised first (x'_i = x_i + α_i), so node i-1 never sees the device's
    own share i — only a fresh share of the same secret.
    """
    arr = check_array(to_ring(share, name="additive input"), name="additive input")
    return await reshare(party, mask_additive(party, arr), bits=bits)


async def from_additive_many(
    party: Party, shares: dict[str, np.ndarray], *, bits: int = 64
) -> dict[str, ArithShare]:
    """Convert several named inputs in one round (one message), fused: each input is copied
    once into one preallocated vector, masked there in place, and sent; the results are views."""
    if not shares:
        return {}
    names = sorted(shares)
    arrays = [check_array(to_ring(shares[n], name=n), name=n) for n in names]
    flat = np.empty(sum(a.size for a in arrays), dtype=DTYPE)
    pos = 0
    for arr in arrays:
        flat[pos : pos + arr.size] = arr.reshape(-1)
        pos += arr.size
    joined = await reshare(party, mask_additive(party, flat, in_place=True), bits=bits)
    out: dict[str, ArithShare] = {}
    pos = 0
    for name, arr in zip(names, arrays, strict=True):
        size = arr.size
        out[name] = ArithShare(
            party.index,
            joined.own[pos : pos + size].reshape(arr.shape),
            joined.nxt[pos : pos + size].reshape(arr.shape),
        )
        pos += size
    return out


def to_output(party: Party, x: ArithShare) -> np.ndarray:
    """Re-randomised additive share of x for a receiver: x_i + α_i (local, no round).

    The receiver adds the three parties' words; each single word is uniform, and the triple
    is a fresh sharing independent of everything the nodes exchanged before.
    """
    return mask_additive(party, x.own)
