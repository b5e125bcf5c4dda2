"""Authentication and topic ACLs on BOTH brokers: embedded amqtt and a Mosquitto started from
the files `ciphertwin broker --emit-mosquitto` writes. A device must not reach another twin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import wait_for_port

from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.broker.mosquitto import emit_mosquitto
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.errors import BusAuthError, SubscriptionDenied
from ciphertwin.bus.topics import Topics
from ciphertwin.config import Deployment, Principal, load_deployment

MOSQUITTO = "/usr/sbin/mosquitto"
FAST = 1000
T = Topics()
PRINCIPALS = [
    ("cloud", "cloud", {}),
    ("alice", "owner", {}),
    ("bob", "owner", {}),
    ("d1", "device", {"twin": "t1", "owner": "alice"}),
    ("d2", "device", {"twin": "t2", "owner": "bob"}),
    ("rec", "receiver", {}),
]


def pw(cid: str) -> str:
    return f"pw-{cid}-0123456789"


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    d = load_deployment(None, env={
        "CIPHERTWIN_PRINCIPALS__CREDENTIALS_FILE": str(tmp_path / "clients.json"),
    })
    for cid, role, attrs in PRINCIPALS:
        d.credentials().add(Principal.create(cid, role, pw(cid), iterations=FAST, **attrs))
    return d


@dataclass
class Running:
    name: str
    host: str
    port: int
    deployment: Deployment
    reload: Callable[[], None]  # make the broker see credential changes

    def client(self, cid: str, password: str | None = None, **kw: object) -> BusClient:
        return BusClient(self.host, self.port, client_id=kw.pop("client_id", cid),  # type: ignore[arg-type]
                         username=cid, password=password or pw(cid),
                         connect_timeout=5, publish_timeout=3, **kw)  # type: ignore[arg-type]



@contextlib.contextmanager
def run_generated_mosquitto(deployment: Deployment, tmp_path: Path) -> Iterator[Running]:
    """Emit the Mosquitto files for ``deployment`` and run Mosquitto on them (free port)."""
    if not Path(MOSQUITTO).exists():
        pytest.skip(f"{MOSQUITTO} not installed")
    port = free_port()
    run_as = "root" if os.geteuid() == 0 else None
    files = emit_mosquitto(deployment, tmp_path / "mosquitto", port=port, run_as=run_as)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(files.conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=5, what="mosquitto")

        def reload() -> None:
            emit_mosquitto(deployment, tmp_path / "mosquitto", port=port, run_as=run_as)
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)

        yield Running("mosquitto", "127.0.0.1", port, deployment, reload)
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
async def embedded(deployment: Deployment) -> AsyncIterator[Running]:
    async with EmbeddedBroker(deployment, port=0) as b:
        yield Running("amqtt", b.host, b.port, deployment, lambda: None)


@pytest.fixture(params=["amqtt", "mosquitto"])
async def broker(
    request: pytest.FixtureRequest, deployment: Deployment, tmp_path: Path
) -> AsyncIterator[Running]:
    if request.param == "amqtt":
        async with EmbeddedBroker(deployment, port=0) as b:
            yield Running("amqtt", b.host, b.port, deployment, lambda: None)
    else:
        with run_generated_mosquitto(deployment, tmp_path) as running:
            yield running


async def _collect(bus: BusClient, topic_filter: str) -> list[str]:
    seen: list[str] = []

    async def handler(topic: str, payload: bytes, retain: bool) -> None:
        seen.append(f"{topic}={payload.decode()}")

    await bus.subscribe(topic_filter, handler)
    return seen


async def _settle(seen: list[str], marker: str, timeout: float = 5.0) -> None:
    """Wait until ``marker`` arrived, plus a grace period for anything sent before it."""
    deadline = time.monotonic() + timeout
    while not any(marker in s for s in seen):
        assert time.monotonic() < deadline, f"marker {marker} never arrived; saw {seen}"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)


async def test_device_cannot_publish_into_another_twin(broker: Running) -> None:
    async with broker.client("cloud") as cloud, broker.client("d1") as d1:
        seen = await _collect(cloud, T.everything())
        await d1.publish(T.twin_data("t2"), b"forged-data")  # broker drops it silently
        await d1.publish(T.reported("t2"), b"forged-state")
        await d1.publish(T.ack("t1", "d1"), b"self-ack")  # cloud->device topic: not the device's
        await d1.publish(T.twin_data("t1"), b"own")
        await _settle(seen, "own")
        assert seen == [f"{T.twin_data('t1')}=own"], broker.name


async def test_device_cannot_read_other_devices(broker: Running) -> None:
    async with broker.client("cloud") as cloud, broker.client("d1") as d1:
        own = await _collect(d1, T.ack("t1", "d1"))
        try:  # amqtt refuses the SUBACK; Mosquitto 2.0 grants it but filters every delivery
            spy = await _collect(d1, T.everything())
        except SubscriptionDenied:
            spy = []
        with pytest.raises(SubscriptionDenied) if broker.name == "amqtt" else _null():
            await _collect(d1, T.ack("t2", "d2"))
        await cloud.publish(T.ack("t2", "d2"), b"secret-for-d2")
        await cloud.publish(T.inbox("d2"), b"secret-inbox")
        await cloud.publish(T.ack("t1", "d1"), b"mine")
        await _settle(own, "mine")
        assert own == [f"{T.ack('t1', 'd1')}=mine"]
        assert all("secret" not in s for s in spy), spy


class _null:
    def __enter__(self) -> None: ...
    def __exit__(self, *a: object) -> None: ...


async def test_wrong_or_unknown_credentials_refused(broker: Running) -> None:
    with pytest.raises(BusAuthError):
        async with broker.client("d1", password="wrong-password"):
            pass
    with pytest.raises(BusAuthError):
        async with broker.client("mallory", password="whatever"):
            pass


async def test_owner_and_receiver_scopes(broker: Running) -> None:
    async with (broker.client("cloud") as cloud, broker.client("alice") as alice,
                broker.client("rec") as rec):
        seen = await _collect(cloud, T.everything())
        await alice.publish(T.desired("t2"), b"not-alices-twin")
        await alice.publish(T.control("bob"), b"impersonation")
        await rec.publish(T.twin_data("t1"), b"receiver-forgery")
        await alice.publish(T.desired("t1"), b"ok-desired")
        await _settle(seen, "ok-desired")
        assert seen == [f"{T.desired('t1')}=ok-desired"]


async def test_enrollment_and_removal_without_restart(broker: Running) -> None:
    creds = broker.deployment.credentials()
    with pytest.raises(BusAuthError):
        async with broker.client("d3"):
            pass
    creds.add(Principal.create("d3", "device", pw("d3"), iterations=FAST, twin="t3", owner="alice"))
    broker.reload()  # amqtt: nothing to do (mtime check); Mosquitto: emit again + SIGHUP
    async with broker.client("cloud") as cloud, broker.client("d3") as d3:
        seen = await _collect(cloud, T.twin_data("t3"))
        await d3.publish(T.twin_data("t3"), b"hello")
        await _settle(seen, "hello")
    creds.remove("d3")
    broker.reload()
    with pytest.raises(BusAuthError):
        async with broker.client("d3"):
            pass


async def test_embedded_refuses_client_id_takeover(embedded: Running) -> None:
    with pytest.raises(BusAuthError):
        async with embedded.client("d1", client_id="cloud"):
            pass
    async with embedded.client("d1", client_id="d1@second-link") as extra:
        assert extra.connected


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path(MOSQUITTO).exists(),
                    reason="mosquitto not installed")
def test_generated_config_passes_mosquitto_own_parser(deployment: Deployment, tmp_path: Path) -> None:
    files = emit_mosquitto(deployment, tmp_path / "m", port=free_port())
    text = files.conf.read_text()
    assert "allow_anonymous false" in text and str(files.acl) in text
    assert (files.passwd.stat().st_mode & 0o777) == 0o600
