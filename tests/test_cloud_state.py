"""Desired/reported state (P4) through the cloud on a real broker (embedded amqtt, and
Mosquitto when it runs): versions, stale writes, concurrent writers, permits (unknown,
revoked, expired), the device's inbox, an offline device converging, state_update fan-out,
state_query, and garbage on every new topic."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cloud_interact import CloudWorld, cloud_world
from structlog.testing import capture_logs

from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.protocol.twin_requests import build_presence
from ciphertwin.protocol.twin_state import (
    build_desired,
    build_reported,
    open_desired,
    open_reported,
)


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def cw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CloudWorld]:
    async with cloud_world(request.param, tmp_path) as world:
        yield world


async def _set(cw: CloudWorld, doc: dict[str, Any], base: int, *, signer: Any = None,
               writer: str = "alice", permit: bytes | None = None) -> dict[str, Any]:
    """Publish a desired write and return the cloud's state_result."""
    rid = secrets.token_hex(8)
    raw = build_desired(signer or cw.w.owner.sig, cw.w.twin, writer, cw.w.owner.pre.public,
                        doc, base, permit=permit, request_id=rid)
    bus = cw.alice if writer == "alice" else cw.bob
    reply = await bus.request(bus.topics.desired(cw.w.twin), raw,
                              bus.topics.replies(writer, rid), timeout=10)
    return decode(reply, "state_result").body


async def _report(cw: CloudWorld, version: int, desired_version: int, state: dict[str, Any],
                  in_sync: bool) -> dict[str, Any]:
    raw = build_reported(cw.w.creds, cw.w.owner.pre.public, version, desired_version, state,
                         in_sync)
    rid = decode(raw, "reported_set")["request_id"]
    reply = await cw.d1.request(cw.d1.topics.reported(cw.w.twin), raw,
                                cw.d1.topics.replies("d1", rid), timeout=10)
    return decode(reply, "state_result").body


async def _query(cw: CloudWorld, bus_name: str) -> dict[str, Any]:
    bus = getattr(cw, bus_name)
    rid = secrets.token_hex(8)
    reply = await bus.request(bus.topics.query(bus_name), encode(
        "state_query", {"request_id": rid, "twin": cw.w.twin}),
        bus.topics.replies(bus_name, rid), timeout=10)
    return decode(reply, "state_reply").body


async def test_desired_versions_inbox_stream_and_stale_writes(cw: CloudWorld) -> None:
    w = cw.w
    res = await _set(cw, {"target_c": 21.0}, 0)
    assert res["ok"] and res["reason"] == "ok" and res["desired_version"] == 1
    # the device gets it re-encrypted through dev-d1 and opens it
    await cw.inbox.wait(lambda: len(cw.inbox.of("inbox_desired")) == 1)
    msg = cw.inbox.of("inbox_desired")[0]
    assert msg["version"] == 1 and msg["twin"] == w.twin
    doc = open_desired(decode(msg["doc"], "desired_set"), msg["key"], w.device.pre,
                       w.owner.sig.verify_key)
    assert doc.doc == {"target_c": 21.0}
    # owner and reader see the update on their streams
    await cw.owner_stream.wait(lambda: bool(cw.owner_stream.of("state_update")))
    await cw.carol_stream.wait(lambda: bool(cw.carol_stream.of("state_update")))
    upd = cw.carol_stream.of("state_update")[0]
    assert (upd["desired_version"], upd["reported_version"], upd["in_sync"]) == (1, 0, False)
    assert open_desired(decode(upd["doc"], "desired_set"), upd["key"], w.reader.pre,
                        w.owner.sig.verify_key, now=time.time()).doc == {"target_c": 21.0}
    # a writer that started from 0 again is refused with the current version
    stale = await _set(cw, {"target_c": 99.0}, 0)
    assert not stale["ok"] and stale["reason"] == "stale: current desired_version is 1"
    assert stale["desired_version"] == 1
    assert not (await _set(cw, {"target_c": 99.0}, 7))["ok"]
    assert (await _set(cw, {"target_c": 22.0}, 1))["desired_version"] == 2
    await cw.inbox.wait(lambda: len(cw.inbox.of("inbox_desired")) == 2)
    assert [m["version"] for m in cw.inbox.of("inbox_desired")] == [1, 2]


async def test_concurrent_writers_exactly_one_wins(cw: CloudWorld) -> None:
    assert (await _set(cw, {"v": 0}, 0))["ok"]
    results = await asyncio.gather(*(_set(cw, {"v": i}, 1) for i in range(6)))
    assert sum(r["ok"] for r in results) == 1
    assert all(r["desired_version"] == 2 for r in results)
    assert {r["reason"] for r in results if not r["ok"]} == {"stale: current desired_version is 2"}


async def test_reported_versions_in_sync_and_query(cw: CloudWorld) -> None:
    w = cw.w
    assert (await _set(cw, {"target_c": 20.0}, 0))["ok"]
    res = await _report(cw, 1, 1, {"target_c": 20.0, "room_c": 19.5}, True)
    assert res["ok"] and (res["desired_version"], res["reported_version"]) == (1, 1)
    for version in (1, 0):  # not above the stored version: refused
        stale = await _report(cw, version, 1, {"target_c": 20.0}, True)
        assert not stale["ok"] and stale["reason"].startswith("stale: reported version")
    await cw.owner_stream.wait(lambda: len(cw.owner_stream.of("state_update")) == 2)
    upd = cw.owner_stream.of("state_update")[-1]
    assert (upd["desired_version"], upd["reported_version"], upd["in_sync"]) == (1, 1, True)
    rep = open_reported(decode(upd["doc"], "reported_set"), upd["key"], w.owner.pre,
                        w.owner.sig.verify_key)
    assert rep.state["room_c"] == 19.5
    # state_query: the owner and the reader get both documents, a stranger only an error
    for who, pre in (("alice", w.owner.pre), ("carol", w.reader.pre)):
        q = await _query(cw, who)
        assert (q["desired_version"], q["reported_version"], q["in_sync"]) == (1, 1, True)
        assert open_desired(decode(q["desired"], "desired_set"), q["desired_key"], pre,
                            w.owner.sig.verify_key, now=time.time()).doc == {"target_c": 20.0}
        assert open_reported(decode(q["reported"], "reported_set"), q["reported_key"], pre,
                             w.owner.sig.verify_key).state["room_c"] == 19.5
    q = await _query(cw, "bob")
    assert "error" in q and "desired" not in q and q["desired_version"] == 0
    # a new desired: out of sync until the device reports on it
    assert (await _set(cw, {"target_c": 23.0}, 1))["ok"]
    assert (await _query(cw, "alice"))["in_sync"] is False


async def test_permits_unknown_revoked_expired(cw: CloudWorld) -> None:
    w = cw.w
    permit = w.permit(["desired"])
    refused = await _set(cw, {"a": 1}, 0, signer=w.requester.sig, writer="bob",
                         permit=permit.to_bytes())
    assert not refused["ok"] and "unknown permit" in refused["reason"]
    assert (await cw.grant_interact(permit))["ok"]
    ok = await _set(cw, {"a": 1}, 0, signer=w.requester.sig, writer="bob",
                    permit=permit.to_bytes())
    assert ok["ok"] and ok["desired_version"] == 1
    # a permit for requests only does not let bob write desired state
    req_only = w.permit(["request"])
    assert (await cw.grant_interact(req_only))["ok"]
    no_right = await _set(cw, {"a": 2}, 1, signer=w.requester.sig, writer="bob",
                          permit=req_only.to_bytes())
    assert not no_right["ok"] and "right-not-granted" in no_right["reason"]
    # bob cannot write under the owner's name, nor with the owner's key under his own
    assert not (await _set(cw, {"a": 3}, 1, signer=w.requester.sig))["ok"]
    # revoked: refused at once; the devices get the owner's signed revocation
    assert (await cw.revoke_interact(permit))["ok"]
    revoked = await _set(cw, {"a": 4}, 1, signer=w.requester.sig, writer="bob",
                         permit=permit.to_bytes())
    assert not revoked["ok"] and revoked["reason"] == "permit revoked by the owner"
    await cw.inbox.wait(lambda: bool(cw.inbox.of("inbox_revoke")))
    fwd = decode(cw.inbox.of("inbox_revoke")[0]["revoke"], "interact_revoke")
    assert fwd["token_id"] == permit.token_id and fwd["owner"] == "alice"
    # a revoked token cannot be installed again
    again = await cw.grant_interact(permit)
    assert not again["ok"] and "revoked" in again["reason"]
    # expired
    # expires 2 s from now on the cloud's clock, the 300 s clock-skew leeway included
    short = w.permit(["desired"], not_before=int(time.time()) - 1000, valid_for_s=702)
    assert (await cw.grant_interact(short))["ok"]
    await asyncio.sleep(2.2)
    expired = await _set(cw, {"a": 5}, 1, signer=w.requester.sig, writer="bob",
                         permit=short.to_bytes())
    assert not expired["ok"] and "expired" in expired["reason"]


async def test_offline_device_converges_at_presence(cw: CloudWorld) -> None:
    """Desired written while the device is away: its next awake presence brings the latest
    version; once it reported on it, presences bring nothing more."""
    await cw.d1.unsubscribe(cw.d1.topics.inbox("d1"))
    for base in range(3):
        assert (await _set(cw, {"v": base}, base))["ok"]
    await cw.d1.subscribe(cw.d1.topics.inbox("d1"), cw.inbox)
    assert cw.inbox.of("inbox_desired") == []
    await cw.presence(True)
    await cw.inbox.wait(lambda: bool(cw.inbox.of("inbox_desired")))
    assert [m["version"] for m in cw.inbox.of("inbox_desired")] == [3]
    assert (await _report(cw, 1, 3, {"v": 2}, True))["ok"]
    await cw.presence(False)
    await cw.presence(True)
    await asyncio.sleep(0.5)
    assert len(cw.inbox.of("inbox_desired")) == 1


async def test_refused_documents_and_garbage_on_every_new_topic(cw: CloudWorld) -> None:
    w = cw.w
    t = cw.alice.topics
    rid = secrets.token_hex(8)
    # a forged desired: signed by a key that is not the owner's
    forged = await _set(cw, {"x": 1}, 0, signer=SigningKey.generate())
    assert not forged["ok"] and "Signature" in forged["reason"]
    # an owner wrap under another PRE key: refused before anything is stored
    stranger = PreKeyPair.generate()
    raw = build_desired(w.owner.sig, w.twin, "alice", stranger.public, {"x": 1}, 0,
                        request_id=rid)
    reply = await cw.alice.request(t.desired(w.twin), raw, t.replies("alice", rid))
    res = decode(reply, "state_result").body
    assert not res["ok"] and "owner's key" in res["reason"] and res["desired_version"] == 0
    # an oversized sealed document (the kinds bound it: 24 KiB) is answered, not stored
    big = msgpack.unpackb(build_desired(w.owner.sig, w.twin, "alice", w.owner.pre.public,
                                        {"x": 1}, 0, request_id=rid), raw=False)
    big["sealed"] = b"\0" * (25 * 1024)
    reply = await cw.alice.request(t.desired(w.twin), msgpack.packb(big), t.replies("alice", rid))
    res = decode(reply, "state_result").body
    assert not res["ok"] and res["reason"].startswith("malformed desired_set")
    # a device report on another twin's topic, a presence for another device
    rep = build_reported(w.creds, w.owner.pre.public, 1, 0, {}, True)
    rep_rid = decode(rep, "reported_set")["request_id"]
    reply = await cw.d1.request(t.reported("other"), rep, t.replies("d1", rep_rid))
    assert "another twin" in decode(reply, "state_result")["reason"]
    garbage = [b"", b"\x00garbage", b"\xc1", msgpack.packb({"t": "desired_set", "v": 1}),
               msgpack.packb([1, 2, 3]), b"\x81\xa1t\xa4item", secrets.token_bytes(300)]
    with capture_logs() as logs:
        for topic in (t.desired(w.twin), t.reported(w.twin), t.requests(w.twin),
                      t.answers(w.twin), t.presence("d1"), t.query("alice")):
            for g in garbage:
                await cw.d1.publish(topic, g or b"\xc0")
        await cw.d1.publish(t.presence("d2"), build_presence(
            w.creds, awake=True, until=time.time() + 9, window_s=9, next_wake=None,
            wakeable=True))
        await asyncio.sleep(1.0)
        # still serving
        assert (await _set(cw, {"after": "garbage"}, 0))["ok"]
    events = [e["event"] for e in logs]
    assert events.count("cloud.garbage") >= 3 * len(garbage)
    assert events.count("cloud.answer_refused") >= len(garbage)
    assert events.count("cloud.presence_refused") >= len(garbage) + 1
    assert not any(e.get("log_level") == "error" for e in logs), [
        e for e in logs if e.get("log_level") == "error"]


async def test_the_store_holds_no_plaintext(cw: CloudWorld, tmp_path: Path) -> None:
    marker = "plaintext-" + secrets.token_hex(6)
    assert (await _set(cw, {"secret": marker}, 0))["ok"]
    assert (await _report(cw, 1, 1, {"secret": marker}, True))["ok"]
    await asyncio.sleep(0.2)
    for f in tmp_path.glob("cloud.db*"):
        assert marker.encode() not in f.read_bytes()



async def test_store_failure_is_answered_not_dropped(cw: CloudWorld) -> None:
    """The cloud's store goes away: writers and requesters are told, nobody waits for a
    timeout, and the cloud keeps running."""
    assert cw.cloud is not None
    await cw.cloud.store.close()
    res = await _set(cw, {"v": 1}, 0)
    assert not res["ok"] and res["reason"] == "the cloud's store failed (try again later)"
    res = await _report(cw, 1, 0, {"v": 1}, True)
    assert not res["ok"] and "store failed" in res["reason"]
    q = await _query(cw, "alice")
    assert "store failed" in q["error"]


@pytest.mark.postgres
async def test_state_on_postgres(tmp_path: Path) -> None:
    """The same service paths on the PostgreSQL store: compare-and-set under concurrent
    writers, reported versions, query."""
    import asyncpg

    from ciphertwin.cloud_twin.store_postgres import PostgresTwinStore
    from cloud_interact import CloudWorld, endpoint
    from interact_world import make_world
    from test_cloud_store_postgres import DSN

    schema = f"ct_test_{secrets.token_hex(6)}"
    try:
        async with endpoint("embedded") as ep:
            world = CloudWorld(ep, tmp_path / "unused.db", make_world())
            world.make_store = lambda: PostgresTwinStore(DSN, schema=schema, max_size=4)  # type: ignore[method-assign]
            async with world as cw:
                assert (await _set(cw, {"v": 0}, 0))["ok"]
                results = await asyncio.gather(*(_set(cw, {"v": i}, 1) for i in range(4)))
                assert sum(r["ok"] for r in results) == 1
                assert (await _report(cw, 1, 2, {"v": 1}, False))["ok"]
                assert not (await _report(cw, 1, 2, {"v": 1}, True))["ok"]
                q = await _query(cw, "alice")
                assert (q["desired_version"], q["reported_version"], q["in_sync"]) == (2, 1, False)
    finally:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
