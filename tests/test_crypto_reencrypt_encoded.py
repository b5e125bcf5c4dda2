"""Re-encryption straight from capsule bytes equals parse-then-re-encrypt, and refuses what
it must (unsatisfied policy, another owner, malformed bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.crypto.errors import KeyMismatch, PolicyNotSatisfied
from ciphertwin.crypto.kpcpre import (
    Capsule, PreKeyPair, decapsulate_receiver, encapsulate, reencrypt_capsule,
    reencrypt_encoded, rekey,
)
from ciphertwin.errors import ValidationError

OWNER, OTHER, BOB = PreKeyPair.generate(), PreKeyPair.generate(), PreKeyPair.generate()
POOL = ["share:0", "share:1", "type:location", "type:temp", "day:1", "day:2", "twin:u1"]
RK = rekey(OWNER, "share:0 AND type:location AND (day:1 OR day:2)", BOB.public)


@settings(max_examples=25, deadline=None)
@given(st.sets(st.sampled_from(POOL), min_size=1))
def test_same_result_as_parsing_first(attrs: set[str]) -> None:
    capsule, key = encapsulate(OWNER.public, attrs)
    if not RK.policy.allows(attrs):
        with pytest.raises(PolicyNotSatisfied):
            reencrypt_encoded(RK, capsule.to_bytes())
        return
    fast = reencrypt_encoded(RK, capsule.to_bytes())
    assert fast.to_bytes() == reencrypt_capsule(RK, Capsule.from_bytes(capsule.to_bytes())).to_bytes()
    assert fast.capsule_id == capsule.capsule_id
    assert decapsulate_receiver(BOB, fast) == key


def test_refuses_other_owner_and_garbage() -> None:
    capsule, _ = encapsulate(OTHER.public, ["share:0", "type:location", "day:1"])
    with pytest.raises(KeyMismatch):
        reencrypt_encoded(RK, capsule.to_bytes())
    good, _ = encapsulate(OWNER.public, ["share:0", "type:location", "day:1"])
    data = bytearray(good.to_bytes())
    data[-5] ^= 0xFF  # corrupt a used point
    for bad in (b"", b"\x80", bytes(data), good.to_bytes()[:-3]):
        with pytest.raises(ValidationError):
            reencrypt_encoded(RK, bad)
