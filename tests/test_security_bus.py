"""Attacks on the bus itself (issue 8, holes 6 and 11), against real brokers.

* size caps: a client announcing a packet larger than any message kind is disconnected by
  both brokers before the packet is buffered, and the broker keeps serving; the largest kind
  still passes; a payload above what a topic carries is dropped by the receiving bus client
  before it is queued or decoded; queues are bounded in bytes;
* client ids: two processes of one principal both stay connected and both receive; a refused
  CONNECT with a victim's client id leaves the victim hearing; a client whose session is
  taken over notices, logs it and reconnects (and logs an error when it keeps happening).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from ciphertwin.agents.identity import Identity
from ciphertwin.broker.acl import client_id_allowed
from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.broker.limits import broker_max_packet
from ciphertwin.broker.mosquitto import render_conf
from ciphertwin.bus.budget import ByteBudget
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import (
    MQTT_HEADER_ROOM, max_packet_size, max_size_of, registered_kinds,
)
from ciphertwin.bus.errors import BusAuthError
from ciphertwin.config import Deployment
from ciphertwin.mpc_nodes.transport.secure import _FRAME_OVERHEAD
from test_broker_isolation import (  # noqa: F401 - fixtures
    T, Running, broker, deployment, embedded, pw,
)

# -- raw MQTT 3.1.1: the attacker does not use our client, and need not send what it announces


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


async def _raw_connect(running: Running, user: str, client_id: str | None = None,
                       password: str | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A logged-in raw connection (CONNACK checked)."""
    reader, writer = await asyncio.open_connection(running.host, running.port)
    body = (_str(b"MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
            + _str((client_id or f"{user}@raw{os.urandom(4).hex()}").encode())
            + _str(user.encode()) + _str((password or pw(user)).encode()))
    writer.write(b"\x10" + _varint(len(body)) + body)
    await writer.drain()
    connack = await asyncio.wait_for(reader.readexactly(4), 5)
    assert connack[:2] == b"\x20\x02"
    return reader, writer


def _publish_header(topic: str, payload_size: int) -> bytes:
    """A QoS 0 PUBLISH header announcing ``payload_size`` bytes of payload."""
    t = _str(topic.encode())
    return b"\x30" + _varint(len(t) + payload_size) + t


async def _closed_by_broker(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def _collect(bus: BusClient, topic_filter: str, **kw: object) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []

    async def handler(topic: str, payload: bytes, retain: bool) -> None:
        seen.append((topic, len(payload)))

    await bus.subscribe(topic_filter, handler, **kw)  # type: ignore[arg-type]
    return seen


async def _until(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _events(logs: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [e for e in logs if e.get("event") == name]


# -- hole 6: size caps -------------------------------------------------------------------------


def test_broker_limit_comes_from_the_largest_registered_kind() -> None:
    largest = max_size_of(*registered_kinds())
    assert largest >= max_size_of("node_inputs", "job_result") == 80 * 1024 * 1024
    assert broker_max_packet() == max_packet_size() == largest + MQTT_HEADER_ROOM
    assert 16 * 1024 * 1024 + _FRAME_OVERHEAD < broker_max_packet()  # largest MPC frame


def test_mosquitto_config_caps_the_packet_size(deployment: Deployment, tmp_path: Path) -> None:
    conf = render_conf(deployment, tmp_path)
    assert f"\nmax_packet_size {broker_max_packet()}\n" in conf


async def test_oversize_packet_is_refused_and_the_broker_keeps_serving(broker: Running) -> None:
    """d1 announces a twin-data packet one byte above the limit and starts sending it: the
    broker (embedded or the emitted Mosquitto) hangs up without waiting for the rest, nothing
    reaches the cloud, and the next legitimate message does."""
    async with broker.client("cloud") as cloud, broker.client("d1") as d1:
        seen = await _collect(cloud, T.filter("twin_data"))
        reader, writer = await _raw_connect(broker, "d1")
        with structlog.testing.capture_logs() as logs:
            writer.write(_publish_header(T.twin_data("t1"), broker_max_packet() + 1))
            with contextlib.suppress(ConnectionError):
                writer.write(b"\0" * (1 << 20))  # a start: the rest (80 MiB) is never needed
                await writer.drain()
            assert await _closed_by_broker(reader), "broker waited for an oversize packet"
        writer.close()
        if broker.name == "amqtt":
            assert _events(logs, "broker.packet_refused")
        await d1.publish(T.twin_data("t1"), b"after")
        await _until(lambda: seen == [(T.twin_data("t1"), 5)])


async def test_largest_message_kind_still_passes(broker: Running) -> None:
    """A node_inputs chunk of the kind's full 80 MiB is delivered by both brokers."""
    size = max_size_of("node_inputs")
    topic = T.node_inputs("n1", "job-1")
    async with broker.client("cloud") as cloud:
        seen = await _collect(cloud, T.filter("node_inputs"))
        reader, writer = await _raw_connect(broker, "cloud")
        writer.write(_publish_header(topic, size))
        chunk = b"\0" * (4 << 20)
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        await _until(lambda: seen == [(topic, size)], timeout=60)
        writer.close()


async def test_oversize_twin_data_is_dropped_before_the_cloud_queues_it(
        embedded: Running, tmp_path: Path) -> None:
    """1 MiB on a twin's data topic (the broker admits up to 80 MiB, an item is at most
    96 KiB): the cloud's bus client drops it, logged, before the ingest sees it."""
    from ciphertwin.cloud_twin.reencryption import ReencryptionPool
    from ciphertwin.cloud_twin.service import CloudTwin
    from ciphertwin.cloud_twin.store import SqliteTwinStore

    async with embedded.client("cloud") as bus, embedded.client("d1") as d1:
        cloud = CloudTwin(bus, SqliteTwinStore(tmp_path / "cloud.db"),
                          pool=ReencryptionPool(1, processes=False))
        async with cloud:
            with structlog.testing.capture_logs() as logs:
                await d1.publish(T.twin_data("t1"), b"\0" * (1 << 20))
                await d1.publish(T.twin_data("t1"), b"small garbage")  # reaches the ingest
                await _until(lambda: cloud.ingest.rejected >= 1)
                await asyncio.sleep(0.2)
            dropped = _events(logs, "bus.oversize_dropped")
            assert [(e["size"], e["limit"]) for e in dropped] == [(1 << 20, max_size_of("item"))]
            assert cloud.ingest.rejected == 1  # only the small garbage was decoded (and refused)


async def test_subscription_queue_drops_beyond_its_byte_budget(embedded: Running) -> None:
    """A flood towards a slow handler: the queue holds at most ``queue_bytes``; the rest is
    dropped, logged, and delivery resumes once the handler catches up."""
    release = asyncio.Event()
    got: list[int] = []

    async def slow(topic: str, payload: bytes, retain: bool) -> None:
        got.append(len(payload))
        await release.wait()

    async with embedded.client("cloud", queue_bytes=100_000) as cloud, \
            embedded.client("d1") as d1:
        await cloud.subscribe(T.filter("twin_data"), slow)
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                await d1.publish(T.twin_data("t1"), b"\1" * 40_000)
            await d1.publish(T.twin_data("t1"), b"marker")
            await asyncio.sleep(0.5)
            release.set()
            await _until(lambda: got[-1:] == [6] or len(got) >= 3)
            await asyncio.sleep(0.3)
        # 40 000 in the handler + 40 000 queued; 40 000 more would exceed 100 000
        assert got == [40_000, 40_000, 6]
        assert len(_events(logs, "bus.queue_full")) == 1
        await d1.publish(T.twin_data("t1"), b"later")
        await _until(lambda: got[-1] == 5)


async def test_ingest_queue_waits_beyond_its_byte_budget(tmp_path: Path) -> None:
    """The cloud's ingest queue holds at most ``queue_bytes``: a submit beyond waits
    (backpressure) until a batch is taken."""
    from ciphertwin.cloud_twin.ingest import IngestPipeline
    from ciphertwin.cloud_twin.store import SqliteTwinStore
    from ciphertwin.cloud_twin.trust import TrustRegistry

    store = SqliteTwinStore(tmp_path / "cloud.sqlite")
    await store.open()
    try:
        async def nothing(*_: object) -> None:
            return None

        pipeline = IngestPipeline(store, TrustRegistry(store), nothing, nothing,
                                  queue_bytes=100_000)
        await pipeline.submit("t1", b"\0" * 60_000)
        blocked = asyncio.create_task(pipeline.submit("t1", b"\0" * 60_000))
        await asyncio.sleep(0.3)
        assert not blocked.done(), "a submit beyond the byte budget did not wait"
        assert [len(p) for _, p in await pipeline._next_batch()] == [60_000]
        await asyncio.wait_for(blocked, 2)
    finally:
        await store.close()


def test_byte_budget_refuses_beyond_its_limit() -> None:
    budget = ByteBudget(100)
    assert budget.try_take(200)  # one message always fits an empty budget
    assert not budget.try_take(1)
    budget.release(200)
    assert budget.try_take(60) and budget.try_take(40) and not budget.try_take(1)


# -- hole 11: client ids --------------------------------------------------------------------------


def test_clients_of_one_principal_get_distinct_unguessable_ids(deployment: Deployment) -> None:
    a = BusClient.for_deployment(deployment, username="cloud", password="x")
    b = BusClient.for_deployment(deployment, username="cloud", password="x")
    assert a.client_id != b.client_id
    for c in (a, b):
        name, _, suffix = c.client_id.partition("@")
        assert name == "cloud" and len(suffix) == 24 and client_id_allowed("cloud", c.client_id)


async def test_refused_connect_with_a_victims_client_id_does_not_deafen_it(
        broker: Running) -> None:
    """d1 connects with the cloud's client id — with a wrong password, and (embedded broker:
    it checks ids per user) with its own password. Both are refused, and the cloud still
    receives, on the connection it had."""
    async with broker.client("cloud") as cloud, broker.client("d1") as d1:
        seen = await _collect(cloud, T.filter("twin_data"))
        attempts = [("cloud", "wrong-password-0123456789")]
        if broker.name == "amqtt":
            attempts.append(("d1", pw("d1")))
        for user, password in attempts:
            with pytest.raises(BusAuthError):
                async with BusClient(broker.host, broker.port, client_id=cloud.client_id,
                                     username=user, password=password, connect_timeout=5):
                    pass
        await d1.publish(T.twin_data("t1"), b"still heard")
        await _until(lambda: len(seen) == 1)
        assert cloud.reconnects == 0


async def test_taken_over_client_reconnects_and_logs_it(broker: Running) -> None:
    """Another connection takes over the receiver's client id once: the receiver is dropped
    (not left connected but deaf), logs it, reconnects and receives again."""
    async with broker.client("cloud", client_id="cloud@fixed") as cloud, \
            broker.client("d1") as d1:
        seen = await _collect(cloud, T.filter("twin_data"))
        with structlog.testing.capture_logs() as logs:
            reader, writer = await _raw_connect(broker, "cloud", client_id="cloud@fixed")
            writer.close()
            await _until(lambda: cloud.reconnects >= 1)
        lost = _events(logs, "bus.connection_lost")
        assert lost and lost[0]["reconnecting"] is True
        if broker.name == "amqtt":
            assert _events(logs, "broker.session_taken_over")
        await cloud.wait_connected(5)
        await d1.publish(T.twin_data("t1"), b"heard again")
        await _until(lambda: (T.twin_data("t1"), 11) in seen)


async def test_client_kicked_again_and_again_logs_an_error(embedded: Running) -> None:
    """Two clients forced onto one id keep taking the session from each other: an error says
    so (instead of two services silently losing messages)."""
    with structlog.testing.capture_logs() as logs:
        async with embedded.client("cloud", client_id="cloud@clash"), \
                embedded.client("cloud", client_id="cloud@clash"):
            await _until(lambda: bool(_events(logs, "bus.repeatedly_disconnected")))


# -- two real `ciphertwin cloud` processes of one principal --------------------------------------


@contextlib.asynccontextmanager
async def _cloud_process(config: Path, password: str) -> AsyncIterator[list[str]]:
    """``ciphertwin cloud`` as a subprocess; yields its log lines as they arrive."""
    env = {**os.environ, "CIPHERTWIN_CLOUD_PASSWORD": password}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "ciphertwin"), "--log-level", "INFO", "cloud",
        "--config", str(config), "--workers", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    lines: list[str] = []

    async def pump() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            lines.append(line.decode(errors="replace"))

    pumping = asyncio.create_task(pump())
    try:
        await _until(lambda: any("cloud twin running" in x for x in lines) or
                     proc.returncode is not None, timeout=60)
        assert proc.returncode is None, "".join(lines)[-2000:]
        yield lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        await pumping


async def test_two_cloud_processes_both_stay_connected_and_both_receive(
        deployment: Deployment, tmp_path: Path) -> None:
    config = tmp_path / "deployment.toml"
    operator_key = tmp_path / "operator.key"  # the cloud needs a pinned operator key
    operator_key.write_bytes(Identity.generate("operator", "operator").public.to_bytes())
    async with EmbeddedBroker(deployment, port=0) as b:
        config.write_text(
            f'[broker]\nhost = "127.0.0.1"\nport = {b.port}\nmode = "embedded"\n'
            f'[storage]\nbackend = "sqlite"\nsqlite_path = "{tmp_path / "cloud.sqlite"}"\n'
            f'[principals]\ncredentials_file = '
            f'"{deployment.principals.credentials_file}"\n'
            f'[processing]\noperator_key = "{operator_key}"\n')
        running = Running("amqtt", b.host, b.port, deployment, lambda: None)
        async with _cloud_process(config, pw("cloud")) as first, \
                _cloud_process(config, pw("cloud")) as second, running.client("d1") as d1:
            await d1.publish(T.twin_data("t1"), b"not an item")
            await _until(lambda: all(any("ingest.rejected" in x for x in lines)
                                     for lines in (first, second)), timeout=20)
            await asyncio.sleep(0.5)
            for lines in (first, second):
                assert not [x for x in lines if "connection_lost" in x], "".join(lines)
