"""Ring helpers, fixed point, payload packing, bit-slicing and the AES-CTR PRF."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.errors import ProtocolError
from ciphertwin.mpc_nodes.fixed_point import bits_needed, decode_fixed, encode_fixed
from ciphertwin.mpc_nodes.prf import CorrelatedRandomness, PrfStream
from ciphertwin.mpc_nodes.protocols.bitslice import bitslice, unslice
from ciphertwin.mpc_nodes.ring import to_ring, to_signed
from ciphertwin.mpc_nodes.wire import pack_words, unpack_words

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
words = st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=0, max_size=200)


@given(st.lists(int64s, min_size=1, max_size=50))
def test_to_ring_and_back_is_identity(values: list[int]) -> None:
    assert to_signed(to_ring(values)).tolist() == values


def test_to_ring_rejects_non_integers() -> None:
    for bad in ([1.5], [True], ["3"], [2**64], [-(2**63) - 1], np.array([1.0])):
        with pytest.raises(ValidationError):
            to_ring(bad)


@given(st.integers(2, 64), st.data())
def test_to_signed_reads_low_bits(bits: int, data: st.DataObject) -> None:
    v = data.draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    noisy = (v + (data.draw(st.integers(0, 2**20)) << bits)) & (2**64 - 1)
    assert int(to_signed(to_ring([noisy]), bits)[0]) == v


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20), st.integers(0, 30))
def test_fixed_point_roundtrip_within_half_ulp(values: list[float], frac: int) -> None:
    decoded = decode_fixed(encode_fixed(values, frac), frac)
    assert np.all(np.abs(decoded - np.array(values)) <= 2.0 ** -(frac + 1) + 1e-9)


def test_fixed_point_rejects_nan_and_overflow() -> None:
    with pytest.raises(ValidationError):
        encode_fixed([float("nan")], 8)
    with pytest.raises(ValidationError):
        encode_fixed([2.0**40], 30)
    assert bits_needed(0) == 1 and bits_needed(1) == 2 and bits_needed(255) == 9


@given(words, st.integers(1, 64))
def test_pack_keeps_exactly_low_bits(values: list[int], bits: int) -> None:
    arr = np.array(values, dtype=np.uint64)
    payload = pack_words(arr, bits)
    assert len(payload) == len(values) * ((bits + 7) // 8)
    back = unpack_words(payload, arr.shape, bits)
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    assert np.array_equal(back & mask, arr & mask)


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ProtocolError, match="expected 16"):
        unpack_words(b"\x00" * 15, (2,), 64)


@given(words, st.integers(1, 64))
def test_bitslice_roundtrip(values: list[int], bits: int) -> None:
    arr = np.array(values, dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    planes = bitslice(arr, bits)
    assert planes.shape == (bits, (len(values) + 63) // 64)
    assert np.array_equal(unslice(planes, len(values)), arr & mask)


def test_prf_is_deterministic_per_address_and_distinct_across_addresses() -> None:
    key = bytes(range(32))
    a, b = PrfStream(key), PrfStream(key)
    assert np.array_equal(a.words(3, 1, 1000), b.words(3, 1, 1000))
    assert not np.array_equal(a.words(3, 1, 10), a.words(3, 2, 10))
    assert not np.array_equal(a.words(3, 1, 10), a.words(4, 1, 10))
    # a longer draw extends a shorter one (block offset is the low counter)
    assert np.array_equal(a.words(5, 0, 1000)[:10], a.words(5, 0, 10))


def test_zero_sharings_sum_to_zero() -> None:
    secrets = [bytes([i]) * 32 for i in range(3)]
    run = bytes(32)
    rands = [CorrelatedRandomness(secrets[(i - 1) % 3], secrets[i], "job", run) for i in range(3)]
    arith = sum(r.zero_arith(7, 0, 500) for r in rands)
    boolean = rands[0].zero_bool(7, 1, 500) ^ rands[1].zero_bool(7, 1, 500) ^ rands[2].zero_bool(7, 1, 500)
    assert not arith.any() and not boolean.any()
    assert rands[0].zero_arith(7, 0, 500).any()
    other_job = CorrelatedRandomness(secrets[2], secrets[0], "job2", run)
    assert not np.array_equal(other_job.zero_arith(7, 0, 5), rands[0].zero_arith(7, 0, 5))


def test_prf_rejects_bad_keys_and_addresses() -> None:
    with pytest.raises(ValidationError):
        PrfStream(b"short")
    with pytest.raises(ValidationError):
        PrfStream(bytes(32)).words(-1, 0, 4)
