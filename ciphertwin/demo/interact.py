"""`ciphertwin demo interact`: desired/reported state, requests and the gatekeeper, checked.

One process, talking only over MQTT (the embedded broker with authentication and per-client
ACLs, or an open broker such as Mosquitto): the cloud, the owner alice, a requester bob, and
a thermostat that sleeps between short awake windows, guarded by a gatekeeper (access rules,
a 2-of-3 firmware approval rule with a signed image, set-point clamping, a thermal simulator).

The scenario, each step a check in the report:

1. alice sets desired state while the device is offline; the device comes up later and
   converges (the cloud re-sends the latest desired at its first presence);
2. a stale write (based on an old version) is refused;
3. bob sends requests while the device sleeps: they are queued, one over his rate limit is
   refused, the rest are delivered in the next wake window and answered (only bob can read
   the answers);
4. an unsafe set-point is clamped (reported state shows the clamped value);
5. a change the simulator predicts unsafe (heating off on a cold day) is refused, with the
   prediction as the reason;
6. a firmware update approved by 2 of 3 approvers, with a vendor-signed image, passes; the
   same with one approval is refused;
7. after alice revokes bob's token, the cloud refuses his requests;
8. every decision is in the decision log alice reads; an outgoing reading is redacted;
9. the cloud's store holds no plaintext (its database files are scanned for the values).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciphertwin.agents.bundle import enroll_from_bundle, load_enrolled_device
from ciphertwin.agents.device import DeviceAgent
from ciphertwin.agents.device_settings import WakeSchedule, parse_device_settings
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.interaction import DeviceInteraction
from ciphertwin.agents.outbox import Outbox
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.agents.requester import Requester, RequestOutcome, StaleVersion
from ciphertwin.agents.sources import Reading
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.demo.twin import DemoReport, Sandbox
from ciphertwin.protocol.sealed_docs import new_request_id
from ciphertwin.protocol.twin_requests import sign_approval, sign_image

TWIN, DEVICE = "home", "thermo"
APPROVERS = ("carol", "dave", "erin")
RATE_LIMIT_PER_MIN = 5
"""bob's requests per minute at this demo's cloud (the default is 60): the burst of
``RATE_LIMIT_PER_MIN + 1`` shows the limit without sending hundreds."""


def gatekeeper_config(approvers: dict[str, SigningKey], vendor: SigningKey) -> dict[str, Any]:
    """The device's ``[gatekeeper]`` table, as ``device.toml`` would hold it."""
    return {
        "access": {"default": "deny", "rule": [
            {"name": "owner", "principals": ["owner"],
             "operations": ["desired", "set_target", "set_mode", "get_state"]},
            {"name": "bob-thermostat", "principals": ["bob"],
             "operations": ["set_target", "get_state"]},
            {"name": "firmware", "principals": ["*"], "operations": ["firmware_update"],
             "approvals": {"m": 2, "approvers": {n: k.verify_key.raw.hex()
                                                 for n, k in approvers.items()}},
             "image_signer": vendor.verify_key.raw.hex()},
        ]},
        "manipulator": {"clamp": {"target_c": [15.0, 25.0]}, "redact": ["owner_name"]},
        "simulator": {"horizon_s": 3600, "envelope": {"room_c": [16.0, 26.0]},
                      "operations": ["desired", "set_target", "set_mode"]},
    }


@dataclass
class Device:
    """The running device: agent (readings, outbox) and its interaction side."""

    agent: DeviceAgent
    interaction: DeviceInteraction
    woke: list[float]
    """Wall-clock times at which an awake window began (watched by the demo)."""


async def _until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0,
                 every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)


async def enroll_thermostat(sandbox: Sandbox, owner: OwnerAgent) -> None:
    """Enroll the thermostat through a bundle (into ``<sandbox>/thermo``) and give it the
    grant through which it reads its desired state."""
    bundle = owner.enroll_device(TWIN, DEVICE, sandbox.connection(DEVICE))
    enroll_from_bundle(bundle, sandbox.root / DEVICE)
    await owner.grant_own_device(TWIN, DEVICE, bundle.device_pre.public)


@contextlib.asynccontextmanager
async def run_device(sandbox: Sandbox, gatekeeper: dict[str, Any],
                     wake: WakeSchedule) -> AsyncIterator[Device]:
    """The thermostat, enrolled through a bundle as a real one is, with its gatekeeper."""
    home = sandbox.root / DEVICE
    config = load_enrolled_device(home)
    settings = parse_device_settings({"gatekeeper": gatekeeper})
    manipulator = settings.gatekeeper.manipulator
    async with sandbox.bus(DEVICE) as bus, Outbox(home / "outbox.db") as outbox:
        agent = DeviceAgent(config, bus, outbox, outgoing=manipulator.outgoing)
        interaction = DeviceInteraction(agent, settings.handler(), settings.gatekeeper,
                                        wake_schedule=wake)
        woke: list[float] = []

        async def watch_wake() -> None:
            was = False
            while True:
                if interaction.awake and not was:
                    woke.append(time.time())
                was = interaction.awake
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(agent.run()), asyncio.create_task(interaction.run()),
                 asyncio.create_task(watch_wake())]
        try:
            await asyncio.wait_for(interaction.ready.wait(), 15)
            yield Device(agent, interaction, woke)
        finally:
            interaction.stop()
            agent.stop()
            tasks[2].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def store_plaintext_hits(db: Path, needles: list[bytes]) -> list[bytes]:
    """The ``needles`` found anywhere in the store's files (database, WAL, shared memory)."""
    found: set[bytes] = set()
    for path in db.parent.glob(db.name + "*"):
        data = path.read_bytes()
        found.update(n for n in needles if n in data)
    return sorted(found)


async def _scenario(report: DemoReport, sandbox: Sandbox, alice: OwnerAgent,
                    bob_id: Identity, db: Path, window_s: float, sleep_s: float) -> None:
    checks, marker = report.checks, f"pt-{secrets.token_hex(6)}"
    approvers = {n: SigningKey.generate() for n in APPROVERS}
    vendor = SigningKey.generate()
    gatekeeper = gatekeeper_config(approvers, vendor)

    # 1. desired state for a device that has never been online
    await enroll_thermostat(sandbox, alice)
    v1 = await alice.set_desired(TWIN, {"target_c": 21.5, "mode": "auto"})
    offline = await alice.get_state(TWIN)
    checks["desired_accepted_while_device_offline"] = (
        v1 == 1 and offline.reported_version == 0 and not offline.in_sync
        and offline.delta == {"target_c": 21.5, "mode": "auto"})

    wake = WakeSchedule(window_s=window_s, sleep_s=sleep_s, wakeable=False)
    async with run_device(sandbox, gatekeeper, wake) as device:
        async def converged() -> bool:
            s = await alice.get_state(TWIN)
            return s.in_sync and s.reported is not None and s.reported.desired_version == v1
        checks["offline_device_wakes_and_converges"] = await _until(converged, 30, 0.2)
        state = await alice.get_state(TWIN)
        checks["reported_state_matches_desired"] = (
            state.delta == {} and state.reported is not None
            and state.reported.state.get("target_c") == 21.5)

        # 2. optimistic concurrency
        try:
            await alice.set_desired(TWIN, {"target_c": 20.0}, base_version=0)
            checks["stale_write_refused"] = False
        except StaleVersion as exc:
            checks["stale_write_refused"] = exc.current == v1

        # 3. bob's requests: queued while the device sleeps, rate-limited, answered at wake-up
        token = await alice.grant_interact("bob", bob_id.signing.verify_key, [TWIN],
                                           ["request"], ["set_target", "get_state"])
        bob = Requester(bob_id, sandbox.bus("bob"), token, alice.identity.pre.public,
                        alice.identity.signing.verify_key)
        async with bob.bus:
            await _until(lambda: not device.interaction.awake, window_s + 5, 0.02)
            asleep_at = time.time()
            sends = [asyncio.create_task(bob.send(
                TWIN, "set_target", {"target_c": 20.0 + i / 10, "comment": marker},
                timeout=sleep_s + window_s + 20)) for i in range(RATE_LIMIT_PER_MIN + 1)]
            outcomes: list[RequestOutcome] = await asyncio.gather(*sends)
            answered = [o for o in outcomes if o.state == "answered"]
            refused = [o for o in outcomes if o.state == "refused"]
            checks["requests_queued_while_device_sleeps"] = (
                len(answered) == RATE_LIMIT_PER_MIN
                and all(o.states[0] == "queued" for o in answered))
            checks["requests_over_rate_limit_refused"] = (
                len(refused) == 1 and "rate" in refused[0].reason)
            woke_after = [t for t in device.woke if t > asleep_at]
            checks["queued_requests_delivered_in_wake_window_and_answered"] = (
                bool(woke_after) and all(o.ok for o in answered)
                and all(o.answer is not None and o.answer.device == DEVICE for o in answered))
            report.figures["request_states"] = [list(o.states) for o in outcomes]

            # 7 (early, bob's last word). revocation: the cloud refuses a revoked requester
            await alice.revoke_interact(token.token_id)
            after = await bob.send(TWIN, "get_state", {}, wait=False, timeout=10)
            checks["revoked_requester_refused"] = after.state == "refused"

        # 4. clamp: an unsafe set-point becomes the nearest safe one
        v_clamp = await alice.set_desired(TWIN, {"target_c": 40.0, "mode": "auto"})

        async def clamped() -> bool:
            s = await alice.get_state(TWIN)
            return s.reported is not None and s.reported.desired_version == v_clamp
        reached = await _until(clamped, sleep_s + window_s + 20, 0.2)
        state = await alice.get_state(TWIN)
        checks["unsafe_setpoint_clamped"] = (
            reached and state.reported is not None
            and state.reported.state.get("target_c") == 25.0)

        # 5. simulator: heating off on a 5 °C day would cool the room below 16 °C
        me = alice.requester(TWIN)
        off = await me.send(TWIN, "set_mode", {"mode": "off"},
                            timeout=sleep_s + window_s + 20)
        checks["simulator_refuses_predicted_unsafe_change"] = (
            off.state == "answered" and off.answer is not None and not off.answer.ok
            and "room_c" in off.answer.reason)

        # 6. firmware: 2 of 3 approvals and a vendor-signed image pass; 1 of 3 does not
        image = b"\x7fFIRMWARE " + marker.encode() + secrets.token_bytes(2048)
        args = {"version": f"2.0-{marker}", "image_sig": sign_image(vendor, image).hex()}

        async def firmware(names: tuple[str, ...]) -> RequestOutcome:
            rid = new_request_id()
            approvals = [sign_approval(approvers[n], n, TWIN, rid, "firmware_update", args,
                                       image) for n in names]
            return await me.send(TWIN, "firmware_update", args, approvals=approvals,
                                 attachment=image, request_id=rid,
                                 timeout=sleep_s + window_s + 20)
        one = await firmware(("carol",))
        two = await firmware(("carol", "erin"))
        checks["firmware_with_1_of_3_approvals_refused"] = (
            one.answer is not None and not one.answer.ok)
        checks["firmware_with_2_of_3_approvals_installed"] = (
            two.ok and two.answer is not None
            and two.answer.result.get("installed") == args["version"])

        # 8. decision log and the outgoing manipulator
        await device.agent.record(Reading("status", {"owner_name": "Alice Example",
                                                     "battery": 97}))
        await device.agent.drained(15)
        items = await alice.reader.history(TWIN)
        actions = {i.reading["values"].get("action") for i in items
                   if i.reading["type"] == "decision"}
        checks["decision_log_readable_by_owner"] = {"allow", "clamp", "refuse"} <= actions
        status = [i.reading["values"] for i in items if i.reading["type"] == "status"]
        checks["outgoing_reading_redacted"] = bool(status) and all(
            "owner_name" not in v and v.get("battery") == 97 for v in status)
        report.figures["decisions_logged"] = sum(1 for i in items
                                                 if i.reading["type"] == "decision")

    # 9. the cloud's store: metadata (names, versions) yes, plaintext no
    needles = [marker.encode(), b"target_c", b"room_c", b"Alice Example", b"FIRMWARE"]
    hits = store_plaintext_hits(db, needles)
    checks["cloud_store_holds_no_plaintext"] = (
        not hits and store_plaintext_hits(db, [b"bob", TWIN.encode()]) != [])
    report.figures["store_scanned_for"] = [n.decode() for n in needles]


async def run_demo(external: tuple[str, int] | None = None, *, window_s: float = 3.0,
                   sleep_s: float = 3.0) -> DemoReport:
    """Run the scenario; every check ends up in the report (nothing is asserted silently)."""
    report = DemoReport()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ciphertwin-interact-") as tmp:
        sandbox = Sandbox(Path(tmp), external)
        for name, role in (("cloud", "cloud"), ("alice", "owner"), ("bob", "receiver")):
            sandbox.add(name, role)
        sandbox.add(DEVICE, "device", twin=TWIN, owner="alice")  # alice's ACL names its twin
        db = Path(sandbox.deployment.storage.sqlite_path)
        async with sandbox.broker(), sandbox.bus("cloud") as cloud_bus, \
                CloudTwin(cloud_bus, SqliteTwinStore(db), pool=ReencryptionPool(1),
                          request_limits={"requests_per_min": RATE_LIMIT_PER_MIN}), \
                sandbox.bus("alice") as alice_bus:
            (sandbox.root / "alice").mkdir(mode=0o700)  # alice's device book
            alice = OwnerAgent(Identity.generate("alice", "owner"), alice_bus,
                               home=sandbox.root / "alice")
            await alice.register()
            await _scenario(report, sandbox, alice, Identity.generate("bob", "receiver"), db,
                            window_s, sleep_s)
        report.figures["broker"] = ("mosquitto %s:%d (anonymous)" % external if external
                                    else "embedded amqtt (authenticated, per-client ACLs)")
        report.figures["seconds"] = round(time.perf_counter() - started, 2)
    return report


TITLE = "ciphertwin demo: desired/reported state, requests and the gatekeeper"
