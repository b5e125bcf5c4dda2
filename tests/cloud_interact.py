"""A cloud twin on a real broker (embedded amqtt or Mosquitto) plus the issue-11 world of
`interact_world` (owner alice, device d1 of twin t1, reader carol, requester bob): the owner
registered, the device's `dev-d1` grant and carol's grant installed. Shared by the cloud
state and request tests; everything is real (broker, store, crypto), nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interact_world import World, make_world

from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import Envelope, decode
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore, TwinStore
from ciphertwin.crypto.tokens import InteractToken
from ciphertwin.protocol.control import build_control, control_request_id
from ciphertwin.protocol.kinds import INBOX_KINDS
from ciphertwin.protocol.twin_requests import build_presence

MOSQUITTO = ("127.0.0.1", 1883)


@dataclass
class Endpoint:
    host: str
    port: int
    prefix: str = field(default_factory=lambda: f"ct-test-{secrets.token_hex(4)}/v1")

    def bus(self, name: str) -> BusClient:
        return BusClient(self.host, self.port, client_id=f"{name}-{secrets.token_hex(3)}",
                         prefix=self.prefix)


@contextlib.asynccontextmanager
async def endpoint(kind: str) -> AsyncIterator[Endpoint]:
    """A broker: ``embedded`` (started here) or ``mosquitto`` (the system's, own prefix)."""
    if kind == "mosquitto":
        yield Endpoint(*MOSQUITTO)
        return
    async with EmbeddedBroker() as broker:
        yield Endpoint("127.0.0.1", broker.port)


class Collector:
    """Every message on one subscription, decoded, with a way to wait for some."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.kinds = kinds
        self.messages: list[tuple[str, Envelope, bytes]] = []
        self._changed = asyncio.Event()

    async def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.messages.append((topic, decode(payload, self.kinds), payload))
        self._changed.set()

    def of(self, kind: str) -> list[Envelope]:
        return [e for _, e, _ in self.messages if e.kind == kind]

    async def wait(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met; have {[e.kind for _, e, _ in self.messages]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))


class CloudWorld:
    """Cloud + clients of alice (owner), d1 (device), carol (reader), bob (requester)."""

    def __init__(self, ep: Endpoint, db: Path, w: World, **cloud_kw: Any) -> None:
        self.ep, self.db, self.w = ep, db, w
        self.cloud_kw = cloud_kw
        self.cloud: CloudTwin | None = None
        self.stack = contextlib.AsyncExitStack()
        self.inbox = Collector(INBOX_KINDS)
        self.owner_stream = Collector(("state_update", "stream_items"))
        self.carol_stream = Collector(("state_update", "stream_items"))
        self.bob_replies = Collector(("request_status", "state_result"))

    def make_store(self) -> TwinStore:
        return SqliteTwinStore(self.db)

    async def start_cloud(self, store: TwinStore | None = None) -> CloudTwin:
        bus = await self.stack.enter_async_context(self.ep.bus("cloud"))
        self.cloud = await self.stack.enter_async_context(CloudTwin(
            bus, store or self.make_store(), pool=ReencryptionPool(1, processes=False),
            **self.cloud_kw))
        return self.cloud

    async def stop_cloud(self) -> None:
        await self.stack.aclose()
        self.stack = contextlib.AsyncExitStack()
        self.cloud = None

    async def control(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = build_control(kind, self.w.owner.sig, {"owner": "alice", **body})
        rid = control_request_id(decode(payload, kind))
        reply = await self.alice.request(self.alice.topics.control("alice"), payload,
                                         self.alice.topics.replies("alice", rid), timeout=10)
        return decode(reply, "control_result").body

    async def setup(self) -> None:
        w = self.w
        res = await self.control("owner_register", {
            "pre_pk": w.owner.pre.public.to_bytes(), "verify_key": w.owner.sig.verify_key.raw})
        assert res["ok"], res
        for grant_id, receiver, rk in (("dev-d1", "d1", w.device_rekey),
                                       ("g-carol", "carol", w.reader_rekey)):
            res = await self.control("grant", {
                "grant_id": grant_id, "receiver": receiver, "twins": [w.twin],
                "policy": f'"twin:{w.twin}"', "rekey": rk.to_bytes()})
            assert res["ok"], res
        t = self.alice.topics
        await self.d1.subscribe(t.inbox("d1"), self.inbox)
        await self.alice.subscribe(t.stream(w.twin, "alice"), self.owner_stream)
        await self.carol.subscribe(t.stream(w.twin, "carol"), self.carol_stream)
        await self.bob.subscribe(t.filter("replies", principal="bob"), self.bob_replies)

    async def grant_interact(self, token: InteractToken) -> dict[str, Any]:
        return await self.control("interact_grant", {"request_id": secrets.token_hex(8),
                                                     "token": token.to_bytes()})

    async def revoke_interact(self, token: InteractToken) -> dict[str, Any]:
        return await self.control("interact_revoke", {"request_id": secrets.token_hex(8),
                                                      "token_id": token.token_id})

    async def presence(self, awake: bool, *, for_s: float = 60.0, wakeable: bool = True,
                       next_wake: float | None = None) -> None:
        await self.d1.publish(self.d1.topics.presence("d1"), build_presence(
            self.w.creds, awake=awake, until=time.time() + for_s, window_s=for_s,
            next_wake=next_wake, wakeable=wakeable))

    async def __aenter__(self) -> CloudWorld:
        self.clients = contextlib.AsyncExitStack()
        self.alice = await self.clients.enter_async_context(self.ep.bus("alice"))
        self.d1 = await self.clients.enter_async_context(self.ep.bus("d1"))
        self.carol = await self.clients.enter_async_context(self.ep.bus("carol"))
        self.bob = await self.clients.enter_async_context(self.ep.bus("bob"))
        await self.start_cloud()
        await self.setup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_cloud()
        await self.clients.aclose()


@contextlib.asynccontextmanager
async def cloud_world(kind: str, tmp: Path, **cloud_kw: Any) -> AsyncIterator[CloudWorld]:
    async with endpoint(kind) as ep, CloudWorld(ep, tmp / "cloud.db", make_world(),
                                                **cloud_kw) as cw:
        yield cw
