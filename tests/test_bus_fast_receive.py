"""The receive path's shortcuts: buffered socket reads, routing remembered per topic, burst
delivery in order, and TCP_NODELAY on the broker connection."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient, _BufferedSocket

T = "ct/v1/fast"


async def wait_for(cond, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_buffered_socket_serves_small_reads_from_one_recv() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        buffered = _BufferedSocket(b)
        a.sendall(b"\x30\x05hello\x40\x02\x00\x01")
        time.sleep(0.05)
        assert buffered.recv(1) == b"\x30"
        assert buffered.pending() == 10
        assert buffered.recv(1) == b"\x05"
        assert buffered.recv(5) == b"hello"
        assert buffered.recv(100) == b"\x40\x02\x00\x01"  # never more than is buffered
        assert buffered.pending() == 0
        with pytest.raises(BlockingIOError):
            buffered.recv(1)
        assert buffered.fileno() == b.fileno()
        a.close()
        time.sleep(0.05)
        assert buffered.recv(1) == b""  # end of stream reaches paho unchanged
    finally:
        a.close()
        b.close()


async def test_routing_follows_subscribe_and_unsubscribe() -> None:
    async with EmbeddedBroker(port=free_port()) as broker:
        a: list[bytes] = []
        b: list[bytes] = []

        async def on_a(topic: str, payload: bytes, retain: bool) -> None:
            a.append(payload)

        async def on_b(topic: str, payload: bytes, retain: bool) -> None:
            b.append(payload)

        async with BusClient("127.0.0.1", broker.port, client_id="sub") as sub, \
                BusClient("127.0.0.1", broker.port, client_id="pub") as pub:
            await sub.subscribe(f"{T}/+/x", on_a)
            await pub.publish(f"{T}/1/x", b"1")
            await wait_for(lambda: a == [b"1"])
            await sub.subscribe(f"{T}/#", on_b)  # the remembered route must not hide this
            await pub.publish(f"{T}/1/x", b"2")  # (overlapping filters may deliver it twice)
            await wait_for(lambda: b"2" in a and b"2" in b)
            await sub.unsubscribe(f"{T}/+/x")
            await pub.publish(f"{T}/1/x", b"3")
            await wait_for(lambda: b"3" in b)
            await asyncio.sleep(0.1)
            assert b"3" not in a


async def test_a_burst_arrives_complete_and_in_order() -> None:
    async with EmbeddedBroker(port=free_port()) as broker:
        got: list[bytes] = []

        async def handler(topic: str, payload: bytes, retain: bool) -> None:
            got.append(payload)

        async with BusClient("127.0.0.1", broker.port, client_id="sub") as sub, \
                BusClient("127.0.0.1", broker.port, client_id="pub") as pub:
            await sub.subscribe(f"{T}/burst", handler)
            sent = [i.to_bytes(4, "big") * (1 + i % 700) for i in range(500)]  # 4 B .. 2.8 KB
            await asyncio.gather(*(pub.publish(f"{T}/burst", p) for p in sent))
            await wait_for(lambda: len(got) == len(sent), timeout=20)
            assert sorted(got) == sorted(sent)


async def test_broker_connection_has_nodelay() -> None:
    async with EmbeddedBroker(port=free_port()) as broker, \
            BusClient("127.0.0.1", broker.port, client_id="c") as bus:
        sock = bus._client._client.socket()  # type: ignore[union-attr]  # noqa: SLF001
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
