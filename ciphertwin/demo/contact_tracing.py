"""Contact-tracing demo: processes 2+, 3+ and 6+ end to end over MQTT, checked against plaintext.

One process hosts everything as asyncio tasks — broker (embedded, unless an external one is
given), cloud (:class:`CloudTwin`, re-encrypting on its process pool), three processing nodes
(opening inputs on a shared process pool), a receiver, and N simulated phones, each with its
owner: the owner grants processing (2+), the phone splits every location point into three
shares and uploads them sealed under its key epochs (3+), the receiver submits a job and
opens the result (6+). Every message crosses the broker; nodes talk only over encrypted MQTT
frames. Network delay: ``rtt_ms`` makes the MPC transport hold every node-to-node frame for
rtt/2 (the bus-layer delay of ``ciphertwin.mpc_nodes.transport``); no ``tc netem`` is used.
"""

from __future__ import annotations

import asyncio
import csv
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ciphertwin.agents.processing import (
    ResultReceiver,
    follow_status,
    grant_processing,
    new_job_id,
    submit_job,
)
from ciphertwin.agents.share_mode import share_items
from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.mpc_nodes.functions import get_function
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.mpc_nodes.ledger import NodeLedger
from ciphertwin.mpc_nodes.service import ProcessingNode
from ciphertwin.protocol import share_open
from ciphertwin.protocol.control import build_control, control_request_id
from ciphertwin.protocol.items import DeviceCredentials, build_item
from ciphertwin.protocol.jobs import build_roster
from ciphertwin.protocol.roster_trust import ShareIndexBook
from ciphertwin.workers import worker_pool

log = structlog.get_logger(__name__)

FRAC_BITS = 4  # coordinates in 1/16 m
COORD_BITS, EPOCH_BITS = 24, 16
POINT_INTERVAL_S = 60
PAPER = {"sync_ms_per_user": 7672.0, "processing_ms_per_user": 7564.0,
         "processing_constant_ms": 12400.0, "mpc_ms_per_user": 6530.0}
WRITE_ATTRS = ["share:*", "type:*", "twin:*", "year:*", "month:*", "day:*", "hour:*"]


@dataclass
class Paths:
    """Plaintext paths: per user a list of (epoch, x, y) in metres; one reference path."""

    users: dict[str, list[tuple[int, float, float]]]
    reference: list[tuple[int, float, float]]

    @property
    def points(self) -> int:
        return max([len(p) for p in self.users.values()] + [len(self.reference)])


def random_paths(users: int, points: int, radius: float, seed: int | None = None) -> Paths:
    """Random walks; about a third of the users shadow the reference for a stretch."""
    rng = random.Random(seed)  # simulation data, not key material
    base = 600
    ref, x, y = [], rng.uniform(0, 2000), rng.uniform(0, 2000)
    for j in range(points):
        x, y = x + rng.gauss(0, 15), y + rng.gauss(0, 15)
        ref.append((base + j, round(x, 2), round(y, 2)))
    out: dict[str, list[tuple[int, float, float]]] = {}
    for u in range(users):
        px, py = rng.uniform(0, 2000), rng.uniform(0, 2000)
        start, length = rng.randrange(points), rng.randrange(1, points + 1)
        near = u % 3 == 0
        path = []
        for j in range(points):
            if near and start <= j < start + length:
                _, rx, ry = ref[j]
                px, py = rx + rng.uniform(-1.5, 1.5) * radius, ry + rng.uniform(-1.5, 1.5) * radius
            else:
                px, py = px + rng.gauss(0, 15), py + rng.gauss(0, 15)
            path.append((base + j, round(px, 2), round(py, 2)))
        out[f"u{u:05d}"] = path
    return Paths(out, ref)


def load_paths(paths_csv: Path, reference_csv: Path) -> Paths:
    """``user,epoch,x,y`` and ``epoch,x,y`` CSV files (header optional; decimal metres)."""
    users: dict[str, list[tuple[int, float, float]]] = {}
    for row in _csv_rows(paths_csv, 4):
        users.setdefault(_user_id(row[0]), []).append((int(row[1]), float(row[2]), float(row[3])))
    ref = [(int(r[0]), float(r[1]), float(r[2])) for r in _csv_rows(reference_csv, 3)]
    if not users or not ref:
        raise ValueError("paths and reference must not be empty")
    return Paths(users, sorted(ref))


def _csv_rows(path: Path, width: int) -> list[list[str]]:
    rows = [r for r in csv.reader(path.open()) if r and len(r) == width]
    if rows and not _is_number(rows[0][-1]):
        rows = rows[1:]
    return rows


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _user_id(raw: str) -> str:
    clean = "".join(c if c.isalnum() or c in "_.-" else "_" for c in raw.strip())[:60]
    return f"u{clean}" if clean else "u_"


def plaintext_reference(paths: Paths, radius: float) -> dict[str, int]:
    """Per user, epochs within radius of the reference — with the same fixed-point rounding."""
    fn = get_function("contact_tracing")
    p = fn.parse(_params(radius))
    users = sorted(paths.users)
    arrays = _plain_arrays(paths, users, p)
    counts = fn.reference(p, arrays)
    return {u: int(c) for u, c in zip(users, counts, strict=True)}


def _fixed(v: float) -> int:
    return round(v * (1 << FRAC_BITS))


def _plain_arrays(paths: Paths, users: Sequence[str], p: Any) -> dict[str, np.ndarray]:
    n = paths.points
    far = (1 << EPOCH_BITS) - 1

    def cols(path: list[tuple[int, float, float]], pad: int) -> tuple[list[int], ...]:
        pts = sorted(path)
        e = [pt[0] for pt in pts] + [pad] * (n - len(pts))
        x = [_fixed(pt[1]) for pt in pts] + [0] * (n - len(pts))
        y = [_fixed(pt[2]) for pt in pts] + [0] * (n - len(pts))
        return e, x, y

    ue, ux, uy = zip(*(cols(paths.users[u], -far) for u in users), strict=True)
    re_, rx, ry = cols(paths.reference, far)
    as_ring = lambda a: np.array(a, dtype=np.int64).astype(np.uint64)
    return {"user_epoch": as_ring(ue), "user_x": as_ring(ux), "user_y": as_ring(uy),
            "ref_epoch": as_ring(re_), "ref_x": as_ring(rx), "ref_y": as_ring(ry)}


def _params(radius: float) -> dict[str, int]:
    return {"radius": max(1, round(radius * (1 << FRAC_BITS))), "coord_bits": COORD_BITS,
            "epoch_bits": EPOCH_BITS}


def epoch_policy(points: int, key_epochs: int) -> KeyEpochPolicy:
    """Key epoch length giving ``key_epochs`` data keys over ``points`` one-minute points."""
    if key_epochs <= 1:
        return KeyEpochPolicy("day")
    return KeyEpochPolicy("seconds", POINT_INTERVAL_S * math.ceil(points / key_epochs))


@dataclass
class Phone:
    """A simulated phone (device) and its owner's keys."""

    user: str
    owner: str
    owner_pre: PreKeyPair
    owner_sig: SigningKey
    creds: DeviceCredentials
    keys: DataKeyManager
    granted: ShareIndexBook = field(default_factory=ShareIndexBook)
    """which node keys this owner gave which share (never a second index to one node)"""


@dataclass
class World:
    """Everything the demo runs; built by :func:`world`."""

    host: str
    port: int
    prefix: str
    tmp: Path
    cloud: CloudTwin
    operator: SigningKey
    receiver: ResultReceiver
    receiver_key: X25519KeyPair
    nodes: list[ProcessingNode]
    roster: Any
    stack: AsyncExitStack
    node_tasks: dict[int, AsyncExitStack] = field(default_factory=dict)
    phones: dict[str, Phone] = field(default_factory=dict)

    def client(self, name: str) -> BusClient:
        return BusClient(self.host, self.port, client_id=f"{name}-{os.urandom(3).hex()}",
                         prefix=self.prefix, max_inflight=256)


async def start_world(stack: AsyncExitStack, *, broker: tuple[str, int] | None = None,
                      rtt_ms: float = 0.0, mpc_timeout_s: float = 30.0,
                      node_timeout_s: float = 60.0, pool_workers: int | None = None) -> World:
    """Broker, cloud, three nodes (roster published) and a receiver, all in this process."""
    prefix = f"ct/demo{os.urandom(3).hex()}"
    if broker is None:
        b = await stack.enter_async_context(EmbeddedBroker(port=0))
        host, port = "127.0.0.1", b.port
    else:
        host, port = broker
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ct-demo-")))
    mk = lambda name: BusClient(host, port, client_id=f"{name}-{os.urandom(3).hex()}",
                                prefix=prefix, max_inflight=256)
    cloud_bus = await stack.enter_async_context(mk("cloud"))
    operator = SigningKey.generate()  # every party pins its public key (mandatory)
    cloud = CloudTwin(cloud_bus, SqliteTwinStore(tmp / "cloud.db"),
                      pool=ReencryptionPool(pool_workers), operator=operator.verify_key)
    cloud.jobs.node_timeout_s = node_timeout_s
    await stack.enter_async_context(cloud)
    executor = stack.enter_context(worker_pool(pool_workers or os.cpu_count() or 1,
                                               preload=(share_open.__name__,)))
    identities = [NodeIdentity.generate(i, f"node{i}") for i in range(3)]
    pres = [PreKeyPair.generate() for _ in range(3)]
    nodes = []
    node_stacks = {}
    for i in range(3):
        ns = AsyncExitStack()
        await stack.enter_async_context(ns)
        bus = await ns.enter_async_context(mk(f"node{i}"))
        ledger = ns.enter_context(closing(NodeLedger(tmp / f"node{i}.ledger")))
        node = ProcessingNode(bus, identities[i], pres[i], operator=operator.verify_key,
                              executor=executor, latency_s=rtt_ms / 2000,
                              mpc_timeout_s=mpc_timeout_s, ledger=ledger)
        nodes.append(await ns.enter_async_context(node))
        node_stacks[i] = ns
    roster_msg = build_roster(operator, [n.entry() for n in identities],
                              [p.public for p in pres], version=1)
    op_bus = await stack.enter_async_context(mk("operator"))
    await op_bus.publish(op_bus.topics.config_nodes(), roster_msg, retain=True)
    key = X25519KeyPair.generate()
    rbus = await stack.enter_async_context(mk("receiver"))
    receiver = await stack.enter_async_context(
        ResultReceiver(rbus, "health", key, operator=operator.verify_key))
    for _ in range(200):
        if receiver.roster and cloud.jobs.roster and all(n.active for n in nodes):
            break
        await asyncio.sleep(0.02)
    else:
        raise RuntimeError("the node roster did not reach every party")
    return World(host, port, prefix, tmp, cloud, operator, receiver, key, nodes,
                 receiver.roster, stack, node_stacks)


async def add_owners(world: World, users: Sequence[str], policy: KeyEpochPolicy,
                     bus: BusClient, since: float, *, concurrency: int = 32) -> None:
    """Owner keys, registration at the cloud and a phone (write token) per user.

    Owners are independent principals, so their registrations run concurrently (each owner's
    own control messages stay in order).
    """
    sem = asyncio.Semaphore(concurrency)

    async def one(user: str) -> None:
        async with sem:
            await _add_owner(world, user, policy, bus, since)

    await asyncio.gather(*(one(u) for u in users))


async def _add_owner(world: World, user: str, policy: KeyEpochPolicy, bus: BusClient,
                     since: float) -> None:
    owner = f"o{user}"
    pre, sig, dev = PreKeyPair.generate(), SigningKey.generate(), SigningKey.generate()
    payload = build_control("owner_register", sig, {
        "owner": owner, "pre_pk": pre.public.to_bytes(), "verify_key": sig.verify_key.raw})
    rid = control_request_id(decode(payload, "owner_register"))
    reply = await bus.request(bus.topics.control(owner), payload,
                              bus.topics.replies(owner, rid), timeout=60)
    if not decode(reply, "control_result")["ok"]:
        raise RuntimeError(f"owner {owner} was not registered")
    token = issue_write_token(sig, user, dev.verify_key, WRITE_ATTRS, device=f"d{user}",
                              not_before=int(since) - 3600, valid_for_s=7 * 86400)
    world.phones[user] = Phone(user, owner, pre, sig,
                               DeviceCredentials(user, f"d{user}", dev, token.to_bytes()),
                               DataKeyManager(pre.public, policy, max_open_epochs=256))


def phone_items(phone: Phone, path: Sequence[tuple[int, float, float]], t0: float,
                record: list[dict[str, Any]] | None = None) -> list[bytes]:
    """What a phone does for its points (3+): split, seal per key epoch, sign.

    ``record`` (tests) receives every share reading, to prove none reaches the cloud.
    """
    out, seq = [], 0
    for epoch, x, y in sorted(path):
        reading = {"type": "location", "time": t0 + (epoch - path[0][0]) * POINT_INTERVAL_S,
                   "values": {"epoch": epoch, "x": x, "y": y}}
        for share_reading, attrs in share_items(reading, (f"twin:{phone.user}",),
                                                frac_bits={"x": FRAC_BITS, "y": FRAC_BITS}):
            seq += 1
            if record is not None:
                record.append(share_reading)
            out.append(build_item(phone.creds, phone.keys, seq, share_reading, attrs))
    return out


SYNC_WINDOW = 600
"""Items awaiting the cloud's ack across all phones: below a broker's queue for one
subscriber (Mosquitto's default ``max_queued_messages`` is 1,000; beyond it QoS 1 messages
to the cloud are dropped), as the device agent's outbox window does."""
RESEND_AFTER_S = 15.0
"""No ack for this long: publish what is unacknowledged again (the store is idempotent)."""
MAX_STALLS = 8


async def sync_phones(world: World, paths: dict[str, list[tuple[int, float, float]]],
                      t0: float, bus: BusClient,
                      record: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Every phone uploads its share items; returns when the cloud acknowledged all of them.

    Like the device agent: a bounded window of unacknowledged items, resent in order after a
    silence, and a refusal by the cloud is an error (the demo's inputs would be incomplete).
    """
    acked: dict[str, set[int]] = {u: set() for u in paths}
    unacked: dict[str, list[bytes]] = {}  # phones with items in flight -> all their items
    refused: list[str] = []
    progress = asyncio.Event()

    async def on_ack(topic: str, payload: bytes, retain: bool) -> None:
        twin = bus.topics.parse(topic)["twin"]
        got = acked.get(twin)
        if got is None:
            return
        env = decode(payload, "ack")
        got.update(env["seqs"])
        for r in env["rejected"]:
            got.add(r["seq"])
            refused.append(f"{twin} seq {r['seq']}: {r['reason']}")
        progress.set()

    def in_flight() -> int:
        for user in [u for u, items in unacked.items() if len(acked[u]) >= len(items)]:
            del unacked[user]
        return sum(len(items) - len(acked[u]) for u, items in unacked.items())

    async def publish(user: str, items: Sequence[bytes]) -> None:
        topic = bus.topics.twin_data(user)
        await asyncio.gather(*(bus.publish(topic, it) for it in items))

    async def wait_for_room(limit: int) -> None:
        stalls = 0
        while in_flight() > limit:
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), RESEND_AFTER_S)
                stalls = 0
            except TimeoutError:
                stalls += 1
                if stalls > MAX_STALLS:
                    raise TimeoutError(f"cloud acknowledged nothing for "
                                       f"{stalls * RESEND_AFTER_S:.0f} s") from None
                log.warning("demo.sync_resend", phones=len(unacked), items=in_flight())
                for user, items in list(unacked.items()):
                    await publish(user, [it for seq, it in enumerate(items, 1)
                                         if seq not in acked[user]])

    await bus.subscribe(bus.topics.filter("ack"), on_ack)
    build_s = 0.0
    t_start = time.perf_counter()
    for user, path in paths.items():
        b0 = time.perf_counter()
        items = phone_items(world.phones[user], path, t0, record)
        build_s += time.perf_counter() - b0
        await wait_for_room(max(0, SYNC_WINDOW - len(items)))
        unacked[user] = items
        await publish(user, items)
    await wait_for_room(0)
    wall = time.perf_counter() - t_start
    await bus.unsubscribe(bus.topics.filter("ack"))
    if refused:
        raise RuntimeError(f"the cloud refused {len(refused)} item(s), e.g. {refused[0]}")
    return {"sync_wall_s": wall, "device_build_s": build_s}


def aligned_start(policy: KeyEpochPolicy, points: int) -> float:
    """Yesterday, at a key-epoch boundary, so the points fill exactly the intended epochs."""
    day = (int(time.time()) // 86400 - 1) * 86400
    step = policy.seconds or 86400
    start = -(-day // step) * step
    if start + points * POINT_INTERVAL_S > day + 86400:
        raise ValueError("points do not fit into one day")
    return float(start)


@dataclass
class Report:
    users: int
    points: int
    key_epochs: int
    results: dict[str, int]
    expected: dict[str, int]
    timings: dict[str, float]
    rtt_ms: float
    broker: str

    @property
    def checked(self) -> bool:
        return self.results == self.expected

    def as_json(self) -> dict[str, Any]:
        return {"results": self.results, "timings": self.timings,
                "checked_against_plaintext": self.checked,
                "parameters": {"users": self.users, "points": self.points,
                               "key_epochs": self.key_epochs, "rtt_ms": self.rtt_ms,
                               "network_delay": "bus-layer delay in the MPC transport (rtt/2 per frame)"
                               if self.rtt_ms else "none", "broker": self.broker},
                "paper": PAPER}


async def prepare(w: World, paths: Paths, key_epochs: int, owners_bus: BusClient,
                  phones_bus: BusClient, *, limits: dict[str, int] | None = None,
                  record: list[dict[str, Any]] | None = None) -> tuple[float, dict[str, float]]:
    """Owners and phones for every path; 2+ (grants, tokens) and 3+ (share upload)."""
    policy = epoch_policy(paths.points, key_epochs)
    t0 = aligned_start(policy, paths.points)
    all_paths = {**paths.users, "ref-path": paths.reference}
    # one standing subscription for every owner's control replies (no per-request subscribe)
    await owners_bus.subscribe(owners_bus.topics.filter("replies"), None)
    await add_owners(w, list(all_paths), policy, owners_bus, t0)
    day = time.strftime("%Y-%m-%d", time.gmtime(t0))
    subset = f"type:location AND day:{day}"
    timings: dict[str, float] = {}
    p0 = time.perf_counter()
    sem = asyncio.Semaphore(32)

    async def permit(user: str, phone: Phone) -> None:
        async with sem:  # owners grant concurrently; each owner's messages stay in order
            await grant_processing(owners_bus, phone.owner, phone.owner_pre, phone.owner_sig,
                                   w.roster, [user], subset, granted=phone.granted,
                                   function_classes=["proximity"],
                                   receiver_keys=[w.receiver_key.public_bytes], limits=limits,
                                   timeout=120)

    await asyncio.gather(*(permit(u, ph) for u, ph in w.phones.items()))
    timings["permit_s"] = time.perf_counter() - p0
    timings.update(await sync_phones(w, all_paths, t0, phones_bus, record))
    return t0, timings


def job_inputs(w: World, paths: Paths) -> list[tuple[str, str, str]]:
    inputs = [(w.phones[u].owner, u, "user") for u in sorted(paths.users)]
    return inputs + [(w.phones["ref-path"].owner, "ref-path", "reference")]


async def process(w: World, paths: Paths, radius: float, t0: float, bus: BusClient, *,
                  receiver: str = "health", receiver_key: bytes | None = None,
                  job: str | None = None, timeout: float = 3600) -> tuple[Any, Any]:
    """6+: submit, follow the status; returns (final status, result or None)."""
    params = _params(radius)
    job = job or new_job_id("ct")
    waiter = asyncio.create_task(w.receiver.result(job, params, timeout=timeout))
    await submit_job(bus, job, "contact_tracing", params, job_inputs(w, paths), receiver,
                     receiver_key or w.receiver_key.public_bytes, paths.points, t0 - 1,
                     t0 + 86400)
    status = await follow_status(bus, job, timeout=timeout)
    if status["state"] != "done":
        waiter.cancel()
        return status, None
    return status, await waiter


async def run_demo(*, users: int = 10, points: int = 50, key_epochs: int = 50,
                   radius: float = 5.0, rtt_ms: float = 30.0,
                   broker: tuple[str, int] | None = None, paths: Paths | None = None,
                   repeat: bool = False) -> Report:
    """Run 2+, 3+ and 6+ and check the receiver's result against the plaintext reference."""
    paths = paths or random_paths(users, points, radius)
    n_users, n_points = len(paths.users), paths.points
    async with AsyncExitStack() as stack:
        w = await start_world(stack, broker=broker, rtt_ms=rtt_ms)
        bus = await stack.enter_async_context(w.client("phones"))
        owners_bus = await stack.enter_async_context(w.client("owners"))
        t0, timings = await prepare(w, paths, key_epochs, owners_bus, bus)
        for run in range(2 if repeat else 1):
            j0 = time.perf_counter()
            status, result = await process(w, paths, radius, t0, owners_bus)
            if result is None:
                raise RuntimeError(f"job {status['job']} failed: {status['reason']}")
            key = "processing" if run == 0 else "processing_repeat"
            timings[f"{key}_s"] = time.perf_counter() - j0
            for phase, secs in w.cloud.jobs.timings.get(status["job"], {}).items():
                timings[f"{key}_{phase}"] = secs
        results = result.as_dict()
    expected = plaintext_reference(paths, radius)
    timings = _per_user(timings, n_users)
    return Report(n_users, n_points, key_epochs, results, expected, timings, rtt_ms,
                  "embedded" if broker is None else f"mqtt://{broker[0]}:{broker[1]}")


def _per_user(t: dict[str, float], n: int) -> dict[str, float]:
    out = {k: round(v, 4) for k, v in t.items()}
    out["sync_ms_per_user"] = round(1000 * t["sync_wall_s"] / (n + 1), 2)
    out["device_cpu_ms_per_user"] = round(1000 * t["device_build_s"] / (n + 1), 2)
    out["processing_ms_per_user"] = round(1000 * t["processing_s"] / n, 2)
    out["mpc_ms_per_user"] = round(1000 * t.get("processing_compute_s", 0.0) / n, 3)
    out["permit_ms_per_user"] = round(1000 * t["permit_s"] / (n + 1), 2)
    if "processing_repeat_s" in t:
        out["processing_repeat_ms_per_user"] = round(1000 * t["processing_repeat_s"] / n, 2)
    return out


def format_report(r: Report) -> str:
    t = r.timings
    rows = [
        ("3+ sync (device build+upload+ack)", t["sync_ms_per_user"], PAPER["sync_ms_per_user"]),
        ("   of which phone CPU (split, seal, sign)", t["device_cpu_ms_per_user"], None),
        ("6+ processing, per user (incl. constant)", t["processing_ms_per_user"],
         PAPER["processing_ms_per_user"]),
        ("   of which MPC (inputs sent -> done)", t["mpc_ms_per_user"], PAPER["mpc_ms_per_user"]),
        ("2+ permit (3 re-keys + token), per user", t["permit_ms_per_user"], None),
    ]
    lines = [f"contact tracing: {r.users} users x {r.points} points, {r.key_epochs} key epochs, "
             f"rtt {r.rtt_ms:g} ms ({'bus-layer delay' if r.rtt_ms else 'no delay'}), "
             f"broker {r.broker}",
             f"{'phase':44} {'ours ms':>10} {'paper ms':>10}"]
    for name, ours, paper in rows:
        lines.append(f"{name:44} {ours:>10.2f} {paper if paper is not None else '':>10}")
    lines.append(f"processing total {t['processing_s']:.2f} s (re-encrypt "
                 f"{t.get('processing_reencrypt_s', 0):.2f}, publish {t.get('processing_publish_s', 0):.2f}, "
                 f"nodes {t.get('processing_compute_s', 0):.2f}); paper constant 12.4 s")
    contacts = sum(1 for v in r.results.values() if v)
    lines.append(f"users with contacts: {contacts}/{r.users}; "
                 f"checked against plaintext: {'OK' if r.checked else 'MISMATCH'}")
    return "\n".join(lines)
