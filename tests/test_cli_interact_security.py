"""The owner's and requester's side against a lying cloud, on a real broker (embedded, and
Mosquitto): the test plays the cloud with the protocol's own functions and sends garbage,
forged documents and forged answers on every topic the owner and requester listen on. They
must refuse each one (logged and counted, never a crash) and still take the genuine message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from ciphertwin.agents.identity import Identity
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.agents.reader import StateChange, TwinReader
from ciphertwin.agents.requester import (
    InteractionRefused, InteractionTimeout, Requester, StaleVersion,
)
from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import DeviceKeys, issue_interact_token, issue_write_token
from ciphertwin.protocol.items import DeviceCredentials
from ciphertwin.protocol.sealed_docs import OWNER_RECIPIENT, wrap_for
from ciphertwin.protocol.twin_requests import build_answer, open_request
from ciphertwin.protocol.twin_state import build_desired, build_reported

TWIN, DEVICE = "t1", "d1"
MOSQUITTO = ("127.0.0.1", 1883)


@dataclass
class Stage:
    """Owner alice, requester bob, a device's keys, and ``cloud``: the test's own bus
    connection, which plays the (lying) cloud."""

    alice: Identity
    bob: Identity
    device: Identity
    creds: DeviceCredentials
    cloud: BusClient
    alice_bus: BusClient
    bob_bus: BusClient

    def device_keys(self) -> DeviceKeys:
        return DeviceKeys(DEVICE, self.device.pre.public.to_bytes(),
                          self.device.signing.verify_key.raw, TWIN)


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def stage(request: pytest.FixtureRequest) -> AsyncIterator[Stage]:
    prefix = f"ct-sec-{secrets.token_hex(3)}/v1"
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "mosquitto":
            host, port = MOSQUITTO
        else:
            host, port = "127.0.0.1", free_port()
            await stack.enter_async_context(EmbeddedBroker(port=port))

        def bus(name: str) -> BusClient:
            return BusClient(host, port, client_id=f"{name}-{secrets.token_hex(3)}",
                             prefix=prefix, connect_timeout=5)
        alice, bob = Identity.generate("alice", "owner"), Identity.generate("bob", "receiver")
        device = Identity.generate(DEVICE, "device")
        token = issue_write_token(alice.signing, TWIN, device.signing.verify_key,
                                  [f"twin:{TWIN}", f"device:{DEVICE}"], device=DEVICE,
                                  valid_for_s=3600)
        creds = DeviceCredentials(TWIN, DEVICE, device.signing, token.to_bytes())
        buses = [await stack.enter_async_context(bus(n)) for n in ("cloud", "alice", "bob")]
        yield Stage(alice, bob, device, creds, *buses)


def _forged_creds(s: Stage) -> DeviceCredentials:
    """A device key and write token of the cloud's own making (not signed by alice)."""
    mallory = SigningKey.generate()
    token = issue_write_token(SigningKey.generate(), TWIN, mallory.verify_key,
                              [f"twin:{TWIN}", f"device:{DEVICE}"], device=DEVICE,
                              valid_for_s=3600)
    return DeviceCredentials(TWIN, DEVICE, mallory, token.to_bytes())


async def test_watch_refuses_garbage_and_forged_state_updates(stage: Stage) -> None:
    s = stage
    reader = TwinReader(s.alice_bus, "alice", s.alice.pre, s.alice.signing.verify_key)
    got: list[Any] = []

    async def watch() -> None:
        async for event in reader.watch_all(TWIN):
            got.append(event)
    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    topic = s.cloud.topics.stream(TWIN, "alice")

    def update(doc: bytes, kind: str, key: bytes | None = None) -> bytes:
        env = decode(doc, kind)
        return encode("state_update", {"twin": TWIN, "desired_version": 1, "reported_version": 1,
                                       "in_sync": True, "doc": doc,
                                       "key": key or wrap_for(env, OWNER_RECIPIENT)})
    stranger = SigningKey.generate()
    forged_desired = build_desired(stranger, TWIN, "alice", s.alice.pre.public, {"a": 1}, 0)
    other_twin = build_desired(s.alice.signing, "t2", "alice", s.alice.pre.public, {"a": 1}, 0)
    forged_report = build_reported(_forged_creds(s), s.alice.pre.public, 1, 1, {"a": 1}, True)
    genuine = build_reported(s.creds, s.alice.pre.public, 1, 1, {"target_c": 21}, True)
    wrong_key = wrap_for(decode(build_desired(s.alice.signing, TWIN, "alice", s.alice.pre.public,
                                              {"b": 2}, 0), "desired_set"), OWNER_RECIPIENT)
    hostile = [os.urandom(300), b"", encode("stream_items", {"items": [
                   {"item": os.urandom(64), "key": os.urandom(64)}]}),
               update(forged_desired, "desired_set"),
               encode("state_update", {**decode(update(other_twin, "desired_set"),
                                                "state_update").body}),
               update(forged_report, "reported_set"),
               update(build_desired(s.alice.signing, TWIN, "alice", s.alice.pre.public,
                                    {"a": 1}, 0), "desired_set", key=wrong_key),
               encode("state_update", {"twin": TWIN, "desired_version": 1,
                                       "reported_version": 1, "in_sync": True,
                                       "doc": os.urandom(200), "key": os.urandom(64)})]
    for payload in hostile:
        await s.cloud.publish(topic, payload)
    await s.cloud.publish(topic, update(genuine, "reported_set"))
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(got) == 1 and isinstance(got[0], StateChange), got
    assert got[0].reported is not None and got[0].reported.state == {"target_c": 21}
    assert reader.unreadable >= 5  # each forged or undecryptable document counted


async def _answer_state_queries(s: Stage, reply: dict[str, Any]) -> None:
    """Play the cloud's ``state_query`` handler: answer every query of alice with ``reply``."""
    async def on_query(topic: str, payload: bytes, retain: bool) -> None:
        q = decode(payload, "state_query")
        await s.cloud.publish(s.cloud.topics.replies("alice", q["request_id"]),
                              encode("state_reply", {"request_id": q["request_id"],
                                                     "twin": q["twin"], **reply}))
    await s.cloud.subscribe(s.cloud.topics.query("alice"), on_query)


async def test_get_state_does_not_take_the_clouds_word_for_a_document(stage: Stage) -> None:
    s = stage
    forged = build_desired(SigningKey.generate(), TWIN, "alice", s.alice.pre.public,
                           {"target_c": 99}, 2)
    report = build_reported(s.creds, s.alice.pre.public, 5, 3, {"target_c": 21}, False)
    await _answer_state_queries(s, {
        "desired_version": 3, "reported_version": 5, "in_sync": False, "desired": forged,
        "desired_key": wrap_for(decode(forged, "desired_set"), OWNER_RECIPIENT),
        "reported": report,
        "reported_key": wrap_for(decode(report, "reported_set"), OWNER_RECIPIENT)})
    owner = OwnerAgent(s.alice, s.alice_bus)
    state = await owner.get_state(TWIN)
    assert state.desired is None and state.reported is not None  # the forgery is left out
    assert state.reported.state == {"target_c": 21} and owner.reader.unreadable == 1
    # a merge needs the current document: refused rather than merged into a forgery
    with pytest.raises(InteractionRefused, match="may not read it"):
        await owner.set_desired(TWIN, {"mode": "auto"}, merge=True)


async def test_stale_write_is_retried_on_the_current_version_then_refused(stage: Stage) -> None:
    """A writer without --base-version re-reads the version when another writer got in first;
    the cloud (here: the test) saying "stale" every time ends in StaleVersion after 3 tries."""
    s = stage
    await _answer_state_queries(s, {"desired_version": 4, "reported_version": 0,
                                    "in_sync": False})
    seen: list[int] = []

    async def on_desired(topic: str, payload: bytes, retain: bool) -> None:
        env = decode(payload, "desired_set")
        seen.append(env["base_version"])
        await s.cloud.publish(s.cloud.topics.replies("alice", env["request_id"]), encode(
            "state_result", {"request_id": env["request_id"], "ok": False,
                             "reason": "stale: current desired_version is 5",
                             "desired_version": 5, "reported_version": 0}))
    await s.cloud.subscribe(s.cloud.topics.desired(TWIN), on_desired)
    owner = OwnerAgent(s.alice, s.alice_bus)
    with pytest.raises(StaleVersion, match="current desired_version is 5") as exc:
        await owner.set_desired(TWIN, {"target_c": 20})
    assert exc.value.current == 5 and seen == [4, 4, 4]
    seen.clear()
    with pytest.raises(StaleVersion):  # an explicit base version is tried exactly once
        await owner.set_desired(TWIN, {"target_c": 20}, base_version=4)
    assert seen == [4]


async def test_requester_takes_only_a_genuine_answer_from_a_listed_device(stage: Stage) -> None:
    s = stage
    permit = issue_interact_token(s.alice.signing, "bob", s.bob.signing.verify_key, [TWIN],
                                  ["request"], devices=[s.device_keys()])
    bob = Requester(s.bob, s.bob_bus, permit, s.alice.pre.public, s.alice.signing.verify_key)

    async def lying_cloud(topic: str, payload: bytes, retain: bool) -> None:
        env = decode(payload, "request")
        rid = env["request_id"]
        req = open_request(env, wrap_for(env, DEVICE), s.device.pre, s.alice.signing.verify_key)
        replies = s.cloud.topics.replies("bob", rid)

        def status(state: str, answer: bytes | None = None) -> bytes:
            body: dict[str, Any] = {"request_id": rid, "state": state, "reason": ""}
            if answer is not None:
                body["answer"] = answer
            return encode("request_status", body)
        for bad in (os.urandom(100), encode("request_status", {
                        "request_id": "ffffffffffffffff", "state": "answered", "reason": ""}),
                    status("answered"), status("answered", os.urandom(500)),
                    status("answered", build_answer(_forged_creds(s), req, True, "forged")),
                    status("queued")):
            await s.cloud.publish(replies, bad)
        await s.cloud.publish(replies, status("answered", build_answer(
            s.creds, req, True, {"target_c": 22})))
    await s.cloud.subscribe(s.cloud.topics.requests(TWIN), lying_cloud)
    outcome = await bob.send(TWIN, "set_target", {"target_c": 22}, timeout=10)
    assert outcome.ok and outcome.answer is not None
    assert outcome.answer.result == {"target_c": 22} and outcome.answer.device == DEVICE
    assert outcome.states == ("queued", "answered")

    # only forgeries: no answer is ever taken — the requester times out instead
    await s.cloud.unsubscribe(s.cloud.topics.requests(TWIN))

    async def only_forgeries(topic: str, payload: bytes, retain: bool) -> None:
        env = decode(payload, "request")
        req = open_request(env, wrap_for(env, DEVICE), s.device.pre, s.alice.signing.verify_key)
        await s.cloud.publish(s.cloud.topics.replies("bob", env["request_id"]), encode(
            "request_status", {"request_id": env["request_id"], "state": "answered",
                               "reason": "", "answer": build_answer(_forged_creds(s), req, True,
                                                                    "forged")}))
    await s.cloud.subscribe(s.cloud.topics.requests(TWIN), only_forgeries)
    with pytest.raises(InteractionTimeout, match="no answer within 1.5 s"):
        await bob.send(TWIN, "set_target", {"target_c": 23}, timeout=1.5)
