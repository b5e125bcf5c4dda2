"""RequestRouter logic over a real store (SQLite, and PostgreSQL where it matters): admission
limits, per-device order, presence, wake cap, expiry, answers, restart. Delivery, wake and
status are collected by plain callbacks; the clock is a settable function."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_cloud_store_postgres import StoreFactory, make_store, pg_schema  # noqa: F401

from ciphertwin.cloud_twin.requests import (
    WAKE_CAP_REACHED,
    IncomingRequest,
    Presence,
    RequestRouter,
    Status,
)
from ciphertwin.cloud_twin.store import Delivery, SqliteTwinStore, TwinStore

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A router plus what it published."""

    def __init__(self, store: TwinStore, clock: Clock, **limits: int) -> None:
        self.store, self.clock = store, clock
        self.delivered: list[tuple[str, str]] = []  # (device, request_id)
        self.wakes: list[str] = []
        self.statuses: list[tuple[str, str, Status, bytes | None]] = []
        self.router = RequestRouter(store, deliver=self._deliver, wake=self._wake,
                                    status=self._status, clock=clock, **limits)

    async def _deliver(self, d: Delivery) -> None:
        self.delivered.append((d.device, d.request_id))

    async def _wake(self, twin: str, device: str) -> None:
        self.wakes.append(device)

    async def _status(self, requester: str, rid: str, status: Status, answer: bytes | None) -> None:
        self.statuses.append((requester, rid, status, answer))

    def states(self, rid: str) -> list[str]:
        return [s.state for _, r, s, _ in self.statuses if r == rid]

    def req(self, rid: str, *, requester: str = "bob", twin: str = "t1", wake: bool = False,
            deadline_in: float = 600.0, devices: tuple[str, ...] = ("d1",)) -> IncomingRequest:
        return IncomingRequest(twin, requester, rid, self.clock.now + deadline_in, wake,
                               f"env-{rid}".encode(), {d: f"wrap-{d}".encode() for d in devices})

    def presence(self, awake: bool, *, device: str = "d1", for_s: float = 60.0,
                 wakeable: bool = True, next_wake: float | None = None) -> Presence:
        return Presence("t1", device, awake, self.clock.now + for_s, next_wake, 60.0, wakeable,
                        self.clock.now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TwinStore]:
    s = SqliteTwinStore(tmp_path / "c.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def h(store: TwinStore) -> Harness:
    return Harness(store, Clock())


async def test_queued_while_asleep_then_delivered_in_order(h: Harness) -> None:
    await h.router.on_presence(h.presence(False, next_wake=T0 + 300))
    for i in range(5):
        status = await h.router.submit(h.req(f"r{i}"))
        assert status.state == "queued" and "asleep until" in status.reason
    assert h.delivered == []
    assert await h.router.on_presence(h.presence(True)) == 5
    assert h.delivered == [("d1", f"r{i}") for i in range(5)]
    assert h.states("r3") == ["queued", "delivered"]
    # a heartbeat in the same awake period sends nothing again
    h.clock.now += 10
    assert await h.router.on_presence(h.presence(True)) == 0
    # while awake a new request goes out at once, told "delivered" once
    assert (await h.router.submit(h.req("r5"))).state == "delivered"
    assert h.delivered[-1] == ("d1", "r5") and h.states("r5") == ["delivered"]


async def test_unknown_device_is_asleep_and_not_woken(h: Harness) -> None:
    status = await h.router.submit(h.req("r1", wake=True))
    assert status.state == "queued" and h.wakes == []


async def test_rate_limits_answered_with_reasons(h: Harness) -> None:
    for i in range(60):
        assert (await h.router.submit(h.req(f"a{i}"))).state == "queued"
    refused = await h.router.submit(h.req("a60"))
    assert refused.state == "refused" and "per requester" in refused.reason
    assert h.states("a60") == ["refused"]
    # per twin: carol still may, until the twin's 120 per minute are used
    for i in range(60):
        assert (await h.router.submit(h.req(f"c{i}", requester="carol"))).state == "queued"
    refused = await h.router.submit(h.req("x", requester="dave"))
    assert refused.state == "refused" and "for this twin" in refused.reason
    h.clock.now += 61  # the window slides on
    assert (await h.router.submit(h.req("a61"))).state == "queued"


async def test_replay_and_deadlines_refused(h: Harness) -> None:
    assert (await h.router.submit(h.req("r1"))).state == "queued"
    replay = await h.router.submit(h.req("r1"))
    assert (replay.state, replay.reason) == ("refused", "replayed: request_id already seen")
    past = await h.router.submit(h.req("r2", deadline_in=-1))
    assert past.state == "refused" and "deadline" in past.reason
    far = await h.router.submit(h.req("r3", deadline_in=8 * 86400))
    assert far.state == "refused" and "7 days" in far.reason
    assert (await h.router.submit(h.req("r4", devices=()))).state == "refused"
    # refused requests used no rate slot: 59 more fit in this minute
    for i in range(59):
        assert (await h.router.submit(h.req(f"s{i}"))).state == "queued"
    assert (await h.router.submit(h.req("s59"))).state == "refused"


async def test_queue_cap(store: TwinStore) -> None:
    h = Harness(store, Clock(), queue_cap=3)
    for i in range(3):
        assert (await h.router.submit(h.req(f"r{i}"))).state == "queued"
    full = await h.router.submit(h.req("r3"))
    assert full.state == "refused" and full.reason == "queue full: device d1 holds 3 requests"
    await h.router.on_presence(h.presence(True))
    assert [r for _, r in h.delivered] == ["r0", "r1", "r2"]
    # delivered but unanswered still count; an answer frees a slot
    assert (await h.router.submit(h.req("r4"))).state == "refused"
    assert await h.router.on_answer("t1", "d1", "bob", "r0", b"answer")
    assert (await h.router.submit(h.req("r5"))).state == "delivered"


async def test_wake_once_while_outstanding_and_capped_per_hour(h: Harness) -> None:
    await h.router.on_presence(h.presence(False))
    assert (await h.router.submit(h.req("w0", wake=True))).reason == "waking device d1"
    assert (await h.router.submit(h.req("w1", wake=True))).reason == "waking device d1"
    assert h.wakes == ["d1"]  # one wake while it is outstanding
    for i in range(2, 8):  # the device wakes, sleeps again; each new wake request wakes it
        h.clock.now += 60
        await h.router.on_presence(h.presence(True, for_s=5))
        h.clock.now += 10
        await h.router.on_presence(h.presence(False))
        status = await h.router.submit(h.req(f"w{i}", wake=True))
        assert status.state == "queued"
        if i < 7:
            assert status.reason == "waking device d1"
    assert len(h.wakes) == 6 and status.reason == WAKE_CAP_REACHED
    assert h.states("w7") == ["queued"]
    # the next hour's window admits wakes again
    h.clock.now += 3600
    await h.router.on_presence(h.presence(False))
    assert (await h.router.submit(h.req("w8", wake=True))).reason == "waking device d1"
    # a device that is not wakeable is never woken
    await h.router.on_presence(h.presence(False, wakeable=False))
    h.clock.now += 1
    await h.router.submit(h.req("w9", wake=True))
    assert len(h.wakes) == 7


async def test_expiry_by_sweep_and_at_delivery(h: Harness) -> None:
    await h.router.submit(h.req("short", deadline_in=5))
    await h.router.submit(h.req("long", deadline_in=500))
    h.clock.now += 10
    assert await h.router.sweep() == 1
    assert h.states("short") == ["queued", "expired"]
    await h.router.submit(h.req("mid", deadline_in=20))
    h.clock.now += 30  # "mid" expires between sweeps: the delivery drops it
    await h.router.on_presence(h.presence(True))
    assert [r for _, r in h.delivered] == ["long"]
    assert h.states("mid") == ["queued", "expired"]
    assert await h.router.sweep() == 0


async def test_answers(h: Harness) -> None:
    await h.router.on_presence(h.presence(True))
    await h.router.submit(h.req("r1", devices=("d1", "d2")))
    assert not await h.router.on_answer("t1", "d9", "bob", "r1", b"x")  # not its device
    assert not await h.router.on_answer("t2", "d1", "bob", "r1", b"x")  # another twin
    assert not await h.router.on_answer("t1", "d1", "carol", "r1", b"x")  # another requester
    assert await h.router.on_answer("t1", "d1", "bob", "r1", b"the answer")
    assert not await h.router.on_answer("t1", "d2", "bob", "r1", b"late")  # already final
    assert [(s.state, a) for _, r, s, a in h.statuses if r == "r1"][-1] == ("answered",
                                                                            b"the answer")
    assert await h.store.device_queue("t1", "d2") == []


async def test_restart_redelivers_unanswered_in_order(make_store: StoreFactory) -> None:  # noqa: F811
    clock = Clock()
    first = make_store()
    await first.open()
    h = Harness(first, clock)
    await h.router.on_presence(h.presence(True))
    for i in range(3):
        await h.router.submit(h.req(f"r{i}"))
    await h.router.on_answer("t1", "d1", "bob", "r1", b"a")
    await h.router.on_presence(h.presence(False))
    for i in range(3, 5):
        await h.router.submit(h.req(f"r{i}"))
    await first.close()
    again = make_store()
    await again.open()
    try:
        h2 = Harness(again, clock)
        await h2.router.load()
        assert not h2.router.is_awake("t1", "d1")
        clock.now += 1
        await h2.router.on_presence(h2.presence(True))
        assert [r for _, r in h2.delivered] == ["r0", "r2", "r3", "r4"]
        assert h2.states("r0") == [] and h2.states("r3") == ["delivered"]
    finally:
        await again.close()


async def test_request_admitted_during_a_delivery_run_keeps_its_place(h: Harness) -> None:
    """A long queue is being delivered when a new request comes: it is not sent ahead of the
    queue, and not left behind either."""
    import asyncio

    slow = h._deliver

    async def deliver(d: Delivery) -> None:
        await asyncio.sleep(0.005)
        await slow(d)

    h.router._deliver = deliver
    for i in range(30):
        await h.router.submit(h.req(f"q{i:02}"))
    run = asyncio.create_task(h.router.on_presence(h.presence(True)))
    await asyncio.sleep(0.03)
    status = await h.router.submit(h.req("late"))
    assert status.state == "queued" and "under way" in status.reason
    await run
    assert [r for _, r in h.delivered] == [f"q{i:02}" for i in range(30)] + ["late"]
    assert h.states("late") == ["queued", "delivered"]


async def test_wake_count_and_presence_survive_restart(tmp_path: Path) -> None:
    """The hourly wake cap is not reset by restarting the cloud (else restarting it, or
    crashing it, would be a way around the denial-of-sleep cap)."""
    clock = Clock()
    first = SqliteTwinStore(tmp_path / "w.db")
    await first.open()
    h = Harness(first, clock, wakes_per_hour=1)
    await h.router.on_presence(h.presence(False))
    assert (await h.router.submit(h.req("w0", wake=True))).reason == "waking device d1"
    await first.close()
    again = SqliteTwinStore(tmp_path / "w.db")
    await again.open()
    try:
        h2 = Harness(again, clock, wakes_per_hour=1)
        await h2.router.load()
        clock.now += 60
        await h2.router.on_presence(h2.presence(False))
        assert (await h2.router.submit(h2.req("w1", wake=True))).reason == WAKE_CAP_REACHED
        assert h2.wakes == []
    finally:
        await again.close()
