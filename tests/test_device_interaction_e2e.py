"""The device's interaction agent end to end through the real cloud twin (store, service,
re-encryption) on a real broker: an offline device converges on desired state when it comes
online, the owner sees the report, a requester's request is answered through the cloud, and
the owner reads the device's decision log with an ordinary history query."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cloud_interact import CloudWorld, cloud_world

from ciphertwin.agents.bundle import BrokerConnection, DeviceConfig
from ciphertwin.agents.device import DeviceAgent
from ciphertwin.agents.gatekeeper import Gatekeeper
from ciphertwin.agents.handlers import SimulatedThermostat
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.interaction import DeviceInteraction
from ciphertwin.agents.outbox import Outbox
from ciphertwin.agents.owner import DEFAULT_DEVICE_ATTRIBUTES
from ciphertwin.agents.reader import TwinReader
from ciphertwin.bus.envelope import decode
from ciphertwin.crypto.epochs import KeyEpochPolicy
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.protocol.twin_requests import build_request, open_answer
from ciphertwin.protocol.twin_state import build_desired, open_reported

GATEKEEPER = {
    "access": {"default": "deny", "rule": [
        {"name": "owner", "principals": ["owner"], "operations": ["*"]},
        {"name": "bob", "principals": ["bob"], "operations": ["set_target"]},
    ]},
    "manipulator": {"clamp": {"target_c": [15.0, 25.0]}},
}


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def cw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CloudWorld]:
    async with cloud_world(request.param, tmp_path) as world:
        yield world


def device_config(cw: CloudWorld) -> DeviceConfig:
    """The world's device (its keys hold the cloud's dev-d1 grant) as an enrolled device,
    with the write token an owner's enrolment gives (attributes of the default rules)."""
    w = cw.w
    token = issue_write_token(w.owner.sig, w.twin, w.device.sig.verify_key,
                              [*DEFAULT_DEVICE_ATTRIBUTES, f"twin:{w.twin}", "device:d1"],
                              device="d1", not_before=int(time.time()) - 60, valid_for_s=86400)
    identity = Identity("d1", "device", w.device.pre, w.device.sig, X25519KeyPair.generate(),
                        {"twin": w.twin})
    return DeviceConfig(identity=identity, twin=w.twin, device="d1", owner_pre=w.owner.pre.public,
                        owner_verify=w.owner.sig.verify_key, write_token=token,
                        broker=BrokerConnection(cw.ep.host, cw.ep.port, "d1", "x", cw.ep.prefix),
                        epoch_policy=KeyEpochPolicy.parse("hour"), rules=[],
                        source={"kind": "simulated"})


@contextlib.asynccontextmanager
async def device(cw: CloudWorld, home: Path) -> AsyncIterator[DeviceInteraction]:
    home.mkdir(exist_ok=True)
    async with cw.ep.bus("d1") as bus, Outbox(home / "outbox.db") as outbox:
        agent = DeviceAgent(device_config(cw), bus, outbox)
        inter = DeviceInteraction(agent, SimulatedThermostat(room_c=20.0),
                                  Gatekeeper.from_config(GATEKEEPER))
        tasks = [asyncio.create_task(agent.run()), asyncio.create_task(inter.run())]
        await asyncio.wait_for(inter.ready.wait(), 10)
        try:
            yield inter
        finally:
            inter.stop()
            agent.stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


async def set_desired(cw: CloudWorld, doc: dict[str, Any], base: int) -> dict[str, Any]:
    rid = secrets.token_hex(8)
    raw = build_desired(cw.w.owner.sig, cw.w.twin, "alice", cw.w.owner.pre.public, doc, base,
                        request_id=rid)
    reply = await cw.alice.request(cw.alice.topics.desired(cw.w.twin), raw,
                                   cw.alice.topics.replies("alice", rid), timeout=10)
    return decode(reply, "state_result").body


async def test_offline_device_converges_answers_and_logs_decisions(cw: CloudWorld,
                                                                   tmp_path: Path) -> None:
    w = cw.w
    assert (await set_desired(cw, {"target_c": 30.0}, 0))["ok"]  # the device is offline
    async with device(cw, tmp_path / "d1") as inter:
        # on its presence the cloud re-sends the latest desired; applied (clamped), reported
        await cw.owner_stream.wait(lambda: any(
            u["reported_version"] >= 1 for u in cw.owner_stream.of("state_update")), 15)
        upd = next(u for u in cw.owner_stream.of("state_update") if u["reported_version"] >= 1)
        rep = open_reported(decode(upd["doc"], "reported_set"), upd["key"], w.owner.pre,
                            w.owner.sig.verify_key)
        assert rep.desired_version == 1 and rep.state["target_c"] == 25.0
        assert not rep.in_sync and inter.applied == 1  # clamped: desired 30, reported 25
        # an in-range change converges to in_sync
        assert (await set_desired(cw, {"target_c": 22.0}, 1))["ok"]
        await cw.owner_stream.wait(lambda: any(
            u["in_sync"] for u in cw.owner_stream.of("state_update")), 10)
        # a requester's request through the cloud, answered by the device
        permit = w.permit(["request"])
        assert (await cw.grant_interact(permit))["ok"]
        raw, reply_key, rid = build_request(
            w.requester.sig, w.twin, "bob", w.owner.pre.public, "set_target",
            {"target_c": 23.0}, permit=permit.to_bytes(), devices=[w.device_recipient],
            deadline=time.time() + 60)
        await cw.bob.publish(cw.bob.topics.requests(w.twin), raw)
        await cw.bob_replies.wait(lambda: any(
            e["state"] == "answered" for _, e, _ in cw.bob_replies.messages), 10)
        status = next(e for _, e, _ in cw.bob_replies.messages if e["state"] == "answered")
        ans = open_answer(decode(status["answer"], "answer"), reply_key,
                          w.owner.sig.verify_key, rid, permit.devices)
        assert ans.ok and ans.result["target_c"] == 23.0
        # the decision log, read by the owner from the cloud's history
        assert await inter.agent.drained(15)
        reader = TwinReader(cw.alice, "alice", w.owner.pre, w.owner.sig.verify_key)
        items = await reader.history(w.twin)
        decisions = [i.reading["values"] for i in items if i.reading["type"] == "decision"]
        assert [(d["action"], d["ref"]) for d in decisions] == [
            ("clamp", "desired:1"), ("allow", "desired:2"), ("allow", rid)]
        assert decisions[2]["principal"] == "bob"
