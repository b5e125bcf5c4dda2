"""Issue 3 end to end, on the embedded broker and on Mosquitto: round trip, policy-limited
receiver, revocation, a cloud killed mid-stream, and hostile envelopes."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
import structlog

from ciphertwin.agents.bundle import BrokerConnection, enroll_from_bundle, load_enrolled_device
from ciphertwin.agents.device import DeviceAgent
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.outbox import Outbox
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.agents.sources import Reading
from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.demo.twin import run_demo
from ciphertwin.protocol.items import DeviceCredentials, build_item

MOSQUITTO = ("127.0.0.1", 1883)


async def test_demo_checks_pass_on_embedded_broker_with_acls() -> None:
    report = await run_demo(readings=6)
    assert report.checks and report.ok, report.checks


@pytest.mark.mosquitto
async def test_demo_checks_pass_on_mosquitto() -> None:
    report = await run_demo(readings=6, external=MOSQUITTO)
    assert report.checks and report.ok, report.checks


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def endpoint(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, int, str]]:
    prefix = f"ct-test-{secrets.token_hex(4)}/v1"
    if request.param == "mosquitto":
        yield (*MOSQUITTO, prefix)
        return
    async with EmbeddedBroker() as broker:
        yield ("127.0.0.1", broker.port, prefix)


def _bus(endpoint: tuple[str, int, str], name: str) -> BusClient:
    host, port, prefix = endpoint
    return BusClient(host, port, client_id=f"{name}-{secrets.token_hex(3)}", prefix=prefix)


def _cloud(bus: BusClient, db: Path) -> CloudTwin:
    return CloudTwin(bus, SqliteTwinStore(db), pool=ReencryptionPool(1, processes=False))


async def test_cloud_killed_mid_stream_loses_nothing(endpoint, tmp_path: Path) -> None:
    """Items produced while the cloud is down wait in the outbox; after the restart every
    item is stored exactly once and the outbox empties."""
    host, port, prefix = endpoint
    db = tmp_path / "cloud.db"
    alice = Identity.generate("alice", "owner")
    async with _bus(endpoint, "alice") as alice_bus, _bus(endpoint, "dev") as dev_bus:
        owner = OwnerAgent(alice, alice_bus)
        async with _bus(endpoint, "cloud") as cloud_bus, _cloud(cloud_bus, db):
            await owner.register()
            bundle = owner.enroll_device("t1", "d1", BrokerConnection(host, port, "d1", "x", prefix))
        enroll_from_bundle(bundle, tmp_path / "d1")
        config = load_enrolled_device(tmp_path / "d1")
        async with Outbox(tmp_path / "d1" / "outbox.db") as outbox:
            agent = DeviceAgent(config, dev_bus, outbox, resend_after=0.6)
            runner = asyncio.create_task(agent.run())

            async def produce(n: int, start: int) -> None:
                for i in range(start, start + n):
                    await agent.record(Reading("temperature", {"c": i}, time.time()))

            cloud_bus = _bus(endpoint, "cloud")
            async with cloud_bus, _cloud(cloud_bus, db):
                await produce(10, 0)
                assert await agent.drained(10)
                await produce(10, 10)  # the cloud dies while these are in flight
            await produce(10, 20)  # cloud down: items wait in the outbox
            await asyncio.sleep(0.3)
            assert await outbox.count() > 0
            cloud_bus = _bus(endpoint, "cloud")
            async with cloud_bus, _cloud(cloud_bus, db) as cloud:
                assert await agent.drained(20), "outbox did not drain after the restart"
                owner.reader.owner_keys = {"t1": alice.signing.verify_key}
                items = await owner.reader.history("t1")
                assert sorted(i.seq for i in items) == list(range(1, 31))
                assert sorted(i.reading["values"]["c"] for i in items) == list(range(30))
                assert len(await cloud.store.history("t1", limit=1000)) == 30
            agent.stop()
            await runner


async def test_hostile_envelopes_are_rejected_and_logged(endpoint, tmp_path: Path) -> None:
    alice = Identity.generate("alice", "owner")
    dev_key = Identity.generate("d1", "device")
    async with _bus(endpoint, "cloud") as cloud_bus, _cloud(cloud_bus, tmp_path / "c.db") as cloud, \
            _bus(endpoint, "alice") as alice_bus, _bus(endpoint, "dev") as dev_bus:
        owner = OwnerAgent(alice, alice_bus)
        await owner.register()
        host, port, prefix = endpoint
        bundle = owner.enroll_device("t1", "d1", BrokerConnection(host, port, "d1", "x", prefix))
        from ciphertwin.crypto.epochs import DataKeyManager

        keys = DataKeyManager(alice.pre.public)
        good = DeviceCredentials("t1", "d1", bundle.device_signing, bundle.write_token)
        forged = DeviceCredentials("t1", "d1", dev_key.signing, bundle.write_token)

        def item(creds: DeviceCredentials, seq: int) -> bytes:
            reading = {"type": "temperature", "values": {"c": seq}, "time": time.time()}
            return build_item(creds, keys, seq, reading, ("twin:t1", "type:temperature"))

        first = item(good, 1)
        unsigned = bytearray(first)
        unsigned[-64:] = bytes(64)  # signature field zeroed
        hostile = {
            "malformed": b"\x93\x01\x02garbage",
            "unsigned": bytes(unsigned),
            "forged": item(forged, 2),
            "conflicting replay": item(good, 1),
            "oversized": msgpack.packb({"t": "item", "v": 1, "pad": b"x" * 200_000}),
        }
        topic = dev_bus.topics.twin_data("t1")
        with structlog.testing.capture_logs() as logs:
            await dev_bus.publish(topic, first)
            for _ in range(40):
                if cloud.ingest.stored:
                    break
                await asyncio.sleep(0.05)
            for payload in hostile.values():
                await dev_bus.publish(topic, payload)
            await dev_bus.publish(topic, first)  # exact replay: acknowledged, not stored again
            await dev_bus.publish(topic, item(good, 4))
            for _ in range(100):  # the oversized one never reaches the ingest (see below)
                if cloud.ingest.stored >= 2 and cloud.ingest.rejected >= len(hostile) - 1:
                    break
                await asyncio.sleep(0.05)
        rejections = [e for e in logs if e["event"] == "ingest.rejected"]
        dropped = [e for e in logs if e["event"] == "bus.oversize_dropped"]
        assert cloud.ingest.stored == 2
        assert len(rejections) == len(hostile) - 1, [r["reason"] for r in rejections]
        assert all(r.get("reason") for r in rejections)
        assert [e["size"] for e in dropped] == [len(hostile["oversized"])]  # before decoding
        assert [e.seq for e in await cloud.store.history("t1")] == [1, 4]
