"""Store tables of issue 11 on SQLite and PostgreSQL: desired compare-and-set, reported
versions, the durable per-device request queue — the same scenarios on both backends, plus
concurrent writers (two stores = two cloud workers / processes on one database)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from test_cloud_store_postgres import StoreFactory, make_store, pg_schema  # noqa: F401

from ciphertwin.cloud_twin.store import (
    DesiredRecord,
    Enqueued,
    ReportedRecord,
    RequestRecord,
    RequestState,
    TwinStore,
)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[TwinStore]:  # noqa: F811
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


def _desired(version: int, writer: str = "alice", twin: str = "t1") -> DesiredRecord:
    return DesiredRecord(twin, version, writer, f"env-{version}-{writer}".encode(), 1.0 + version)


def _request(rid: str, deadline: float = 1e10, requester: str = "bob",
             twin: str = "t1", wake: bool = False) -> RequestRecord:
    return RequestRecord(requester, rid, twin, f"req-{rid}".encode(), deadline, wake, 5.0)


async def test_desired_compare_and_set(store: TwinStore) -> None:
    assert await store.get_desired("t1") is None
    ok = await store.set_desired(_desired(1), 0)
    assert ok.accepted and ok.current == 1 and not ok.duplicate
    # same bytes again (a writer's resend): accepted, nothing changes
    again = await store.set_desired(_desired(1), 0)
    assert again.accepted and again.duplicate and again.current == 1
    # another writer from the same (now stale) base: refused with the current version
    stale = await store.set_desired(_desired(1, "bob"), 0)
    assert not stale.accepted and stale.current == 1
    assert (await store.set_desired(_desired(2), 1)).accepted
    stale = await store.set_desired(_desired(2, "bob"), 1)
    assert (stale.accepted, stale.current) == (False, 2)
    assert not (await store.set_desired(_desired(5), 4)).accepted  # a base from the future
    got = await store.get_desired("t1")
    assert got == _desired(2)
    with pytest.raises(ValueError):
        await store.set_desired(_desired(3), 1)
    assert await store.get_desired("t2") is None


async def test_reported_versions_only_increase(store: TwinStore) -> None:
    def rep(v: int, device: str = "d1", env: bytes | None = None) -> ReportedRecord:
        return ReportedRecord("t1", device, v, 1, v % 2 == 0, env or f"r{v}".encode(), float(v))

    assert (await store.put_reported(rep(3))).accepted
    assert (await store.put_reported(rep(3))).duplicate
    for v, env in ((3, b"other"), (2, None)):
        out = await store.put_reported(rep(v, env=env))
        assert (out.accepted, out.current) == (False, 3)
    assert (await store.put_reported(rep(4))).accepted
    assert (await store.put_reported(rep(1, "d2"))).accepted  # per device
    rows = await store.get_reported("t1")
    assert [(r.device, r.version, r.in_sync) for r in rows] == [("d1", 4, True), ("d2", 1, False)]
    assert await store.get_reported("t2") == []


async def test_concurrent_writers_exactly_one_wins(make_store: StoreFactory) -> None:  # noqa: F811
    """Two stores on one database (two cloud workers) and many tasks, all from base 0
    and then from base 1: exactly one write per base wins."""
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    try:
        for base in (0, 1):
            results = await asyncio.gather(*(
                s.set_desired(_desired(base + 1, f"w{i}"), base)
                for i, s in enumerate([a, b] * 8)))
            winners = [r for r in results if r.accepted]
            assert len(winners) == 1
            assert {r.current for r in results} == {base + 1}
        assert (await a.get_desired("t1")).version == 2  # type: ignore[union-attr]
    finally:
        await a.close()
        await b.close()


async def test_queue_order_replay_cap_and_close(store: TwinStore) -> None:
    wraps = {"d1": b"w1", "d2": b"w2"}
    for i in range(5):
        assert await store.enqueue_request(_request(f"r{i}"), wraps, cap=5) == (Enqueued.NEW, None)
    assert await store.enqueue_request(_request("r0"), wraps, cap=5) == (Enqueued.REPLAYED, None)
    assert await store.enqueue_request(_request("r0", requester="carol"), {"d3": b"w"}, cap=5) \
        == (Enqueued.NEW, None)  # request ids are the requester's
    assert await store.enqueue_request(_request("r5"), wraps, cap=5) == (Enqueued.FULL, "d1")
    assert await store.get_request("bob", "r5") is None  # a refused request leaves nothing
    q = await store.device_queue("t1", "d1")
    assert [d.request_id for d in q] == [f"r{i}" for i in range(5)]
    assert q[0].wrap == b"w1" and q[0].envelope == b"req-r0" and not q[0].delivered
    await store.mark_delivered("t1", "d1", q[0].ord, q[1].ord)
    assert [d.delivered for d in await store.device_queue("t1", "d1")] == [True, True] + [False] * 3
    pending = await store.device_queue("t1", "d1", include_delivered=False)
    assert [d.request_id for d in pending] == ["r2", "r3", "r4"]
    assert [d.request_id for d in await store.device_queue("t1", "d1", after=q[3].ord)] == ["r4"]
    # only a device the request was queued for may answer it
    assert await store.close_request("bob", "r1", RequestState.ANSWERED, 9.0, twin="t1",
                                     device="d9") is None
    closed = await store.close_request("bob", "r1", RequestState.ANSWERED, 9.0, twin="t1",
                                       device="d2")
    assert closed is not None and closed.twin == "t1" and closed.state is RequestState.OPEN
    assert await store.close_request("bob", "r1", RequestState.EXPIRED, 9.0) is None  # final
    assert (await store.get_request("bob", "r1")).state is RequestState.ANSWERED  # type: ignore[union-attr]
    assert await store.queue_length("t1", "d1") == 4 and await store.queue_length("t1", "d2") == 4
    assert sorted(await store.queued_devices()) == [("t1", "d1"), ("t1", "d2"), ("t1", "d3")]
    # a slot freed: the cap admits one more
    assert (await store.enqueue_request(_request("r6"), wraps, cap=5))[0] is Enqueued.NEW
    # the replay guard outlives the answer
    assert (await store.enqueue_request(_request("r1"), wraps, cap=9))[0] is Enqueued.REPLAYED


async def test_due_requests_and_purge(store: TwinStore) -> None:
    await store.enqueue_request(_request("old", deadline=10.0), {"d1": b"w"}, cap=10)
    await store.enqueue_request(_request("new", deadline=1e10), {"d1": b"w"}, cap=10)
    due = await store.due_requests(100.0)
    assert [r.request_id for r in due] == ["old"]
    assert await store.close_request("bob", "old", RequestState.EXPIRED, 100.0) is not None
    assert await store.due_requests(100.0) == []
    assert [d.request_id for d in await store.device_queue("t1", "d1")] == ["new"]
    assert await store.purge_requests(50.0) == 1
    assert await store.get_request("bob", "old") is None
    assert await store.get_request("bob", "new") is not None


async def test_queue_survives_reopen(make_store: StoreFactory) -> None:  # noqa: F811
    store = make_store()
    await store.open()
    for i in range(30):
        await store.enqueue_request(_request(f"r{i:03}"), {"d1": b"w"}, cap=1000)
    await store.set_desired(_desired(1), 0)
    await store.close()
    again = make_store()
    await again.open()
    try:
        assert [d.request_id for d in await again.device_queue("t1", "d1")] == \
            [f"r{i:03}" for i in range(30)]
        assert (await again.get_desired("t1")) == _desired(1)
    finally:
        await again.close()


async def test_two_workers_respect_the_queue_cap(make_store: StoreFactory) -> None:  # noqa: F811
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    try:
        results = await asyncio.gather(*(
            s.enqueue_request(_request(f"r{i}"), {"d1": b"w"}, cap=7)
            for i, s in enumerate([a, b] * 10)))
        assert [r[0] for r in results].count(Enqueued.NEW) == 7
        assert await a.queue_length("t1", "d1") == 7
    finally:
        await a.close()
        await b.close()

