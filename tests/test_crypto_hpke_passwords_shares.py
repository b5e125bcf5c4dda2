"""HPKE, passphrase boxes (Argon2id) and additive secret sharing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.crypto import (
    Argon2Params,
    DecryptionFailed,
    PreKeyPair,
    X25519KeyPair,
    combine_additive,
    decode_fixed,
    decrypt_with_passphrase,
    derive_key,
    encode_fixed,
    encrypt_with_passphrase,
    hpke_open,
    hpke_seal,
    split_additive,
)
from ciphertwin.errors import ValidationError

FAST = Argon2Params(memory_kib=64, iterations=1, lanes=1)  # tests only; defaults are 64 MiB


def test_hpke_round_trip_and_binding() -> None:
    node, other = X25519KeyPair.generate(), X25519KeyPair.generate()
    blob = hpke_seal(node.public_bytes, b"output share", info=b"job-1", aad=b"node-0")
    assert hpke_open(node, blob, info=b"job-1", aad=b"node-0") == b"output share"
    assert hpke_seal(node.public_bytes, b"output share", b"job-1", b"node-0") != blob  # fresh
    for key, info, aad, data in (
        (other, b"job-1", b"node-0", blob),
        (node, b"job-2", b"node-0", blob),
        (node, b"job-1", b"node-1", blob),
        (node, b"job-1", b"node-0", blob[:-1] + bytes([blob[-1] ^ 1])),
        (node, b"job-1", b"node-0", bytes([blob[0] ^ 1]) + blob[1:]),
    ):
        with pytest.raises(DecryptionFailed):
            hpke_open(key, data, info=info, aad=aad)


def test_hpke_rejects_bad_keys_and_short_blobs() -> None:
    node = X25519KeyPair.generate()
    with pytest.raises(ValidationError):
        hpke_seal(b"\x01" * 31, b"x")
    with pytest.raises(ValidationError):
        hpke_seal(bytes(32), b"x")  # low-order point
    with pytest.raises(ValidationError):
        hpke_open(node, b"short")
    assert X25519KeyPair.from_bytes(node.to_bytes()).public_bytes == node.public_bytes


def test_passphrase_box_round_trip_for_a_secret_key_file() -> None:
    key = PreKeyPair.generate()
    box = encrypt_with_passphrase("correct horse", key.to_bytes(), aad=b"owner", params=FAST)
    restored = PreKeyPair.from_bytes(decrypt_with_passphrase("correct horse", box, aad=b"owner"))
    assert restored.public == key.public
    assert key.to_bytes() not in box
    with pytest.raises(DecryptionFailed):
        decrypt_with_passphrase("wrong horse", box, aad=b"owner")
    with pytest.raises(DecryptionFailed):
        decrypt_with_passphrase("correct horse", box, aad=b"device")


def test_passphrase_box_parameters_are_stored_and_bounded() -> None:
    from ciphertwin.crypto import wire

    box = encrypt_with_passphrase(b"pw", b"data", params=FAST)
    f = wire.decode(box, "passphrase-box", ("m", "i", "p", "salt", "nonce", "ct"), 1 << 20)
    assert (f.int("m"), f.int("i"), f.int("p")) == (64, 1, 1)
    fields = {k: f.raw(k) for k in ("m", "i", "p", "salt", "nonce", "ct")}
    huge = wire.encode("passphrase-box", {**fields, "m": 1 << 30})
    with pytest.raises(ValidationError):
        decrypt_with_passphrase(b"pw", huge)
    weaker = wire.encode("passphrase-box", {**fields, "i": 2})  # tampered cost: AAD-bound
    with pytest.raises(DecryptionFailed):
        decrypt_with_passphrase(b"pw", weaker)
    with pytest.raises(ValidationError):
        encrypt_with_passphrase("", b"x", params=FAST)
    with pytest.raises(ValidationError):
        Argon2Params(memory_kib=4, iterations=1, lanes=1)


def test_argon2id_is_deterministic_per_salt() -> None:
    a = derive_key("pw", b"saltsalt", FAST)
    assert a == derive_key("pw", b"saltsalt", FAST) and len(a) == 32
    assert a != derive_key("pw", b"saltsalT", FAST)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=20), st.integers(2, 5))
def test_additive_shares_recombine(values, n) -> None:
    shares = split_additive(values, n)
    assert len(shares) == n and all(len(s) == len(values) for s in shares)
    assert combine_additive(shares) == values
    assert all(0 <= v < 2**64 for s in shares for v in s)


def test_shares_look_random_and_differ_between_splits() -> None:
    shares = split_additive([0] * 64)
    assert shares[0] != shares[1] and len(set(shares[0])) > 60
    assert split_additive([5])[0] != split_additive([5])[0]


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 24))
def test_fixed_point_round_trip(x, frac_bits) -> None:
    assert abs(decode_fixed(encode_fixed(x, frac_bits), frac_bits) - x) <= 2.0 ** -(frac_bits + 1)


def test_fixed_point_and_split_validation() -> None:
    assert combine_additive(split_additive([encode_fixed(-2.5, 16)])) == [2**64 - 2 * 2**16 - 2**15]
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValidationError):
            encode_fixed(bad, 16)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        encode_fixed(2.0**60, 16)
    with pytest.raises(ValidationError):
        split_additive([1.5])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        split_additive([2**64])
    with pytest.raises(ValidationError):
        split_additive([1], n=1)
    with pytest.raises(ValidationError):
        combine_additive([[1, 2], [3]])


def test_shares_module_does_not_import_numpy() -> None:
    import subprocess
    import sys

    code = "import ciphertwin.crypto, sys; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=200, deadline=None)
@given(st.floats(-5e4, 5e4, allow_nan=False), st.integers(0, 20))
def test_declared_encoding_survives_the_split(x, frac) -> None:
    """What the device shares is exactly FieldEncoding.encode's signed integer, mod 2^64."""
    from ciphertwin.protocol.job_epochs import FieldEncoding

    enc = FieldEncoding("m", frac, -5e4, 5e4)
    v = enc.encode(x)
    total = combine_additive(split_additive([v]))[0]
    assert total - (1 << 64) * (total >> 63) == v
    assert abs(decode_fixed(total, frac) - x) <= 2.0 ** -(frac + 1)
