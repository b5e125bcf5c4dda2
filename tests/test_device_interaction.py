"""The device's interaction agent over a real (embedded) broker: desired state applied and
reported, requests answered, replays, forged writers, revoked requesters, approvals, the
simulator and manipulator, the decision log — with every cloud-side message built by the
protocol functions (the test plays the cloud: it re-encrypts with the device's grant re-key
and relays on the device's inbox, exactly what the cloud twin does)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ciphertwin.agents.bundle import BrokerConnection, enroll_from_bundle, load_enrolled_device
from ciphertwin.agents.device import DeviceAgent
from ciphertwin.agents.device_settings import WakeSchedule
from ciphertwin.agents.gatekeeper import Gatekeeper, sign_image_hex
from ciphertwin.agents.handlers import SimulatedThermostat
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.interaction import DeviceInteraction
from ciphertwin.agents.outbox import Outbox
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.agents.sources import Reading
from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.kpcpre import PreCiphertext, ReKey, reencrypt, rekey
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import InteractToken, issue_interact_token
from ciphertwin.protocol.control import build_control
from ciphertwin.protocol.items import decode_item, key_from_capsule, open_item
from ciphertwin.protocol.sealed_docs import OWNER_RECIPIENT, Recipient, new_request_id, wrap_for
from ciphertwin.protocol.twin_requests import (
    AnswerBody, build_request, open_answer, sign_approval, verify_presence,
)
from ciphertwin.protocol.twin_state import ReportedDoc, build_desired, open_reported
from ciphertwin.crypto.tokens import DeviceKeys

TWIN, DEVICE = "t1", "d1"
APPROVERS = {name: SigningKey.generate() for name in ("ann", "cat", "dan")}
IMAGE_SIGNER = SigningKey.generate()


def gatekeeper_config() -> dict[str, Any]:
    return {
        "access": {"default": "deny", "rule": [
            {"name": "owner", "principals": ["owner"], "operations": ["*"]},
            {"name": "bob", "principals": ["bob"], "operations": ["desired", "set_target",
                                                                  "get_state", "boost"]},
            {"name": "firmware", "principals": ["*"], "operations": ["firmware_update"],
             "approvals": {"m": 2, "approvers": {n: k.verify_key.raw.hex()
                                                 for n, k in APPROVERS.items()}},
             "image_signer": IMAGE_SIGNER.verify_key.raw.hex()},
            {"name": "quiet", "effect": "deny", "principals": ["*"], "operations": ["reboot"],
             "silent": True},
        ]},
        "manipulator": {"clamp": {"target_c": [15.0, 25.0]}, "redact": ["owner_name"],
                        "coarsen": {"location": 100}},
        "simulator": {"horizon_s": 3600, "envelope": {"room_c": [16.0, 26.0]},
                      "operations": ["desired", "set_target", "boost"]},
    }


class CountingThermostat(SimulatedThermostat):
    """The built-in actuator, counting what reaches it (so a replay that ran twice shows)."""

    def __init__(self) -> None:
        super().__init__(room_c=20.0)
        self.calls: list[str] = []

    def __call__(self, op: str, args: dict[str, Any]) -> Any:
        self.calls.append(op)
        return super().__call__(op, args)


@dataclass
class Rig:
    tmp: Path
    port: int
    prefix: str
    owner: Identity
    bob: SigningKey
    device_rekey: ReKey
    device_keys: DeviceKeys
    cloud: BusClient
    agent: DeviceAgent
    inter: DeviceInteraction
    handler: CountingThermostat
    got: dict[str, list[bytes]] = field(default_factory=dict)
    keys: dict[bytes, bytes] = field(default_factory=dict)

    # -- playing the cloud -----------------------------------------------------------------
    async def relay(self, kind: str, body: dict[str, Any]) -> None:
        await self.cloud.publish(self.cloud.topics.inbox(DEVICE), encode(kind, body))

    def desired(self, doc: dict[str, Any], base: int, *, signer: SigningKey | None = None,
                writer: str = "alice", permit: InteractToken | None = None) -> bytes:
        return build_desired(signer or self.owner.signing, TWIN, writer, self.owner.pre.public,
                             doc, base, permit=None if permit is None else permit.to_bytes())

    async def send_desired(self, raw: bytes) -> None:
        env = decode(raw, "desired_set")
        key = reencrypt(self.device_rekey, PreCiphertext.from_bytes(wrap_for(env, "owner")))
        await self.relay("inbox_desired", {"twin": TWIN, "version": env["version"], "doc": raw,
                                           "key": key.to_bytes()})

    def permit(self, rights: tuple[str, ...] = ("desired", "request"), *,
               owner: SigningKey | None = None, ops: tuple[str, ...] = ("*",)) -> InteractToken:
        return issue_interact_token(owner or self.owner.signing, "bob", self.bob.verify_key,
                                    [TWIN], rights, operations=ops, devices=[self.device_keys])

    def request(self, op: str, args: dict[str, Any], *, permit: InteractToken | None,
                signer: SigningKey | None = None, requester: str = "bob", **kw: Any
                ) -> tuple[bytes, Any, str]:
        return build_request(signer or self.bob, TWIN, requester, self.owner.pre.public, op,
                             args, permit=None if permit is None else permit.to_bytes(),
                             devices=[Recipient(DEVICE, self.owner_device_pk())],
                             deadline=time.time() + 600, **kw)

    def owner_device_pk(self):  # noqa: ANN201
        from ciphertwin.crypto.kpcpre import PrePublicKey

        return PrePublicKey.from_bytes(self.device_keys.pre_pk)

    async def send_request(self, raw: bytes) -> None:
        env = decode(raw, "request")
        await self.relay("inbox_request", {"request": raw, "wrap": wrap_for(env, DEVICE)})

    async def revoke(self, token: InteractToken, signer: SigningKey | None = None) -> None:
        ctl = build_control("interact_revoke", signer or self.owner.signing, {
            "owner": "alice", "request_id": new_request_id(), "token_id": token.token_id})
        await self.relay("inbox_revoke", {"revoke": ctl})

    # -- what the owner / requester see ----------------------------------------------------
    async def wait(self, kind: str, n: int, timeout: float = 10.0) -> list[bytes]:
        t0 = time.monotonic()
        while len(self.got.get(kind, [])) < n:
            assert time.monotonic() - t0 < timeout, f"{n} {kind} not within {timeout} s " \
                                                    f"(got {len(self.got.get(kind, []))})"
            await asyncio.sleep(0.02)
        return self.got[kind]

    async def report(self, n: int) -> ReportedDoc:
        raw = (await self.wait("reported", n))[n - 1]
        env = decode(raw, "reported_set")
        return open_reported(env, wrap_for(env, OWNER_RECIPIENT), self.owner.pre,
                             self.owner.signing.verify_key)

    async def answer(self, n: int, reply_key: Any, rid: str) -> AnswerBody:
        raw = (await self.wait("answers", n))[n - 1]
        return open_answer(decode(raw, "answer"), reply_key, self.owner.signing.verify_key, rid,
                           [self.device_keys])

    async def owner_readings(self, rtype: str, n: int, timeout: float = 10.0) -> list[dict]:
        """Readings of ``rtype`` the owner can open from the items the device published."""
        t0 = time.monotonic()
        while True:
            seen: dict[int, dict] = {}
            for raw in list(self.got.get("data", [])):
                env = decode_item(raw)
                if env.get("capsule") is not None:
                    cid, key = key_from_capsule(self.owner.pre, env["capsule"])
                    self.keys[cid] = key
                key = self.keys.get(env["capsule_id"])
                if key is None:
                    continue
                item = open_item(env, key, self.owner.signing.verify_key)
                if item.reading["type"] == rtype:
                    seen[item.seq] = item.reading
            if len(seen) >= n:
                return [seen[s] for s in sorted(seen)]
            assert time.monotonic() - t0 < timeout, f"{n} {rtype} readings not within {timeout} s"
            await asyncio.sleep(0.05)

    async def decisions(self, n: int) -> list[dict]:
        return [r["values"] for r in await self.owner_readings("decision", n)]


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Every test runs on the embedded broker and on Mosquitto (when it runs)."""
    return request.param


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, broker_kind: str, *, gatekeeper: Gatekeeper | None = None,
              wake: WakeSchedule | None = None, handler: Any = None) -> AsyncIterator[Rig]:
    prefix = f"ct-inter-{secrets.token_hex(3)}/v1"
    broker: EmbeddedBroker | None = None
    if broker_kind == "mosquitto":
        port = 1883
    else:
        port = free_port()
        broker = EmbeddedBroker(port=port)
        await broker.start()

    def bus(name: str) -> BusClient:
        return BusClient("127.0.0.1", port, client_id=f"{name}-{secrets.token_hex(3)}",
                         prefix=prefix, connect_timeout=5)

    alice = Identity.generate("alice", "owner")
    try:
        async with bus("cloud") as cloud, bus(DEVICE) as dev_bus:
            bundle = OwnerAgent(alice, cloud).enroll_device(
                TWIN, DEVICE, BrokerConnection("127.0.0.1", port, DEVICE, "x", prefix))
            enroll_from_bundle(bundle, tmp_path / DEVICE, overwrite=True)
            config = load_enrolled_device(tmp_path / DEVICE)
            device_keys = DeviceKeys(DEVICE, bundle.device_pre.public.to_bytes(),
                                     bundle.device_signing.verify_key.raw)
            got: dict[str, list[bytes]] = {}
            t = cloud.topics
            for kind, topic in (("reported", t.reported(TWIN)), ("answers", t.answers(TWIN)),
                                ("presence", t.presence(DEVICE)), ("data", t.twin_data(TWIN))):
                async def collect(topic: str, payload: bytes, retain: bool, k: str = kind) -> None:
                    got.setdefault(k, []).append(payload)
                await cloud.subscribe(topic, collect)
            gk = gatekeeper or Gatekeeper.from_config(gatekeeper_config())
            async with Outbox(tmp_path / DEVICE / "outbox.db") as outbox:
                manip = gk.manipulator
                agent = DeviceAgent(config, dev_bus, outbox,
                                    outgoing=manip.outgoing if manip.rewrites_outgoing else None)
                counting = CountingThermostat()
                inter = DeviceInteraction(agent, handler or counting, gk, wake_schedule=wake)
                tasks = [asyncio.create_task(agent.run()), asyncio.create_task(inter.run())]
                await asyncio.wait_for(inter.ready.wait(), 10)
                r = Rig(tmp_path, port, prefix, alice, SigningKey.generate(),
                        rekey(alice.pre, f'"twin:{TWIN}"', bundle.device_pre.public),
                        device_keys, cloud, agent, inter, counting, got)
                try:
                    yield r
                finally:
                    r.inter.stop()
                    agent.stop()
                    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    finally:
        if broker is not None:
            await broker.stop()


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


# --- P4: desired -> applied -> reported -----------------------------------------------------

async def test_desired_applied_reported_and_replays_refused(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        v1 = r.desired({"target_c": 22.0}, 0)
        await r.send_desired(v1)
        rep = await r.report(1)
        assert (rep.version, rep.desired_version, rep.in_sync) == (1, 1, True)
        assert rep.state["target_c"] == 22.0 and rep.device == DEVICE
        assert r.handler.calls == ["desired"]
        # the same version again: not applied again, the same report repeated (the cloud
        # may have missed it)
        await r.send_desired(v1)
        await r.wait("reported", 2)
        assert r.got["reported"][1] == r.got["reported"][0]
        await r.send_desired(r.desired({"target_c": 23.0}, 1))
        rep2 = await r.report(3)
        assert (rep2.version, rep2.desired_version, rep2.state["target_c"]) == (2, 2, 23.0)
        with capture_logs() as logs:
            await r.send_desired(v1)  # an old version replayed
            await until(lambda: any(e["event"] == "device.inbox_refused" for e in logs))
        assert "older than the applied 2" in next(
            e["reason"] for e in logs if e["event"] == "device.inbox_refused")
        assert r.handler.calls == ["desired", "desired"]
        assert r.handler.state()["target_c"] == 23.0
        decisions = await r.decisions(2)
        assert [(d["action"], d["ref"], d["principal"]) for d in decisions] == [
            ("allow", "desired:1", "alice"), ("allow", "desired:2", "alice")]


async def test_forged_and_unauthorised_writers_refused(tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        mallory = SigningKey.generate()
        bad = [
            r.desired({"target_c": 24.0}, 0, signer=mallory),  # claims to be the owner
            r.desired({"target_c": 24.0}, 0, signer=r.bob, writer="bob",
                      permit=r.permit(("request",))),  # no "desired" right
            r.desired({"target_c": 24.0}, 0, signer=r.bob, writer="bob",
                      permit=r.permit(owner=mallory)),  # permit not signed by the owner
            r.desired({"target_c": 24.0}, 0, signer=mallory, writer="bob",
                      permit=r.permit()),  # someone else's permit
        ]
        with capture_logs() as logs:
            for raw in bad:
                await r.send_desired(raw)
            await until(lambda: sum(e["event"] == "device.inbox_refused" for e in logs) == 4)
        reasons = [e["reason"] for e in logs if e["event"] == "device.inbox_refused"]
        assert all(reasons) and r.handler.calls == [] and "reported" not in r.got
        # a genuine permit holder may write
        await r.send_desired(r.desired({"target_c": 24.0}, 0, signer=r.bob, writer="bob",
                                       permit=r.permit()))
        rep = await r.report(1)
        assert rep.state["target_c"] == 24.0 and rep.in_sync
        assert (await r.decisions(1))[0]["principal"] == "bob"


async def test_clamp_and_simulator_refusal_reported_out_of_sync(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        await r.send_desired(r.desired({"target_c": 30.0}, 0))
        rep = await r.report(1)
        assert rep.state["target_c"] == 25.0 and not rep.in_sync  # clamped: desired != reported
        await r.send_desired(r.desired({"target_c": 15.0}, 1))  # cools below 16 within the hour
        rep = await r.report(2)
        assert rep.desired_version == 2 and not rep.in_sync and rep.state["target_c"] == 25.0
        assert r.handler.calls == ["desired"]
        clamp, unsafe = await r.decisions(2)
        assert clamp["action"] == "clamp" and clamp["clamped"] == "target_c"
        assert unsafe["action"] == "refuse" and unsafe["rule"] == "simulator"
        assert "room_c leaves the safe envelope [16, 26]" in unsafe["reason"]
        assert "min 15." in unsafe["reason"]  # the prediction is the reason


# --- P5: requests and answers ---------------------------------------------------------------

async def test_request_answered_and_replay_answered_from_cache(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        permit = r.permit()
        raw, reply, rid = r.request("set_target", {"target_c": 23.5}, permit=permit)
        await r.send_request(raw)
        ans = await r.answer(1, reply, rid)
        assert ans.ok and ans.result["target_c"] == 23.5 and ans.device == DEVICE
        rep = await r.report(1)  # the request changed the state: reported
        assert rep.state["target_c"] == 23.5 and rep.desired_version == 0
        await r.send_request(raw)  # replayed (or redelivered by a restarted cloud)
        await r.wait("answers", 2)
        assert r.got["answers"][1] == r.got["answers"][0]
        assert r.handler.calls == ["set_target"]
        # an owner's own request needs no permit; read-only requests report nothing
        raw, reply, rid = r.request("get_state", {}, permit=None, signer=r.owner.signing,
                                    requester="alice")
        await r.send_request(raw)
        assert (await r.answer(3, reply, rid)).ok
        await asyncio.sleep(0.3)
        assert len(r.got["reported"]) == 1


async def test_request_replay_after_restart_not_reexecuted(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        raw, reply, rid = r.request("set_target", {"target_c": 22.5}, permit=r.permit())
        await r.send_request(raw)
        first = await r.answer(1, reply, rid)
        await r.send_desired(r.desired({"target_c": 21.0}, 0))
        await r.report(2)
        # a new interaction on the same store (a device restart)
        r.inter.stop()
        await asyncio.sleep(0.2)
        again = DeviceInteraction(r.agent, r.handler, r.inter.gatekeeper)
        task = asyncio.create_task(again.run())
        await asyncio.wait_for(again.ready.wait(), 10)
        try:
            await r.send_request(raw)
            second = await r.answer(2, reply, rid)
            assert second == first and r.handler.calls == ["set_target", "desired"]
            with capture_logs() as logs:
                await r.send_desired(r.desired({"target_c": 21.0}, 0))  # version 1 again
                await r.wait("reported", 3)  # same version: reported again, not applied
            assert r.handler.calls == ["set_target", "desired"]
            assert not [e for e in logs if e["event"] == "device.inbox_refused"]
        finally:
            again.stop()
            await asyncio.wait_for(task, 10)


async def test_revoked_requester_refused_at_the_device(tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        permit = r.permit()
        with capture_logs() as logs:
            await r.revoke(permit, signer=SigningKey.generate())  # forged: not the owner's
            await until(lambda: any(e["event"] == "device.inbox_refused" for e in logs))
        raw, reply, rid = r.request("get_state", {}, permit=permit)
        await r.send_request(raw)
        assert (await r.answer(1, reply, rid)).ok  # the forged revocation changed nothing
        await r.revoke(permit)
        await asyncio.sleep(0.3)
        raw, reply, rid = r.request("set_target", {"target_c": 24.0}, permit=permit)
        await r.send_request(raw)  # the cloud forwards it anyway
        ans = await r.answer(2, reply, rid)
        assert not ans.ok and "revoked" in ans.reason
        await r.send_desired(r.desired({"target_c": 24.0}, 0, signer=r.bob, writer="bob",
                                       permit=permit))
        rep = await r.report(1)
        assert not rep.in_sync and rep.state["target_c"] == 21.0
        assert r.handler.calls == ["get_state"]
        refused = [d for d in await r.decisions(3) if d["code"] == "revoked"]
        assert len(refused) == 2


async def test_m_of_n_approvals_and_image_signature(tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        permit = r.permit()
        image = os.urandom(4096)

        async def firmware(approvers: list[tuple[str, SigningKey]], n: int, *,
                           signer: SigningKey = IMAGE_SIGNER) -> AnswerBody:
            rid = new_request_id()
            args = {"version": "2.0", "image_sig": sign_image_hex(signer, image)}
            approvals = [sign_approval(k, name, TWIN, rid, "firmware_update", args, image)
                         for name, k in approvers]
            raw, reply, _ = r.request("firmware_update", args, permit=permit,
                                      approvals=approvals, attachment=image, request_id=rid)
            await r.send_request(raw)
            return await r.answer(n, reply, rid)

        a, c, d = (("ann", APPROVERS["ann"]), ("cat", APPROVERS["cat"]),
                   ("dan", APPROVERS["dan"]))
        one = await firmware([a], 1)
        assert not one.ok and "needs 2 of 3 approvals, has 1" in one.reason
        forged = await firmware([a, ("cat", APPROVERS["dan"])], 2)
        assert not forged.ok and "cat (signature invalid)" in forged.reason
        bad_image = await firmware([a, c], 3, signer=SigningKey.generate())
        assert not bad_image.ok and "image signature" in bad_image.reason
        assert r.handler.calls == []
        ok = await firmware([c, d], 4)
        assert ok.ok and ok.result["installed"] == "2.0"
        assert r.handler.calls == ["firmware_update"] and r.handler.state()["firmware"] == "2.0"


async def test_silent_refusal_and_simulator_refusal_of_a_request(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        permit = r.permit()
        raw, _, _ = r.request("reboot", {}, permit=permit)
        await r.send_request(raw)  # silent: no answer
        raw, reply, rid = r.request("boost", {"mode": "boost", "room_c": 25.0}, permit=permit)
        await r.send_request(raw)
        ans = await r.answer(1, reply, rid)
        assert not ans.ok and "room_c leaves the safe envelope" in ans.reason
        # "desired" is no request operation: it would bypass versions and reports
        raw, reply, rid = r.request("desired", {"target_c": 22.0}, permit=permit)
        await r.send_request(raw)
        ans = await r.answer(2, reply, rid)
        assert not ans.ok and "desired state" in ans.reason
        await asyncio.sleep(0.3)
        assert len(r.got["answers"]) == 2 and r.handler.calls == []
        silent, unsafe, reserved = await r.decisions(3)
        assert silent["silent"] and silent["rule"] == "quiet" and unsafe["code"] == "unsafe"
        assert reserved["code"] == "reserved"


# --- outgoing manipulation, garbage, presence ------------------------------------------------

async def test_redaction_and_coarsening_visible_in_what_the_owner_reads(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        await r.agent.record(Reading("location", {"lat": 48.20821, "lon": 16.37383,
                                                  "owner_name": "Ann", "speed": 1.5}))
        await r.agent.record(Reading("temperature", {"c": 21.5, "owner_name": "Ann"}))
        loc = (await r.owner_readings("location", 1))[0]["values"]
        temp = (await r.owner_readings("temperature", 1))[0]["values"]
        assert "owner_name" not in loc and "owner_name" not in temp
        assert (loc["lat"], loc["lon"]) != (48.20821, 16.37383)
        assert abs(loc["lat"] - 48.20821) < 0.001 and loc["speed"] == 1.5


async def test_garbage_on_the_inbox_is_refused_and_the_device_carries_on(
        tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind) as r:
        inbox = r.cloud.topics.inbox(DEVICE)
        good = r.desired({"target_c": 22.0}, 0)
        env = decode(good, "desired_set")
        key = reencrypt(r.device_rekey, PreCiphertext.from_bytes(wrap_for(env, "owner")))
        garbage = [
            b"", os.urandom(200), encode("inbox_wake", {"twin": "other", "time": time.time()}),
            encode("ack", {"seqs": [], "rejected": []}),
            encode("inbox_desired", {"twin": TWIN, "version": 7, "doc": good,
                                     "key": key.to_bytes()}),  # version mismatch
            encode("inbox_desired", {"twin": TWIN, "version": 1, "doc": good,
                                     "key": os.urandom(300)}),  # not a wrap
            encode("inbox_desired", {"twin": TWIN, "version": 1, "doc": os.urandom(500),
                                     "key": key.to_bytes()}),
            encode("inbox_request", {"request": os.urandom(300), "wrap": os.urandom(100)}),
            encode("inbox_revoke", {"revoke": os.urandom(100)}),
        ]
        with capture_logs() as logs:
            for payload in garbage:
                await r.cloud.publish(inbox, payload)
            await until(lambda: r.inter.refused >= len(garbage) - 1, 10, "refusals")
        refusals = [e for e in logs if e["event"] == "device.inbox_refused"]
        assert all(e["reason"] for e in refusals)
        assert not [e for e in logs if e["event"] == "device.inbox_failed"]
        await r.send_desired(good)
        assert (await r.report(1)).in_sync


async def test_presence_and_wake_schedule(tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind, wake=WakeSchedule(window_s=1.0, sleep_s=60.0)) as r:
        first = decode((await r.wait("presence", 1))[0], "presence")
        verify_presence(first, r.owner.signing.verify_key, now=time.time())
        assert first["awake"] and first["until"] <= time.time() + 1.5
        def last_presence() -> dict:
            return decode(r.got["presence"][-1], "presence").body

        await until(lambda: not last_presence()["awake"], 5, "asleep after the window")
        asleep = last_presence()
        assert not asleep["awake"] and asleep["next_wake"] > time.time() + 50
        n = len(r.got["presence"])
        await r.relay("inbox_wake", {"twin": TWIN, "time": time.time()})
        await until(lambda: r.inter.awake, 5, "woken")
        await r.wait("presence", n + 1)
        assert decode(r.got["presence"][n], "presence")["awake"]
        # the device's own wake cap holds whatever the cloud sends
        r.inter.wake = WakeSchedule(window_s=1.0, sleep_s=60.0, max_wakes_per_hour=1)
        await until(lambda: not last_presence()["awake"], 5, "asleep again")
        with capture_logs() as logs:
            await r.relay("inbox_wake", {"twin": TWIN, "time": time.time()})
            await until(lambda: any(e["event"] == "device.inbox_refused" for e in logs), 5)
        assert not r.inter.awake


async def test_always_awake_presence_renewed(tmp_path: Path, broker_kind: str) -> None:
    async with rig(tmp_path, broker_kind, wake=WakeSchedule(window_s=1.0)) as r:
        await r.wait("presence", 3, timeout=5)
        envs = [decode(p, "presence") for p in r.got["presence"][:3]]
        assert all(e["awake"] and e.get("next_wake") is None for e in envs)
    last = decode(r.got["presence"][-1], "presence")
    assert not last["awake"]  # said goodbye on stop


async def test_plain_callable_handler_and_its_failures(tmp_path: Path,
                                                      broker_kind: str) -> None:
    """A handler that is only a function (async here): the applied document is the reported
    state; its exceptions become refusals with the exception's type, never a crash, and the
    log names where it failed without the arguments."""
    seen: list[tuple[str, dict]] = []

    async def handler(op: str, args: dict[str, Any]) -> Any:
        seen.append((op, args))
        if op == "divide":
            return args["a"] / args["b"]
        return None  # for "desired": the document itself is then the reported state

    async with rig(tmp_path, broker_kind, gatekeeper=Gatekeeper.permissive(),
                   handler=handler) as r:
        await r.send_desired(r.desired({"lamp": {"on": True, "level": 3}}, 0))
        rep = await r.report(1)
        assert rep.state == {"lamp": {"on": True, "level": 3}} and rep.in_sync
        permit = r.permit()
        raw, reply, rid = r.request("divide", {"a": 1, "b": 4}, permit=permit)
        await r.send_request(raw)
        assert (await r.answer(1, reply, rid)).result == 0.25
        with capture_logs() as logs:
            raw, reply, rid = r.request("divide", {"a": 1, "b": 0}, permit=permit)
            await r.send_request(raw)
            ans = await r.answer(2, reply, rid)
        assert not ans.ok and ans.reason == "handler failed (ZeroDivisionError)"
        failed = next(e for e in logs if e["event"] == "device.handler_failed")
        assert "ZeroDivisionError at test_device_interaction.py" in failed["error"]
        assert "exc_info" not in failed and "'b': 0" not in str(failed)
        raw, reply, rid = r.request("blob", {}, permit=permit)  # result is no JSON value
        seen_before = len(seen)

        async def bytes_result(op: str, args: dict[str, Any]) -> Any:
            seen.append((op, args))
            return b"\x00raw"

        r.inter.handler = bytes_result
        await r.send_request(raw)
        ans = await r.answer(3, reply, rid)
        assert not ans.ok and "cannot be sent" in ans.reason and len(seen) == seen_before + 1
        assert len(r.got["reported"]) == 1  # no state() and requests: nothing more to report


@pytest.mark.parametrize("bad_doc", [{"k" * 65: 1}, {"a": "x" * 17000}])
async def test_oversized_or_bad_desired_never_built(tmp_path: Path, bad_doc: dict) -> None:
    """The writer's own check refuses such documents; the device applies the same check
    when opening (open_desired → check_document), so nothing oversized reaches a handler."""
    from ciphertwin.errors import ValidationError

    owner = SigningKey.generate()
    with pytest.raises(ValidationError):
        build_desired(owner, TWIN, "alice", Identity.generate("x", "owner").pre.public,
                      bad_doc, 0)
