"""Every wire format: canonical round trip, and garbage or mutations never crash."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciphertwin.crypto import (
    Capsule,
    DataKeyManager,
    KeyEpochPolicy,
    PreCiphertext,
    PreKeyPair,
    PrePublicKey,
    ProcessToken,
    ReCapsule,
    ReEncryptedCiphertext,
    ReKey,
    SealedItem,
    SigningKey,
    VerifyKey,
    WriteToken,
    X25519KeyPair,
    decode_any,
    encrypt,
    issue_process_token,
    issue_write_token,
    reencrypt,
    rekey,
    wire,
)
from ciphertwin.errors import ValidationError

OWNER, BOB = PreKeyPair.generate(), PreKeyPair.generate()
SIGNER = SigningKey.generate()
CT = encrypt(OWNER.public, {"a", "b"}, b"payload", b"aad")
RK = rekey(OWNER, "a AND 2 of (b, c, d)", BOB.public)
RCT = reencrypt(rekey(OWNER, "a", BOB.public), CT)
_, SEALED = DataKeyManager(OWNER.public, KeyEpochPolicy("hour")).seal(
    b"x", {"a"}, at=datetime(2026, 1, 1, tzinfo=timezone.utc)
)
SAMPLES = {
    PrePublicKey: OWNER.public,
    PreKeyPair: OWNER,
    Capsule: CT.capsule,
    PreCiphertext: CT,
    ReKey: RK,
    ReCapsule: RCT.recapsule,
    ReEncryptedCiphertext: RCT,
    SealedItem: SEALED,
    SigningKey: SIGNER,
    VerifyKey: SIGNER.verify_key,
    X25519KeyPair: X25519KeyPair.generate(),
    WriteToken: issue_write_token(SIGNER, "t", SIGNER.verify_key, ["a"], valid_for_s=60),
    ProcessToken: issue_process_token(SIGNER, "a", ["f"], [b"r"], [b"n0", b"n1", b"n2"],
                                      twins=["t"], valid_for_s=60),
}
CLASSES = list(SAMPLES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_round_trip_is_canonical_and_dispatchable(cls) -> None:
    raw = SAMPLES[cls].to_bytes()
    again = cls.from_bytes(raw)
    assert again.to_bytes() == raw
    assert type(decode_any(raw)) is cls
    assert wire.peek_tag(raw) == cls.TAG


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_structural_garbage_is_rejected(cls) -> None:
    raw = SAMPLES[cls].to_bytes()
    obj = wire._unpack(raw, 1 << 24)
    variants = [
        b"",
        b"\xc1",
        raw[:-1],
        raw + b"\x00",
        wire.canonical([1, 2, 3]),
        wire.canonical({**obj, "v": 2}),
        wire.canonical({**obj, "t": "other"}),
        wire.canonical({**obj, "extra": 1}),
        wire.canonical({k: v for k, v in obj.items() if k != sorted(set(obj) - {"t", "v"})[0]}),
    ]
    for key in set(obj) - {"t", "v"}:
        for replacement in (None, 7, "s", b"", [b"x"], {"k": 1}, -1, b"\x00" * 1000):
            variants.append(wire.canonical({**obj, key: replacement}))
    for data in variants:
        try:
            parsed = cls.from_bytes(data)
        except ValidationError:
            continue
        assert parsed.to_bytes() == cls.from_bytes(parsed.to_bytes()).to_bytes()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CLASSES), st.data())
def test_bit_flips_and_truncations_never_crash(cls, data) -> None:
    raw = bytearray(SAMPLES[cls].to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            cls.from_bytes(candidate)
        except ValidationError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_decode_any(data) -> None:
    with pytest.raises(ValidationError):
        decode_any(data)


def test_size_limit_and_non_bytes() -> None:
    with pytest.raises(ValidationError, match="limit"):
        Capsule.from_bytes(b"\x00" * (1 << 20))
    with pytest.raises(ValidationError, match="bytes"):
        Capsule.from_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="unknown object tag"):
        decode_any(wire.encode("nope", {}))


def test_unsorted_or_duplicate_attributes_are_not_canonical() -> None:
    obj = wire._unpack(CT.capsule.to_bytes(), 1 << 20)
    swapped = {**obj, "attrs": list(reversed(obj["attrs"])), "e": list(reversed(obj["e"]))}
    with pytest.raises(ValidationError, match="sorted"):
        Capsule.from_bytes(wire.canonical(swapped))


_LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8))
_TREES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_TREES, st.randoms(use_true_random=False))
def test_is_canonical_agrees_with_the_definition(tree: object, rnd: object) -> None:
    """``is_canonical`` (the fast check every decoder runs) says yes exactly when the bytes
    equal ``canonical`` of what they unpack to — for the canonical bytes and for a re-encoding
    with every map's keys shuffled (what a re-encoding broker would send)."""
    import msgpack

    from ciphertwin.crypto.wire import canonical, is_canonical

    def shuffled(x: object) -> object:
        if isinstance(x, dict):
            keys = list(x)
            rnd.shuffle(keys)  # type: ignore[attr-defined]
            return {k: shuffled(x[k]) for k in keys}
        if isinstance(x, list):
            return [shuffled(v) for v in x]
        return x

    for data in (canonical(tree), msgpack.packb(shuffled(tree), use_bin_type=True)):
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        assert is_canonical(obj, data) == (canonical(obj) == data)
