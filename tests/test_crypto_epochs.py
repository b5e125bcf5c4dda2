"""Key epochs: one capsule per (attribute set, epoch), unique nonces, sealed items bound."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from ciphertwin.crypto import (
    DataKeyManager,
    DecryptionFailed,
    KeyEpochPolicy,
    PreKeyPair,
    SealedItem,
    decapsulate_owner,
    decapsulate_receiver,
    open_sealed,
    reencrypt,
    rekey,
)
from ciphertwin.errors import ValidationError

OWNER = PreKeyPair.generate()
T0 = datetime(2026, 11, 22, 10, 15, tzinfo=timezone.utc)
LOC = {"type:location", "day:2026-11-22"}


def test_hourly_epoch_reuses_one_capsule_with_distinct_nonces() -> None:
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("hour"))
    capsule, first = mgr.seal(b"p0", LOC, b"seq0", at=T0)
    assert capsule is not None
    key = decapsulate_owner(OWNER, capsule)
    nonces = {first.nonce}
    for i in range(1, 20):
        again, item = mgr.seal(f"p{i}".encode(), LOC, f"seq{i}".encode(), at=T0 + timedelta(minutes=i))
        assert again is None and item.capsule_id == capsule.capsule_id
        assert open_sealed(item, key, f"seq{i}".encode()) == f"p{i}".encode()
        nonces.add(item.nonce)
    assert len(nonces) == 20
    assert mgr.current_capsule(LOC, at=T0) == capsule


def test_new_epoch_and_new_attribute_set_get_new_capsules() -> None:
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("hour"))
    c1, _ = mgr.seal(b"a", LOC, at=T0)
    c2, _ = mgr.seal(b"b", LOC, at=T0 + timedelta(hours=1))
    c3, _ = mgr.seal(b"c", {"type:temperature"}, at=T0 + timedelta(hours=1))
    assert None not in (c1, c2, c3)
    assert len({c.capsule_id for c in (c1, c2, c3)}) == 3


def test_per_item_policy_makes_a_capsule_for_every_item() -> None:
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("item"))
    ids = set()
    for i in range(3):
        capsule, item = mgr.seal(b"x", LOC, at=T0)
        assert capsule is not None
        assert open_sealed(item, decapsulate_owner(OWNER, capsule)) == b"x"
        ids.add(capsule.capsule_id)
    assert len(ids) == 3


def test_day_and_custom_epochs() -> None:
    day = KeyEpochPolicy("day")
    assert day.epoch_of(T0) == day.epoch_of(T0.replace(hour=23, minute=59))
    assert day.epoch_of(T0) != day.epoch_of(T0 + timedelta(days=1))
    custom = KeyEpochPolicy.parse("900s")
    assert custom == KeyEpochPolicy("seconds", 900)
    assert custom.epoch_of(T0) != custom.epoch_of(T0 + timedelta(minutes=15))
    assert KeyEpochPolicy.parse("item").epoch_of(T0) is None
    for bad in ("week", "0s", "-5s"):
        with pytest.raises(ValidationError):
            KeyEpochPolicy.parse(bad)


def test_receiver_opens_sealed_items_via_reencrypted_capsule() -> None:
    bob = PreKeyPair.generate()
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("day"))
    capsule, item = mgr.seal(b"47.07,15.44", LOC, b"twin-1|7", at=T0)
    rc = reencrypt(rekey(OWNER, "type:location", bob.public), capsule)
    key = decapsulate_receiver(bob, rc)
    assert open_sealed(SealedItem.from_bytes(item.to_bytes()), key, b"twin-1|7") == b"47.07,15.44"


def test_sealed_item_is_bound_to_its_capsule_and_aad() -> None:
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("hour"))
    capsule, item = mgr.seal(b"v", LOC, b"aad", at=T0)
    key = decapsulate_owner(OWNER, capsule)
    other_capsule, _ = mgr.seal(b"w", {"type:other"}, at=T0)
    moved = SealedItem(other_capsule.capsule_id, item.nonce, item.ciphertext)
    for bad, aad in ((item, b"other aad"), (moved, b"aad"),
                     (SealedItem(item.capsule_id, item.nonce, item.ciphertext[:-1] + b"\0"), b"aad")):
        with pytest.raises(DecryptionFailed):
            open_sealed(bad, key, aad)


def test_time_must_be_timezone_aware() -> None:
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("hour"))
    with pytest.raises(ValidationError, match="timezone"):
        mgr.seal(b"x", LOC, at=datetime(2026, 1, 1))
    capsule, _ = mgr.seal(b"x", LOC)  # default: now
    assert capsule is not None


def test_old_epochs_are_forgotten() -> None:
    mgr = DataKeyManager(OWNER.public, KeyEpochPolicy("hour"), max_open_epochs=4)
    for h in range(10):
        mgr.seal(b"x", LOC, at=T0 + timedelta(hours=h))
    assert len(mgr._keys) <= 2
