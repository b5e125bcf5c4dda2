"""Security properties of the cloud twin, attacked from outside: by another owner, by a
device, by a receiver without a grant, and by whoever can publish garbage on the bus.

Everything runs for real: an in-process embedded broker, the CloudTwin service with a SQLite
store, real keys, tokens and re-encryption. Ingest outcomes are read straight from
``IngestPipeline.process`` (the function the service's ingest loop calls) so that each test
is deterministic; control messages and queries go over the bus. See docs/security.md for the
threat model; tests marked ``xfail(strict=True)`` demonstrate a real, not yet fixed bug.

Readers are built with the owner's verify key (``TwinReader`` requires it); every twin in
these tests belongs to alice unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog

from ciphertwin.agents.reader import TwinReader
from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy
from ciphertwin.crypto.kpcpre import PreKeyPair, rekey
from ciphertwin.crypto.pairing import scalar_to_bytes
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.mpc_nodes.roster import NodeIdentity, Roster
from ciphertwin.protocol.control import build_control
from ciphertwin.protocol.items import ITEM_CONTEXT, DeviceCredentials, build_item
from ciphertwin.protocol.jobs import NodeRoster

ATTRS = ["twin:*", "type:*", "device:*", "share:*"]


# --- a small world of principals -----------------------------------------------------------


class Owner:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pre, self.sig = PreKeyPair.generate(), SigningKey.generate()
        self.keys = DataKeyManager(self.pre.public, KeyEpochPolicy("hour"))

    def device(self, twin: str, device: str, *, attrs: list[str] | None = None,
               key: SigningKey | None = None, token_device: str | None = None,
               **window: Any) -> Device:
        """A device ``device`` of ``twin``; its write token names ``token_device`` (default:
        ``device`` itself, i.e. an honestly enrolled device)."""
        key = key or SigningKey.generate()
        window = window or {"valid_for_s": 3600}
        token = issue_write_token(self.sig, twin, key.verify_key, attrs or ATTRS,
                                  device=token_device or device, **window)
        return Device(DeviceCredentials(twin, device, key, token.to_bytes()), self.pre)

    def control(self, kind: str, body: dict[str, Any], *, signer: SigningKey | None = None,
                owner: str | None = None) -> bytes:
        return build_control(kind, signer or self.sig, {"owner": owner or self.name, **body})

    def register_msg(self) -> bytes:
        return self.control("owner_register", {"pre_pk": self.pre.public.to_bytes(),
                                               "verify_key": self.sig.verify_key.raw})


class Device:
    def __init__(self, creds: DeviceCredentials, owner_pre: PreKeyPair,
                 keys: DataKeyManager | None = None) -> None:
        self.creds = creds
        self.keys = keys or DataKeyManager(owner_pre.public, KeyEpochPolicy("hour"))

    def item(self, seq: int, kind: str = "temperature", *, value: Any = None,
             attrs: tuple[str, ...] | None = None, t: float | None = None) -> bytes:
        reading = {"type": kind, "values": {"v": seq if value is None else value},
                   "time": t or time.time()}
        attrs = attrs or (f"device:{self.creds.device}", f"twin:{self.creds.twin}",
                          f"type:{kind}")
        return build_item(self.creds, self.keys, seq, reading, attrs)


def resign(payload: bytes, signer: SigningKey, **changes: Any) -> bytes:
    """What a malicious device (holding its own key) can do: edit any field, sign again."""
    body = {k: v for k, v in msgpack.unpackb(payload, raw=False).items() if k not in ("t", "v")}
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    body.pop("sig")
    body["sig"] = signer.sign_object(ITEM_CONTEXT, body)
    return encode("item", body)


OwnerKeys = VerifyKey | Mapping[str, VerifyKey]


class World:
    def __init__(self, broker: EmbeddedBroker, cloud: CloudTwin, bus: BusClient) -> None:
        self.broker, self.cloud, self.bus = broker, cloud, bus
        self.alice, self.mallory = Owner("alice"), Owner("mallory")

    def client(self, name: str) -> BusClient:
        return BusClient("127.0.0.1", self.broker.port, client_id=f"{name}@{os.urandom(3).hex()}")

    async def ingest(self, *items: tuple[str, bytes]) -> list[tuple[str, str, int]]:
        """Run one ingest batch; the (twin, device, seq) newly stored."""
        accepted = await self.cloud.ingest.process(list(items))
        return [(a.twin, a.device, a.seq) for a in accepted]

    async def control(self, owner: str, payload: bytes, request_id: str | None = None
                      ) -> dict[str, Any]:
        env = decode(payload, ("owner_register", "grant", "revoke"))
        rid = request_id or env.get("grant_id") or f"register-{int(env['time'] * 1000)}"
        reply = await self.bus.request(self.bus.topics.control(owner), payload,
                                       self.bus.topics.replies(owner, rid), timeout=10)
        return decode(reply, "control_result").body

    async def register(self, owner: Owner) -> None:
        res = await self.control(owner.name, owner.register_msg())
        assert res["ok"], res

    async def grant(self, owner: Owner, grant_id: str, receiver: str, receiver_pre: PreKeyPair,
                    twins: list[str], policy: str, **override: Any) -> dict[str, Any]:
        rk = rekey(owner.pre, policy, receiver_pre.public)
        body = {"grant_id": grant_id, "receiver": receiver, "twins": twins, "policy": policy,
                "rekey": rk.to_bytes(), **override}
        return await self.control(owner.name, owner.control("grant", body))

    async def history(self, reader: str, pre: PreKeyPair, twin: str,
                      owner_keys: OwnerKeys | None = None) -> tuple[list[Any], int]:
        """(opened items, number of entries the cloud sent) of one history query."""
        opened, entries = await self.history_entries(reader, pre, twin, owner_keys)
        return opened, len(entries)

    async def history_entries(self, reader: str, pre: PreKeyPair, twin: str,
                              owner_keys: OwnerKeys | None = None
                              ) -> tuple[list[Any], list[dict[str, bytes]]]:
        """The reader checks write tokens against ``owner_keys`` (default: alice's key)."""
        rid = f"q{os.urandom(4).hex()}"
        q = encode("history_query", {"request_id": rid, "twin": twin, "since": 0.0,
                                     "until": time.time() + 3600, "limit": 1000})
        reply = await self.bus.request(self.bus.topics.query(reader), q,
                                       self.bus.topics.replies(reader, rid), timeout=10)
        entries = decode(reply, "history_reply")["items"]
        r = TwinReader(self.bus, reader, pre,
                       owner_keys if owner_keys is not None else self.alice.sig.verify_key)
        opened = [o for e in entries if (o := r.try_open(e["item"], e["key"])) is not None]
        return opened, entries


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with EmbeddedBroker() as broker, \
            BusClient("127.0.0.1", broker.port, client_id="cloud") as cloud_bus:
        cloud = CloudTwin(cloud_bus, SqliteTwinStore(tmp_path / "cloud.db"),
                          pool=ReencryptionPool(1, processes=False))
        async with cloud, BusClient("127.0.0.1", broker.port, client_id="tester") as bus:
            yield World(broker, cloud, bus)


# --- write path: twins, devices, tokens --------------------------------------------------


async def test_other_owners_token_cannot_write_into_a_bound_twin(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    d1 = w.alice.device("t1", "d1")
    assert await w.ingest(("t1", d1.item(1))) == [("t1", "d1", 1)]
    intruder = w.mallory.device("t1", "m1")
    assert await w.ingest(("t1", intruder.item(1))) == []
    # alice still reads exactly her item
    opened, _ = await w.history("alice", w.alice.pre, "t1", {"t1": w.alice.sig.verify_key})
    assert [(o.device, o.seq) for o in opened] == [("d1", 1)]


async def test_unregistered_owner_token_is_refused(world: World) -> None:
    w = world
    await w.register(w.alice)
    nobody = Owner("nobody")  # never registered: its tokens bind nothing
    assert await w.ingest(("t9", nobody.device("t9", "n1").item(1))) == []


async def test_device_name_bound_to_another_key_is_refused_and_seqs_untouched(
        world: World) -> None:
    w = world
    await w.register(w.alice)
    d1 = w.alice.device("t1", "d1")
    assert await w.ingest(("t1", d1.item(1)), ("t1", d1.item(2))) == [
        ("t1", "d1", 1), ("t1", "d1", 2)]
    # a second device of the same owner, with its own valid token, claims the name d1
    clone = w.alice.device("t1", "d1")
    assert await w.ingest(("t1", clone.item(2, value="evil")), ("t1", clone.item(3))) == []
    opened, _ = await w.history("alice", w.alice.pre, "t1", {"t1": w.alice.sig.verify_key})
    assert [(o.seq, o.reading["values"]["v"]) for o in opened] == [(1, 1), (2, 2)]
    # d1 itself goes on
    assert await w.ingest(("t1", d1.item(3))) == [("t1", "d1", 3)]


async def test_device_cannot_claim_a_device_name_it_was_not_issued(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    # mallory's device m1, on mallory's own twin, names itself like alice's future device
    squatter = w.mallory.device("tm", "victim", token_device="m1")
    assert await w.ingest(("tm", squatter.item(1))) == []
    # a sibling of alice's (token for d2, same twin) does the same; so does a token naming
    # no device at all
    sibling = w.alice.device("t1", "victim", token_device="d2")
    unnamed = w.alice.device("t1", "victim")
    unnamed.creds = DeviceCredentials("t1", "victim", unnamed.creds.signing_key, issue_write_token(
        w.alice.sig, "t1", unnamed.creds.signing_key.verify_key, ATTRS,
        valid_for_s=3600).to_bytes())
    assert await w.ingest(("t1", sibling.item(1))) == []
    assert await w.ingest(("t1", unnamed.item(1))) == []
    # none of them bound the name: the device it was issued to still gets it
    victim = w.alice.device("t1", "victim")
    assert await w.ingest(("t1", victim.item(1))) == [("t1", "victim", 1)]


async def test_another_owner_cannot_squat_an_unbound_device_name(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    # mallory enrolls a device of her own twin under the name of alice's future device
    squatter = w.mallory.device("tm", "victim")
    await w.ingest(("tm", squatter.item(1)))
    victim = w.alice.device("t1", "victim")
    assert await w.ingest(("t1", victim.item(1))) == [("t1", "victim", 1)]


async def test_one_batch_cannot_bind_two_keys_to_one_new_name(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    a, b = w.alice.device("t1", "dX"), w.alice.device("t1", "dX")
    m = w.mallory.device("t1", "mX")
    stored = await w.ingest(("t1", a.item(1)), ("t1", b.item(2)), ("t1", m.item(1)))
    assert stored == [("t1", "dX", 1)]


async def test_write_token_validity_twin_and_attributes_are_enforced(world: World) -> None:
    w = world
    await w.register(w.alice)
    now = int(time.time())
    expired = w.alice.device("t1", "e1", not_before=now - 7200, not_after=now - 3600)
    future = w.alice.device("t1", "f1", not_before=now + 3600, not_after=now + 7200)
    other_twin = w.alice.device("t2", "o1")  # token for t2, item claims t1
    other_twin.creds = DeviceCredentials("t1", "o1", other_twin.creds.signing_key,
                                         other_twin.creds.write_token)
    narrow = w.alice.device("t1", "n1", attrs=["twin:t1", "type:temperature"])
    stolen_token = w.alice.device("t1", "s1")  # valid token, but signed with another key
    thief = Device(DeviceCredentials("t1", "s1", SigningKey.generate(),
                                     stolen_token.creds.write_token), w.alice.pre)
    for label, payload in [
        ("expired", expired.item(1, attrs=("twin:t1",))),
        ("not yet valid", future.item(1, attrs=("twin:t1",))),
        ("other twin", other_twin.item(1, attrs=("twin:t1",))),
        ("attribute not allowed", narrow.item(1, "location", attrs=("twin:t1", "type:location"))),
        ("token of another device key", thief.item(1, attrs=("twin:t1",))),
    ]:
        assert await w.ingest(("t1", payload)) == [], label
    # a published item for twin t1 that names t2 inside is refused too
    ok = w.alice.device("t2", "ok2")
    assert await w.ingest(("t1", ok.item(1, attrs=("twin:t2",)))) == []
    # positive control: the narrow device is fine within its attributes
    assert await w.ingest(("t1", narrow.item(5, attrs=("twin:t1", "type:temperature")))) == [
        ("t1", "n1", 5)]


async def test_item_attributes_must_equal_its_capsules(world: World) -> None:
    w = world
    await w.register(w.alice)
    dev = w.alice.device("t1", "d1")
    key = dev.creds.signing_key
    first = dev.item(1, attrs=("twin:t1", "type:temperature"))  # carries the epoch's capsule
    assert "capsule" in decode(first, "item").body
    # with the capsule in the envelope: claim wider/other attributes than the capsule has
    lying = resign(first, key, attrs=["twin:t1", "type:location"])
    assert await w.ingest(("t1", lying)) == []
    assert await w.ingest(("t1", first)) == [("t1", "d1", 1)]
    # without the capsule: a later item of the same epoch, relabelled
    second = dev.item(2, attrs=("twin:t1", "type:temperature"))
    assert "capsule" not in decode(second, "item").body
    assert await w.ingest(("t1", resign(second, key, attrs=["share:1", "twin:t1"]))) == []
    # and a capsule id that does not match the capsule sent with it
    third = resign(first, key, seq=3, capsule_id=os.urandom(32))
    assert await w.ingest(("t1", third)) == []
    assert await w.ingest(("t1", second)) == [("t1", "d1", 2)]


async def test_capsule_under_another_owners_key_is_refused(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    dev = w.alice.device("t1", "d1")
    dev.keys = DataKeyManager(w.mallory.pre.public, KeyEpochPolicy("hour"))
    assert await w.ingest(("t1", dev.item(1))) == []


async def test_item_cannot_reference_a_capsule_of_another_twin(world: World) -> None:
    w = world
    await w.register(w.alice)
    bob = PreKeyPair.generate()
    home = w.alice.device("home", "d-home")
    first = home.item(1, attrs=("twin:shared-attrs", "type:location"))
    assert await w.ingest(("home", first)) == [("home", "d-home", 1)]
    capsule_id = decode(first, "item")["capsule_id"]
    # bob may read the "car" twin only
    assert (await w.grant(w.alice, "g-car", "bob", bob, ["car"], "type:location"))["ok"]
    car = w.alice.device("car", "d-car")
    leech = resign(car.item(1, attrs=("twin:shared-attrs", "type:location")),
                   car.creds.signing_key, capsule=None, capsule_id=capsule_id)
    await w.ingest(("car", leech))
    # nor by sending the home capsule along (it is alice's and its attributes fit)
    carrier = resign(car.item(2, attrs=("twin:shared-attrs", "type:location")),
                     car.creds.signing_key, capsule=decode(first, "item")["capsule"],
                     capsule_id=capsule_id)
    assert await w.ingest(("car", carrier)) == []
    _, entries = await w.history_entries("bob", bob, "car")
    for entry in entries:  # what the leak means: bob opens a "home" item with it
        opened = TwinReader(w.bus, "bob", bob, w.alice.sig.verify_key).try_open(
            first, entry["key"])
        assert opened is None, f"bob read the home twin: {opened}"
    assert entries == []  # bob must not be handed a re-encrypted "home" capsule


# --- control path: registration, grants, revocation ---------------------------------------


async def test_owner_keys_cannot_be_taken_over(world: World) -> None:
    w = world
    await w.register(w.alice)
    thief = Owner("alice")  # same name, other keys, published on control/alice
    res = await w.control("alice", thief.register_msg())
    assert not res["ok"] and "other keys" in res["reason"]
    # alice's signing key cannot be registered again under another name either
    clone = Owner("mallory")
    clone.sig = w.alice.sig
    res = await w.control("mallory", clone.register_msg())
    assert not res["ok"]
    # re-registering the same keys is idempotent, and alice still controls her grants
    await w.register(w.alice)
    assert (await w.grant(w.alice, "g1", "bob", PreKeyPair.generate(), ["t1"], "type:x"))["ok"]


async def test_pre_key_of_another_owner_cannot_be_registered(world: World) -> None:
    w = world
    await w.register(w.alice)
    clone = Owner("mallory")
    clone.pre = w.alice.pre  # alice's public PRE key, mallory's own signing key
    res = await w.control("mallory", clone.register_msg())
    assert not res["ok"] and "PRE key" in res["reason"]
    assert "mallory" not in w.cloud.trust.owners


async def test_grant_checks_policy_signature_and_rekey_owner(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    bob = PreKeyPair.generate()
    # policy text wider than the re-key's policy
    rk = rekey(w.alice.pre, "type:temperature", bob.public)
    res = await w.control("alice", w.alice.control("grant", {
        "grant_id": "g-wide", "receiver": "bob", "twins": ["t1"],
        "policy": "type:temperature OR type:location", "rekey": rk.to_bytes()}))
    assert not res["ok"] and "policy" in res["reason"]
    # grant signed by another key
    res = await w.control("alice", w.alice.control("grant", {
        "grant_id": "g-sig", "receiver": "bob", "twins": ["t1"], "policy": "type:temperature",
        "rekey": rk.to_bytes()}, signer=w.mallory.sig))
    assert not res["ok"]
    # re-key made from another owner's PRE key
    rk_m = rekey(w.mallory.pre, "type:temperature", bob.public)
    res = await w.control("alice", w.alice.control("grant", {
        "grant_id": "g-key", "receiver": "bob", "twins": ["t1"], "policy": "type:temperature",
        "rekey": rk_m.to_bytes()}))
    assert not res["ok"]
    assert w.cloud.grants.get("g-wide") is None and w.cloud.grants.get("g-sig") is None
    assert w.cloud.grants.get("g-key") is None


async def test_control_for_another_owner_is_refused(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    bob = PreKeyPair.generate()
    assert (await w.grant(w.alice, "g1", "bob", bob, ["t1"], "type:temperature"))["ok"]
    # names alice but arrives on control/mallory (what mallory's ACL lets her publish)
    rk = rekey(w.mallory.pre, "type:temperature", bob.public)
    body = {"grant_id": "g-x", "receiver": "bob", "twins": ["t1"], "policy": "type:temperature",
            "rekey": rk.to_bytes()}
    res = await w.control("mallory", w.mallory.control("grant", body, owner="alice"))
    assert not res["ok"] and "another owner" in res["reason"]
    # mallory's key on alice's topic: refused by the signature
    res = await w.control("alice", w.mallory.control("revoke", {"grant_id": "g1"},
                                                    owner="alice"))
    assert not res["ok"]
    # mallory revoking alice's grant from her own topic
    res = await w.control("mallory", w.mallory.control("revoke", {"grant_id": "g1"}))
    assert not res["ok"]
    assert w.cloud.grants.get("g1") is not None


async def test_replayed_grant_after_revocation_is_refused(world: World) -> None:
    w = world
    await w.register(w.alice)
    bob = PreKeyPair.generate()
    dev = w.alice.device("t1", "d1")
    await w.ingest(("t1", dev.item(1)))
    rk = rekey(w.alice.pre, "type:temperature", bob.public)
    grant = w.alice.control("grant", {"grant_id": "g1", "receiver": "bob", "twins": ["t1"],
                                      "policy": "type:temperature", "rekey": rk.to_bytes()})
    assert (await w.control("alice", grant))["ok"]
    assert len((await w.history("bob", bob, "t1"))[0]) == 1
    revoke = w.alice.control("revoke", {"grant_id": "g1"})
    assert (await w.control("alice", revoke))["ok"]
    res = await w.control("alice", grant)  # the broker (or anyone who saw it) replays it
    assert not res["ok"] and "replayed" in res["reason"]
    assert (await w.control("alice", revoke))["ok"] is False  # and the revoke, too
    assert await w.history("bob", bob, "t1") == ([], 0)
    # a control message dated in the future is refused (it would block later ones)
    late = w.alice.control("revoke", {"grant_id": "g1", "time": time.time() + 3600})
    assert not (await w.control("alice", late))["ok"]


async def test_history_without_a_grant_yields_nothing(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    dev = w.alice.device("t1", "d1")
    await w.ingest(("t1", dev.item(1)), ("t1", dev.item(2, "location")))
    eve = PreKeyPair.generate()
    assert await w.history("eve", eve, "t1") == ([], 0)
    assert await w.history("mallory", w.mallory.pre, "t1") == ([], 0)
    assert await w.history("eve", eve, "unknown-twin") == ([], 0)
    # a grant of bob's covers temperature only: no location item is even sent to him
    bob = PreKeyPair.generate()
    assert (await w.grant(w.alice, "g1", "bob", bob, ["t1"], "type:temperature"))["ok"]
    opened, sent = await w.history("bob", bob, "t1")
    assert [o.seq for o in opened] == [1] and sent == 1
    assert await w.history("eve", eve, "t1") == ([], 0)  # bob's grant is not eve's
    # mallory installs a grant of her own over alice's twin: her re-key cannot transform
    # alice's capsules, so nothing is sent
    assert (await w.history("mallory", w.mallory.pre, "t1")) == ([], 0)
    await w.grant(w.mallory, "g-m", "eve", eve, ["t1"], "type:temperature")
    assert await w.history("eve", eve, "t1") == ([], 0)


async def test_grant_id_of_another_owner_cannot_be_overwritten(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    bob = PreKeyPair.generate()
    await w.ingest(("t1", w.alice.device("t1", "d1").item(1)))
    assert (await w.grant(w.alice, "g1", "bob", bob, ["t1"], "type:temperature"))["ok"]
    res = await w.grant(w.mallory, "g1", "bob", bob, ["tm"], "type:temperature")
    assert not res["ok"] and "another owner" in res["reason"]
    assert w.cloud.grants.get("g1").grant.owner == "alice"
    assert len((await w.history("bob", bob, "t1"))[0]) == 1


async def test_grant_over_another_owners_twin_is_refused(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.register(w.mallory)
    await w.ingest(("t1", w.alice.device("t1", "d1").item(1)))
    res = await w.grant(w.mallory, "g-m", "eve", PreKeyPair.generate(), ["t1"], "type:temperature")
    assert not res["ok"] and "another owner" in res["reason"]
    assert w.cloud.grants.get("g-m") is None
    # mixed with a twin of her own, the grant is refused as a whole
    await w.ingest(("tm", w.mallory.device("tm", "m1").item(1)))
    res = await w.grant(w.mallory, "g-m2", "eve", PreKeyPair.generate(), ["tm", "t1"],
                        "type:temperature")
    assert not res["ok"] and w.cloud.grants.get("g-m2") is None
    # her own twin alone is fine
    assert (await w.grant(w.mallory, "g-m3", "eve", PreKeyPair.generate(), ["tm"],
                          "type:temperature"))["ok"]


async def test_regranting_an_id_replaces_it_and_its_cached_reencryptions(world: World) -> None:
    w = world
    await w.register(w.alice)
    bob, carol = PreKeyPair.generate(), PreKeyPair.generate()
    await w.ingest(("t1", w.alice.device("t1", "d1").item(1)))
    assert (await w.grant(w.alice, "g1", "bob", bob, ["t1"], "type:temperature"))["ok"]
    assert len((await w.history("bob", bob, "t1"))[0]) == 1  # re-capsule for bob now cached
    # alice gives the same id to carol: bob's access ends, carol is not handed bob's re-capsule
    assert (await w.grant(w.alice, "g1", "carol", carol, ["t1"], "type:temperature"))["ok"]
    assert await w.history("bob", bob, "t1") == ([], 0)
    opened, sent = await w.history("carol", carol, "t1")
    assert [o.seq for o in opened] == [1] and sent == 1


async def test_forged_item_cannot_make_the_cloud_refuse_another_devices_seq(
        world: World) -> None:
    w = world
    await w.register(w.alice)
    d1, d2 = w.alice.device("t1", "d1"), w.alice.device("t1", "d2")
    assert await w.ingest(("t1", d1.item(1))) == [("t1", "d1", 1)]
    acks: list[dict[str, Any]] = []

    async def on_ack(topic: str, payload: bytes, retain: bool) -> None:
        acks.append(decode(payload, "ack").body)

    await w.bus.subscribe(w.bus.topics.ack("t1", "d1"), on_ack)
    # d2 (same twin, so its broker ACL lets it publish there) sends seq 2 in d1's name
    spoof = d2.item(2)
    spoof = resign(spoof, d2.creds.signing_key, device="d1")
    await w.ingest(("t1", spoof), ("t1", b"\x81\xa1t\xa4item"))
    await asyncio.sleep(0.3)
    assert not any(r["seq"] == 2 for a in acks for r in a["rejected"]), acks


async def test_processing_nodes_get_no_history(world: World) -> None:
    w = world
    await w.register(w.alice)
    await w.ingest(("t1", w.alice.device("t1", "d1").item(1)))
    ids = [NodeIdentity.generate(i, f"node-{i}") for i in range(3)]
    w.cloud.jobs.roster = NodeRoster(1, Roster([i.entry() for i in ids]),
                                     tuple(PreKeyPair.generate().public for _ in ids),
                                     SigningKey.generate().verify_key)
    node0 = PreKeyPair.generate()
    # even a grant to a node (e.g. made for a job) yields no history: nodes get inputs per job
    assert (await w.grant(w.alice, "g-n", "node-0", node0, ["t1"], "type:temperature"))["ok"]
    assert await w.history("node-0", node0, "t1") == ([], 0)
    # positive control: the same grant to a non-node principal yields the item
    bob = PreKeyPair.generate()
    assert (await w.grant(w.alice, "g-b", "bob", bob, ["t1"], "type:temperature"))["ok"]
    assert len((await w.history("bob", bob, "t1"))[0]) == 1


# --- robustness: garbage on every subscribed topic -----------------------------------------


def _garbage() -> list[bytes]:
    def env(kind: str, **fields: Any) -> bytes:
        return msgpack.packb({"t": kind, "v": 1, **fields})

    return [
        b"", b"\x00", b"\xc1", os.urandom(64), b"\xff" * 300, msgpack.packb([1, 2, 3]),
        msgpack.packb({"t": "item"}), env("item", twin=1, device=None),
        env("ack", seqs=[], rejected=[]), env("history_reply", request_id="x", items=[]),
        env("owner_register", owner="alice", pre_pk=b"\x00" * 16, verify_key=b"\x01" * 16,
            time=time.time(), sig=b"\x00" * 64),
        env("owner_register", owner="alice", pre_pk=os.urandom(200), verify_key=os.urandom(32),
            time=math.nan, sig=os.urandom(64)),
        env("grant", owner="alice", grant_id="g", receiver="bob", twins=["t1"],
            policy="((((", rekey=os.urandom(100), time=time.time(), sig=os.urandom(64)),
        env("revoke", owner="alice", grant_id="g", time=math.inf, sig=os.urandom(64)),
        env("history_query", request_id="r1", twin="t1", since=math.nan, until=math.inf,
            limit=2**64 - 1),
        env("history_query", request_id="r2", twin="t1", since=-1e308, until=1e308, limit=0,
            after={"time": math.nan, "device": "d", "seq": 0}),
        env("process_token", owner="alice", token=os.urandom(50), time=time.time(),
            sig=os.urandom(64)),
        msgpack.packb({"t": "item", "v": 1, "x": b"\x00" * (200 * 1024)}),
    ]


async def test_garbage_on_every_topic_leaves_the_service_serving(world: World) -> None:
    w = world
    await w.register(w.alice)
    dev = w.alice.device("t1", "d1")
    t = w.bus.topics
    with structlog.testing.capture_logs() as logs:
        for payload in _garbage():
            for topic in (t.twin_data("t1"), t.control("alice"), t.control("nobody"),
                          t.query("eve"), t.query("alice")):
                await w.bus.publish(topic, payload)
        await asyncio.sleep(0.5)
        # still serving: ingest over the bus, control, history
        await w.bus.publish(t.twin_data("t1"), dev.item(1))
        for _ in range(100):
            if w.cloud.ingest.stored:
                break
            await asyncio.sleep(0.05)
        assert w.cloud.ingest.stored == 1
        assert (await w.grant(w.alice, "g1", "bob", PreKeyPair.generate(), ["t1"], "type:x"))["ok"]
        opened, _ = await w.history("alice", w.alice.pre, "t1")
        assert [o.seq for o in opened] == [1]
    crashed = [e for e in logs if e["event"] in ("bus.handler_failed", "ingest.batch_failed")
               or e.get("log_level") in ("exception", "critical")]
    assert crashed == [], crashed[:3]


# --- logs never carry plaintext or secrets -------------------------------------------------


def _strings_and_bytes(obj: Any, out: list[Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _strings_and_bytes(k, out)
            _strings_and_bytes(v, out)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _strings_and_bytes(v, out)
    elif isinstance(obj, (str, bytes, bytearray)):
        out.append(obj)
    else:
        out.append(repr(obj))


async def test_logs_never_contain_plaintext_or_secret_keys(world: World) -> None:
    w = world
    marker = "PLAINTEXT-" + os.urandom(8).hex()
    bob = PreKeyPair.generate()
    dev = w.alice.device("t1", "d1")
    with structlog.testing.capture_logs() as logs:
        await w.register(w.alice)
        payloads = [dev.item(i, value=f"{marker}-{i}") for i in range(1, 4)]
        await w.ingest(*(("t1", p) for p in payloads))
        # refused items are logged with their reasons: make some
        await w.ingest(("t1", resign(payloads[0], dev.creds.signing_key, seq=9,
                                     attrs=["twin:t1", "type:location"])))
        assert (await w.grant(w.alice, "g1", "bob", bob, ["t1"], "type:temperature"))["ok"]
        opened, _ = await w.history("bob", bob, "t1", {"t1": w.alice.sig.verify_key})
        assert [o.reading["values"]["v"] for o in opened] == [f"{marker}-{i}" for i in (1, 2, 3)]
        # a receiver refusing an item logs the reason
        reader = TwinReader(w.bus, "alice", w.alice.pre, w.alice.sig.verify_key)
        relabelled = resign(payloads[1], dev.creds.signing_key, attrs=["twin:t1", "type:x"])
        assert reader.try_open(relabelled, decode(payloads[0], "item")["capsule"]) is None
        data_keys = list(reader._keys.values())
        r2 = TwinReader(w.bus, "alice", w.alice.pre, w.alice.sig.verify_key)
        r2.open(payloads[0], decode(payloads[0], "item")["capsule"])
        data_keys += list(r2._keys.values())
        await w.control("alice", w.alice.control("revoke", {"grant_id": "g1"}))
    assert logs, "expected some log events"
    secrets_raw = [scalar_to_bytes(w.alice.pre._x), scalar_to_bytes(bob._x),
                   w.alice.sig.to_bytes()[-32:], dev.creds.signing_key.to_bytes()[-32:],
                   *data_keys]
    values: list[Any] = []
    _strings_and_bytes(logs, values)
    for v in values:
        text = v if isinstance(v, str) else bytes(v).decode("latin-1")
        assert marker not in text, v
        for s in secrets_raw:
            for form in (s.hex(), base64.b64encode(s).decode(), s.decode("latin-1"), repr(s)):
                assert form not in text
