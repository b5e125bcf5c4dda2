"""Security properties enforced at the edges, where the plaintext is: a reader (owner,
receiver or device) must refuse anything a malicious cloud or broker — or a malicious device
of the same owner — can make up. The cloud here is the attacker: it holds every envelope,
capsule and re-key and can rewrite, re-sign (with keys of its own) and re-encrypt at will.

``TwinReader.open`` is the function under test (history and live stream both call it).
A reader always knows the twin owner's verify key: one key for every twin, or a map
twin -> key; it checks the write token (issuer, twin, device, attributes, validity) with it.
Tests marked ``xfail(strict=True)`` demonstrate a real, not yet fixed bug (docs/security.md).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import msgpack
import pytest

from ciphertwin.agents.bundle import BrokerConnection
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.agents.reader import TwinReader
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy
from ciphertwin.crypto.errors import DecryptionFailed, KeyMismatch, SignatureInvalid
from ciphertwin.crypto.kpcpre import Capsule, PreKeyPair, ReCapsule, reencrypt_capsule, rekey
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import WriteToken, issue_write_token
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.items import ITEM_CONTEXT, DeviceCredentials, build_item

REFUSED = (CipherTwinError,)  # every refusal is a CipherTwinError subclass, never a crash


def _bus() -> BusClient:
    return BusClient("127.0.0.1", 1, client_id="unused")  # never connected: open() is local


class Setup:
    """Alice (owner), her device d1 on twin t1, receivers bob and carol with grants."""

    def __init__(self, epoch: str = "item") -> None:
        self.alice = Identity.generate("alice", "owner")
        self.bob, self.carol = PreKeyPair.generate(), PreKeyPair.generate()
        self.dev_key = SigningKey.generate()
        self.token = issue_write_token(self.alice.signing, "t1", self.dev_key.verify_key,
                                       ["twin:t1", "device:d1", "type:*"], device="d1",
                                       valid_for_s=3600)
        self.creds = DeviceCredentials("t1", "d1", self.dev_key, self.token.to_bytes())
        self.keys = DataKeyManager(self.alice.pre.public, KeyEpochPolicy(epoch))
        self.policy = "type:temperature"
        self.rk_bob = rekey(self.alice.pre, self.policy, self.bob.public)
        self.rk_carol = rekey(self.alice.pre, self.policy, self.carol.public)
        self.owner_keys = {"t1": self.alice.signing.verify_key}

    def item(self, seq: int, value: Any = 20.5, attrs: tuple[str, ...] | None = None,
             creds: DeviceCredentials | None = None, keys: DataKeyManager | None = None
             ) -> tuple[bytes, bytes]:
        """(item bytes, capsule bytes) as the device publishes them."""
        reading = {"type": "temperature", "values": {"v": value}, "time": time.time()}
        payload = build_item(creds or self.creds, keys or self.keys, seq, reading,
                             attrs or ("device:d1", "twin:t1", "type:temperature"))
        return payload, decode(payload, "item").get("capsule") or b""

    def for_bob(self, capsule: bytes) -> bytes:
        return reencrypt_capsule(self.rk_bob, Capsule.from_bytes(capsule)).to_bytes()

    def reader(self, who: str = "alice", *, per_twin: bool = True) -> TwinReader:
        """A reader knowing alice's key for twin t1 only (``per_twin``), or for every twin."""
        pre = {"alice": self.alice.pre, "bob": self.bob, "carol": self.carol}[who]
        keys = dict(self.owner_keys) if per_twin else self.alice.signing.verify_key
        return TwinReader(_bus(), who, pre, keys)


def _fields(payload: bytes) -> dict[str, Any]:
    return {k: v for k, v in msgpack.unpackb(payload, raw=False).items() if k not in ("t", "v")}


def _rewrite(payload: bytes, **changes: Any) -> bytes:
    """The cloud edits fields but cannot sign as the device: the old signature stays."""
    return encode("item", {**_fields(payload), **changes})


def _resign(payload: bytes, key: SigningKey, **changes: Any) -> bytes:
    body = {**_fields(payload), **changes}
    body.pop("sig")
    body = {k: v for k, v in body.items() if v is not None}
    body["sig"] = key.sign_object(ITEM_CONTEXT, body)
    return encode("item", body)


def test_positive_control_owner_and_receiver_open_authentic_items() -> None:
    s = Setup()
    item, capsule = s.item(1)
    assert s.reader().open(item, capsule).reading["values"] == {"v": 20.5}
    assert s.reader("bob").open(item, s.for_bob(capsule)).seq == 1


def test_reader_refuses_the_key_of_another_capsule() -> None:
    s = Setup()
    item1, _ = s.item(1)
    _, cap2 = s.item(2)  # per-item epochs: another capsule
    with pytest.raises(ValidationError, match="another capsule"):
        s.reader().open(item1, cap2)
    with pytest.raises(ValidationError, match="another capsule"):
        s.reader("bob").open(item1, s.for_bob(cap2))
    # the item's id changed to the swapped capsule's: the sealed part names another one
    cid2 = Capsule.from_bytes(cap2).capsule_id
    with pytest.raises(REFUSED):
        s.reader().open(_rewrite(item1, capsule_id=cid2), cap2)


@pytest.mark.parametrize("field, value", [
    ("seq", 99), ("twin", "t2"), ("device", "d2"), ("time", 1.0),
    ("attrs", ["device:d1", "twin:t1", "type:location"]), ("sealed", None), ("token", None),
])
def test_reader_refuses_tampered_items(field: str, value: Any) -> None:
    s = Setup()
    item, capsule = s.item(1)
    if field == "sealed":
        sealed = bytearray(_fields(item)["sealed"])
        sealed[-1] ^= 1
        value = bytes(sealed)
    if field == "token":  # a token of the cloud's own making for the same device key
        value = issue_write_token(SigningKey.generate(), "t1", s.dev_key.verify_key,
                                  ["twin:t1", "device:d1", "type:*"], device="d1",
                                  valid_for_s=60).to_bytes()
    tampered = _rewrite(item, **{field: value})
    for who, key in (("alice", capsule), ("bob", s.for_bob(capsule))):
        with pytest.raises(REFUSED):
            s.reader(who).open(tampered, key)
        with pytest.raises(REFUSED):
            s.reader(who, per_twin=False).open(tampered, key)


def test_reader_refuses_items_resigned_with_the_clouds_own_keys() -> None:
    """The cloud cannot sign as the device; with a device key and token of its own making
    (it knows the owner's PRE public key, so it can encrypt), the token's issuer gives it away."""
    s = Setup()
    item, capsule = s.item(1)
    cloud_key, cloud_owner = SigningKey.generate(), SigningKey.generate()
    token = issue_write_token(cloud_owner, "t1", cloud_key.verify_key,
                              ["twin:t1", "device:d1", "type:*"], device="d1", valid_for_s=60)
    forged_creds = DeviceCredentials("t1", "d1", cloud_key, token.to_bytes())
    forged, fcap = s.item(1, value=-40.0, creds=forged_creds)
    for who, key in (("alice", fcap), ("bob", s.for_bob(fcap))):
        with pytest.raises(REFUSED):
            s.reader(who).open(forged, key)
    # re-signing the authentic item after a change, with the cloud's key, fails as well
    with pytest.raises(REFUSED):
        s.reader().open(_resign(item, cloud_key, seq=7), capsule)


def test_receiver_cannot_use_a_recapsule_made_for_another_receiver() -> None:
    s = Setup()
    item, capsule = s.item(1)
    for_carol = reencrypt_capsule(s.rk_carol, Capsule.from_bytes(capsule)).to_bytes()
    with pytest.raises((DecryptionFailed, KeyMismatch, ValidationError)):
        s.reader("bob").open(item, for_carol)
    # nor the owner's second-level capsule
    with pytest.raises(REFUSED):
        s.reader("bob").open(item, capsule)


def test_a_grantees_key_outside_its_policy_does_not_exist() -> None:
    s = Setup()
    _, capsule = s.item(1, attrs=("device:d1", "twin:t1", "type:location"))
    with pytest.raises(REFUSED):
        s.for_bob(capsule)  # the cloud cannot produce it


def test_refused_key_material_does_not_poison_the_key_cache() -> None:
    s = Setup(epoch="hour")
    item1, capsule = s.item(1)
    item2, _ = s.item(2)
    bob = s.reader("bob")
    # the cloud (or the broker, on the stream topic) relabels bob's re-capsule of another
    # capsule with this capsule's id: it parses, names bob, and yields a wrong key
    real = ReCapsule.from_bytes(s.for_bob(capsule))
    bogus = reencrypt_capsule(s.rk_bob, Capsule.from_bytes(
        s.item(3, keys=DataKeyManager(s.alice.pre.public, KeyEpochPolicy("item")))[1]))
    bogus = dataclasses.replace(bogus, capsule_id=real.capsule_id).to_bytes()
    assert bob.try_open(item1, bogus) is None
    assert bob.open(item2, s.for_bob(capsule)).seq == 2


def test_owner_reader_refuses_items_forged_by_the_cloud() -> None:
    s = Setup()
    owner = OwnerAgent(s.alice, _bus())
    item, capsule = s.item(1)
    assert owner.reader.open(item, capsule).seq == 1  # positive control: its own device
    cloud_key, cloud_owner = SigningKey.generate(), SigningKey.generate()
    token = issue_write_token(cloud_owner, "t1", cloud_key.verify_key,
                              ["twin:t1", "device:d1", "type:*"], device="d1", valid_for_s=60)
    forged, fcap = s.item(2, value=-40.0,
                          creds=DeviceCredentials("t1", "d1", cloud_key, token.to_bytes()))
    with pytest.raises(REFUSED):
        owner.reader.open(forged, fcap)
    # nor on a twin the owner never enrolled: the token still is not the owner's
    other = issue_write_token(cloud_owner, "t9", cloud_key.verify_key, ["type:*"],
                              device="d9", valid_for_s=60)
    forged9, fcap9 = s.item(1, creds=DeviceCredentials("t9", "d9", cloud_key, other.to_bytes()),
                            attrs=("type:temperature",))
    with pytest.raises(REFUSED):
        owner.reader.open(forged9, fcap9)


def test_reader_refuses_twins_whose_owner_key_it_does_not_know() -> None:
    s = Setup()
    item, capsule = s.item(1)
    for keys in ({}, {"t2": s.alice.signing.verify_key}):
        reader = TwinReader(_bus(), "alice", s.alice.pre, keys)
        with pytest.raises(REFUSED, match="unknown"):
            reader.open(item, capsule)
    # a wrong owner key (e.g. another owner's) refuses too, both as a map and for all twins
    mallory = SigningKey.generate().verify_key
    for keys in ({"t1": mallory}, mallory):
        with pytest.raises(REFUSED):
            TwinReader(_bus(), "alice", s.alice.pre, keys).open(item, capsule)


def test_reader_refuses_a_sibling_device_writing_as_d1() -> None:
    s = Setup()
    d2_key = SigningKey.generate()
    d2_token = issue_write_token(s.alice.signing, "t1", d2_key.verify_key,
                                 ["twin:t1", "device:d2", "type:*"], device="d2",
                                 valid_for_s=3600)
    posing = DeviceCredentials("t1", "d1", d2_key, d2_token.to_bytes())
    item, capsule = s.item(1, value=99.0, creds=posing,
                           attrs=("device:d2", "twin:t1", "type:temperature"))
    with pytest.raises(REFUSED):
        s.reader().open(item, capsule)
    # even if the token allowed d2 to write "device:d1" labels, the name is the token's
    loose = issue_write_token(s.alice.signing, "t1", d2_key.verify_key,
                              ["twin:t1", "device:*", "type:*"], device="d2", valid_for_s=3600)
    item, capsule = s.item(1, value=99.0,
                           creds=DeviceCredentials("t1", "d1", d2_key, loose.to_bytes()))
    with pytest.raises(REFUSED):
        s.reader().open(item, capsule)
    # and a token naming no device at all is refused
    unnamed = issue_write_token(s.alice.signing, "t1", s.dev_key.verify_key,
                                ["twin:t1", "device:d1", "type:*"], valid_for_s=3600)
    item, capsule = s.item(1, creds=DeviceCredentials("t1", "d1", s.dev_key, unnamed.to_bytes()))
    with pytest.raises(REFUSED):
        s.reader().open(item, capsule)


def test_reader_refuses_attributes_the_write_token_does_not_allow() -> None:
    s = Setup()
    narrow = issue_write_token(s.alice.signing, "t1", s.dev_key.verify_key,
                               ["twin:t1", "type:temperature"], device="d1", valid_for_s=3600)
    creds = DeviceCredentials("t1", "d1", s.dev_key, narrow.to_bytes())
    item, capsule = s.item(1, creds=creds, attrs=("share:1", "twin:t1", "type:location"))
    with pytest.raises(REFUSED):
        s.reader().open(item, capsule)
    # positive control: within its attributes the narrow token is fine
    item, capsule = s.item(2, creds=creds, attrs=("twin:t1", "type:temperature"))
    assert s.reader().open(item, capsule).seq == 2


def test_enrolled_device_token_is_limited_to_its_own_twin_and_name() -> None:
    owner = OwnerAgent(Identity.generate("alice", "owner"), _bus())
    bundle = owner.enroll_device("t1", "d1", BrokerConnection("127.0.0.1", 1883, "d1", "pw"))
    token = WriteToken.from_bytes(bundle.write_token)
    assert token.device == "d1" and token.twin == "t1"
    assert token.allows_attribute("twin:t1") and token.allows_attribute("device:d1")
    assert not token.allows_attribute("twin:t2")
    assert not token.allows_attribute("device:d2")
    assert set(token.attributes) == {"twin:t1", "device:d1", "type:*", "year:*", "month:*",
                                     "day:*", "hour:*", "share:*"}
    # attributes its rules add are allowed as well, exactly
    ruled = owner.enroll_device("t1", "d1", BrokerConnection("127.0.0.1", 1883, "d1", "pw"),
                                rules=[{"when_type": "temperature", "add": ["room:kitchen"]}])
    token = WriteToken.from_bytes(ruled.write_token)
    assert token.allows_attribute("room:kitchen") and not token.allows_attribute("room:hall")


def test_garbage_key_material_and_items_are_refused_cleanly() -> None:
    s = Setup()
    item, capsule = s.item(1)
    r = s.reader()
    for junk_item, junk_key in [(b"", capsule), (os.urandom(200), capsule), (item, b""),
                                (item, os.urandom(300)), (item, s.token.to_bytes()),
                                (item, capsule[:-1]), (item[:-3], capsule)]:
        assert r.try_open(junk_item, junk_key) is None
    assert r.unreadable == 7
    assert r.open(item, capsule).seq == 1  # and the reader still works


def test_signature_errors_are_refusals_not_crashes() -> None:
    s = Setup()
    item, capsule = s.item(1)
    bad = bytearray(_fields(item)["sig"])
    bad[0] ^= 0xFF
    with pytest.raises(SignatureInvalid):
        s.reader().open(_rewrite(item, sig=bytes(bad)), capsule)
