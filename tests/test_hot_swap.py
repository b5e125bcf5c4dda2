"""Hot swap of a processing node (design M4) over a real broker.

Every job is pinned to the roster it was checked against — at the nodes, the cloud and the
receiver — for its whole life. A new roster replacing one of that roster's nodes ends the job
at once with a reason that says so (not "node(s) silent" a minute later); tokens issued for
the old roster fail with a reason that says so; results of jobs that finished before a swap
still verify (against the pinned roster); re-granting and resubmitting works. A roster not
signed by the operator, and statuses of nodes outside the job's roster, change nothing.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import numpy as np
import pytest

import processing_world as pw
from ciphertwin.agents.processing import JobFailedError, follow_status
from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin import jobs as cloud_jobs
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.mpc_nodes.output import OutputShare, seal_output
from ciphertwin.protocol.jobs import build_result, build_roster, build_status, pack_params

SWAPPED = "node roster changed to version 2 during the job: index 1 node1 -> node1b"
EXPECTED = {"ua": 5, "ub": 0, "uc": 3}


def data(t0: float) -> dict[str, list]:
    """ua walks with the reference (5 epochs in contact), ub far away, uc 3 readings close."""
    return {"ua": pw.walk(t0, 5, 100, 100), "ub": pw.walk(t0, 5, 3000, 100),
            "uc": pw.walk(t0, 3, 101, 101), "ref": pw.walk(t0, 5, 102, 100)}


async def _setup(stack: AsyncExitStack, **kw) -> tuple[pw.Env, list]:
    env = await pw.setup(stack, data(pw.day_start()), **kw)
    return env, pw.ct_inputs(env, ["ua", "ub", "uc"], "ref")


async def _swap(stack: AsyncExitStack, env: pw.Env) -> pw.Spare:
    """Operator publishes roster v2 with node1 replaced by node1b; returns the spare."""
    w = env.w
    spare = await pw.spare_node(stack, w, 1, "node1b")
    await pw.publish_roster(w, env.bus, pw.roster_with(w, w.receiver.roster, spare, 2))
    return spare


async def _swapped_everywhere(env: pw.Env, spare: pw.Spare) -> None:
    w = env.w
    await pw.until(lambda: w.cloud.jobs.roster.version == 2 and w.receiver.roster.version == 2
                   and spare.node.active and all(n.roster.version == 2 for n in w.nodes),
                   what="roster v2 everywhere")


async def _rerun_after_regrant(env: pw.Env, inputs: list) -> None:
    await pw.permit(env, list(EXPECTED) + ["ref"], roster=env.w.receiver.roster)
    status, result = await pw.run(env, inputs)
    assert status["state"] == "done", status["reason"]
    assert result.as_dict() == EXPECTED


async def test_swap_between_jobs_old_tokens_say_so_old_results_verify_regrant_works() -> None:
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        w = env.w
        status, result = await pw.run(env, inputs)
        assert status["state"] == "done", status["reason"]
        assert result.as_dict() == EXPECTED
        first = status["job"]

        spare = await _swap(stack, env)
        await _swapped_everywhere(env, spare)
        # the owners' tokens name roster v1: refused with a reason that says so
        status, _ = await pw.run(env, inputs)
        assert status["state"] == "failed"
        assert "token was issued for another node roster" in status["reason"], status["reason"]
        assert "function-class" not in status["reason"]
        # the job that ran on v1 still opens: its shares name the v1 roster, which the
        # receiver accepted before (kept by digest)
        again = await w.receiver.result(first, {"radius": 80}, timeout=10)
        assert again.as_dict() == EXPECTED
        # a cloud skipping its check: the v2 nodes refuse the old tokens with the same reason
        twins = [{"twin": t, "owner_key": w.phones[t].owner_sig.verify_key.raw, "count": 0,
                  "role": "reference" if t == "ref" else "user"} for t in (*EXPECTED, "ref")]
        spec = pw.job_spec("old-tokens", "health", w.receiver_key.public_bytes,
                           w.receiver.roster.digest, twins,
                           [env.tokens[t["twin"]].to_bytes() for t in twins])
        await pw.send_spec(env.bus, w.receiver.roster.node_ids, "old-tokens", spec)
        live = [w.nodes[0], spare.node, w.nodes[2]]
        await pw.until(lambda: all("old-tokens" in n.refused for n in live), what="refusals")
        assert all("token was issued for another node roster" in n.refused["old-tokens"]
                   for n in live), [n.refused["old-tokens"] for n in live]
        await _rerun_after_regrant(env, inputs)
        assert all(n.refused == {} or first not in n.refused for n in w.nodes)


async def test_swap_during_reencryption_ends_the_job_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud_jobs, "CHUNK_ITEMS", 5)  # one twin per batch: several batches
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack)
        w = env.w
        real, calls = w.cloud.pool.reencrypt, []
        second_batch, gate = asyncio.Event(), asyncio.Event()

        async def held(work):  # the second batch's re-encryption waits for the gate
            calls.append(len(work))
            if len(calls) == 2:
                second_batch.set()
                await gate.wait()
            return await real(work)

        w.cloud.pool.reencrypt = held  # type: ignore[method-assign]
        try:
            job = await pw.submit(env, inputs)
            await asyncio.wait_for(second_batch.wait(), 30)
            t = time.monotonic()
            spare = await _swap(stack, env)
            status = await follow_status(env.bus, job, timeout=30)
            took = time.monotonic() - t
        finally:
            gate.set()
        assert status["state"] == "failed" and SWAPPED in status["reason"], status["reason"]
        assert status["reason"].endswith("re-grant processing and resubmit")
        assert took < 10, f"took {took:.1f} s: the cloud must not wait for the stalled batch"
        await pw.until(lambda: all(job in n.refused for n in w.nodes), what="nodes ended it")
        assert all(SWAPPED in n.refused[job] or "aborted" in n.refused[job] for n in w.nodes)
        with pytest.raises(JobFailedError, match="node roster changed"):
            await w.receiver.result(job, timeout=10)
        await _swapped_everywhere(env, spare)
        await _rerun_after_regrant(env, inputs)


async def test_swap_mid_round_ends_the_job_at_once_then_a_regranted_rerun_succeeds() -> None:
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack, rtt_ms=300)  # rounds slow enough to land mid-job
        w = env.w
        swapped: list[float] = []
        spares: list[asyncio.Task[pw.Spare]] = []

        async def swap_at_round_2(topic: str, payload: bytes, retain: bool) -> None:
            env_ = decode(payload, "job_status")
            if env_["by"] == "node2" and env_["state"] == "computing" and env_["round"] >= 2 \
                    and not swapped:
                swapped.append(time.monotonic())
                spares.append(asyncio.get_running_loop().create_task(_swap(stack, env)))

        watcher = await stack.enter_async_context(w.client("watcher"))
        await watcher.subscribe(watcher.topics.filter("job_status"), swap_at_round_2)
        job = await pw.submit(env, inputs)
        status = await follow_status(env.bus, job, timeout=60)
        assert swapped, "the job never reached round 2"
        took = time.monotonic() - swapped[0]
        assert status["state"] == "failed" and SWAPPED in status["reason"], status["reason"]
        assert took < 10, f"{took:.1f} s: ended by timeout rather than by the swap"
        await pw.until(lambda: all(job in n.refused for n in w.nodes), what="nodes ended it")
        assert any(SWAPPED in n.refused[job] for n in w.nodes)
        with pytest.raises(JobFailedError):
            await w.receiver.result(job, timeout=10)
        await watcher.unsubscribe(watcher.topics.filter("job_status"))
        await _swapped_everywhere(env, await spares[0])
        await _rerun_after_regrant(env, inputs)


async def test_forged_roster_and_foreign_statuses_neither_abort_nor_hijack_a_job() -> None:
    """A roster signed by another key, a 'failed' from a node outside the job's roster, a
    'failed', a ready report and a result share under a roster node's name but another key:
    all ignored (on an open broker; with ACLs a node may not even publish under another
    node's result topic)."""
    async with AsyncExitStack() as stack:
        env, inputs = await _setup(stack, rtt_ms=200)
        w = env.w
        mallory = SigningKey.generate()
        evil = NodeIdentity.generate(1, "node1b")
        pres = list(w.receiver.roster.pre_keys)
        forged_roster = build_roster(mallory, [evil.entry() if e.index == 1 else e
                                               for e in w.receiver.roster.roster.entries],
                                     pres, version=2)
        attacked: list[str] = []

        async def attack(topic: str, payload: bytes, retain: bool) -> None:
            st = decode(payload, "job_status")
            if st["by"] != "node0" or st["state"] != "computing" or st["round"] < 1 or attacked:
                return
            attacked.append(st["job"])
            job = st["job"]
            t = env.bus.topics.job_status(job)
            await env.bus.publish(env.bus.topics.config_nodes(), forged_roster, retain=True)
            for by, key in (("node1b", evil.signing), ("node1", evil.signing)):
                await env.bus.publish(t, build_status(job, "failed", by, reason="stop",
                                                      signer=key))
            await env.bus.publish(t, build_status(job, "computing", "node1", round_=0,
                                                  nonce=bytes(32), signer=evil.signing))
            # and a share of its own for the receiver, under its name and under node1's
            blob = seal_output(OutputShare(job, "contact_tracing", 1, np.zeros(3, np.uint64)),
                               w.receiver_key.public_bytes)
            for name in ("node1b", "node1"):
                await env.bus.publish(env.bus.topics.results("health", job, name), build_result(
                    job, "contact_tracing", 1, name, list(EXPECTED), blob, evil.signing,
                    roster=w.receiver.roster.digest, params=pack_params({"radius": 80})), retain=True)

        watcher = await stack.enter_async_context(w.client("watcher"))
        await watcher.subscribe(watcher.topics.filter("job_status"), attack)
        status, result = await pw.run(env, inputs)
        assert attacked, "the attack never ran"
        assert status["state"] == "done", status["reason"]
        assert result.as_dict() == EXPECTED
        assert w.cloud.jobs.roster.version == 1 and all(n.roster.version == 1 for n in w.nodes)
        assert w.receiver.roster.version == 1
        assert w.receiver.rejected >= 1  # (node1's own retained share replaced the other one)
