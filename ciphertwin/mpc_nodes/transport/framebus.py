"""Publish/subscribe of raw frames: the seam between the secure channel and a broker.

``BusFrameBus`` adapts the project's resilient MQTT client (:class:`ciphertwin.bus.client.
BusClient`); ``MemoryFrameBus`` is an in-process broker used to test the channel against
dropped, duplicated, reordered and forged frames without a network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from ciphertwin.bus.client import BusClient

FrameHandler = Callable[[str, bytes], Awaitable[None]]


class FrameBus(Protocol):
    async def publish(self, topic: str, payload: bytes) -> None: ...

    async def subscribe(self, topic_filter: str, handler: FrameHandler) -> None: ...

    async def unsubscribe(self, topic_filter: str) -> None: ...


class BusFrameBus:
    """Frames over MQTT through a connected :class:`BusClient` (QoS 1: at-least-once)."""

    def __init__(self, bus: BusClient, *, qos: int = 1) -> None:
        self.bus = bus
        self.qos = qos

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.bus.publish(topic, payload, qos=self.qos)

    async def subscribe(self, topic_filter: str, handler: FrameHandler) -> None:
        async def on_message(topic: str, payload: bytes, _retain: bool) -> None:
            await handler(topic, payload)

        await self.bus.subscribe(topic_filter, on_message, qos=self.qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        await self.bus.unsubscribe(topic_filter)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching ('+' one level, '#' the rest)."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels) or (f != "+" and f != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


Interceptor = Callable[[str, bytes], list[tuple[str, bytes]]]
"""Fault injection: maps one published frame to what actually gets delivered (0..n frames)."""


class MemoryFrameBus:
    """In-process broker: every publish is delivered to matching subscribers, in order.

    An optional ``interceptor`` sees each frame first and may drop, duplicate, alter or hold
    it back (``release_held`` delivers held frames later, i.e. reordered).
    """

    def __init__(self, interceptor: Interceptor | None = None) -> None:
        self._subs: dict[str, FrameHandler] = {}
        self.interceptor = interceptor
        self.published = 0

    async def publish(self, topic: str, payload: bytes) -> None:
        self.published += 1
        frames = self.interceptor(topic, payload) if self.interceptor else [(topic, payload)]
        for t, p in frames:
            await self.deliver(t, p)

    async def deliver(self, topic: str, payload: bytes) -> None:
        for flt, handler in list(self._subs.items()):
            if topic_matches(flt, topic):
                await handler(topic, payload)
        await asyncio.sleep(0)

    async def subscribe(self, topic_filter: str, handler: FrameHandler) -> None:
        self._subs[topic_filter] = handler

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subs.pop(topic_filter, None)
