"""One bad item never fails a batch for the others; a store failure never blames an item
(issue 9, finding 2) — on SQLite and on PostgreSQL.

* the store: a batch holding an envelope the database refuses (a seq of 2**63; a row a
  constraint refuses) stores the others and reports that one ``Unstorable``; a failure of the
  store itself (disk full) raises ``StoreUnavailable`` and blames no envelope;
* ingest: a correctly signed item with an out-of-range seq (signed with the device's key,
  past the device's own checks) travels in one batch with other devices' items: theirs are
  stored and acknowledged, it is refused with a reason; an item the database refuses is
  refused to its device in the ack; a full disk leaves the batch unacknowledged, and the
  resend after it is freed is acknowledged;
* the service over a real broker: the same over the bus, and history queries with out-of-range
  numbers or during a store failure get an answer with an error, not silence.

Real parts: SQLite files, PostgreSQL (a throw-away schema per test), the embedded broker, the
CloudTwin service. The database failures are the databases' own: SQLite's page limit for a
full disk, PostgreSQL's ``disk_full`` error raised by a trigger, a renamed table, a constraint.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog
from test_cloud_store_postgres import DSN, StoreFactory, make_store, pg_schema, store  # noqa: F401

from ciphertwin.agents.reader import HistoryUnavailable, TwinReader
from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin.ingest import IngestPipeline
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import (
    Outcome,
    SqliteTwinStore,
    StoredEnvelope,
    StoreUnavailable,
    TwinStore,
    Unstorable,
)
from ciphertwin.cloud_twin.trust import TrustRegistry
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.protocol.control import build_control
from ciphertwin.protocol.items import ITEM_CONTEXT, DeviceCredentials, build_item

OWNER_PRE, OWNER_SIG = PreKeyPair.generate(), SigningKey.generate()
NEW = Outcome.NEW


# --- real database failures, per backend --------------------------------------------------


async def refuse_device(store: TwinStore, device: str) -> None:
    """An item-specific refusal by the database: rows of ``device`` violate a constraint."""
    if isinstance(store, SqliteTwinStore):
        await store.db.execute(
            f"CREATE TRIGGER refuse_{device} BEFORE INSERT ON envelopes "
            f"WHEN NEW.device = '{device}' BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
        await store.db.commit()
    else:
        await store.pool.execute(f'ALTER TABLE "{store.schema}".envelopes '  # type: ignore[attr-defined]
                                 f"ADD CONSTRAINT refuse_{device} CHECK (device <> '{device}')")


async def fill_disk(store: TwinStore) -> None:
    """The disk is full: SQLite may not grow the file by a page; PostgreSQL answers every
    insert with its ``disk_full`` error (53100), as when it cannot extend a file."""
    if isinstance(store, SqliteTwinStore):
        async with store.db.execute("PRAGMA page_count") as cur:
            pages = (await cur.fetchone())[0]  # type: ignore[index]
        await (await store.db.execute(f"PRAGMA max_page_count = {pages}")).close()
    else:
        s = f'"{store.schema}"'  # type: ignore[attr-defined]
        await store.pool.execute(  # type: ignore[attr-defined]
            f"CREATE FUNCTION {s}.disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file: No space left on device' "
            f"USING ERRCODE = 'disk_full'; END $$; CREATE TRIGGER disk_full BEFORE INSERT ON "
            f"{s}.envelopes FOR EACH STATEMENT EXECUTE FUNCTION {s}.disk_full()")


async def free_disk(store: TwinStore) -> None:
    if isinstance(store, SqliteTwinStore):
        await (await store.db.execute("PRAGMA max_page_count = 1073741823")).close()
    else:
        await store.pool.execute(  # type: ignore[attr-defined]
            f'DROP TRIGGER disk_full ON "{store.schema}".envelopes')  # type: ignore[attr-defined]


async def rename_envelopes(store: TwinStore, old: str, new: str) -> None:
    """The table vanishes (and comes back): reads fail for a reason that is the store's."""
    if isinstance(store, SqliteTwinStore):
        await store.db.execute(f"ALTER TABLE {old} RENAME TO {new}")
        await store.db.commit()
    else:
        await store.pool.execute(  # type: ignore[attr-defined]
            f'ALTER TABLE "{store.schema}".{old} RENAME TO {new}')  # type: ignore[attr-defined]


# --- the store ------------------------------------------------------------------------------


def _env(seq: int, device: str = "d1", size: int = 100) -> StoredEnvelope:
    return StoredEnvelope("t1", device, seq, b"cid", ("type:x",), 1.0 + seq % 1000,
                          os.urandom(size))


async def test_an_envelope_the_database_cannot_hold_is_refused_alone(store: TwinStore) -> None:
    batch = [_env(1), _env(2**63), _env(2), _env(-(2**63) - 1), _env(3), _env(4)]
    with structlog.testing.capture_logs() as logs:
        outcomes = await store.append_envelopes(batch)
    assert [o for o in outcomes if not isinstance(o, Unstorable)] == [NEW] * 4
    bad = [(e.seq, o) for e, o in zip(batch, outcomes, strict=True) if isinstance(o, Unstorable)]
    assert [seq for seq, _ in bad] == [2**63, -(2**63) - 1]
    assert all("the store refused it" in o.reason for _, o in bad)
    assert [e.seq for e in await store.history("t1", 0.0, 1e12)] == [1, 2, 3, 4]
    assert [e["seq"] for e in logs if e["event"] == "store.envelope_refused"] == [s for s, _ in bad]
    # the store is fine afterwards: replays are duplicates, new rows new
    assert await store.append_envelopes([_env(5), batch[0]]) == [NEW, Outcome.DUPLICATE]


async def test_a_row_a_constraint_refuses_is_refused_alone(store: TwinStore) -> None:
    await refuse_device(store, "bad")
    outcomes = await store.append_envelopes([_env(1), _env(1, "bad"), _env(2)])
    assert outcomes[0] is NEW and outcomes[2] is NEW and isinstance(outcomes[1], Unstorable)
    assert [(e.device, e.seq) for e in await store.history("t1", 0.0, 1e12)] == [
        ("d1", 1), ("d1", 2)]


async def test_a_full_disk_blames_no_envelope(store: TwinStore) -> None:
    await store.append_envelopes([_env(1)])
    await fill_disk(store)
    batch = [_env(s, size=3000) for s in range(2, 10)]
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(StoreUnavailable, match="full|space"):
            await store.append_envelopes(batch)
    assert [e["event"] for e in logs] == ["store.unavailable"]  # at once: no splitting
    assert logs[0]["log_level"] == "error"
    assert [e.seq for e in await store.history("t1", 0.0, 1e12)] == [1]  # nothing half-done
    await free_disk(store)
    assert await store.append_envelopes(batch) == [NEW] * len(batch)


# --- ingest ---------------------------------------------------------------------------------


class Device:
    def __init__(self, name: str) -> None:
        self.key = SigningKey.generate()
        token = issue_write_token(OWNER_SIG, "t1", self.key.verify_key, ["twin:*", "type:*"],
                                  device=name, valid_for_s=3600)
        self.creds = DeviceCredentials("t1", name, self.key, token.to_bytes())
        self.keys = DataKeyManager(OWNER_PRE.public)

    def item(self, seq: int) -> bytes:
        reading = {"type": "temperature", "values": {"c": seq}, "time": time.time()}
        return build_item(self.creds, self.keys, seq, reading, ("twin:t1", "type:temperature"))

    def item_with_seq(self, seq: int) -> bytes:
        """A correctly signed item with any seq: the device's key, past its own checks."""
        body = {k: v for k, v in msgpack.unpackb(self.item(1), raw=False).items()
                if k not in ("t", "v", "sig")}
        body["seq"] = seq
        body["sig"] = self.key.sign_object(ITEM_CONTEXT, body)
        return msgpack.packb(dict(sorted({"t": "item", "v": 1, **body}.items())),
                             use_bin_type=True)


class Acks:
    """What each device is told, decoded as a device decodes it."""

    def __init__(self) -> None:
        self.seqs: dict[str, set[int]] = {}
        self.rejected: dict[str, list[dict[str, Any]]] = {}

    async def __call__(self, twin: str, device: str, payload: bytes) -> None:
        ack = decode(payload, "ack")
        self.seqs.setdefault(device, set()).update(ack["seqs"])
        self.rejected.setdefault(device, []).extend(ack["rejected"])


async def _nothing(items: object) -> None:
    return None


@pytest.fixture
async def pipeline(store: TwinStore) -> tuple[IngestPipeline, Acks]:
    trust = TrustRegistry(store)
    await trust.register_owner("alice", OWNER_SIG.verify_key, OWNER_PRE.public)
    acks = Acks()
    return IngestPipeline(store, trust, acks, _nothing), acks


async def test_an_out_of_range_seq_costs_only_its_own_item(
        pipeline: tuple[IngestPipeline, Acks]) -> None:
    ingest, acks = pipeline
    d1, d2, d3 = Device("d1"), Device("d2"), Device("d3")
    batch = [d1.item(1), d2.item(1), d2.item_with_seq(2**63), d3.item(1), d1.item(2),
             d2.item_with_seq(2**64 - 1), d3.item(2)]
    with structlog.testing.capture_logs() as logs:
        stored = await ingest.process([("t1", p) for p in batch])
    assert sorted((a.device, a.seq) for a in stored) == [
        ("d1", 1), ("d1", 2), ("d2", 1), ("d3", 1), ("d3", 2)]
    assert acks.seqs == {"d1": {1, 2}, "d2": {1}, "d3": {1, 2}}
    refused = [e for e in logs if e["event"] == "ingest.rejected"]
    assert len(refused) == 2
    assert all("field 'seq': out of range" in e["reason"] for e in refused)
    assert not [e for e in logs if e["log_level"] in ("error", "exception", "critical")]
    history = await ingest.store.history("t1", 0.0, 1e12)
    assert len(history) == 5


async def test_an_item_the_database_refuses_is_refused_to_its_device_alone(
        pipeline: tuple[IngestPipeline, Acks]) -> None:
    ingest, acks = pipeline
    d1, d2, d3 = Device("d1"), Device("d2"), Device("d3")
    await refuse_device(ingest.store, "d2")
    stored = await ingest.process([("t1", p) for p in (d1.item(1), d2.item(1), d3.item(1))])
    assert sorted((a.device, a.seq) for a in stored) == [("d1", 1), ("d3", 1)]
    assert acks.seqs == {"d1": {1}, "d2": set(), "d3": {1}}
    assert [r["seq"] for r in acks.rejected["d2"]] == [1]
    assert "the store refused it" in acks.rejected["d2"][0]["reason"]
    assert acks.rejected["d1"] == acks.rejected["d3"] == []


async def test_a_full_disk_leaves_the_batch_unacknowledged_until_resent(
        pipeline: tuple[IngestPipeline, Acks]) -> None:
    ingest, acks = pipeline
    d1, d2 = Device("d1"), Device("d2")
    assert await ingest.process([("t1", d1.item(1))])  # the capsule is stored
    await fill_disk(ingest.store)
    batch = [("t1", d1.item(s)) for s in range(2, 6)] + [("t1", d2.item(1))]
    with pytest.raises(StoreUnavailable):
        await ingest.process(batch)
    assert acks.seqs == {"d1": {1}} and acks.rejected == {"d1": []}  # nobody blamed
    await free_disk(ingest.store)
    assert len(await ingest.process(batch)) == 5  # the devices' resend
    assert acks.seqs == {"d1": {1, 2, 3, 4, 5}, "d2": {1}}
    assert acks.rejected == {"d1": [], "d2": []}


# --- the service over a real broker ----------------------------------------------------------


class World:
    def __init__(self, cloud: CloudTwin, bus: BusClient) -> None:
        self.cloud, self.bus = cloud, bus
        self.reader = TwinReader(bus, "alice", OWNER_PRE, OWNER_SIG.verify_key)

    async def register(self) -> None:
        msg = build_control("owner_register", OWNER_SIG, {
            "owner": "alice", "pre_pk": OWNER_PRE.public.to_bytes(),
            "verify_key": OWNER_SIG.verify_key.raw, "time": time.time()})
        rid = f"register-{int(decode(msg, 'owner_register')['time'] * 1000)}"
        reply = await self.bus.request(self.bus.topics.control("alice"), msg,
                                       self.bus.topics.replies("alice", rid), timeout=10)
        assert decode(reply, "control_result")["ok"]

    async def listen_acks(self, *devices: str) -> Acks:
        acks = Acks()
        for device in devices:
            async def on_ack(topic: str, payload: bytes, retain: bool, d: str = device) -> None:
                await acks("t1", d, payload)
            await self.bus.subscribe(self.bus.topics.ack("t1", device), on_ack)
        return acks

    async def raw_query(self, **body: Any) -> dict[str, Any]:
        """A history query packed by hand (canonical, but past ``encode``'s checks)."""
        full = {"request_id": "raw1", "twin": "t1", "since": 0.0, "until": 2e9, "limit": 100,
                **body}
        payload = msgpack.packb(dict(sorted({"t": "history_query", "v": 1, **full}.items())),
                                use_bin_type=True)
        reply = await self.bus.request(self.bus.topics.query("alice"), payload,
                                       self.bus.topics.replies("alice", full["request_id"]),
                                       timeout=5)
        return decode(reply, "history_reply").body


@pytest.fixture
async def world(make_store: StoreFactory) -> AsyncIterator[World]:  # noqa: F811
    async with EmbeddedBroker() as broker, \
            BusClient("127.0.0.1", broker.port, client_id="cloud") as cloud_bus:
        cloud = CloudTwin(cloud_bus, make_store(), pool=ReencryptionPool(1, processes=False))
        async with cloud, BusClient("127.0.0.1", broker.port, client_id="tester") as bus:
            w = World(cloud, bus)
            await w.register()
            yield w


async def _until(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_over_the_bus_bad_seqs_do_not_hold_up_other_devices(world: World) -> None:
    w = world
    good, bad = [Device("d1"), Device("d3")], Device("d2")
    acks = await w.listen_acks("d1", "d3")
    topic = w.bus.topics.twin_data("t1")
    for seq in range(1, 21):  # interleaved: every batch the cloud takes holds bad items
        for d in good:
            await w.bus.publish(topic, d.item(seq))
        await w.bus.publish(topic, bad.item_with_seq(2**63 + seq))
    want = set(range(1, 21))
    assert await _until(lambda: acks.seqs.get("d1") == want and acks.seqs.get("d3") == want), \
        acks.seqs
    opened = await w.reader.history("t1")
    assert sorted((o.device, o.seq) for o in opened) == sorted(
        (d, s) for d in ("d1", "d3") for s in want)


@pytest.mark.parametrize("body", [{"since": 2**64 - 1}, {"until": -(2**63)},
                                  {"limit": 2**63},
                                  {"after": {"device": "d1", "seq": 2**63, "time": 1.0}},
                                  {"after": {"device": "d1", "seq": 1, "time": 2**63}}])
async def test_an_out_of_range_history_query_is_answered(world: World,
                                                        body: dict[str, Any]) -> None:
    w = world
    await w.bus.publish(w.bus.topics.twin_data("t1"), Device("d1").item(1))
    reply = await w.raw_query(**body)
    assert reply["items"] == [] and "query refused" in reply["error"]
    assert "out of range" in reply["error"] or "too large" in reply["error"]
    # the cloud keeps serving
    assert await _until(lambda: w.cloud.ingest.stored == 1)
    assert [o.seq for o in await w.reader.history("t1")] == [1]


async def test_a_store_failure_during_a_query_is_answered_with_an_error(world: World) -> None:
    w = world
    await w.bus.publish(w.bus.topics.twin_data("t1"), Device("d1").item(1))
    assert await _until(lambda: w.cloud.ingest.stored == 1)
    await rename_envelopes(w.cloud.store, "envelopes", "envelopes_away")
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(HistoryUnavailable, match="store failed"):
            await w.reader.history("t1", timeout=5)
    assert [e["log_level"] for e in logs if e["event"] == "cloud.history_failed"] == ["error"]
    await rename_envelopes(w.cloud.store, "envelopes_away", "envelopes")
    assert [o.seq for o in await w.reader.history("t1")] == [1]


async def test_over_the_bus_a_full_disk_leaves_items_unacknowledged(world: World) -> None:
    w = world
    d1 = Device("d1")
    acks = await w.listen_acks("d1")
    topic = w.bus.topics.twin_data("t1")
    await w.bus.publish(topic, d1.item(1))
    assert await _until(lambda: acks.seqs.get("d1") == {1})
    await fill_disk(w.cloud.store)
    items = [d1.item(s) for s in range(2, 12)]
    with structlog.testing.capture_logs() as logs:
        for p in items:
            await w.bus.publish(topic, p)
        assert await _until(lambda: any(e["event"] == "store.unavailable" for e in logs))
        for _ in range(3):  # devices resend while the disk is full: more failing batches
            await asyncio.sleep(0.3)
            for p in items:
                await w.bus.publish(topic, p)
        await asyncio.sleep(0.3)
        # what fitted before the disk filled is stored and acknowledged; the rest neither
        stored = {e.seq for e in await w.cloud.store.history("t1", 0.0, 1e12)}
        assert acks.seqs["d1"] == stored != set(range(1, 12)) and acks.rejected["d1"] == []
        await free_disk(w.cloud.store)
        for p in items:  # what the device's outbox does: resend what is unacknowledged
            await w.bus.publish(topic, p)
        assert await _until(lambda: acks.seqs["d1"] == set(range(1, 12))), acks.seqs
    assert acks.rejected["d1"] == []
    # an outage is logged when it starts and when it ends, not per failing batch (a full disk
    # used to write a traceback per batch: hundreds of lines a second); a batch that still
    # fits in the last free pages ends an outage, so there may be a few
    events = [e["event"] for e in logs if e["event"].startswith("ingest.")]
    assert 2 <= len(events) <= 6 and events[-1] == "ingest.store_recovered", events
    assert events[::2] == ["ingest.store_unavailable"] * (len(events) // 2), events
    failing = sum(e["event"] == "store.unavailable" for e in logs)
    assert 1 <= failing <= 6, f"{failing} failing batches in ~1.5 s: no back-off"
