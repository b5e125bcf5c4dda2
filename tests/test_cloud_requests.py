"""Requests (P5) through the cloud on a real broker (embedded amqtt, and Mosquitto when it
runs): round trip with an answer only the requester opens, refusals (unknown, revoked,
expired requester; replay; rate limits; queue cap), wake cap, expiry, and the Must of the
issue: 1,000 queued requests for a sleeping device survive a cloud restart and are
delivered in order (SQLite, and PostgreSQL when it runs)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cloud_interact import Collector, CloudWorld, cloud_world, endpoint
from interact_world import make_world

from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin.store_postgres import PostgresTwinStore
from ciphertwin.crypto.tokens import InteractToken
from ciphertwin.protocol.twin_requests import build_answer, build_request, open_answer, open_request

DSN = os.environ.get("CIPHERTWIN_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def cw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CloudWorld]:
    async with cloud_world(request.param, tmp_path, sweep_interval_s=0.2) as world:
        yield world


class Requester:
    """bob's side: build (with PROTO's functions), send, collect statuses."""

    def __init__(self, cw: CloudWorld, permit: InteractToken | None) -> None:
        self.cw, self.permit = cw, permit
        self.statuses = cw.bob_replies  # every status bob gets
        self.keys: dict[str, Any] = {}

    async def start(self) -> Requester:
        return self

    def build(self, op: str = "set_target", args: dict[str, Any] | None = None, *,
              wake: bool = False, deadline_in: float = 600.0,
              permit: InteractToken | None = None) -> tuple[bytes, str]:
        w = self.cw.w
        token = permit or self.permit
        raw, reply_key, rid = build_request(
            w.requester.sig, w.twin, "bob", w.owner.pre.public, op, args or {"c": 21},
            permit=token.to_bytes() if token else None, devices=[w.device_recipient],
            deadline=time.time() + deadline_in, wake=wake)
        self.keys[rid] = reply_key
        return raw, rid

    async def send(self, raw: bytes) -> None:
        await self.cw.bob.publish(self.cw.bob.topics.requests(self.cw.w.twin), raw)

    def states(self, rid: str) -> list[tuple[str, str]]:
        return [(e["state"], e["reason"]) for t, e, _ in self.statuses.messages
                if t.endswith("/" + rid)]

    async def until(self, rid: str, state: str, timeout: float = 10.0) -> str:
        await self.statuses.wait(lambda: any(s == state for s, _ in self.states(rid)), timeout)
        return next(r for s, r in self.states(rid) if s == state)


async def _bob(cw: CloudWorld, rights: tuple[str, ...] = ("request",), **kw: Any) -> Requester:
    permit = cw.w.permit(rights, **kw)
    assert (await cw.grant_interact(permit))["ok"]
    return await Requester(cw, permit).start()


async def test_round_trip_answer_only_the_requester_opens(cw: CloudWorld) -> None:
    w = cw.w
    bob = await _bob(cw)
    await cw.presence(True)
    await asyncio.sleep(0.2)
    raw, rid = bob.build("set_target", {"target_c": 21.5})
    await bob.send(raw)
    await cw.inbox.wait(lambda: bool(cw.inbox.of("inbox_request")))
    inbox = cw.inbox.of("inbox_request")[0]
    req = open_request(decode(inbox["request"], "request"), inbox["wrap"], w.device.pre,
                       w.owner.sig.verify_key)
    assert (req.body.op, req.body.args, req.requester) == ("set_target", {"target_c": 21.5}, "bob")
    await bob.until(rid, "delivered")
    await cw.d1.publish(cw.d1.topics.answers(w.twin), build_answer(w.creds, req, True, {"ok": 1}))
    await bob.until(rid, "answered")
    status = next(e for _, e, _ in bob.statuses.messages if e["state"] == "answered")
    ans = open_answer(decode(status["answer"], "answer"), bob.keys[rid], w.owner.sig.verify_key,
                      rid, bob.permit.devices)  # type: ignore[union-attr]
    assert ans.ok and ans.result == {"ok": 1} and ans.device == "d1"
    # a second answer (a redelivered request answered again) changes nothing
    await cw.d1.publish(cw.d1.topics.answers(w.twin), build_answer(w.creds, req, True, {"ok": 2}))
    await asyncio.sleep(0.3)
    assert [s for s, _ in bob.states(rid)] == ["delivered", "answered"]
    # the owner may request without a permit
    raw, _, orid = build_request(w.owner.sig, w.twin, "alice", w.owner.pre.public, "ping", {},
                                 permit=None, devices=[w.device_recipient],
                                 deadline=time.time() + 60)
    reply = await cw.alice.request(cw.alice.topics.requests(w.twin), raw,
                                   cw.alice.topics.replies("alice", orid))
    assert decode(reply, "request_status")["state"] == "delivered"


async def test_unknown_revoked_expired_requesters_refused(cw: CloudWorld) -> None:
    w = cw.w
    stranger = await Requester(cw, w.permit(("request",))).start()  # never installed
    raw, rid = stranger.build()
    await stranger.send(raw)
    assert "unknown permit" in await stranger.until(rid, "refused")
    bob = await _bob(cw)
    raw, queued = bob.build()
    await bob.send(raw)
    await bob.until(queued, "queued")
    assert (await cw.revoke_interact(bob.permit))["ok"]  # type: ignore[arg-type]
    raw, rid = bob.build()
    await bob.send(raw)
    assert await bob.until(rid, "refused") == "permit revoked by the owner"
    # what waited in the queue under the revoked permit never reaches the device
    await cw.presence(True)
    assert await bob.until(queued, "refused") == "permit revoked by the owner"
    assert cw.inbox.of("inbox_request") == []
    await cw.presence(False)
    # right "desired" only: no requests
    desired_only = await _bob(cw, ("desired",))
    raw, rid = desired_only.build()
    await desired_only.send(raw)
    assert "right-not-granted" in await desired_only.until(rid, "refused")
    # expires 2 s from now on the cloud's clock, the 300 s clock-skew leeway included
    short = await _bob(cw, not_before=int(time.time()) - 1000, valid_for_s=702)
    await asyncio.sleep(2.2)
    raw, rid = short.build()
    await short.send(raw)
    assert "expired" in await short.until(rid, "refused")
    # the owner's key under bob's name: refused
    raw, _, orid = build_request(w.owner.sig, w.twin, "bob", w.owner.pre.public, "x", {},
                                 permit=None, devices=[w.device_recipient],
                                 deadline=time.time() + 60)
    await bob.send(raw)
    assert "another name" in await bob.until(orid, "refused")


async def test_replay_and_deadline_refused(cw: CloudWorld) -> None:
    bob = await _bob(cw)
    raw, rid = bob.build()
    await bob.send(raw)
    await bob.until(rid, "queued")
    await bob.send(raw)
    assert await bob.until(rid, "refused") == "replayed: request_id already seen"
    raw, rid = bob.build(deadline_in=8 * 86400)
    await bob.send(raw)
    assert "days ahead" in await bob.until(rid, "refused")


@pytest.mark.parametrize("broker", ["embedded"])
async def test_rate_limits_queue_cap_and_wake_cap(broker: str, tmp_path: Path) -> None:
    limits = {"requests_per_min": 4, "twin_requests_per_min": 6, "queue_cap": 8,
              "wakes_per_hour": 1}
    async with cloud_world(broker, tmp_path, request_limits=limits,
                           sweep_interval_s=0.2) as cw:
        bob = await _bob(cw)
        await cw.presence(False, next_wake=time.time() + 3600)
        await asyncio.sleep(0.2)
        rids = []
        for i in range(5):
            raw, rid = bob.build(wake=i < 2)
            rids.append(rid)
            await bob.send(raw)
        assert await bob.until(rids[0], "queued") == "waking device d1"
        assert await bob.until(rids[1], "queued") == "waking device d1"  # one wake outstanding
        assert "asleep until" in await bob.until(rids[2], "queued")
        assert "per requester" in await bob.until(rids[4], "refused")
        await cw.inbox.wait(lambda: len(cw.inbox.of("inbox_wake")) == 1)
        # per twin: carol (another requester) gets 2 more, then the twin is at its 6
        carol_permit = cw.w.permit(("request",), principal="carol", holder=cw.w.reader.sig)
        assert (await cw.grant_interact(carol_permit))["ok"]
        statuses = Collector(("request_status",))
        await cw.carol.subscribe(cw.carol.topics.filter("replies", principal="carol"), statuses)
        for _ in range(3):
            raw, _, _ = build_request(cw.w.reader.sig, cw.w.twin, "carol",
                                      cw.w.owner.pre.public, "x", {},
                                      permit=carol_permit.to_bytes(),
                                      devices=[cw.w.device_recipient],
                                      deadline=time.time() + 60)
            await cw.carol.publish(cw.carol.topics.requests(cw.w.twin), raw)
        await statuses.wait(lambda: len(statuses.messages) == 3)
        states = [(e["state"], e["reason"]) for _, e, _ in statuses.messages]
        assert [s for s, _ in states] == ["queued", "queued", "refused"]
        assert "for this twin" in states[2][1]
        # the device wakes and sleeps; a new wake request is over the hourly cap
        await cw.presence(True, for_s=1)
        await cw.inbox.wait(lambda: len(cw.inbox.of("inbox_request")) == 6)
        await cw.presence(False)
        await asyncio.sleep(0.2)
        for window in (cw.cloud.requests.per_requester,  # type: ignore[union-attr]
                       cw.cloud.requests.per_twin):  # type: ignore[union-attr]
            window.forget_idle(time.time() + 120)  # as if a minute had passed
        raw, rid = bob.build(wake=True)
        await bob.send(raw)
        assert await bob.until(rid, "queued") == "wake cap reached"
        assert len(cw.inbox.of("inbox_wake")) == 1
        # queue cap 8: six delivered (unanswered) + one queued; one more fits, then full
        raw, rid = bob.build()
        await bob.send(raw)
        await bob.until(rid, "queued")
        raw, rid = bob.build()
        await bob.send(raw)
        assert await bob.until(rid, "refused") == "queue full: device d1 holds 8 requests"


async def test_deadline_expiry_answered_expired(cw: CloudWorld) -> None:
    bob = await _bob(cw)
    await cw.presence(False)
    raw, rid = bob.build(deadline_in=1.0)
    await bob.send(raw)
    await bob.until(rid, "queued")
    assert await bob.until(rid, "expired", timeout=5) == "deadline passed"
    await cw.presence(True)
    await asyncio.sleep(0.5)
    assert cw.inbox.of("inbox_request") == []


# -- the Must: 1,000 queued requests survive a restart, delivered in order ------------------

def _thousand(cw: CloudWorld, permit: InteractToken) -> list[tuple[bytes, str]]:
    """1,000 (request, request_id) — each build is two PRE encryptions."""
    w = cw.w
    return [build_request(w.requester.sig, w.twin, "bob", w.owner.pre.public, "step",
                          {"i": i}, permit=permit.to_bytes(), devices=[w.device_recipient],
                          deadline=time.time() + 3600)[::2] for i in range(1000)]


@pytest.mark.parametrize("broker,backend", [
    ("embedded", "sqlite"),
    pytest.param("mosquitto", "sqlite", marks=pytest.mark.mosquitto),
    pytest.param("embedded", "postgres", marks=pytest.mark.postgres),
])
async def test_thousand_queued_requests_survive_restart_in_order(
        broker: str, backend: str, tmp_path: Path) -> None:
    schema = f"ct_test_{secrets.token_hex(6)}"
    limits = {"requests_per_min": 5000, "twin_requests_per_min": 5000}
    try:
        async with endpoint(broker) as ep:
            cw = CloudWorld(ep, tmp_path / "cloud.db", make_world(), request_limits=limits)
            if backend == "postgres":
                cw.make_store = lambda: PostgresTwinStore(DSN, schema=schema, max_size=4)  # type: ignore[method-assign]
            async with cw:
                bob = await _bob(cw)
                await cw.presence(False)
                built = _thousand(cw, bob.permit)  # type: ignore[arg-type]
                t0 = time.perf_counter()
                for raw, _ in built:
                    await bob.send(raw)
                await bob.statuses.wait(lambda: len(bob.statuses.messages) >= 1000, timeout=120)
                assert {e["state"] for _, e, _ in bob.statuses.messages} == {"queued"}
                queued_s = time.perf_counter() - t0
                w = cw.w
                raw, _, extra = build_request(  # the 1,001st: over the default cap
                    w.requester.sig, w.twin, "bob", w.owner.pre.public, "step", {"i": 1000},
                    permit=bob.permit.to_bytes(),  # type: ignore[union-attr]
                    devices=[w.device_recipient], deadline=time.time() + 3600)
                await bob.send(raw)
                assert (await bob.until(extra, "refused")).startswith("queue full")
                await cw.stop_cloud()  # the cloud goes away with 1,000 requests queued
                await cw.start_cloud()
                assert await cw.cloud.store.queue_length("t1", "d1") == 1000  # type: ignore[union-attr]
                t1 = time.perf_counter()
                await cw.presence(True, for_s=300)
                await cw.inbox.wait(lambda: len(cw.inbox.of("inbox_request")) == 1000,
                                    timeout=120)
                delivered_s = time.perf_counter() - t1
                got = [decode(m["request"], "request")["request_id"]
                       for m in cw.inbox.of("inbox_request")]
                assert got == [rid for _, rid in built]
                print(f"\n1,000 requests ({broker}/{backend}): queued in {queued_s:.1f} s, "
                      f"delivered after restart in {delivered_s:.1f} s")
    finally:
        if backend == "postgres":
            import asyncpg

            conn = await asyncpg.connect(DSN)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()


async def test_garbage_and_forged_answers_and_presence(cw: CloudWorld) -> None:
    """An answer by another device key, or for a request that is not open, changes nothing;
    presence signed by another key is refused (no delivery to nowhere)."""
    from interact_world import Party

    from ciphertwin.crypto.tokens import issue_write_token
    from ciphertwin.protocol.items import DeviceCredentials
    from ciphertwin.protocol.twin_requests import build_presence

    w = cw.w
    bob = await _bob(cw)
    raw, rid = bob.build()
    await bob.send(raw)
    await bob.until(rid, "queued")
    # an impostor "d1" with its own owner-less token: its presence and answers are refused
    mallory = Party("d1")
    fake = issue_write_token(mallory.sig, w.twin, mallory.sig.verify_key, ["type:*"],
                             device="d1", valid_for_s=600)
    fake_creds = DeviceCredentials(w.twin, "d1", mallory.sig, fake.to_bytes())
    await cw.d1.publish(cw.d1.topics.presence("d1"), build_presence(
        fake_creds, awake=True, until=time.time() + 60, window_s=60, next_wake=None,
        wakeable=True))
    await asyncio.sleep(0.5)
    assert cw.inbox.of("inbox_request") == []
    req = open_request(decode(raw, "request"), _wrap(raw, "d1"), w.device.pre,
                       w.owner.sig.verify_key)
    await cw.d1.publish(cw.d1.topics.answers(w.twin), build_answer(fake_creds, req, True, 1))
    await asyncio.sleep(0.5)
    assert [s for s, _ in bob.states(rid)] == ["queued"]
    # the real device: delivered, answered
    await cw.presence(True)
    await cw.inbox.wait(lambda: bool(cw.inbox.of("inbox_request")))
    await cw.d1.publish(cw.d1.topics.answers(w.twin), build_answer(w.creds, req, True, 1))
    await bob.until(rid, "answered")


def _wrap(raw: bytes, to: str) -> bytes:
    from ciphertwin.protocol.sealed_docs import wrap_for

    return wrap_for(decode(raw, "request"), to)
