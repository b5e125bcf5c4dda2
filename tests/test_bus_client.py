"""BusClient against real brokers: reconnect + resubscribe, outages, handler faults, requests."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.errors import BusUnavailable, RequestTimeout
from ciphertwin.errors import ValidationError

T = "ct/v1/test"


def client(port: int, cid: str, **kw: object) -> BusClient:
    opts: dict[str, object] = {"connect_timeout": 5, "publish_timeout": 5, "backoff_max": 0.5}
    opts.update(kw)
    return BusClient("127.0.0.1", port, client_id=cid, **opts)  # type: ignore[arg-type]


async def wait_for(cond, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_reconnects_and_resubscribes_after_broker_restart() -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port)
    await broker.start()
    got: list[bytes] = []

    async def handler(topic: str, payload: bytes, retain: bool) -> None:
        got.append(payload)

    async with client(port, "sub") as sub, client(port, "pub") as pub:
        await sub.subscribe(f"{T}/#", handler)
        await pub.publish(f"{T}/a", b"before")
        await wait_for(lambda: got == [b"before"])

        await broker.stop()
        await wait_for(lambda: not sub.connected and not pub.connected)
        with pytest.raises(BusUnavailable):
            await pub.publish(f"{T}/a", b"lost", timeout=0.3)
        # a publish issued during the outage waits for the broker and then goes through
        pending = asyncio.create_task(pub.publish(f"{T}/a", b"during", timeout=10))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await broker.start()  # same port
        await pending
        await wait_for(lambda: sub.connected)
        await pub.publish(f"{T}/a", b"after")
        # "during" may arrive before the subscriber re-subscribed (QoS 1 without a persistent
        # session is lost then); "after" must arrive through the re-made subscription.
        await wait_for(lambda: b"after" in got)
        assert sub.reconnects >= 1 and pub.reconnects >= 1
    await broker.stop()


async def test_handler_errors_do_not_stop_delivery() -> None:
    async with EmbeddedBroker(port=0) as b, client(b.port, "c") as c:
        got: list[bytes] = []

        async def flaky(topic: str, payload: bytes, retain: bool) -> None:
            if payload == b"boom":
                raise RuntimeError("handler bug")
            if payload == b"bad":
                raise ValidationError("garbage")
            got.append(payload)

        await c.subscribe(f"{T}/#", flaky)
        for p in (b"boom", b"bad", b"fine"):
            await c.publish(f"{T}/x", p)
        await wait_for(lambda: got == [b"fine"])


async def test_request_response_and_timeout() -> None:
    async with EmbeddedBroker(port=0) as b, client(b.port, "server") as srv, \
            client(b.port, "asker") as asker:

        async def echo(topic: str, payload: bytes, retain: bool) -> None:
            rid = topic.rsplit("/", 1)[1]
            await srv.publish(f"{T}/replies/{rid}", payload.upper())

        await srv.subscribe(f"{T}/requests/+", echo)
        reply = await asker.request(f"{T}/requests/r1", b"ping", f"{T}/replies/r1", timeout=5)
        assert reply == b"PING"
        with pytest.raises(RequestTimeout):
            await asker.request(f"{T}/nobody", b"x", f"{T}/replies/r2", timeout=0.3)


async def test_unreachable_broker_and_bad_arguments() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable, match="could not connect"):
        async with client(port, "x", connect_timeout=0.5):
            pass
    assert time.monotonic() - t0 < 3
    with pytest.raises(ValidationError):
        BusClient("127.0.0.1", 70000, client_id="x")
    with pytest.raises(ValidationError):
        BusClient("127.0.0.1", 1883, client_id="x", username="a/b")
    async with EmbeddedBroker(port=0) as b, client(b.port, "v") as c:
        with pytest.raises(ValidationError):
            await c.publish(f"{T}/+", b"x")
        with pytest.raises(ValidationError):
            await c.publish(f"{T}/x", "text")  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await c.subscribe(f"{T}/#/x", None)
        with pytest.raises(ValidationError):
            await c.publish(f"{T}/x", b"x", qos=3)


async def _throughput(port: int, n: int) -> float:
    got = 0
    done = asyncio.Event()

    async def count(topic: str, payload: bytes, retain: bool) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    # ids and topic unique per run: other test runs may share the system Mosquitto
    run = secrets.token_hex(4)
    topic = f"{T}/tp/{run}"
    async with client(port, f"tp-sub-{run}") as sub, client(port, f"tp-pub-{run}") as pub:
        await sub.subscribe(topic, count)
        payload = b"x" * 256
        t0 = time.perf_counter()
        for start in range(0, n, 100):  # keep at most 100 unacknowledged (broker queue limits)
            await asyncio.gather(*(pub.publish(topic, payload)
                                   for _ in range(min(100, n - start))))
        rate = n / (time.perf_counter() - t0)
        await asyncio.wait_for(done.wait(), 20)
    return rate


@pytest.mark.mosquitto
async def test_round_trip_and_publish_rate_on_system_mosquitto() -> None:
    rate = await _throughput(1883, 3000)
    print(f"\nQoS 1 publish rate, Mosquitto 127.0.0.1:1883: {rate:,.0f} msg/s")
    assert rate > 300


async def test_publish_rate_on_embedded_broker() -> None:
    async with EmbeddedBroker(port=0) as b:
        rate = await _throughput(b.port, 1000)
    print(f"\nQoS 1 publish rate, embedded amqtt: {rate:,.0f} msg/s")
    assert rate > 100


async def test_for_deployment_uses_broker_settings() -> None:
    from ciphertwin.config import load_deployment

    async with EmbeddedBroker(port=0) as b:
        d = load_deployment(None, env={"CIPHERTWIN_BROKER__PORT": str(b.port),
                                       "CIPHERTWIN_BROKER__PREFIX": "site/x"})
        async with BusClient.for_deployment(d, client_id="fd") as c:
            assert c.topics.prefix == "site/x" and c.port == b.port and c.connected


# -- publishes cut by a dropped connection (a real Mosquitto process, paused and killed) ---
MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class MosquittoProcess:
    """A Mosquitto of our own on a free port: started, paused (SIGSTOP: TCP still accepts
    what we send, but nothing is acknowledged), killed (SIGKILL) and started again."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.conf = tmp_path / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             "persistence false\nuser root\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "mosquitto exited at start"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not open its port")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def mosquitto_process(tmp_path: Path) -> Iterator[MosquittoProcess]:
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip(f"the mosquitto binary is NOT installed ({MOSQUITTO_BIN})")
    m = MosquittoProcess(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.kill()


async def test_publish_in_flight_when_the_connection_drops_completes_after_reconnect(
        mosquitto_process: MosquittoProcess) -> None:
    """The PUBACK of a publish on a dead connection never comes (aiomqtt does not wake the
    wait); the client must notice the drop, send it again on the new connection and return —
    not sit out a deadline and then fail."""
    m = mosquitto_process
    async with client(m.port, "inflight-pub", publish_timeout=0.5) as pub:
        await pub.publish(f"{T}/cut", b"warm-up")
        m.signal(signal.SIGSTOP)
        pending = asyncio.create_task(pub.publish(f"{T}/cut", b"in flight", timeout=30))
        await asyncio.sleep(0.3)
        assert not pending.done(), "the paused broker cannot have acknowledged it"
        m.kill()
        await wait_for(lambda: not pub.connected)
        await asyncio.sleep(1.0)  # longer than publish_timeout: only the caller's timeout counts
        m.start()
        back = time.monotonic()
        await asyncio.wait_for(pending, 5)
        took = time.monotonic() - back
        assert pub.reconnects == 1
        print(f"\npublish cut by a broker kill completed {took:.2f} s after the broker returned")
        # without a deadline a publish waits through any outage and goes through afterwards
        m.kill()
        untimed = asyncio.create_task(pub.publish(f"{T}/cut", b"after", timeout=math.inf))
        await asyncio.sleep(1.0)
        assert not untimed.done()
        m.start()
        await asyncio.wait_for(untimed, 5)


def test_reconnect_attempts_stay_frequent_whatever_the_outage() -> None:
    """A device must resume <= 5 s after the broker returns, however long it was away: the
    back-off between attempts is capped well below that (jitter included)."""
    c = BusClient("127.0.0.1", 1883, client_id="backoff")
    assert max(c._backoff_delay(n) for n in range(60)) <= 2.0  # noqa: SLF001
