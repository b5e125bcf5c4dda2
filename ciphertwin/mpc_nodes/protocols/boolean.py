"""Boolean protocols on bit-sliced replicated shares: AND, sign extraction, bit injection.

Sign of x (``x < 0`` for x read as an ℓ-bit two's-complement number), ABY3-style:
party 0 holds x_0 and x_1, so it knows y = x_0 + x_1; parties 1 and 2 both hold x_2. Then
x = y + x_2 is a sum of two values each known to someone, and its top bit is
    msb = y_{ℓ-1} ⊕ x2_{ℓ-1} ⊕ carry_{ℓ-1}(y, x2).
Only the carry needs a circuit: generate g = y ∧ x2, propagate p = y ⊕ x2, and a carry-only
(Kogge–Stone) tree combining (G, P) pairs, G = G_hi ⊕ P_hi∧G_lo, P = P_hi∧P_lo.
Rounds: 1 (party 0 shares y) + 1 (g) + ceil(log2(ℓ-1)) (tree), i.e. 2 + log2 ℓ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import product_terms, reshare
from ciphertwin.mpc_nodes.protocols.bitslice import bitslice, unslice_bit
from ciphertwin.mpc_nodes.ring import DTYPE, check_bits
from ciphertwin.mpc_nodes.shares import ArithShare, BoolShare, words_for


def ltz_rounds(bits: int) -> int:
    """Rounds of :func:`ltz` for an ℓ-bit comparison."""
    check_bits(bits)
    return 2 + (math.ceil(math.log2(bits - 1)) if bits > 2 else 0)


def _xor_zero_bool(party: Party, z: np.ndarray) -> np.ndarray:
    """z ^= this party's part of a fresh XOR sharing of zero — :meth:`Party.zero_bool`'s draw,
    applied in place (no third array)."""
    round_, op = party.new_op()
    z ^= party.rand.prev.words(round_, op, z.size).reshape(z.shape)
    z ^= party.rand.next.words(round_, op, z.size).reshape(z.shape)
    return z


async def and_planes(
    party: Party, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Replicated AND of bit planes (own, nxt) × (own, nxt). One round.

    z = a_own ∧ (b_own ⊕ b_nxt) ⊕ a_nxt ∧ b_own, computed in place (two arrays, not five).
    """
    a_own, a_nxt = a
    b_own, b_nxt = b
    z = np.bitwise_xor(b_own, b_nxt)
    z &= a_own
    t = np.bitwise_and(a_nxt, b_own)
    z ^= t
    del t
    _xor_zero_bool(party, z)
    received = await party.exchange(z, z.shape)
    assert received is not None
    return z, received


async def and_(party: Party, a: BoolShare, b: BoolShare) -> BoolShare:
    """Elementwise AND of two boolean sharings of equal shape. One round."""
    if a.own.shape != b.own.shape or a.count != b.count:
        raise MpcValidationError("AND operands differ in shape")
    own, nxt = await and_planes(party, (a.own, a.nxt), (b.own, b.nxt))
    return BoolShare(party.index, own, nxt, a.count)


async def _share_y(party: Party, x: ArithShare, bits: int, words: int) -> tuple[np.ndarray, ...]:
    """Round 1: party 0 XOR-shares y = x_0 + x_1 as (y ⊕ y_1, y_1, 0); y_1 from the 0–1 PRF."""
    zeros = np.zeros((bits, words), dtype=DTYPE)
    round_, op = party.new_op()
    if party.index == 0:
        y = bitslice(x.own, bits, plus=x.nxt)
        y1 = party.rand.next.words(round_, op, bits * words).reshape(bits, words)
        y0 = y ^ y1
        await party.exchange(y0, None)
        return y0, y1
    if party.index == 1:
        y1 = party.rand.prev.words(round_, op, bits * words).reshape(bits, words)
        await party.exchange(None, None)
        return y1, zeros
    y0 = await party.exchange(None, (bits, words))
    assert y0 is not None
    return zeros, y0


def _x2_planes(party: Party, x: ArithShare, bits: int, words: int) -> tuple[np.ndarray, ...]:
    """x_2 as a boolean sharing (0, 0, x_2): parties 1 and 2 hold it, no message needed."""
    zeros = np.zeros((bits, words), dtype=DTYPE)
    if party.index == 0:
        return zeros, zeros
    if party.index == 1:
        return zeros, bitslice(x.nxt, bits)
    return bitslice(x.own, bits), zeros


async def _carry_tree(
    party: Party, g: tuple[np.ndarray, np.ndarray], p: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Carry out of all positions in ``g``/``p`` (rows = bit positions, low first).

    Each level pairs neighbours (lo, hi); the lowest group's P is never needed because no
    carry enters bit 0, so its AND is skipped. All ANDs of a level share one round. Operands
    and results are written into preallocated arrays (no concatenation chains).
    """
    (g_own, g_nxt), (p_own, p_nxt) = g, p
    while g_own.shape[0] > 1:
        m, words = g_own.shape
        pairs = m // 2
        ands = 2 * pairs - 1
        a = (np.empty((ands, words), DTYPE), np.empty((ands, words), DTYPE))
        b = (np.empty((ands, words), DTYPE), np.empty((ands, words), DTYPE))
        for dst_a, dst_b, gs, ps in ((a[0], b[0], g_own, p_own), (a[1], b[1], g_nxt, p_nxt)):
            dst_a[:pairs] = ps[1 : 2 * pairs : 2]  # P_hi, for G_hi ⊕ P_hi ∧ G_lo
            dst_a[pairs:] = dst_a[1:pairs]         # P_hi, for P_hi ∧ P_lo (groups ≥ 1)
            dst_b[:pairs] = gs[0 : 2 * pairs : 2]  # G_lo
            dst_b[pairs:] = ps[2 : 2 * pairs : 2]  # P_lo (groups ≥ 1)
        r = await and_planes(party, a, b)
        del a, b
        size = pairs + m % 2
        out_g = (np.empty((size, words), DTYPE), np.empty((size, words), DTYPE))
        out_p = (np.empty((size, words), DTYPE), np.empty((size, words), DTYPE))
        for k, (gs, ps) in enumerate(((g_own, p_own), (g_nxt, p_nxt))):
            np.bitwise_xor(gs[1 : 2 * pairs : 2], r[k][:pairs], out=out_g[k][:pairs])
            out_p[k][0] = ps[0]  # group 0 keeps a placeholder P (never read)
            out_p[k][1:pairs] = r[k][pairs:]
            if m % 2:
                out_g[k][pairs] = gs[m - 1]
                out_p[k][pairs] = ps[m - 1]
        (g_own, g_nxt), (p_own, p_nxt) = out_g, out_p
    return g_own, g_nxt


async def ltz(party: Party, x: ArithShare, bits: int = 64) -> BoolShare:
    """[x < 0] as a one-plane boolean sharing, reading x as an ℓ-bit signed number.

    Correct whenever the true value lies in [-2^(ℓ-1), 2^(ℓ-1)); only the low ℓ bits of the
    shares are used, so shares that are correct only modulo 2^ℓ suffice.
    Rounds: :func:`ltz_rounds` (ℓ).
    """
    check_bits(bits)
    count = x.own.size
    words = words_for(count)
    y = await _share_y(party, x, bits, words)
    c = _x2_planes(party, x, bits, words)
    p = (y[0] ^ c[0], y[1] ^ c[1])
    top = bits - 1
    g = await and_planes(party, (y[0][:top], y[1][:top]), (c[0][:top], c[1][:top]))
    carry = await _carry_tree(party, g, (p[0][:top], p[1][:top]))
    return BoolShare(party.index, p[0][top:] ^ carry[0], p[1][top:] ^ carry[1], count)


async def ltz_many(party: Party, xs: Sequence[ArithShare], bits: int = 64) -> list[BoolShare]:
    """Several sign tests in the rounds of one: inputs are padded to whole words and joined."""
    if not xs:
        return []
    counts = [x.own.size for x in xs]
    padded = [words_for(n) * 64 for n in counts]

    def join(parts: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(sum(padded), dtype=DTYPE)
        pos = 0
        for arr, size in zip(parts, padded, strict=True):
            out[pos : pos + arr.size] = arr.reshape(-1)
            pos += size
        return out

    joined = ArithShare(party.index, join([x.own for x in xs]), join([x.nxt for x in xs]))
    sign = await ltz(party, joined, bits)
    out, word = [], 0
    for n in counts:
        w = words_for(n)
        out.append(
            BoolShare(party.index, sign.own[:, word : word + w], sign.nxt[:, word : word + w], n)
        )
        word += w
    return out


async def eq_zero_many(party: Party, xs: Sequence[ArithShare], bits: int = 64) -> list[BoolShare]:
    """[x == 0] for |x| < 2^(ℓ-1): neither x < 0 nor -x < 0. Same rounds as one :func:`ltz`."""
    signs = await ltz_many(party, [*xs, *(-x for x in xs)], bits)
    k = len(xs)
    return [(signs[j] ^ signs[k + j]).invert() for j in range(k)]


async def eq_const(party: Party, x: ArithShare, c: int, bits: int = 64) -> BoolShare:
    """[x == c] for a public constant c, with |x - c| < 2^(ℓ-1)."""
    return (await eq_zero_many(party, [x.add_public(-c)], bits))[0]


async def b2a_additive(party: Party, b: BoolShare) -> np.ndarray:
    """Bit → ring, as a masked 3-out-of-3 additive share (one round).

    b = t ⊕ c with t = b_0 ⊕ b_1 (known to party 0) and c = b_2 (known to parties 1, 2).
    Party 0 arithmetic-shares t as (t - t_1, t_1, 0), c is (0, 0, c), and
    b = t + c - 2·t·c needs one multiplication whose output stays additive — callers that
    only sum the bits (counts, histograms) never pay the resharing round.
    """
    if b.bits != 1:
        raise MpcValidationError("b2a converts single-bit sharings")
    n = b.count
    zero = np.zeros(n, dtype=DTYPE)
    round_, op = party.new_op()
    if party.index == 0:
        t = unslice_bit(b.own[0] ^ b.nxt[0], n)
        t1 = party.rand.next.words(round_, op, n)
        t0 = t - t1
        await party.exchange(t0, None)
        ts, cs = ArithShare(0, t0, t1), ArithShare(0, zero, zero)
    elif party.index == 1:
        t1 = party.rand.prev.words(round_, op, n)
        await party.exchange(None, None)
        ts, cs = ArithShare(1, t1, zero), ArithShare(1, zero, unslice_bit(b.nxt[0], n))
    else:
        t0 = await party.exchange(None, (n,))
        assert t0 is not None
        ts, cs = ArithShare(2, zero, t0), ArithShare(2, unslice_bit(b.own[0], n), zero)
    v = ts.own + cs.own - DTYPE(2) * product_terms(ts, cs)
    return v + party.zero_arith(n)


async def b2a(party: Party, b: BoolShare) -> ArithShare:
    """Bit → replicated ring share (two rounds)."""
    return await reshare(party, await b2a_additive(party, b))
