"""A small processing deployment for job, liveness, result and hot-swap tests.

Everything real: broker (embedded, or Mosquitto), cloud, three nodes, receiver (the demo's
``start_world``), owners registered at the cloud, grants and process tokens
(``grant_processing``), and devices' share items in the brief's format ``{type, time, share,
enc, values}`` sealed and signed like any item. What the tests upload is given as plain
readings per twin; the device side here is written from the definition (encode
``round(v · 2^frac)``, split additively), independent of the demo's phone code.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass
from typing import Any

from ciphertwin.agents.attribute_rules import time_attributes
from ciphertwin.agents.processing import follow_status, grant_processing, new_job_id, submit_job
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.epochs import KeyEpochPolicy
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.shares import split_additive
from ciphertwin.crypto.tokens import ProcessToken
from ciphertwin.demo.contact_tracing import World, add_owners, start_world
from ciphertwin.mpc_nodes.ledger import NodeLedger
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.mpc_nodes.service import ProcessingNode
from ciphertwin.protocol.items import build_item
from ciphertwin.protocol.job_epochs import FieldEncoding
from ciphertwin.protocol.jobs import NodeRoster, build_roster, default_bindings, pack_params

METRES = FieldEncoding("m", 4, -50_000.0, 50_000.0)
CT_FIELDS = {"x": METRES, "y": METRES}
CLASSES = ("proximity", "aggregate", "distribution")

Readings = Sequence[tuple[float, Mapping[str, float]]]
"""(time, {field: value}) of one twin"""


@dataclass
class Env:
    w: World
    bus: BusClient  # owners, devices and submitter
    t0: float  # start of the data (a whole hour, yesterday)
    fields: dict[str, FieldEncoding]
    tokens: dict[str, ProcessToken]


async def world(stack: AsyncExitStack, broker: str = "embedded", **kw: Any) -> tuple[World, BusClient]:
    addr = ("127.0.0.1", 1883) if broker == "mosquitto" else None
    w = await start_world(stack, broker=addr, pool_workers=2, **kw)
    return w, await stack.enter_async_context(w.client("people"))


def day_start() -> float:
    return float((int(time.time()) // 86400 - 1) * 86400)


def share_readings(twin: str, when: float, values: Mapping[str, float],
                   fields: Mapping[str, FieldEncoding]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """A device's three share readings of one reading, each with its attributes."""
    names = sorted(values)
    columns = split_additive([fields[n].encode(values[n]) for n in names], 3)
    enc = {n: fields[n].as_dict() for n in names}
    attrs = {f"twin:{twin}", "type:location", *time_attributes(when)}
    return [({"type": "location", "time": when, "share": i, "enc": enc,
              "values": dict(zip(names, column, strict=True))}, tuple(sorted(attrs | {f"share:{i}"})))
            for i, column in enumerate(columns)]


async def upload(env: Env, data: Mapping[str, Readings]) -> None:
    """Every twin's readings as sealed share items; returns once the cloud stored them all."""
    w, bus = env.w, env.bus
    want: dict[str, set[int]] = {}
    acked: dict[str, set[int]] = {t: set() for t in data}
    done = asyncio.Event()

    async def on_ack(topic: str, payload: bytes, retain: bool) -> None:
        twin = bus.topics.parse(topic)["twin"]
        if twin in acked:
            msg = decode(payload, "ack")
            assert not msg["rejected"], msg["rejected"]
            acked[twin].update(msg["seqs"])
            if all(want.get(t, set()) <= acked[t] for t in data):
                done.set()

    await bus.subscribe(bus.topics.filter("ack"), on_ack)
    for twin, readings in data.items():
        phone = w.phones[twin]
        items = [build_item(phone.creds, phone.keys, seq, body, attrs) for seq, (body, attrs)
                 in enumerate((r for when, vals in readings
                               for r in share_readings(twin, when, vals, env.fields)), start=1)]
        want[twin] = set(range(1, len(items) + 1))
        for item in items:
            await bus.publish(bus.topics.twin_data(twin), item)
    if all(want[t] <= acked[t] for t in data):
        done.set()
    await asyncio.wait_for(done.wait(), 60)
    await bus.unsubscribe(bus.topics.filter("ack"))


async def permit(env: Env, twins: Sequence[str], roster: NodeRoster | None = None,
                 limits: Mapping[str, int] | None = None) -> None:
    """Each twin's owner grants processing to ``roster`` (default: the current one)."""
    w = env.w
    for twin in twins:
        phone = w.phones[twin]
        env.tokens[twin] = await grant_processing(
            env.bus, phone.owner, phone.owner_pre, phone.owner_sig, roster or w.receiver.roster,
            [twin], "type:location", granted=phone.granted, function_classes=CLASSES,
            receiver_keys=[w.receiver_key.public_bytes], limits=limits, timeout=30)


async def setup(stack: AsyncExitStack, data: Mapping[str, Readings], *,
                fields: Mapping[str, FieldEncoding] = CT_FIELDS, broker: str = "embedded",
                **kw: Any) -> Env:
    """World, owners (registered), processing permits for every twin, uploaded readings."""
    w, bus = await world(stack, broker, **kw)
    await bus.subscribe(bus.topics.filter("replies"), None)  # owners' control replies
    t0 = day_start()
    env = Env(w, bus, t0, dict(fields), {})
    await add_owners(w, list(data), KeyEpochPolicy("day"), bus, t0)
    await permit(env, list(data))
    await upload(env, data)
    return env


def ct_inputs(env: Env, users: Sequence[str], reference: str) -> list[tuple[str, str, str]]:
    p = env.w.phones
    return [(p[u].owner, u, "user") for u in users] + [(p[reference].owner, reference, "reference")]


async def submit(env: Env, inputs: Sequence[tuple[str, str, str]], *, function: str = "contact_tracing",
                 params: Mapping[str, Any] | None = None, job: str | None = None,
                 points: int = 50, **kw: Any) -> str:
    job = job or new_job_id("t")
    await submit_job(env.bus, job, function, params if params is not None else {"radius": 80},
                     inputs, "health", env.w.receiver_key.public_bytes, points, env.t0,
                     env.t0 + 86400, fields=env.fields, **kw)
    return job


async def run(env: Env, inputs: Sequence[tuple[str, str, str]], *, timeout: float = 60,
              **kw: Any) -> tuple[Any, Any]:
    """Submit and wait: (the cloud's final status, the receiver's result or None)."""
    job = await submit(env, inputs, **kw)
    status = await follow_status(env.bus, job, timeout=timeout)
    if status["state"] != "done":
        return status, None
    return status, await env.w.receiver.result(job, kw.get("params") or {"radius": 80},
                                               timeout=timeout)


@dataclass
class Spare:
    """A node that can replace node ``index`` (new id and keys)."""

    identity: NodeIdentity
    pre: PreKeyPair
    node: ProcessingNode


async def spare_node(stack: AsyncExitStack, w: World, index: int, name: str) -> Spare:
    identity, pre = NodeIdentity.generate(index, name), PreKeyPair.generate()
    bus = await stack.enter_async_context(w.client(name))
    ledger = stack.enter_context(closing(NodeLedger(w.tmp / f"{name}.ledger")))
    node = await stack.enter_async_context(ProcessingNode(
        bus, identity, pre, operator=w.operator.verify_key, ledger=ledger,
        mpc_timeout_s=w.nodes[0].mpc_timeout_s, latency_s=w.nodes[0].latency_s))
    return Spare(identity, pre, node)


def roster_with(w: World, current: NodeRoster, spare: Spare, version: int) -> bytes:
    """The operator's roster ``version``: ``current`` with node ``spare.identity.index``
    replaced by the spare."""
    i = spare.identity.index
    entries = [spare.identity.entry() if e.index == i else e for e in current.roster.entries]
    pres = [spare.pre.public if k == i else p for k, p in enumerate(current.pre_keys)]
    return build_roster(w.operator, entries, pres, version=version)


async def publish_roster(w: World, bus: BusClient, payload: bytes) -> None:
    await bus.publish(bus.topics.config_nodes(), payload, retain=True)


async def until(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


def walk(t0: float, n: int, x: float, y: float, dx: float = 0.0, step_s: float = 60.0
         ) -> list[tuple[float, dict[str, float]]]:
    """n readings one step apart, moving by dx metres per step."""
    return [(t0 + 5 + k * step_s, {"x": x + k * dx, "y": y}) for k in range(n)]


def unique(prefix: str) -> str:
    return f"{prefix}{os.urandom(2).hex()}"


def job_spec(job: str, receiver: str, receiver_key: bytes, roster: bytes,
             twins: Sequence[Mapping[str, Any]], tokens: Sequence[bytes], *,
             function: str = "contact_tracing", params: Mapping[str, Any] | None = None,
             points: int = 4, fields: Mapping[str, FieldEncoding] = CT_FIELDS,
             since: float = 0.0, until: float = 86400.0, epoch_s: int = 60) -> bytes:
    """A ``job_spec`` as a (malicious) cloud could send it: well-formed, any content."""
    declared = {f: e.as_dict() for f, e in fields.items()}
    return encode("job_spec", {
        "job": job, "function": function, "params": pack_params(params or {"radius": 80}),
        "receiver": receiver, "receiver_key": receiver_key, "roster": roster, "points": points,
        "bindings": default_bindings(function, declared), "since": since, "until": until,
        "epoch_s": epoch_s, "fields": declared, "twins": list(twins), "tokens": list(tokens)})


async def send_spec(bus: BusClient, node_ids: Sequence[str], job: str, spec: bytes) -> None:
    """Chunk 0 (the spec, no items) of a one-chunk job to every node."""
    for node in node_ids:
        await bus.publish(bus.topics.node_inputs(node, job), encode(
            "node_inputs", {"job": job, "chunk": 0, "chunks": 1, "spec": spec, "items": []}))
