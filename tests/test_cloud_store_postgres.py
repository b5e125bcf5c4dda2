"""Both twin store backends against one set of scenarios, plus PostgreSQL concurrency.

The scenarios run on SQLite and on PostgreSQL (a fresh random schema per test, dropped
afterwards) so the two backends cannot drift apart; the concurrency tests play two cloud
workers, each with its own connection pool, writing to the same schema at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from ciphertwin.cloud_twin.store import (
    Grant,
    Outcome,
    SqliteTwinStore,
    StoredEnvelope,
    TwinStore,
    open_store,
)
from ciphertwin.cloud_twin.store_postgres import PostgresTwinStore
from ciphertwin.config.settings import StorageSettings

DSN = os.environ.get("CIPHERTWIN_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NEW, DUP, CONFLICT = Outcome.NEW, Outcome.DUPLICATE, Outcome.CONFLICT

StoreFactory = Callable[[], TwinStore]


def _env(seq: int, payload: bytes = b"x", device: str = "dev1", t: float = 0.0) -> StoredEnvelope:
    return StoredEnvelope("twin1", device, seq, b"cid", ("type:temp", "day:2026-11-22"),
                          t or float(seq), payload)


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A throw-away schema name; the schema is dropped with everything in it afterwards."""
    schema = f"ct_test_{secrets.token_hex(6)}"
    yield schema
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """New, unopened stores over the same backing data (so reopening can be tested)."""
    if request.param == "sqlite":
        return lambda: SqliteTwinStore(tmp_path / "c.db")
    schema = request.getfixturevalue("pg_schema")
    return lambda: PostgresTwinStore(DSN, schema=schema, max_size=4)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[TwinStore]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


async def test_append_is_idempotent_and_detects_conflicts(store: TwinStore) -> None:
    assert await store.append_envelopes([]) == []
    assert await store.append_envelopes([_env(1), _env(2)]) == [NEW, NEW]
    # exact replay: stored again means acknowledged again, no duplicate row
    assert await store.append_envelopes([_env(2), _env(3)]) == [DUP, NEW]
    # different bytes under an existing (device, seq): refused
    assert await store.append_envelopes([_env(3, b"forged")]) == [CONFLICT]
    # the same envelope twice in one batch: stored once; a different second copy is refused
    assert await store.append_envelopes([_env(4), _env(4)]) == [NEW, DUP]
    assert await store.append_envelopes([_env(5, b"a"), _env(5, b"b")]) == [NEW, CONFLICT]
    hist = await store.history("twin1")
    assert [e.seq for e in hist] == [1, 2, 3, 4, 5]
    assert hist[2].payload == b"x" and hist[4].payload == b"a"
    assert hist[0] == _env(1)


async def test_data_survives_reopen(make_store: StoreFactory) -> None:
    store = make_store()
    await store.open()
    await store.append_envelopes([_env(i) for i in range(1, 51)])
    await store.put_grant(Grant("g1", "alice", "bob", ("twin1",), "type:temp", b"rk", 1.0))
    await store.put_kv("owner", "alice", b"pk")
    await store.close()
    again = make_store()
    await again.open()  # schema creation is idempotent
    try:
        assert len(await again.history("twin1", limit=100)) == 50
        assert await again.active_grants() == [
            Grant("g1", "alice", "bob", ("twin1",), "type:temp", b"rk", 1.0)
        ]
        assert await again.get_kv("owner", "alice") == b"pk"
        assert await again.get_kv("owner", "carol") is None
        await again.put_kv("owner", "alice", b"pk2")  # kv records are replaced
        assert await again.list_kv("owner") == {"alice": b"pk2"}
        assert not await again.revoke_grant("mallory", "g1", 2.0)  # only the owner revokes
        assert await again.revoke_grant("alice", "g1", 2.0)
        assert not await again.revoke_grant("alice", "g1", 3.0)
        assert await again.active_grants() == []
    finally:
        await again.close()


async def test_history_window_and_paging(store: TwinStore) -> None:
    await store.append_envelopes([_env(i) for i in range(1, 21)])
    # same item time on two devices: the cursor must split ties by (device, seq)
    await store.append_envelopes([_env(100, device="devB", t=10.0), _env(7, device="devA", t=10.0)])
    assert [e.seq for e in await store.history("twin1", since=5, until=8)] == [5, 6, 7, 8]
    page = await store.history("twin1", limit=5)
    last = page[-1]
    nxt = await store.history("twin1", limit=5, after=(last.item_time, last.device, last.seq))
    assert [e.seq for e in nxt] == [6, 7, 8, 9, 10]
    rows, after = [], None
    while batch := await store.history("twin1", limit=3, after=after):
        rows += batch
        after = (batch[-1].item_time, batch[-1].device, batch[-1].seq)
    assert [(e.device, e.seq) for e in rows if e.item_time == 10.0] == [
        ("dev1", 10), ("devA", 7), ("devB", 100)]
    assert len(rows) == 22
    assert await store.history("other") == []


async def test_window_groups_and_items_for_many_twins(store: TwinStore) -> None:
    def env(twin: str, seq: int, cid: bytes, attrs: tuple[str, ...], t: float) -> StoredEnvelope:
        return StoredEnvelope(twin, "d", seq, cid, attrs, t, bytes([seq]) * seq)

    a, b = ("share:0", "type:x"), ("share:1", "type:x")
    await store.append_envelopes([env("t1", 1, b"c1", a, 1.0), env("t1", 2, b"c1", a, 2.0),
                                  env("t1", 3, b"c2", b, 3.0), env("t2", 4, b"c3", a, 1.5),
                                  env("t2", 5, b"c3", a, 99.0), env("t3", 6, b"c4", a, 1.0)])
    groups = sorted(await store.window_groups(["t1", "t2", "t2"], 0.0, 10.0),
                    key=lambda g: (g.twin, g.capsule_id))
    assert [(g.twin, g.capsule_id, g.attributes, g.count, g.payload_bytes) for g in groups] == [
        ("t1", b"c1", a, 2, 3), ("t1", b"c2", b, 1, 3), ("t2", b"c3", a, 1, 4)]
    items = await store.window_items(["t2", "t1"], 0.0, 10.0)
    assert [(i.twin, i.capsule_id, i.attributes, i.payload) for i in items] == [
        ("t1", b"c1", a, b"\x01"), ("t1", b"c1", a, b"\x02\x02"), ("t1", b"c2", b, b"\x03" * 3),
        ("t2", b"c3", a, b"\x04" * 4)]
    assert await store.window_items(["t1"], 0.0, 10.0, stored_until=0.0) == []
    assert await store.window_groups([], 0.0, 10.0) == []


async def test_recapsule_cache_dropped_on_revoke(store: TwinStore) -> None:
    await store.put_grant(Grant("g1", "alice", "bob", ("twin1",), "a", b"rk", 1.0))
    await store.cache_recapsules([(b"c1", "g1", b"rc"), (b"c1", "g1", b"rc")])
    assert await store.cached_recapsules([(b"c1", "g1"), (b"c2", "g1")]) == {(b"c1", "g1"): b"rc"}
    await store.revoke_grant("alice", "g1", 2.0)
    assert await store.cached_recapsules([(b"c1", "g1")]) == {}
    await store.put_capsules([(b"c1", "twin1", ("a:1", "b:2"), b"cap")])
    await store.put_capsules([(b"c1", "twin1", ("a:9",), b"other")])  # existing ids are kept
    assert await store.get_capsules([b"c1", b"zz"]) == {b"c1": b"cap"}
    assert await store.capsule_info([b"c1"]) == {b"c1": ("twin1", ("a:1", "b:2"))}


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    sqlite = open_store(StorageSettings(sqlite_path=tmp_path / "c.db"))
    assert isinstance(sqlite, SqliteTwinStore) and sqlite.path == tmp_path / "c.db"
    pg = open_store(StorageSettings(backend="postgres", postgres_dsn=DSN))
    assert isinstance(pg, PostgresTwinStore) and pg.dsn == DSN


def test_schema_name_is_checked() -> None:
    with pytest.raises(ValueError):
        PostgresTwinStore(DSN, schema='x"; DROP TABLE y; --')


@pytest.mark.postgres
async def test_two_workers_append_overlapping_batches(pg_schema: str) -> None:
    """Each (device, seq) is stored once and reported NEW to exactly one worker."""
    workers = [PostgresTwinStore(DSN, schema=pg_schema, max_size=4) for _ in range(2)]
    await asyncio.gather(*(w.open() for w in workers))  # concurrent schema creation too
    try:
        keys = [(f"dev{d}", s) for d in range(6) for s in range(300)]
        rng = random.Random(7)

        def batches() -> list[list[StoredEnvelope]]:
            # Every worker eventually offers every key, in its own random order and batching.
            order = keys[:]
            rng.shuffle(order)
            return [[_env(s, f"{d}/{s}".encode(), d) for d, s in order[i : i + 250]]
                    for i in range(0, len(order), 250)]

        async def run(worker: PostgresTwinStore, work: list[list[StoredEnvelope]]) -> Counter:
            seen: Counter[tuple[tuple[str, int], Outcome]] = Counter()
            for batch in work:
                for env, outcome in zip(batch, await worker.append_envelopes(batch), strict=True):
                    seen[((env.device, env.seq), outcome)] += 1
            return seen

        # Several concurrent batches per worker so both pools really interleave.
        work = [batches() for _ in workers]
        results = await asyncio.gather(*(
            run(w, part) for w, mine in zip(workers, work, strict=True)
            for part in (mine[0::3], mine[1::3], mine[2::3])
        ))
        total: Counter[tuple[tuple[str, int], Outcome]] = sum(results, Counter())
        assert not any(o == CONFLICT for _, o in total)
        assert all(total[(k, NEW)] == 1 and total[(k, DUP)] == 1 for k in keys)
        assert sum(1 for _, o in total.elements() if o == NEW) == len(keys)

        conn = await asyncpg.connect(DSN)
        try:
            count, distinct = await conn.fetchrow(
                f'SELECT count(*), count(DISTINCT (device, seq)) FROM "{pg_schema}".envelopes')
        finally:
            await conn.close()
        assert count == distinct == len(keys)
    finally:
        await asyncio.gather(*(w.close() for w in workers))


@pytest.mark.postgres
async def test_two_workers_racing_different_bytes(pg_schema: str) -> None:
    """A forged copy racing the genuine one: one wins as NEW, the other is a CONFLICT."""
    a, b = (PostgresTwinStore(DSN, schema=pg_schema, max_size=2) for _ in range(2))
    await a.open()
    await b.open()
    try:
        seqs = range(1, 401)
        out_a, out_b = await asyncio.gather(
            a.append_envelopes([_env(s, b"genuine") for s in seqs]),
            b.append_envelopes([_env(s, b"forged") for s in reversed(seqs)]),
        )
        stored = {e.seq: e.payload for e in await a.history("twin1", limit=1000)}
        for s, oa, ob in zip(seqs, out_a, reversed(out_b), strict=True):
            assert sorted((oa, ob)) == sorted((NEW, CONFLICT))
            assert stored[s] == (b"genuine" if oa == NEW else b"forged")
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_revoke_racing_the_cache_leaves_no_stale_recapsule(pg_schema: str) -> None:
    """Worker A caches re-capsules while worker B revokes the grant: none may survive."""
    a, b = (PostgresTwinStore(DSN, schema=pg_schema, max_size=2) for _ in range(2))
    await a.open()
    await b.open()
    try:
        for i in range(20):
            gid = f"g{i}"
            await a.put_grant(Grant(gid, "alice", "bob", ("twin1",), "a", b"rk", 1.0))
            rows = [(secrets.token_bytes(16), gid, b"rc") for _ in range(200)]
            await asyncio.gather(a.cache_recapsules(rows), b.revoke_grant("alice", gid, 2.0))
            assert await a.cached_recapsules([(c, gid) for c, _, _ in rows[::20]]) == {}
            await a.cache_recapsules(rows[:1])  # after the revoke: refused outright
            assert await a.cached_recapsules([(rows[0][0], gid)]) == {}
    finally:
        await a.close()
        await b.close()
