"""Contact-tracing demo: processes 2+, 3+ and 6+ end to end over MQTT, checked against plaintext.

One process hosts everything as asyncio tasks — broker (embedded, unless an external one is
given), cloud (:class:`CloudTwin`, re-encrypting on its process pool), three processing nodes
(opening inputs on a shared process pool), a receiver, and N simulated phones, each with its
owner: the owner grants processing (2+), the phone encodes every reading as declared
(x, y: 1/16 m within ±50 km, in plain metres or projected from lat/lon around an origin),
splits it into three shares and uploads them at the reading's own time, sealed under its key
epochs (3+); the receiver submits a job over a time window and opens the result (6+), which
is checked against the plaintext reference from the definition (:mod:`demo.plaintext`).
Readings are placed in clock-aligned epochs by their time, so gaps, duplicates, unsorted
uploads and users without readings are counted right; user ids come back as given.
Every message crosses the broker; nodes talk only over encrypted MQTT frames. Network delay: ``rtt_ms`` makes the MPC transport hold every node-to-node frame for
rtt/2 (the bus-layer delay of ``ciphertwin.mpc_nodes.transport``); no ``tc netem`` is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ciphertwin.agents.processing import (
    JobResult,
    ResultReceiver,
    follow_status,
    grant_processing,
    new_job_id,
    submit_job,
)
from ciphertwin.agents.share_mode import ShareMode
from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.bus.topics import ID_PATTERN
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.demo import plaintext
from ciphertwin.demo.paths import POINT_INTERVAL_S, Paths, Reading, iso, load_paths, random_paths
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.ledger import NodeLedger
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.mpc_nodes.service import ProcessingNode
from ciphertwin.protocol import share_open
from ciphertwin.protocol.control import build_control, control_request_id
from ciphertwin.protocol.items import DeviceCredentials, build_item
from ciphertwin.protocol.job_epochs import DEFAULT_EPOCH_S, FieldEncoding
from ciphertwin.protocol.jobs import DEFAULT_FIELDS, build_roster
from ciphertwin.protocol.roster_trust import ShareIndexBook
from ciphertwin.workers import worker_pool

__all__ = ["Paths", "random_paths", "load_paths", "plaintext_reference", "prepare", "process",
           "start_world", "add_owners", "epoch_policy", "job_inputs", "run_demo",
           "format_report", "coordinate_encoding"]

log = structlog.get_logger(__name__)

PAPER = {"sync_ms_per_user": 7672.0, "processing_ms_per_user": 7564.0,
         "processing_constant_ms": 12400.0, "mpc_ms_per_user": 6530.0}
WRITE_ATTRS = ["share:*", "type:*", "twin:*", "year:*", "month:*", "day:*", "hour:*"]
REF_TWIN = "ref-path"
MAX_PLAUSIBLE_AGE_S = 366 * 86400  # the cloud refuses items further than this from now
MAX_SUBSET_DAYS = 31
MAX_ROWS_SHOWN = 20


def coordinate_encoding(unit: str = "m") -> FieldEncoding:
    """The declared encoding of x and y: the CLI default (1/16 m within ±50 km,
    ``DEFAULT_FIELDS``) in the paths' frame (``unit``)."""
    return dataclasses.replace(DEFAULT_FIELDS["contact_tracing"]["x"], unit=unit)


def _params(radius: float, encoding: FieldEncoding | None = None,
            window: int = 0) -> dict[str, int]:
    """Job parameters: the radius in encoded units, the coordinate bound the encoding gives,
    and the ±``window`` epochs a contact may be apart (only sent when not 0)."""
    enc = encoding or coordinate_encoding()
    params = {"radius": max(1, round(radius * (1 << enc.frac))),
              "coord_bits": max(1, enc.bound.bit_length())}
    return params | ({"window": window} if window else {})


def _fields(encoding: FieldEncoding) -> dict[str, dict[str, Any]]:
    return {"x": encoding.as_dict(), "y": encoding.as_dict()}


def job_window(paths: Paths, epoch_s: int = DEFAULT_EPOCH_S) -> tuple[float, float]:
    """[since, until): from the start of the first reading's epoch to the end of the last's."""
    lo, hi = paths.span()
    return float(math.floor(lo / epoch_s) * epoch_s), float((math.floor(hi / epoch_s) + 1) * epoch_s)


def plaintext_reference(paths: Paths, radius: float, *, since: float | None = None,
                        until: float | None = None, epoch_s: int = DEFAULT_EPOCH_S,
                        window: int = 0) -> dict[str, int]:
    """Per user id (verbatim), the contact count by the definition (:mod:`demo.plaintext`)."""
    lo, hi = job_window(paths, epoch_s)
    enc = coordinate_encoding(paths.unit)

    def metric(path: Sequence[Reading]) -> list[tuple[float, float, float]]:
        return [(r[0], *paths.metres(r)) for r in path]

    return plaintext.contact_tracing(
        {u: metric(p) for u, p in paths.users.items()}, metric(paths.reference),
        encoding=enc, radius=_params(radius, enc)["radius"],
        since=lo if since is None else since, until=hi if until is None else until,
        epoch_s=epoch_s, window=window)


def twin_ids(users: Sequence[str]) -> dict[str, str]:
    """user id → twin id: the id itself when it is a valid twin id, else a stable hash.

    Results are keyed by twin id on the bus and mapped back, so a user always sees the ids
    they gave (``user-000`` stays ``user-000``; ``Zoë Müller`` comes back as itself)."""
    out = {}
    for u in users:
        ok = ID_PATTERN.fullmatch(u) and len(u) <= 63 and u != REF_TWIN
        out[u] = u if ok else "h-" + hashlib.sha256(u.encode()).hexdigest()[:24]
    if len(set(out.values())) != len(out):
        raise ValidationError("two user ids map to the same twin id; rename one")
    return out


def epoch_policy(points: int, key_epochs: int) -> KeyEpochPolicy:
    """Key epoch length giving ``key_epochs`` data keys over ``points`` minutes of readings."""
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
    mode: ShareMode | None = None
    """the phone's share mode (declared encodings, geo frame), set by :func:`prepare`"""
    seq: int = 0
    """the last sequence number used (a phone may upload again later)"""


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
    twins: dict[str, str] = field(default_factory=dict)
    """user id -> twin id (see :func:`twin_ids`)"""

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
    not_before = int(since) - 3600  # the nodes check it at each item's time, the cloud now
    token = issue_write_token(sig, user, dev.verify_key, WRITE_ATTRS, device=f"d{user}",
                              not_before=not_before,
                              valid_for_s=max(7 * 86400, int(time.time()) + 7 * 86400 - not_before))
    world.phones[user] = Phone(user, owner, pre, sig,
                               DeviceCredentials(user, f"d{user}", dev, token.to_bytes()),
                               DataKeyManager(pre.public, policy, max_open_epochs=256))


def location_readings(paths: Paths, path: Sequence[Reading]) -> list[dict[str, Any]]:
    """A path as the readings a phone's sensor gives: lat/lon (projected by the phone's share
    mode) or x/y metres, at their own times, in the order given."""
    names = ("lat", "lon") if paths.geo is not None else ("x", "y")
    return [{"type": "location", "time": t, "values": dict(zip(names, (a, b), strict=True))}
            for t, a, b in path]


def phone_items(phone: Phone, readings: Sequence[Mapping[str, Any]], mode: ShareMode,
                record: list[dict[str, Any]] | None = None) -> list[bytes]:
    """What a phone does for its readings (3+): encode as declared, split, seal per key
    epoch, sign — in the order the readings came.

    ``record`` (tests) receives every share reading, to prove none reaches the cloud.
    """
    shares = [s for reading in readings for s in mode(reading, (f"twin:{phone.user}",))]
    out = []
    for share_reading, attrs in shares:  # nothing is sealed unless every reading encoded
        phone.seq += 1
        if record is not None:
            record.append(share_reading)
        out.append(build_item(phone.creds, phone.keys, phone.seq, share_reading, attrs))
    return out


SYNC_WINDOW = 600
"""Items awaiting the cloud's ack across all phones: below a broker's queue for one
subscriber (Mosquitto's default ``max_queued_messages`` is 1,000; beyond it QoS 1 messages
to the cloud are dropped), as the device agent's outbox window does."""
RESEND_AFTER_S = 15.0
"""No ack for this long: publish what is unacknowledged again (the store is idempotent)."""
MAX_STALLS = 8


async def sync_phones(world: World, readings: Mapping[str, Sequence[Mapping[str, Any]]],
                      bus: BusClient,
                      record: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Every phone uploads its share items; returns when the cloud acknowledged all of them.

    Like the device agent: a bounded window of unacknowledged items, resent in order after a
    silence, and a refusal by the cloud is an error (the demo's inputs would be incomplete).
    """
    acked: dict[str, set[int]] = {u: set() for u in readings}
    unacked: dict[str, dict[int, bytes]] = {}  # phones with items in flight -> {seq: item}
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
        for user in [u for u, items in unacked.items() if items.keys() <= acked[u]]:
            del unacked[user]
        return sum(len(items.keys() - acked[u]) for u, items in unacked.items())

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
                    await publish(user, [it for seq, it in items.items()
                                         if seq not in acked[user]])

    await bus.subscribe(bus.topics.filter("ack"), on_ack)
    build_s = 0.0
    t_start = time.perf_counter()
    for user, its in readings.items():
        if not its:
            continue  # nothing to upload
        phone = world.phones[user]
        if phone.mode is None:
            raise ValidationError(f"phone {user} has no share mode")
        b0 = time.perf_counter()
        first = phone.seq + 1
        items = phone_items(phone, its, phone.mode, record)
        build_s += time.perf_counter() - b0
        await wait_for_room(max(0, SYNC_WINDOW - len(items)))
        unacked[user] = dict(enumerate(items, first))
        await publish(user, items)
    await wait_for_room(0)
    wall = time.perf_counter() - t_start
    await bus.unsubscribe(bus.topics.filter("ack"))
    if refused:
        raise RuntimeError(f"the cloud refused {len(refused)} item(s), e.g. {refused[0]}")
    return {"sync_wall_s": wall, "device_build_s": build_s}


def aligned_start(policy: KeyEpochPolicy, points: int) -> float:
    """Yesterday, at a key-epoch boundary, so ``points`` one-minute readings fill exactly the
    intended key epochs (simulated paths start here)."""
    day = (int(time.time()) // 86400 - 1) * 86400
    step = policy.seconds or 86400
    start = -(-day // step) * step
    if start + points * POINT_INTERVAL_S > day + 86400:
        raise ValueError("points do not fit into one day")
    return float(start)


def check_recent(paths: Paths, now: float | None = None) -> None:
    """The cloud refuses items more than 366 days from now: say so before uploading."""
    lo, hi = paths.span()
    now = time.time() if now is None else now
    if now - lo > MAX_PLAUSIBLE_AGE_S or hi - now > MAX_PLAUSIBLE_AGE_S:
        raise ValidationError(
            f"readings span {iso(lo)} .. {iso(hi)}; the cloud accepts items within 366 days of "
            "now — replay old data with --replay (moves every reading by whole days)")


def replay_shift(paths: Paths, now: float | None = None) -> float:
    """Whole days that move the last reading into the last 24 hours (time of day kept)."""
    now = time.time() if now is None else now
    return math.floor((now - paths.span()[1]) / 86400) * 86400.0


def _subset(since: float, until: float) -> str:
    """The grants' data subset: location readings of the days the window touches."""
    days = sorted({time.strftime("%Y-%m-%d", time.gmtime(t))
                   for t in range(int(since), int(until), 86400)} |
                  {time.strftime("%Y-%m-%d", time.gmtime(until - 1))})
    if len(days) > MAX_SUBSET_DAYS:
        return "type:location"
    return "type:location AND (" + " OR ".join(f"day:{d}" for d in days) + ")"


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
    since: float = 0.0
    until: float = 0.0
    epoch_s: int = DEFAULT_EPOCH_S
    unit: str = "m"
    notes: list[str] = field(default_factory=list)
    window: int = 0

    @property
    def checked(self) -> bool:
        return self.results == self.expected

    @property
    def mismatches(self) -> list[str]:
        return sorted(u for u in self.expected.keys() | self.results.keys()
                      if self.results.get(u) != self.expected.get(u))

    def as_json(self) -> dict[str, Any]:
        return {"results": self.results, "timings": self.timings,
                "checked_against_plaintext": self.checked, "mismatches": self.mismatches,
                "window": {"since": iso(self.since), "until": iso(self.until),
                           "epoch_s": self.epoch_s, "contact_window_epochs": self.window},
                "parameters": {"users": self.users, "points": self.points,
                               "key_epochs": self.key_epochs, "rtt_ms": self.rtt_ms,
                               "unit": self.unit,
                               "network_delay": "bus-layer delay in the MPC transport (rtt/2 per frame)"
                               if self.rtt_ms else "none", "broker": self.broker},
                "notes": self.notes, "paper": PAPER}


async def permit_all(w: World, twins: Sequence[str], subset: str, function_classes: Sequence[str],
                     bus: BusClient, *, limits: Mapping[str, int] | None = None) -> float:
    """2+ for every twin's owner, concurrently; returns the seconds it took."""
    p0 = time.perf_counter()
    sem = asyncio.Semaphore(32)

    async def one(twin: str) -> None:
        phone = w.phones[twin]
        async with sem:  # owners grant concurrently; each owner's messages stay in order
            await grant_processing(bus, phone.owner, phone.owner_pre, phone.owner_sig,
                                   w.roster, [twin], subset, granted=phone.granted,
                                   function_classes=list(function_classes),
                                   receiver_keys=[w.receiver_key.public_bytes],
                                   limits=dict(limits) if limits else None, timeout=120)

    await asyncio.gather(*(one(t) for t in twins))
    return time.perf_counter() - p0


async def prepare(w: World, paths: Paths, key_epochs: int, owners_bus: BusClient,
                  phones_bus: BusClient, *, limits: dict[str, int] | None = None,
                  record: list[dict[str, Any]] | None = None) -> tuple[float, dict[str, float]]:
    """Owners and phones for every path; 2+ (grants, tokens) and 3+ (share upload).

    Returns (start of the job window, timings). Readings go up at their own times, in the
    order given; a user without readings is registered and permitted and uploads nothing (its
    owner's token names the twin, so the cloud admits it; its count is 0).
    """
    since, until = job_window(paths)
    policy = epoch_policy(math.ceil((until - since) / POINT_INTERVAL_S), key_epochs)
    w.twins.update(twin_ids(list(paths.users)))
    mode = ShareMode({"x": coordinate_encoding(paths.unit), "y": coordinate_encoding(paths.unit)},
                     paths.geo)
    readings = {w.twins[u]: location_readings(paths, p) for u, p in paths.users.items()}
    readings[REF_TWIN] = location_readings(paths, paths.reference)
    # one standing subscription for every owner's control replies (no per-request subscribe)
    await owners_bus.subscribe(owners_bus.topics.filter("replies"), None)
    await add_owners(w, list(readings), policy, owners_bus, since)
    for twin in readings:
        w.phones[twin].mode = mode
    timings = {"permit_s": await permit_all(w, list(readings), _subset(since, until),
                                            ["proximity"], owners_bus, limits=limits)}
    timings.update(await sync_phones(w, readings, phones_bus, record))
    return since, timings


def job_inputs(w: World, paths: Paths) -> list[tuple[str, str, str]]:
    """(owner, twin, role): every user in id order, then the reference."""
    inputs = []
    for u in sorted(paths.users):
        twin = w.twins.get(u, u)
        inputs.append((w.phones[twin].owner, twin, "user"))
    return inputs + [(w.phones[REF_TWIN].owner, REF_TWIN, "reference")]


async def process(w: World, paths: Paths, radius: float, t0: float, bus: BusClient, *,
                  receiver: str = "health", receiver_key: bytes | None = None,
                  job: str | None = None, timeout: float = 3600,
                  epoch_s: int = DEFAULT_EPOCH_S,
                  window: int = 0) -> tuple[Any, JobResult | None]:
    """6+: submit over the window [t0, end of the last reading's epoch), follow the status;
    returns (final status, result keyed by the users' own ids, or None)."""
    enc = coordinate_encoding(paths.unit)
    status, result = await run_job(
        w, bus, "contact_tracing", _params(radius, enc, window), job_inputs(w, paths), paths.points,
        t0, job_window(paths, epoch_s)[1], epoch_s=epoch_s, fields=_fields(enc),
        job=job or new_job_id("ct"), receiver=receiver, receiver_key=receiver_key,
        timeout=timeout)
    if result is None:
        return status, None
    user_of = {twin: user for user, twin in w.twins.items()}
    return status, dataclasses.replace(result, labels=[user_of.get(t, t) for t in result.labels])


async def run_job(w: World, bus: BusClient, function: str, params: Mapping[str, Any],
                  inputs: Sequence[tuple[str, str, str]], points: int, since: float,
                  until: float, *, fields: Mapping[str, Mapping[str, Any]],
                  epoch_s: int = DEFAULT_EPOCH_S, job: str | None = None,
                  receiver: str = "health", receiver_key: bytes | None = None,
                  timeout: float = 3600) -> tuple[Any, JobResult | None]:
    """Any registered function (6+): submit, follow the status, collect the receiver's
    result; returns (final status, result keyed by twin id, or None if the job failed)."""
    job = job or new_job_id(function.replace("_", "-")[:8])
    waiter = asyncio.create_task(w.receiver.result(job, params, timeout=timeout))
    await submit_job(bus, job, function, params, inputs, receiver,
                     receiver_key or w.receiver_key.public_bytes, points, since, until,
                     epoch_s=epoch_s, fields=fields)
    status = await follow_status(bus, job, timeout=timeout)
    if status["state"] != "done":
        waiter.cancel()
        return status, None
    return status, await waiter


async def run_demo(*, users: int = 10, points: int = 50, key_epochs: int = 50,
                   radius: float = 5.0, rtt_ms: float = 30.0,
                   broker: tuple[str, int] | None = None, paths: Paths | None = None,
                   repeat: bool = False, replay: bool = False,
                   epoch_s: int = DEFAULT_EPOCH_S, window: int = 0) -> Report:
    """Run 2+, 3+ and 6+ and check the receiver's result against the plaintext reference."""
    if paths is None:
        start = aligned_start(epoch_policy(points, key_epochs), points)
        paths = random_paths(users, points, radius, start=start)
    notes = list(paths.notes)
    if replay:
        shift = replay_shift(paths)
        paths = paths.shifted(shift)
        notes.append(f"replayed: every reading moved by {shift / 86400:+.0f} day(s)")
    check_recent(paths)
    n_users, n_points = len(paths.users), paths.points
    async with AsyncExitStack() as stack:
        w = await start_world(stack, broker=broker, rtt_ms=rtt_ms)
        bus = await stack.enter_async_context(w.client("phones"))
        owners_bus = await stack.enter_async_context(w.client("owners"))
        t0, timings = await prepare(w, paths, key_epochs, owners_bus, bus)
        for run in range(2 if repeat else 1):
            j0 = time.perf_counter()
            status, result = await process(w, paths, radius, t0, owners_bus, epoch_s=epoch_s,
                                           window=window)
            if result is None:
                raise RuntimeError(f"job {status['job']} failed: {status['reason']}")
            key = "processing" if run == 0 else "processing_repeat"
            timings[f"{key}_s"] = time.perf_counter() - j0
            for phase, secs in w.cloud.jobs.timings.get(status["job"], {}).items():
                timings[f"{key}_{phase}"] = secs
        results = result.as_dict()
    since, until = t0, job_window(paths, epoch_s)[1]
    expected = plaintext_reference(paths, radius, since=since, until=until, epoch_s=epoch_s,
                                   window=window)
    timings = _per_user(timings, n_users)
    return Report(n_users, n_points, key_epochs, results, expected, timings, rtt_ms,
                  "embedded" if broker is None else f"mqtt://{broker[0]}:{broker[1]}",
                  since, until, epoch_s, paths.unit, notes, window)


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
    lines.append(f"window {iso(r.since)} .. {iso(r.until)} in epochs of {r.epoch_s} s"
                 f"{f' (contacts ±{r.window} epochs)' if r.window else ''}; "
                 f"coordinates in {r.unit}")
    lines.extend(f"note: {n}" for n in r.notes)
    shown = sorted(r.expected)[:MAX_ROWS_SHOWN]
    for user in shown:
        got, want = r.results.get(user), r.expected[user]
        lines.append(f"  {user:24} {got!s:>6} contact epoch(s)"
                     f"{'' if got == want else f'   MISMATCH: plaintext {want}'}")
    if len(r.expected) > len(shown):
        lines.append(f"  … {len(r.expected) - len(shown)} more user(s) (--json lists all)")
    lines.append(f"users with contacts: {contacts}/{r.users}; "
                 f"checked against plaintext: {'OK' if r.checked else 'MISMATCH'}"
                 + (f" ({len(r.mismatches)} user(s) differ)" if not r.checked else ""))
    return "\n".join(lines)
