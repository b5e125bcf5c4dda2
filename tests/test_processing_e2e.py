"""Processes 2+, 3+ and 6+ end to end over a real broker: results, refusals, privacy, failures."""

from __future__ import annotations

import asyncio
import struct
from contextlib import AsyncExitStack

import msgpack
import pytest

import processing_world as pw
from ciphertwin.agents.processing import JobFailedError, ResultReceiver
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_process_token
from ciphertwin.demo.contact_tracing import (
    _params, plaintext_reference, prepare, process, random_paths, start_world,
)
from ciphertwin.protocol.jobs import pack_params

USERS, POINTS, RADIUS = 4, 6, 5.0


async def _world(stack: AsyncExitStack, broker: str, **kw):
    addr = ("127.0.0.1", 1883) if broker == "mosquitto" else None
    w = await start_world(stack, broker=addr, pool_workers=2, **kw)
    return w, await stack.enter_async_context(w.client("phones")), \
        await stack.enter_async_context(w.client("owners"))


class Spy:
    """Records every message under the deployment prefix — what the broker (and cloud) see."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.payloads.append(bytes(payload))


def _encodings(value: int) -> list[bytes]:
    return [struct.pack("<Q", value), struct.pack(">Q", value), msgpack.packb(value)]


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def test_contact_tracing_matches_plaintext_and_cloud_sees_no_share(broker: str) -> None:
    paths = random_paths(USERS, POINTS, RADIUS, seed=7)
    shares: list[dict] = []
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, broker)
        spy = Spy()
        spy_bus = await stack.enter_async_context(w.client("spy"))
        await spy_bus.subscribe(f"{w.prefix}/#", spy)
        t0, _ = await prepare(w, paths, 3, owners, phones, record=shares)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=120)
        assert status["state"] == "done", status["reason"]
        assert result.as_dict() == plaintext_reference(paths, RADIUS)
        assert any(result.values), "the paths are built to produce contacts"
        # a repeated job is served from the (capsule, grant) cache: no pairing work
        before = w.cloud.pool
        status2, result2 = await process(w, paths, RADIUS, t0, owners, timeout=120)
        assert status2["state"] == "done" and result2.as_dict() == result.as_dict()
        assert w.cloud.pool is before
        await asyncio.sleep(0.3)
        db = b"".join(p.read_bytes() for p in w.tmp.glob("cloud.db*"))
    seen = b"".join(spy.payloads)
    assert len(shares) == 3 * POINTS * (USERS + 1)
    leaked = [v for s in shares for v in s["values"].values() if v > 2**32
              for enc in _encodings(v) if enc in seen or enc in db]
    assert leaked == []
    # control: the scan does find values that really are there (the job parameters)
    assert pack_params(_params(RADIUS)) in seen


async def test_repeat_job_does_no_pairing_work() -> None:
    paths = random_paths(2, 4, RADIUS, seed=3)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded")
        t0, _ = await prepare(w, paths, 4, owners, phones)
        calls: list[int] = []
        real = w.cloud.pool.reencrypt

        async def counting(work):  # count work handed to the real pool
            calls.append(len(work))
            return await real(work)

        w.cloud.pool.reencrypt = counting  # type: ignore[method-assign]
        s1, _ = await process(w, paths, RADIUS, t0, owners, timeout=60)
        first = sum(calls)
        s2, _ = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert s1["state"] == s2["state"] == "done"
        assert first == 3 * 4 * 3  # 3 nodes x 4 key epochs x 3 twins (nodes get no live stream)
        assert sum(calls) == first  # the repeat hit the (capsule, grant) cache


async def test_nodes_refuse_a_job_their_tokens_do_not_admit() -> None:
    paths = random_paths(2, 4, RADIUS, seed=5)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded")
        t0, _ = await prepare(w, paths, 1, owners, phones, limits={"min_twins": 50})
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert status["state"] == "failed" and result is None
        assert "min_twins" in status["reason"]
        assert all("min_twins" in n.refused[status["job"]] or "aborted" in n.refused[status["job"]]
                   for n in w.nodes)


async def test_receiver_not_in_tokens_gets_nothing() -> None:
    paths = random_paths(2, 4, RADIUS, seed=9)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded")
        t0, _ = await prepare(w, paths, 1, owners, phones)
        eve_key = X25519KeyPair.generate()
        eve_bus = await stack.enter_async_context(w.client("eve"))
        eve = await stack.enter_async_context(
            ResultReceiver(eve_bus, "eve", eve_key, operator=w.operator.verify_key))
        status, _ = await process(w, paths, RADIUS, t0, owners, receiver="eve",
                                  receiver_key=eve_key.public_bytes, timeout=60)
        assert status["state"] == "failed" and "receiver-not-authorised" in status["reason"]
        # a cloud that skips its own check: the nodes refuse the forged spec themselves
        await _forge_inputs(w, owners, "forged-1", eve_key.public_bytes)
        for _ in range(100):
            if all("forged-1" in n.refused for n in w.nodes):
                break
            await asyncio.sleep(0.05)
        assert all("receiver-not-authorised" in n.refused["forged-1"] for n in w.nodes)
        await asyncio.sleep(0.3)
        assert eve._jobs == {} and eve.rejected == 0


async def _forge_inputs(w, bus, job: str, receiver_key: bytes) -> None:
    """Node inputs as a malicious cloud would send them (tokens from the owners, eve's key)."""
    phone = next(iter(w.phones.values()))
    tokens = [v for k, v in (await w.cloud.store.list_kv("process_tokens")).items()
              if k.startswith(phone.owner + "/")]
    token = msgpack.unpackb(tokens[0])["token"]
    spec = pw.job_spec(job, "eve", receiver_key, w.roster.digest,
                       [{"twin": phone.user, "owner_key": phone.owner_sig.verify_key.raw,
                         "role": "user", "count": 0}], [token])
    await pw.send_spec(bus, w.roster.node_ids, job, spec)


async def test_forged_token_is_refused() -> None:
    paths = random_paths(1, 3, RADIUS, seed=1)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded")
        await prepare(w, paths, 1, owners, phones)
        mallory = SigningKey.generate()
        phone = next(iter(w.phones.values()))
        forged = issue_process_token(mallory, "type:location", ["proximity"],
                                     [w.receiver_key.public_bytes], w.roster.node_keys,
                                     twins=[phone.user], valid_for_s=600)
        spec = pw.job_spec("forged-2", "health", w.receiver_key.public_bytes, w.roster.digest,
                           [{"twin": phone.user, "owner_key": phone.owner_sig.verify_key.raw,
                             "role": "user", "count": 0}], [forged.to_bytes()], points=3)
        await pw.send_spec(owners, w.roster.node_ids, "forged-2", spec)
        for _ in range(100):
            if all("forged-2" in n.refused for n in w.nodes):
                break
            await asyncio.sleep(0.05)
        assert all("no process token from this owner" in n.refused["forged-2"] for n in w.nodes)


async def test_node_dying_mid_job_fails_the_job_without_output() -> None:
    paths = random_paths(2, 4, RADIUS, seed=11)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded", rtt_ms=400, mpc_timeout_s=3,
                                         node_timeout_s=20)
        t0, _ = await prepare(w, paths, 1, owners, phones)
        killed = asyncio.Event()

        async def kill_on_round(topic: str, payload: bytes, retain: bool) -> None:
            env = decode(payload, "job_status")
            if env["by"] == "node2" and env["state"] == "computing" and env["round"] >= 2 \
                    and not killed.is_set():
                killed.set()
                asyncio.get_running_loop().create_task(w.node_tasks[2].aclose())

        await owners.subscribe(owners.topics.filter("job_status"), kill_on_round)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert killed.is_set()
        assert status["state"] == "failed" and result is None
        assert "node2" in status["reason"] or "node 2" in status["reason"]
        with pytest.raises(JobFailedError, match="node2|node 2"):  # not all three shares exist
            await w.receiver.result(status["job"], timeout=5)


async def test_phone_items_lost_on_the_way_are_resent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker may drop QoS 1 messages (a full subscriber queue): phones resend what the
    cloud has not acknowledged, and the job still sees every point."""
    import ciphertwin.demo.contact_tracing as ct

    monkeypatch.setattr(ct, "RESEND_AFTER_S", 0.5)
    paths = random_paths(2, 4, RADIUS, seed=11)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded")
        real, dropped = phones.publish, []

        async def lossy(topic: str, payload: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
            if "/data" in topic and len(dropped) < 2 and not dropped.count(payload):
                dropped.append(payload)  # "acknowledged" by nobody: lost on the way
                return None
            return await real(topic, payload, *args, **kwargs)

        monkeypatch.setattr(phones, "publish", lossy)
        t0, _ = await prepare(w, paths, 1, owners, phones)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
    assert len(dropped) == 2
    assert status["state"] == "done", status.get("reason")
    assert result.as_dict() == plaintext_reference(paths, RADIUS)


async def test_garbage_node_inputs_are_rejected_and_jobs_still_run() -> None:
    """Streamed node inputs: garbage bytes, a chunk naming another job than its topic, broken
    chunk numbering and a spec-less chunk 0 are logged and dropped; no node dies of them."""
    paths = random_paths(2, 4, RADIUS, seed=13)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, "embedded")
        t0, _ = await prepare(w, paths, 1, owners, phones)
        for node in w.roster.node_ids:
            topic = owners.topics.node_inputs(node, "junk-1")
            await owners.publish(topic, b"\xc1 not msgpack")
            await owners.publish(topic, encode("node_inputs", {
                "job": "junk-2", "chunk": 0, "chunks": 1, "items": []}))  # topic says junk-1
            await owners.publish(topic, encode("node_inputs", {
                "job": "junk-1", "chunk": 5, "chunks": 2, "items": []}))  # chunk out of range
            await owners.publish(topic, encode("node_inputs", {
                "job": "junk-1", "chunk": 0, "chunks": 2, "items": []}))  # no spec: never runs
        await asyncio.sleep(0.3)
        assert all("junk-1" not in n._running and "junk-2" not in n._running  # noqa: SLF001
                   for n in w.nodes)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
    assert status["state"] == "done", status.get("reason")
    assert result.as_dict() == plaintext_reference(paths, RADIUS)
