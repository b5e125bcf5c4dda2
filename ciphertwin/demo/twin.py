"""`ciphertwin demo twin`: the whole encrypted-twin flow on the embedded broker, checked.

Starts an authenticated broker (per-client ACLs), the cloud, an owner, two devices enrolled
through bundles, and a receiver whose grant admits only temperature readings. Devices stream
simulated readings; then the demo checks that the owner reads everything, the receiver
exactly the matching subset (history and live), and — after revocation — nothing new.
Everything runs in one process but talks only over MQTT, as separate machines would.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciphertwin.agents.bundle import BrokerConnection, enroll_from_bundle, load_enrolled_device
from ciphertwin.agents.device import DeviceAgent
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.outbox import Outbox
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.agents.reader import TwinReader
from ciphertwin.agents.sources import SimulatedSensor
from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient, unique_client_id
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.config.passwords import generate_password
from ciphertwin.config.principals import Principal, add_client
from ciphertwin.config.settings import Deployment, load_deployment

RECEIVER_POLICY = "type:temperature"


@dataclass
class DemoReport:
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": self.checks, "figures": self.figures}


class Sandbox:
    """A throw-away deployment folder: TOML, credentials file, cloud DB, agents' homes.

    With ``external`` (host, port) it uses that broker (e.g. Mosquitto) anonymously under a
    fresh topic prefix; otherwise an authenticated embedded broker on a free port.
    """

    def __init__(self, root: Path, external: tuple[str, int] | None = None) -> None:
        self.root = root
        self.external = external
        host, port = external or ("127.0.0.1", free_port())
        prefix = f"ct-demo-{secrets.token_hex(4)}/v1" if external else "ct/v1"
        (root / "deployment.toml").write_text(
            f'[broker]\nhost = "{host}"\nport = {port}\nprefix = "{prefix}"\n'
            f'open = {"true" if external else "false"}\n'
            f'[storage]\nsqlite_path = "cloud.sqlite"\n'
            f'[principals]\ncredentials_file = "clients.json"\nhash_iterations = 1000\n'
        )
        self.deployment: Deployment = load_deployment(root / "deployment.toml", env={})
        self.passwords: dict[str, str] = {}

    def add(self, name: str, role: str, **attrs: Any) -> str:
        password = generate_password()
        add_client(self.deployment.principals.credentials_file,
                   Principal.create(name, role, password, iterations=1000, **attrs))
        self.passwords[name] = password
        return password

    def bus(self, name: str) -> BusClient:
        if self.external:
            return BusClient.for_deployment(self.deployment, client_id=unique_client_id(name))
        return BusClient.for_deployment(self.deployment, username=name,
                                        password=self.passwords[name])

    def broker(self) -> contextlib.AbstractAsyncContextManager[object]:
        if self.external:
            return contextlib.nullcontext()
        return EmbeddedBroker(self.deployment)

    def connection(self, name: str) -> BrokerConnection:
        b = self.deployment.broker
        return BrokerConnection(b.host, b.port, name, self.passwords[name], b.prefix)


async def _collect(reader: TwinReader, twin: str, into: list[tuple[str, int]]) -> None:
    async for item in reader.watch(twin):
        into.append((item.device, item.seq))


async def _until(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@contextlib.asynccontextmanager
async def _device(sandbox: Sandbox, owner: OwnerAgent, twin: str, name: str,
                  sensor: str) -> AsyncIterator[DeviceAgent]:
    sandbox.add(name, "device", twin=twin, owner=owner.name)
    bundle = owner.enroll_device(twin, name, sandbox.connection(name),
                                 source={"kind": "simulated", "sensor": sensor})
    home = sandbox.root / name
    enroll_from_bundle(bundle, home)
    config = load_enrolled_device(home)
    await owner.grant_own_device(twin, name, config.identity.pre.public)
    async with sandbox.bus(name) as bus, Outbox(home / "outbox.db") as outbox:
        agent = DeviceAgent(config, bus, outbox)
        task = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.stop()
            await task


async def _readings(agent: DeviceAgent, sensor: str, count: int) -> None:
    async for reading in SimulatedSensor(sensor, interval_s=0.0, count=count):
        await agent.record(reading)


async def run_demo(readings: int = 20, external: tuple[str, int] | None = None) -> DemoReport:
    """Run the scenario; every check ends up in the report (nothing is asserted silently)."""
    report = DemoReport()
    with tempfile.TemporaryDirectory(prefix="ciphertwin-demo-") as tmp:
        sandbox = Sandbox(Path(tmp), external)
        for name, role, extra in (("cloud", "cloud", {}), ("alice", "owner", {}),
                                  ("bob", "receiver", {})):
            sandbox.add(name, role, **extra)
        started = time.perf_counter()
        async with sandbox.broker(), \
                sandbox.bus("cloud") as cloud_bus, \
                CloudTwin(cloud_bus, SqliteTwinStore(sandbox.deployment.storage.sqlite_path),
                          pool=ReencryptionPool(2)) as cloud, \
                sandbox.bus("alice") as alice_bus, sandbox.bus("bob") as bob_bus:
            alice = OwnerAgent(Identity.generate("alice", "owner"), alice_bus)
            bob_id = Identity.generate("bob", "receiver")
            await alice.register()
            async with _device(sandbox, alice, "home", "thermo", "temperature") as thermo, \
                    _device(sandbox, alice, "car", "tracker", "location") as tracker:
                grant_id = await alice.grant("bob", bob_id.pre.public, ["home", "car"],
                                             RECEIVER_POLICY)
                owner_keys = {"home": alice.identity.signing.verify_key,
                              "car": alice.identity.signing.verify_key}
                bob = TwinReader(bob_bus, "bob", bob_id.pre, owner_keys)
                live: list[tuple[str, int]] = []
                watchers = [asyncio.create_task(_collect(bob, twin, live))
                            for twin in ("home", "car")]
                await asyncio.sleep(0.3)  # let the stream subscriptions settle

                await asyncio.gather(_readings(thermo, "temperature", readings),
                                     _readings(tracker, "location", readings))
                drained = await thermo.drained() and await tracker.drained()
                report.checks["devices_outbox_drained"] = drained

                owner_home = await alice.reader.history("home")
                owner_car = await alice.reader.history("car")
                report.checks["owner_reads_everything"] = (
                    len(owner_home) == readings and len(owner_car) == readings)
                bob_home, bob_car = await bob.history("home"), await bob.history("car")
                report.checks["receiver_reads_exactly_matching_subset"] = (
                    sorted(i.seq for i in bob_home) == sorted(i.seq for i in owner_home)
                    and bob_car == [] and all(i.reading["type"] == "temperature"
                                              for i in bob_home))
                report.checks["receiver_live_stream_matches"] = await _until(
                    lambda: len(live) == readings) and all(d == "thermo" for d, _ in live)

                await alice.revoke(grant_id)
                before = len(live)
                await _readings(thermo, "temperature", 5)
                await thermo.drained()
                await asyncio.sleep(0.5)
                report.checks["revoked_receiver_gets_nothing_new"] = (
                    len(live) == before and await bob.history("home") == [])
                report.checks["owner_still_reads_new_items"] = (
                    len(await alice.reader.history("home")) == readings + 5)
                thermo_self = TwinReader(thermo.bus, "thermo", thermo.config.identity.pre,
                                         thermo.config.owner_verify)
                report.checks["device_reads_own_twin"] = (
                    len(await thermo_self.history("home")) == readings + 5)
                report.checks["no_unreadable_items"] = bob.unreadable == 0 and \
                    alice.reader.unreadable == 0
                for w in watchers:
                    w.cancel()
            report.figures = {
                "broker": "mosquitto %s:%d (anonymous)" % external if external
                else "embedded amqtt (authenticated, per-client ACLs)",
                "items_stored": cloud.ingest.stored, "items_rejected": cloud.ingest.rejected,
                "seconds": round(time.perf_counter() - started, 2),
            }
    return report


def print_report(report: DemoReport,
                 title: str = "ciphertwin demo: encrypted twin sync, sharing and revocation"
                 ) -> None:
    print(title)
    for name, ok in report.checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name.replace('_', ' ')}")
    for name, value in report.figures.items():
        print(f"  {name.replace('_', ' ')}: {value}")
    print("result:", "all checks passed" if report.ok else "SOME CHECKS FAILED")
