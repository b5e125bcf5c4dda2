"""Cloud twin over a real (embedded) broker: ingest, acks, grants, history, stream, revocation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy
from ciphertwin.crypto.kpcpre import PreKeyPair, rekey
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.agents.reader import TwinReader
from ciphertwin.protocol.control import build_control, control_request_id
from ciphertwin.protocol.items import DeviceCredentials, build_item


class World:
    """A cloud on an embedded broker plus the keys of an owner, a device and a receiver."""

    def __init__(self, broker: EmbeddedBroker, tmp: Path) -> None:
        self.broker, self.tmp = broker, tmp
        self.owner_pre, self.owner_sig = PreKeyPair.generate(), SigningKey.generate()
        self.bob_pre = PreKeyPair.generate()
        self.dev_sig = SigningKey.generate()
        token = issue_write_token(self.owner_sig, "t1", self.dev_sig.verify_key,
                                  ["twin:t1", "type:*", "device:d1"], device="d1",
                                  valid_for_s=3600)
        self.creds = DeviceCredentials("t1", "d1", self.dev_sig, token.to_bytes())
        self.keys = DataKeyManager(self.owner_pre.public, KeyEpochPolicy("hour"))

    def client(self, name: str) -> BusClient:
        return BusClient("127.0.0.1", self.broker.port, client_id=name)

    def item(self, seq: int, kind: str = "temperature", t: float | None = None) -> bytes:
        reading = {"type": kind, "values": {"v": seq}, "time": t or time.time()}
        attrs = ("device:d1", "twin:t1", f"type:{kind}")
        return build_item(self.creds, self.keys, seq, reading, attrs)


@pytest.fixture
async def world(tmp_path: Path):
    async with EmbeddedBroker() as broker:
        w = World(broker, tmp_path)
        async with w.client("cloud") as bus:
            cloud = CloudTwin(bus, SqliteTwinStore(tmp_path / "cloud.db"),
                              pool=ReencryptionPool(1, processes=False))
            async with cloud:
                w.cloud = cloud  # type: ignore[attr-defined]
                yield w


async def _control(bus: BusClient, w: World, kind: str, body: dict) -> dict:
    rid = body.get("grant_id") or "register"
    payload = build_control(kind, w.owner_sig, {"owner": "alice", **body})
    if kind == "owner_register":
        rid = control_request_id(decode(payload, kind))
    reply = await bus.request(bus.topics.control("alice"), payload,
                              bus.topics.replies("alice", rid), timeout=10)
    return decode(reply, "control_result").body


async def _register(bus: BusClient, w: World) -> None:
    res = await _control(bus, w, "owner_register", {
        "pre_pk": w.owner_pre.public.to_bytes(), "verify_key": w.owner_sig.verify_key.raw})
    assert res["ok"], res


async def test_ingest_ack_history_grant_revoke(world: World) -> None:
    w = world
    acks: list[dict] = []
    async with w.client("alice") as owner_bus, w.client("d1") as dev_bus, \
            w.client("bob") as bob_bus:
        await _register(owner_bus, w)

        async def on_ack(topic: str, payload: bytes, retain: bool) -> None:
            acks.append(decode(payload, "ack").body)

        await dev_bus.subscribe(dev_bus.topics.ack("t1", "d1"), on_ack)
        for seq in range(1, 6):
            kind = "temperature" if seq % 2 else "location"
            await dev_bus.publish(dev_bus.topics.twin_data("t1"), w.item(seq, kind))
        # a replay of seq 1 is acknowledged again, not stored twice
        await dev_bus.publish(dev_bus.topics.twin_data("t1"), w.item(1))  # new bytes, same seq
        for _ in range(100):
            if sum(len(a["seqs"]) + len(a["rejected"]) for a in acks) >= 6:
                break
            await asyncio.sleep(0.05)
        stored = sorted(s for a in acks for s in a["seqs"])
        assert stored == [1, 2, 3, 4, 5]
        assert [r["reason"] for a in acks for r in a["rejected"]] == [
            "another item is stored under this seq"]

        owner_reader = TwinReader(owner_bus, "alice", w.owner_pre, w.owner_sig.verify_key)
        items = await owner_reader.history("t1")
        assert [i.seq for i in items] == [1, 2, 3, 4, 5]
        assert items[1].reading["values"] == {"v": 2}

        # bob gets a grant for temperature only
        rk = rekey(w.owner_pre, "type:temperature AND twin:t1", w.bob_pre.public)
        res = await _control(owner_bus, w, "grant", {
            "grant_id": "g1", "receiver": "bob", "twins": ["t1"],
            "policy": "type:temperature AND twin:t1", "rekey": rk.to_bytes()})
        assert res["ok"], res
        bob = TwinReader(bob_bus, "bob", w.bob_pre, {"t1": w.owner_sig.verify_key})
        assert [i.seq for i in await bob.history("t1")] == [1, 3, 5]

        # live: bob sees new temperature items, not locations
        live: list[int] = []

        async def follow() -> None:
            async for it in bob.watch("t1"):
                live.append(it.seq)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        for seq in (6, 7):
            await dev_bus.publish(dev_bus.topics.twin_data("t1"),
                                  w.item(seq, "location" if seq == 6 else "temperature"))
        for _ in range(100):
            if live:
                break
            await asyncio.sleep(0.05)
        assert live == [7]

        # revoke: nothing new reaches bob, history is empty for him
        res = await _control(owner_bus, w, "revoke", {"grant_id": "g1"})
        assert res["ok"], res
        await dev_bus.publish(dev_bus.topics.twin_data("t1"), w.item(9))
        await asyncio.sleep(0.5)
        assert live == [7]
        assert await bob.history("t1") == []
        task.cancel()


async def test_forged_and_garbage_items_are_rejected(world: World) -> None:
    w = world
    async with w.client("alice") as owner_bus, w.client("d1") as dev_bus:
        await _register(owner_bus, w)
        mallory = SigningKey.generate()
        forged = DeviceCredentials("t1", "d1", mallory, w.creds.write_token)
        bad_sig = build_item(forged, w.keys, 1, {"type": "x", "values": {}, "time": time.time()},
                             ("twin:t1",))
        for payload in (b"\x00garbage", b"", bad_sig, b"\x81\xa1t\xa4item"):
            await dev_bus.publish(dev_bus.topics.twin_data("t1"), payload or b"\xc0")
        await dev_bus.publish(dev_bus.topics.twin_data("t1"), w.item(2))
        for _ in range(100):
            if w.cloud.ingest.stored >= 1:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert w.cloud.ingest.stored == 1  # type: ignore[attr-defined]
        assert w.cloud.ingest.rejected == 4  # type: ignore[attr-defined]
        reader = TwinReader(owner_bus, "alice", w.owner_pre, w.owner_sig.verify_key)
        assert [i.seq for i in await reader.history("t1")] == [2]
