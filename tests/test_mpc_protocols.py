"""Property tests: reconstructing every protocol's result gives the plaintext result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.local_cluster import simulate
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols import arithmetic as arith
from ciphertwin.mpc_nodes.protocols import boolean
from ciphertwin.mpc_nodes.protocols.bitslice import bitslice, unslice
from ciphertwin.mpc_nodes.ring import to_ring, to_signed
from ciphertwin.mpc_nodes.shares import (
    ArithShare,
    reconstruct,
    reconstruct_bool,
    split_additive,
    split_replicated,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
int64s = st.integers(-(2**63), 2**63 - 1)


def signed_values(bits: int) -> st.SearchStrategy[list[int]]:
    """Values of an ℓ-bit comparison, always mixed with the edge cases."""
    top = 2 ** (bits - 1) - 1
    edges = [0, -1, 1, top, -top]
    return st.lists(st.integers(-top, top), min_size=0, max_size=80).map(lambda v: v + edges)


def opened_bits(shares: list, count: int) -> list[int]:
    return unslice(reconstruct_bool(shares), count).tolist()


@FAST
@given(st.lists(st.tuples(int64s, int64s), min_size=1, max_size=60))
def test_mul_matches_ring_product(pairs: list[tuple[int, int]]) -> None:
    x, y = (to_ring([p[i] for p in pairs]) for i in (0, 1))

    async def prog(party: Party, s: tuple[ArithShare, ArithShare]) -> ArithShare:
        return await arith.mul(party, *s)

    out, parties = simulate(prog, list(zip(split_replicated(x), split_replicated(y), strict=True)))
    assert np.array_equal(reconstruct(out), x * y)
    assert parties[0].round == 1


@FAST
@given(st.lists(st.tuples(int64s, int64s, int64s), min_size=1, max_size=40), int64s)
def test_inner_product_in_one_round(rows: list[tuple[int, int, int]], w: int) -> None:
    a, b, c = (to_ring([r[i] for r in rows]) for i in range(3))

    async def prog(party: Party, s: tuple[ArithShare, ...]) -> ArithShare:
        sa, sb, sc = s
        return await arith.inner(party, [(sa, sa), (sb, sc)], [1, w])

    shares = list(zip(split_replicated(a), split_replicated(b), split_replicated(c), strict=True))
    out, parties = simulate(prog, shares)
    assert np.array_equal(reconstruct(out), a * a + to_ring(w) * b * c)
    assert parties[0].round == 1


@FAST
@given(st.lists(int64s, min_size=1, max_size=50), int64s, int64s)
def test_local_linear_ops(values: list[int], k: int, c: int) -> None:
    x = to_ring(values)
    shares = split_replicated(x)
    out = [(s.scale(k) + s).add_public(c) - (-s) for s in shares]
    assert np.array_equal(reconstruct(out), x * to_ring(k) + x + to_ring(c) + x)
    assert np.array_equal(reconstruct([s.sum() for s in shares]), np.asarray(x.sum(dtype=np.uint64)))


@FAST
@given(st.lists(int64s, min_size=1, max_size=50))
def test_additive_to_replicated(values: list[int]) -> None:
    x = to_ring(values)

    async def prog(party: Party, share: np.ndarray) -> ArithShare:
        return await arith.from_additive(party, share)

    parts = split_additive(x)
    out, _ = simulate(prog, parts)
    assert np.array_equal(reconstruct(out), x)
    # re-randomised: node i-1's copy of share i is not the device's share i
    assert not np.array_equal(out[0].nxt, parts[1])


@FAST
@given(st.sampled_from([2, 3, 8, 17, 32, 33, 45, 48, 63, 64]), st.data())
def test_ltz_matches_sign(bits: int, data: st.DataObject) -> None:
    values = data.draw(signed_values(bits))
    x = to_ring(values)

    async def prog(party: Party, s: ArithShare) -> object:
        return await boolean.ltz(party, s, bits)

    out, parties = simulate(prog, split_replicated(x))
    assert opened_bits(out, len(values)) == [int(v < 0) for v in values]
    assert parties[0].round == boolean.ltz_rounds(bits)


def test_ltz_round_counts_are_2_plus_log2_l() -> None:
    assert [boolean.ltz_rounds(b) for b in (2, 3, 9, 17, 33, 45, 64)] == [2, 3, 5, 6, 7, 8, 8]


def test_ltz_uses_only_low_bits() -> None:
    # shares correct only modulo 2^16 (garbage above) still give the right sign
    values = [5, -5, 0, -1, 32767, -32767]
    shares = split_replicated(to_ring(values))
    noisy = [ArithShare(s.party, s.own ^ np.uint64(0xABCD << 40), s.nxt ^ np.uint64(0xABCD << 40))
             for s in shares]

    async def prog(party: Party, s: ArithShare) -> object:
        return await boolean.ltz(party, s, 16)

    out, _ = simulate(prog, noisy)
    assert opened_bits(out, len(values)) == [0, 1, 0, 1, 0, 1]


@FAST
@given(st.data(), st.sampled_from([8, 24, 64]))
def test_eq_const_and_b2a(data: st.DataObject, bits: int) -> None:
    top = 2 ** (bits - 2) - 1
    c = data.draw(st.integers(-top, top))
    values = data.draw(st.lists(st.integers(-top, top), max_size=40)) + [c, c + 1, c - 1, 0, -1]
    x = to_ring(values)

    async def prog(party: Party, s: ArithShare) -> tuple[object, ArithShare, np.ndarray]:
        eq = await boolean.eq_const(party, s, c, bits)
        as_ring = await boolean.b2a(party, eq)
        additive = await boolean.b2a_additive(party, eq)
        return eq, as_ring, additive

    out, parties = simulate(prog, split_replicated(x))
    want = [int(v == c) for v in values]
    assert opened_bits([o[0] for o in out], len(values)) == want
    assert reconstruct([o[1] for o in out]).tolist() == want
    assert (out[0][2] + out[1][2] + out[2][2]).tolist() == want
    assert parties[0].round == boolean.ltz_rounds(bits) + 3


def test_ltz_many_keeps_inputs_apart() -> None:
    a, b = to_ring([-3, 4, -5]), to_ring(list(range(-40, 60)))

    async def prog(party: Party, s: tuple[ArithShare, ArithShare]) -> list:
        return await boolean.ltz_many(party, list(s), 32)

    out, parties = simulate(prog, list(zip(split_replicated(a), split_replicated(b), strict=True)))
    assert opened_bits([o[0] for o in out], 3) == [1, 0, 1]
    assert opened_bits([o[1] for o in out], 100) == [int(v < 0) for v in range(-40, 60)]
    assert parties[0].round == boolean.ltz_rounds(32)


def test_and_of_bits() -> None:
    x, y = to_ring([-1, -1, 1, 1]), to_ring([-1, 1, -1, 1])

    async def prog(party: Party, s: tuple[ArithShare, ArithShare]) -> object:
        sx, sy = s
        bx, by = await boolean.ltz_many(party, [sx, sy], 8)
        return await boolean.and_(party, bx, by)

    out, _ = simulate(prog, list(zip(split_replicated(x), split_replicated(y), strict=True)))
    assert opened_bits(out, 4) == [1, 0, 0, 0]


def test_empty_arrays_work() -> None:
    async def prog(party: Party, s: ArithShare) -> object:
        return await boolean.ltz(party, await arith.mul(party, s, s), 16)

    out, _ = simulate(prog, split_replicated(to_ring(np.zeros(0, dtype=np.int64))))
    assert opened_bits(out, 0) == []


def test_shares_validate_their_inputs() -> None:
    good = np.zeros(3, dtype=np.uint64)
    with pytest.raises(ValidationError):
        ArithShare(3, good, good)
    with pytest.raises(ValidationError):
        ArithShare(0, good, np.zeros(4, dtype=np.uint64))
    with pytest.raises(ValidationError):
        ArithShare(0, good.astype(np.int64), good)  # type: ignore[arg-type]
    a, b = split_replicated([1, 2, 3])[:2]
    with pytest.raises(ValidationError):
        _ = a + b  # different parties
    with pytest.raises(ValidationError):
        reconstruct([a, b])
    tampered = split_replicated([1, 2, 3])
    tampered[1] = ArithShare(1, tampered[1].own + np.uint64(1), tampered[1].nxt)
    with pytest.raises(ValidationError, match="disagree"):
        reconstruct(tampered)


def test_signed_edge_values_survive_mul_by_minus_one() -> None:
    edges = [0, -1, 1, 2**63 - 1, -(2**63) + 1, -(2**63)]

    async def prog(party: Party, s: ArithShare) -> ArithShare:
        minus_one = ArithShare(party.index, *(np.zeros_like(s.own),) * 2).add_public(-1)
        return await arith.mul(party, s, minus_one)

    out, _ = simulate(prog, split_replicated(edges))
    assert to_signed(reconstruct(out)).tolist() == [0, 1, -1, -(2**63) + 1, 2**63 - 1, -(2**63)]


# -- the in-place / fused paths (issue 10) ----------------------------------------------------


@FAST
@given(st.sampled_from([1, 7, 44, 64]), st.sampled_from([0, 1, 63, 64, 65, 2048 * 64 + 77]))
def test_bitslice_of_a_sum_keeps_only_the_low_bits(bits: int, n: int) -> None:
    # sizes cross the transpose's chunk of 2048 blocks; high bits never reach the planes
    rng = np.random.default_rng(n + bits)  # test data only
    a = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    b = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    planes = bitslice(a, bits, plus=b)
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    assert np.array_equal(unslice(planes, n), (a + b) & mask)
    assert np.array_equal(bitslice(a, bits), bitslice(a & mask, bits))


def test_ltz_over_many_transpose_chunks() -> None:
    rng = np.random.default_rng(5)  # test data only
    values = rng.integers(-(2**19), 2**19, 2048 * 64 * 2 + 3)

    async def prog(party: Party, s: ArithShare) -> object:
        return await boolean.ltz(party, s, 21)

    out, _ = simulate(prog, split_replicated(to_ring(values)))
    assert opened_bits(out, len(values)) == (values < 0).astype(int).tolist()


def test_fused_input_conversion_leaves_the_callers_arrays_alone() -> None:
    x, y = to_ring([1, -2, 3]), to_ring(np.arange(10).reshape(2, 5))
    parts = [dict(zip("xy", p, strict=True)) for p in zip(split_additive(x), split_additive(y), strict=True)]
    before = [{k: v.copy() for k, v in p.items()} for p in parts]

    async def prog(party: Party, share: dict[str, np.ndarray]) -> dict[str, ArithShare]:
        return await arith.from_additive_many(party, share, bits=64)

    out, parties = simulate(prog, parts)
    assert parties[0].round == 1
    assert np.array_equal(reconstruct([o["x"] for o in out]), x)
    assert np.array_equal(reconstruct([o["y"] for o in out]), y)
    assert all(np.array_equal(p[k], b[k]) for p, b in zip(parts, before, strict=True) for k in "xy")
