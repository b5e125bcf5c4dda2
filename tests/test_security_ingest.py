"""Ingest attacked by a sibling device and by the broker (issue 8, holes 4 and 7).

* Capsule-index poisoning: a device of the same twin (it holds its own valid write token)
  sends items carrying a forged capsule under another device's capsule id; the other
  device's genuine items must still be stored and acknowledged, never finally refused.
* Malleable encodings: the broker re-encodes a genuine signed message (keys reordered,
  integers, strings, byte strings or maps with wider headers). The signature is over the
  canonical re-encoding, so it still verifies; the re-encoding must be refused at decoding
  (a clear, logged reason) and must not block the genuine message arriving afterwards (the
  store is idempotent on (twin, device, seq) and compares bytes).

Real parts throughout: SQLite store, trust registry, keys, tokens, capsules, the ingest
pipeline as the service runs it (``process``: checks, one commit, acks decoded as a device
decodes them).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog

from ciphertwin.bus.envelope import decode
from ciphertwin.bus.errors import EnvelopeError
from ciphertwin.cloud_twin.ingest import IngestPipeline
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.cloud_twin.trust import TrustRegistry
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.crypto.kpcpre import Capsule, PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import WriteToken, issue_write_token
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.roster import NodeIdentity, RosterEntry
from ciphertwin.protocol.control import build_control
from ciphertwin.protocol.items import (
    ITEM_CONTEXT,
    DeviceCredentials,
    build_item,
    decode_item,
)
from ciphertwin.protocol.kinds import CONTROL_KINDS

OWNER_PRE, OWNER_SIG = PreKeyPair.generate(), SigningKey.generate()
TEMPERATURE = ("twin:t1", "type:temperature")


class Device:
    """An honestly enrolled device of twin t1 (its own key and write token)."""

    def __init__(self, name: str, owner_pre: PreKeyPair = OWNER_PRE) -> None:
        self.key = SigningKey.generate()
        token = issue_write_token(OWNER_SIG, "t1", self.key.verify_key, ["twin:*", "type:*"],
                                  device=name, valid_for_s=3600)
        self.creds = DeviceCredentials("t1", name, self.key, token.to_bytes())
        self.keys = DataKeyManager(owner_pre.public)

    def item(self, seq: int, attrs: tuple[str, ...] = TEMPERATURE) -> bytes:
        reading = {"type": "temperature", "values": {"c": seq}, "time": time.time()}
        return build_item(self.creds, self.keys, seq, reading, attrs)

    def resign(self, payload: bytes, **changes: Any) -> bytes:
        """What this device can do with its own key: edit any field of an item, sign again."""
        body = {k: v for k, v in msgpack.unpackb(payload, raw=False).items()
                if k not in ("t", "v", "sig")}
        body.update(changes)
        body["sig"] = self.key.sign_object(ITEM_CONTEXT, body)
        return msgpack.packb(dict(sorted({"t": "item", "v": 1, **body}.items())),
                             use_bin_type=True)


class Cloud:
    """The ingest pipeline on a real store; records what each device is told."""

    def __init__(self, store: SqliteTwinStore, trust: TrustRegistry) -> None:
        self.pipeline = IngestPipeline(store, trust, self.publish_ack, self.on_stored)
        self.acked: dict[str, set[int]] = {}
        self.told: dict[str, list[dict[str, Any]]] = {}

    async def publish_ack(self, twin: str, device: str, payload: bytes) -> None:
        ack = decode(payload, "ack")  # as the device decodes it
        self.acked.setdefault(device, set()).update(ack["seqs"])
        self.told.setdefault(device, []).extend(ack["rejected"])

    async def on_stored(self, items: object) -> None:
        return None

    async def ingest(self, *payloads: bytes) -> list[tuple[str, int]]:
        """One batch on twin t1's topic; the (device, seq) newly stored."""
        accepted = await self.pipeline.process([("t1", p) for p in payloads])
        return [(a.device, a.seq) for a in accepted]


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    store = SqliteTwinStore(tmp_path / "cloud.sqlite")
    await store.open()
    trust = TrustRegistry(store)
    await trust.register_owner("alice", OWNER_SIG.verify_key, OWNER_PRE.public)
    try:
        yield Cloud(store, trust)
    finally:
        await store.close()


FORGERIES = ("victim's capsule relabelled", "sibling's own capsule", "garbage capsule")


def forge_capsule(sibling: Device, victim_first: bytes, how: str, seq: int) -> bytes:
    """An item the sibling signs with its own key, carrying a capsule under the capsule id of
    the victim's epoch (whose first item the sibling or the broker has seen)."""
    victim = decode_item(victim_first)
    cid = victim["capsule_id"]
    if how == "victim's capsule relabelled":
        return sibling.resign(sibling.item(seq, ("twin:t1", "type:location")),
                              capsule=victim["capsule"], capsule_id=cid)
    if how == "sibling's own capsule":
        own = decode_item(Device("d2").item(seq))["capsule"]  # new epoch: valid, alice's
        return sibling.resign(sibling.item(seq), capsule=own, capsule_id=cid)
    return sibling.resign(sibling.item(seq), capsule=os.urandom(200), capsule_id=cid)


@pytest.mark.parametrize("how", FORGERIES)
async def test_forged_capsule_under_a_known_capsule_id_does_not_refuse_its_items(
        cloud: Cloud, how: str) -> None:
    victim, sibling = Device("d1"), Device("d2")
    first, second, third = (victim.item(s) for s in (1, 2, 3))
    assert await cloud.ingest(first, sibling.item(1)) == [("d1", 1), ("d2", 1)]
    forged = forge_capsule(sibling, first, how, 50)
    # the forgery travels in the same batch as the victim's next item, just before it
    assert await cloud.ingest(forged, second) == [("d1", 2)]
    assert await cloud.ingest(forged, third) == [("d1", 3)]
    assert cloud.acked["d1"] == {1, 2, 3} and cloud.told.get("d1", []) == []
    assert cloud.pipeline.capsules.get(decode_item(first)["capsule_id"]) == ("t1", TEMPERATURE)


@pytest.mark.parametrize("how", FORGERIES)
async def test_forged_capsule_ahead_of_a_new_capsule_does_not_refuse_its_items(
        cloud: Cloud, how: str) -> None:
    victim, sibling = Device("d1"), Device("d2")
    assert await cloud.ingest(sibling.item(1)) == [("d2", 1)]
    first, second = victim.item(1), victim.item(2)
    forged = forge_capsule(sibling, first, how, 50)
    # the sibling (or the broker for it) puts the forgery ahead of the epoch's capsule
    assert await cloud.ingest(forged, first, second) == [("d1", 1), ("d1", 2)]
    assert cloud.acked["d1"] == {1, 2} and cloud.told.get("d1", []) == []
    assert cloud.pipeline.capsules.get(decode_item(first)["capsule_id"]) == ("t1", TEMPERATURE)
    assert [r["seq"] for r in cloud.told["d2"]] == [50]  # the forger hears of its own only


async def test_items_whose_own_device_sent_a_refused_capsule_are_refused(cloud: Cloud) -> None:
    """The other side of the rule above: the device's own capsule was bad (here: under
    another owner's key), so its items of that epoch are refused, and it is told."""
    broken = Device("d1", owner_pre=PreKeyPair.generate())
    assert await cloud.ingest(broken.item(1), broken.item(2)) == []
    assert [r["seq"] for r in cloud.told["d1"]] == [1, 2]
    assert cloud.told["d1"][1]["reason"] == "its capsule was refused"


# --- malleable encodings -------------------------------------------------------------------


_WIDEST = {int: b"\xcf", str: b"\xdb", bytes: b"\xc6", list: b"\xdd", dict: b"\xdf"}


def _enc(obj: Any, widen: frozenset[type]) -> bytes:
    """msgpack of ``obj``: maps in their given order, the types in ``widen`` with their
    widest header (valid msgpack, same values, other bytes), the rest as msgpack packs it."""
    kind = type(obj)
    if kind in (list, dict):
        parts = [_enc(v, widen) for v in (obj if kind is list else
                                          (x for kv in obj.items() for x in kv))]
        if kind in widen:
            return _WIDEST[kind] + len(obj).to_bytes(4, "big") + b"".join(parts)
        assert len(obj) < 16  # fixarray / fixmap: all this module's messages need
        return bytes([(0x90 if kind is list else 0x80) | len(obj)]) + b"".join(parts)
    if kind in widen and kind is int and obj >= 0:
        return _WIDEST[int] + obj.to_bytes(8, "big")
    if kind in widen and kind in (str, bytes):
        data = obj.encode() if kind is str else obj
        return _WIDEST[kind] + struct.pack(">I", len(data)) + data
    return msgpack.packb(obj, use_bin_type=True)


def reencode(payload: bytes, *, reverse: bool = False, widen: frozenset[type] = frozenset()
             ) -> bytes:
    """What the broker can do to a message without breaking its signature."""
    msg = msgpack.unpackb(payload, raw=False)
    return _enc(dict(sorted(msg.items(), reverse=reverse)), widen)


REENCODINGS = {
    "keys in another order": {"reverse": True},
    "integers as uint64": {"widen": frozenset({int})},
    "strings with str32 headers": {"widen": frozenset({str})},
    "byte strings with bin32 headers": {"widen": frozenset({bytes})},
    "maps and lists with 32-bit headers": {"widen": frozenset({dict, list})},
}


@pytest.mark.parametrize("how", REENCODINGS)
async def test_reencoded_item_is_refused_and_does_not_block_the_genuine_one(
        cloud: Cloud, how: str) -> None:
    device = Device("d1")
    genuine = device.item(1)
    assert reencode(genuine) == genuine  # the re-encoder is faithful when told nothing
    forged = reencode(genuine, **REENCODINGS[how])
    assert forged != genuine and msgpack.unpackb(forged) == msgpack.unpackb(genuine)
    body = {k: v for k, v in msgpack.unpackb(forged, raw=False).items() if k not in ("t", "v")}
    # the attack is real: the re-encoding's canonical form carries the device's signature
    device.key.verify_key.verify_object(ITEM_CONTEXT, {k: v for k, v in body.items() if k != "sig"},
                                        body["sig"])
    with pytest.raises(EnvelopeError, match="not in canonical form"):
        decode_item(forged)
    with structlog.testing.capture_logs() as logs:
        assert await cloud.ingest(forged) == []
    assert any(e["event"] == "ingest.rejected" and "canonical form" in e["reason"]
               for e in logs), logs
    assert await cloud.ingest(genuine) == [("d1", 1)]
    assert cloud.acked["d1"] == {1} and cloud.told.get("d1", []) == []


@pytest.mark.parametrize("how", REENCODINGS)
def test_reencoded_control_message_is_refused(how: str) -> None:
    """Every kind goes through the one decoder: a signed owner registration here."""
    genuine = build_control("owner_register", OWNER_SIG, {
        "owner": "alice", "pre_pk": OWNER_PRE.public.to_bytes(),
        "verify_key": OWNER_SIG.verify_key.raw})
    assert decode(genuine, CONTROL_KINDS)["owner"] == "alice"
    with pytest.raises(EnvelopeError, match="not in canonical form"):
        decode(reencode(genuine, **REENCODINGS[how]), CONTROL_KINDS)


def test_reordered_nested_map_is_refused() -> None:
    """Nested maps have one key order too (the ack's refusals, for instance)."""
    ack = {"rejected": [{"reason": "no", "seq": 2}], "seqs": [1], "t": "ack", "v": 1}
    assert decode(_enc(ack, frozenset()), "ack")["rejected"] == [{"reason": "no", "seq": 2}]
    ack["rejected"] = [{"seq": 2, "reason": "no"}]
    with pytest.raises(EnvelopeError, match="not in canonical form"):
        decode(_enc(ack, frozenset()), "ack")


WIRE_OBJECTS: dict[str, tuple[Callable[[], bytes], Callable[[bytes], Any]]] = {
    "write token": (lambda: issue_write_token(
        OWNER_SIG, "t1", SigningKey.generate().verify_key, ["twin:*"], device="d1",
        valid_for_s=3600).to_bytes(), WriteToken.from_bytes),
    "roster entry": (lambda: NodeIdentity.generate(0, "node-0").entry().to_bytes(),
                     RosterEntry.from_bytes),
    "capsule": (lambda: decode_item(Device("d1").item(1))["capsule"], Capsule.from_bytes),
}


@pytest.mark.parametrize("how", REENCODINGS)
@pytest.mark.parametrize("what", WIRE_OBJECTS)
def test_reencoded_token_roster_entry_and_capsule_are_refused(what: str, how: str) -> None:
    """Crypto objects (inside signed messages, or signed themselves) have one encoding."""
    build, parse = WIRE_OBJECTS[what]
    genuine = build()
    parse(genuine)
    assert reencode(genuine) == genuine
    with pytest.raises(ValidationError, match="not in canonical form"):
        parse(reencode(genuine, **REENCODINGS[how]))
