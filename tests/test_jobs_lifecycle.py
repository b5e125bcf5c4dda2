"""A job's life over a real broker: checks at submission, retained results, waiting by
progress, one-line timeouts, and the nodes' agreement on the input layout."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

import processing_world as pw
from ciphertwin.agents.processing import (
    JobFailedError, ProcessingTimeout, ResultReceiver, follow_status, submit_job,
)
from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin import jobs as cloud_jobs
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.items import decode_item
from ciphertwin.protocol.job_epochs import FieldEncoding
from ciphertwin.protocol.jobs import build_job

EXPECTED = {"ua": 4, "ub": 0}


def data(t0: float) -> dict[str, list]:
    return {"ua": pw.walk(t0, 4, 100, 100), "ub": pw.walk(t0, 4, 3000, 100),
            "ref": pw.walk(t0, 4, 101, 100)}


async def _setup(stack: AsyncExitStack, **kw: Any) -> tuple[pw.Env, list]:
    env = await pw.setup(stack, data(pw.day_start()), **kw)
    return env, pw.ct_inputs(env, ["ua", "ub"], "ref")


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def test_receiver_started_after_the_job_gets_the_retained_result(broker: str) -> None:
    """`receiver results --job J` works whenever it starts: the shares are retained, and a
    receiver that never saw the job run checks them against the roster they name."""
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack, broker=broker)
        w = env.w
        job = await pw.submit(env, inputs)
        status = await follow_status(env.bus, job, timeout=60)
        assert status["state"] == "done", status["reason"]
        for _ in range(2):  # a later receiver, and another one after it: still there
            bus = await stack.enter_async_context(w.client("late"))
            late = await stack.enter_async_context(ResultReceiver(
                bus, "health", w.receiver_key, operator=w.operator.verify_key,
                roster_state=w.tmp / f"late-{bus.client_id}.json"))
            assert (await late.result(job, {"radius": 80}, timeout=10)).as_dict() == EXPECTED
        # the nodes clear what they retained once it is old: then it is gone for good
        for node in w.nodes:
            assert await node.clear_results(time.time() + 1) == 1
        bus = await stack.enter_async_context(w.client("later"))
        later = await stack.enter_async_context(ResultReceiver(
            bus, "health", w.receiver_key, operator=w.operator.verify_key))
        with pytest.raises(ProcessingTimeout, match=f"job {job}: no result share from node"):
            await later.result(job, timeout=1.0)


async def test_submitter_that_is_the_receiver_on_one_connection() -> None:
    """Submit, follow the status and collect the result on one bus, at the same time or one
    after the other: no clash of subscriptions, no timeout."""
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        w = env.w
        me = await stack.enter_async_context(w.client("health"))
        rx = await stack.enter_async_context(ResultReceiver(
            me, "health", w.receiver_key, operator=w.operator.verify_key))
        await pw.until(lambda: rx.roster is not None, what="roster at the receiver")
        for concurrently in (True, False):
            job = pw.unique("self-")
            await submit_job(me, job, "contact_tracing", {"radius": 80}, inputs, "health",
                             w.receiver_key.public_bytes, 50, env.t0, env.t0 + 86400,
                             fields=env.fields)
            if concurrently:
                status, result = await asyncio.gather(follow_status(me, job, timeout=60),
                                                      rx.result(job, {"radius": 80}, timeout=60))
            else:
                status = await follow_status(me, job, timeout=60)
                result = await rx.result(job, {"radius": 80}, timeout=60)
            assert status["state"] == "done" and result.as_dict() == EXPECTED


async def test_timeouts_are_one_line_errors_and_failures_say_why() -> None:
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        w = env.w
        with pytest.raises(ProcessingTimeout) as waited:
            await follow_status(env.bus, "no-such-job", timeout=0.5)
        assert "\n" not in str(waited.value) and "no status for 0 s" not in str(waited.value)
        assert "job no-such-job: no status" in str(waited.value)
        with pytest.raises(ProcessingTimeout) as waited:
            await w.receiver.result("no-such-job", timeout=0.5)
        assert "\n" not in str(waited.value) and "is the job id right?" in str(waited.value)
        # a job the cloud refuses: the receiver hears why at once, not after its timeout
        bad = {"x": FieldEncoding("m", 4, -1e6, 1e6), "y": FieldEncoding("m", 4, -1e6, 1e6)}
        job = pw.unique("bad-")
        await env.bus.publish(env.bus.topics.job_submit(), build_job(
            job, "contact_tracing", {"radius": 80, "coord_bits": 20}, inputs, "health",
            w.receiver_key.public_bytes, 50, env.t0, env.t0 + 86400, fields=bad))
        t = time.monotonic()
        with pytest.raises(JobFailedError, match="job refused: .*coord_bits") as failed:
            await w.receiver.result(job, timeout=30)
        assert time.monotonic() - t < 10 and "\n" not in str(failed.value)


@pytest.mark.parametrize("fields, since_until, params, reason", [
    ({"x": FieldEncoding("m", 4, -1e6, 1e6), "y": FieldEncoding("m", 4, -1e6, 1e6)}, None,
     {"radius": 80, "coord_bits": 20}, "coord_bits"),
    ({"x": FieldEncoding("m", 4, -5e4, 5e4)}, None, {"radius": 80}, "fields x and y"),
    ({"x": FieldEncoding("m", 4, -5e4, 5e4), "y": FieldEncoding("km", 4, -5e4, 5e4)}, None,
     {"radius": 80}, "unit"),
    (None, (0.0, 4102444800.0), {"radius": 80}, "epochs"),
    (None, None, {"radius": 80, "epoch_bits": 16}, "epoch_bits"),
])
async def test_cloud_refuses_bad_jobs_with_the_reason(fields, since_until, params, reason) -> None:
    """What submit_job refuses locally, the cloud refuses too (a client may skip the check)."""
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        since, until = since_until or (env.t0, env.t0 + 86400)
        with pytest.raises(ValidationError, match=reason):
            await submit_job(env.bus, "local", "contact_tracing", params, inputs, "health",
                             env.w.receiver_key.public_bytes, 50, since, until,
                             fields=fields or env.fields)
        job = pw.unique("refused-")
        await env.bus.publish(env.bus.topics.job_submit(), build_job(
            job, "contact_tracing", params, inputs, "health", env.w.receiver_key.public_bytes,
            50, since, until, fields=fields or env.fields))
        status = await follow_status(env.bus, job, timeout=10)
        assert status["state"] == "failed" and reason in status["reason"], status["reason"]
        assert status["reason"].startswith("job refused: ")


async def test_long_opening_is_progress_not_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening and streaming that take several times every timeout still finish: nodes report
    opening progress, the cloud's, the peers', the submitter's and the receiver's silence
    counts from the last report, and a node's input timeout from the last chunk that arrived
    — not from the start."""
    monkeypatch.setattr(cloud_jobs, "CHUNK_ITEMS", 4)  # one twin per batch: 3 batches
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack, node_timeout_s=3, mpc_timeout_s=3)
        w = env.w
        for n in w.nodes:
            n.input_timeout_s = 3
        real_pool = w.cloud.pool.reencrypt

        async def slow_pool(work):  # 3 batches x 1.2 s of streaming > 3 s
            await asyncio.sleep(1.2)
            return await real_pool(work)

        w.cloud.pool.reencrypt = slow_pool  # type: ignore[method-assign]
        slow = w.nodes[2]
        real_open, lock = slow._open, asyncio.Lock()

        async def slow_open(*args):  # node 2 opens one chunk at a time, 2 s each: the
            async with lock:            # others wait ~3.5 s for it, longer than mpc_timeout_s
                await asyncio.sleep(2.0)
                return await real_open(*args)

        monkeypatch.setattr(slow, "_open", slow_open)
        seen: list[tuple[str, float]] = []

        async def note(topic: str, payload: bytes, retain: bool) -> None:
            st = decode(payload, "job_status")
            if st["by"] == "node2" and st["state"] == "opening":
                seen.append((st["state"], st["progress"]))

        spy = await stack.enter_async_context(w.client("spy"))
        await spy.subscribe(spy.topics.filter("job_status"), note)
        t = time.monotonic()
        job = await pw.submit(env, inputs)
        # the submitter and the receiver wait by progress too: 3 s of silence at most
        status, result = await asyncio.gather(
            follow_status(env.bus, job, timeout=3), w.receiver.result(job, {"radius": 80}, timeout=3))
        assert status["state"] == "done", status["reason"]
        assert result.as_dict() == EXPECTED
        assert time.monotonic() - t > 6.0  # twice any timeout: it really was slow
        progress = [p for _, p in seen]
        assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] == 1.0


async def test_nodes_refuse_to_compute_on_different_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cloud that gives the nodes different (genuine) readings of a twin with equal counts:
    their layouts differ, and they refuse before computing anything."""
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        w = env.w
        jobs = w.cloud.jobs
        real_plan, real_prepare = jobs._plan, jobs._prepare

        async def plan(*args):  # the spec claims one reading less for twin ua
            p = await real_plan(*args)
            p.counts["ua"] -= 1
            return p

        async def prepare(*args):  # node 1 misses ua's first reading, nodes 0, 2 its last
            per_node = await real_prepare(*args)
            for i, entries in enumerate(per_node):
                ua = sorted((decode_item(e["item"])["time"], k) for k, e in enumerate(entries)
                            if decode_item(e["item"])["twin"] == "ua")
                if ua:
                    drop = ua[0][1] if i == 1 else ua[-1][1]
                    del entries[drop]
            return per_node

        monkeypatch.setattr(jobs, "_plan", plan)
        monkeypatch.setattr(jobs, "_prepare", prepare)
        status, result = await pw.run(env, inputs)
        assert status["state"] == "failed" and result is None
        assert "nodes disagree on the input layout" in status["reason"], status["reason"]
        await pw.until(lambda: all(status["job"] in n.refused for n in w.nodes))


async def test_twins_the_cloud_has_not_seen_and_twins_of_others() -> None:
    """A twin that never uploaded is admitted only when its owner's signed token lists it (it
    then adds no readings); another owner's twin, or an unlisted unknown one, is refused."""
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        owner_a, owner_b = env.w.phones["ua"].owner, env.w.phones["ub"].owner
        ref = inputs[-1]
        # someone else's twin under owner_a's name: refused by the cloud, with the reason
        status, _ = await pw.run(env, [(owner_a, "ub", "user"), ref])
        assert status["state"] == "failed" and f"twin ub is not a twin of {owner_a}" in status["reason"]
        # a twin nobody uploaded to, not in owner_a's token: refused
        status, _ = await pw.run(env, [(owner_a, "ua", "user"), (owner_a, "ghost", "user"), ref])
        assert status["state"] == "failed" and "does not cover" in status["reason"], status["reason"]
        # owner_b's token lists its twin, which has readings; a job with it alone still runs
        status, result = await pw.run(env, [(owner_b, "ub", "user"), ref])
        assert status["state"] == "done" and result.as_dict() == {"ub": 0}
