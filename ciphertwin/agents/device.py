"""The device agent: readings → attributes → sealed, signed items → outbox → cloud.

Nothing is lost between a reading and the cloud's store: each item enters the persistent
outbox (with its sequence number inside the signed envelope) before it is published, and it
leaves the outbox only when the cloud acknowledges that it committed it. Items in flight for
longer than ``resend_after`` are published again — the cloud stores idempotently, so
duplicates cost bandwidth, never correctness. This path imports no numpy (Raspberry Pi).

Publishing has no deadline: during a broker outage the sender waits, and a publish cut by a
dropped connection is sent again on the next one, so sending resumes as soon as the bus is
back. The send and produce tasks run supervised (:mod:`ciphertwin.supervise`): a failure is
logged and the task restarted, never a silently dead sender behind a filling outbox.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from ciphertwin.agents.attribute_rules import AttributeRules
from ciphertwin.agents.bundle import DeviceConfig
from ciphertwin.agents.outbox import Outbox
from ciphertwin.agents.sources import Reading, Source
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, max_size_of
from ciphertwin.bus.errors import BusError
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.errors import CipherTwinError
from ciphertwin.protocol.items import DeviceCredentials, build_item
from ciphertwin.supervise import spawn

log = structlog.get_logger(__name__)

Expand = Callable[[dict[str, Any], frozenset[str]], Iterable[tuple[dict[str, Any], Iterable[str]]]]
"""Turns one reading into the items to send (e.g. three secret shares); default: itself."""


Outgoing = Callable[[Reading], Reading]
"""Rewrites a reading before it is sealed (the gatekeeper's manipulator: redact, coarsen)."""


def _as_is(reading: dict[str, Any], attrs: frozenset[str]) -> list[tuple[dict[str, Any], Iterable[str]]]:
    return [(reading, attrs)]


class DeviceAgent:
    """Run with ``await agent.run(source)``; ``stop()`` ends it after flushing what it can."""

    def __init__(self, config: DeviceConfig, bus: BusClient, outbox: Outbox, *,
                 expand: Expand = _as_is, window: int = 256, resend_after: float = 5.0,
                 resend_after_reconnect: float = 1.0, outgoing: Outgoing | None = None) -> None:
        """``resend_after``: seconds an unacknowledged item waits before it is sent again;
        ``resend_after_reconnect``: the same, shorter, from a reconnect of the bus until the
        first acknowledgement — the items sent right after a broker restart often reach it
        before the cloud has subscribed again, and the broker drops them. ``outgoing``
        rewrites every reading before its attributes are derived and it is sealed: what it
        drops never leaves the device."""
        self.config, self.bus, self.outbox = config, bus, outbox
        self.creds = DeviceCredentials(config.twin, config.device, config.identity.signing,
                                       config.write_token.to_bytes())
        self.keys = DataKeyManager(config.owner_pre, config.epoch_policy)
        self.rules: AttributeRules = config.attribute_rules()
        self.expand = expand
        self.outgoing = outgoing
        self.window, self.resend_after = window, resend_after
        self.resend_after_reconnect = min(resend_after, resend_after_reconnect)
        self._acked_on = -1  # bus connection (``bus.reconnects``) whose items were last acknowledged
        self._sent_upto = 0
        self._inflight: dict[int, float] = {}  # seq -> loop time it was (last) published
        self._sent_on: dict[int, int] = {}  # seq -> bus connection it was (last) published on
        self._refused: set[int] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.acknowledged = 0
        self.produced = 0

    # -- producing ----------------------------------------------------------------------
    async def record(self, reading: Reading) -> list[int]:
        """Seal one reading (or its expansion) into the outbox; returns the seqs used."""
        if self.outgoing is not None:
            reading = self.outgoing(reading)
        attrs = frozenset(self.rules.attributes_for(reading))
        seqs = []
        for body, item_attrs in self.expand(reading.as_dict(), attrs):
            attributes = tuple(sorted(set(item_attrs)))
            seq = await self.outbox.append(
                lambda s, b=body, a=attributes: build_item(self.creds, self.keys, s, b, a))
            seqs.append(seq)
        self.produced += len(seqs)
        self._wake.set()
        return seqs

    async def _produce(self, source: Source) -> None:
        async for reading in source:
            try:
                await self.record(reading)
            except CipherTwinError as exc:
                log.warning("device.reading_refused", device=self.config.device, reason=str(exc))
            if self._stopping.is_set():
                return

    # -- sending ------------------------------------------------------------------------
    async def _on_ack(self, topic: str, payload: bytes, retain: bool) -> None:
        ack = decode(payload, "ack")
        # Only an acknowledgement of an item published on this connection shows the cloud
        # is listening again: acks of items it took before a restart arrive late as well.
        if any(self._sent_on.get(seq) == self.bus.reconnects for seq in ack["seqs"]):
            self._acked_on = self.bus.reconnects
        if ack["seqs"]:
            self.acknowledged += await self.outbox.acknowledge(ack["seqs"])
        for seq in ack["seqs"]:
            self._inflight.pop(seq, None)
            self._sent_on.pop(seq, None)
        for refusal in ack["rejected"]:
            self._inflight.pop(refusal["seq"], None)
            self._sent_on.pop(refusal["seq"], None)
            self._refused.add(refusal["seq"])
            log.error("device.item_refused_by_cloud", seq=refusal["seq"],
                      reason=refusal["reason"], hint="kept in the outbox; not resent")
        self._wake.set()

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        self._inflight.clear()  # a (re)started sender sends every pending item again
        self._sent_on.clear()
        self._sent_upto = 0
        while True:
            room = self.window - len(self._inflight)
            batch = await self.outbox.pending(room, self._sent_upto) if room > 0 else []
            for seq, payload in batch:
                if seq in self._refused:
                    self._sent_upto = max(self._sent_upto, seq)
                    continue
                self._inflight[seq] = loop.time()
                if not await self._publish(seq, payload):
                    self._inflight.pop(seq, None)
                    break  # retried from this item on
                self._sent_on[seq] = self.bus.reconnects
                self._sent_upto = max(self._sent_upto, seq)
            if batch:
                continue
            self._wake.clear()
            resend_after = self._resend_after()
            try:
                await asyncio.wait_for(self._wake.wait(), resend_after / 2)
            except TimeoutError:
                pass
            oldest = min(self._inflight.values(), default=None)
            if oldest is not None and loop.time() - oldest > resend_after:
                log.info("device.resending", unacknowledged=len(self._inflight),
                         after_s=resend_after)
                self._inflight.clear()
                self._sent_on.clear()
                self._sent_upto = 0  # publish every pending item again, oldest first

    def _resend_after(self) -> float:
        """Short until an item published since the bus (re)connected is acknowledged (see
        ``resend_after_reconnect``), else ``resend_after``."""
        if self.bus.reconnects != self._acked_on:
            return self.resend_after_reconnect
        return self.resend_after

    async def _publish(self, seq: int, payload: bytes) -> bool:
        """Publish one item, waiting through outages; False (logged, after a pause) if the
        bus gave up anyway (closing, say): the caller retries from this item."""
        try:
            await self.bus.publish(self.bus.topics.twin_data(self.config.twin), payload,
                                   timeout=math.inf)
            return True
        except BusError as exc:
            log.warning("device.send_failed", device=self.config.device, seq=seq,
                        error=f"{type(exc).__name__}: {exc}", retry_in=1.0)
            await asyncio.sleep(1.0)
            return False

    async def run(self, source: Source | None = None) -> None:
        """Subscribe to acks, send the outbox, and (if given) record the source's readings."""
        await self.bus.subscribe(self.bus.topics.ack(self.config.twin, self.config.device),
                                 self._on_ack, max_payload=max_size_of("ack"))
        sender = spawn("device:send", self._send)
        producer = spawn("device:produce", functools.partial(self._produce, source)) \
            if source is not None else None
        try:
            await self._stopping.wait()
        finally:
            for task in (sender, producer):
                if task is not None:
                    task.cancel()
            await asyncio.gather(sender, *([producer] if producer else []),
                                 return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()

    async def drained(self, timeout: float = 30.0) -> bool:
        """Wait until the outbox is empty (everything acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        while await self.outbox.count() > len(self._refused):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True
