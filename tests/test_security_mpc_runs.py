"""Issue 8, holes 3, 5b and 9b: runs of one job id, token job budgets, whose `failed` counts.

* 3: PRF and channel keys are bound to a run digest of the three nodes' fresh nonces, and a
  node refuses a job id it has run before — also after a restart (its ledger).
* 5b: a process token admits at most ``max_jobs`` jobs per ``window_s``, counted by every node
  in its ledger (so a restart does not reset it).
* 9b: a running job is aborted only by a ``failed`` status signed by a node of its roster.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack, closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ciphertwin.bus.envelope import decode
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.demo.contact_tracing import (
    _params, job_inputs, plaintext_reference, prepare, process, random_paths, start_world,
)
from ciphertwin.agents.processing import JobFailedError, submit_job
from ciphertwin.mpc_nodes.errors import MpcValidationError, TamperedMessageError
from ciphertwin.mpc_nodes.ledger import NodeLedger
from ciphertwin.mpc_nodes.local_cluster import run_parties
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.prf import (
    CorrelatedRandomness, derive_job_key, new_run_nonce, run_digest,
)
from ciphertwin.mpc_nodes.protocols.arithmetic import mul
from ciphertwin.mpc_nodes.roster import NodeIdentity, Roster
from ciphertwin.mpc_nodes.service import ProcessingNode
from ciphertwin.mpc_nodes.shares import reconstruct, split_replicated
from ciphertwin.mpc_nodes.transport.framebus import MemoryFrameBus
from ciphertwin.mpc_nodes.transport.secure import SecureTransport
from ciphertwin.protocol.jobs import build_status

RADIUS = 5.0


def _nonces() -> list[bytes]:
    return [new_run_nonce() for _ in range(3)]


def _roster() -> tuple[list[NodeIdentity], Roster]:
    ids = [NodeIdentity.generate(i, f"r-node{i}") for i in range(3)]
    return ids, Roster([i.entry() for i in ids])


async def _transports(bus: MemoryFrameBus, runs: list[bytes | None], job: str = "job-run",
                      ids_roster: Any = None) -> list[SecureTransport]:
    ids, roster = ids_roster or _roster()
    return [await SecureTransport(job=job, identity=ids[i], roster=roster, bus=bus,
                                  timeout_s=2.0, chunk_bytes=1024, max_rounds=16,
                                  run=runs[i]).start() for i in range(3)]


async def _square(party: Party, s: Any) -> Any:
    return await mul(party, s, s)


VALUES = np.arange(-50, 50, dtype=np.int64)


# --- hole 3: run keys --------------------------------------------------------------------


def test_keys_of_two_runs_of_one_job_id_differ() -> None:
    """The replay attack's premise: the same job id twice must not give the same masks."""
    secret = bytes(range(32))
    run_a, run_b = run_digest(_nonces()), run_digest(_nonces())
    for purpose in (b"prf", b"chan/0>2"):
        assert (derive_job_key(secret, "job-7", purpose, run_a)
                != derive_job_key(secret, "job-7", purpose, run_b))
    a = CorrelatedRandomness(secret, secret[::-1], "job-7", run_a)
    b = CorrelatedRandomness(secret, secret[::-1], "job-7", run_b)
    assert not np.array_equal(a.zero_arith(0, 0, 64), b.zero_arith(0, 0, 64))
    # one node's fresh nonce alone changes the run (the other two replayed from the old run)
    n = _nonces()
    assert run_digest(n) != run_digest([n[0], n[1], new_run_nonce()])


def test_a_missing_or_malformed_nonce_gives_no_run_keys() -> None:
    n = _nonces()
    for bad in ([n[0], n[1]], [n[0], n[1], b""], [n[0], n[1], n[2][:31]], [n[0], n[1], None]):
        with pytest.raises(MpcValidationError):
            run_digest(bad)  # type: ignore[arg-type]
    with pytest.raises(MpcValidationError):
        derive_job_key(bytes(32), "job", b"prf", b"")


async def test_a_party_with_a_wrong_peer_nonce_cannot_talk() -> None:
    """Node 2 was fed another nonce for node 1 (e.g. a replayed ready status): no channel."""
    n = _nonces()
    good, wrong = run_digest(n), run_digest([n[0], new_run_nonce(), n[2]])
    runs = [good, good, wrong]
    bus = MemoryFrameBus()
    transports = await _transports(bus, runs)
    parties = [Party(i, "job-run", t, *t.secrets(), run=runs[i]) for i, t in enumerate(transports)]
    with pytest.raises(TamperedMessageError, match="failed authentication"):
        await run_parties(parties, _square, split_replicated(VALUES))


async def test_a_party_without_run_keys_cannot_send() -> None:
    bus = MemoryFrameBus()
    transports = await _transports(bus, [None, None, None])
    with pytest.raises(MpcValidationError, match="no run keys"):
        await transports[0].send(2, 0, b"x" * 8)


async def test_frames_before_the_run_keys_are_buffered_then_opened() -> None:
    """Peers that learnt the nonces first may send at once: nothing is lost or mis-opened."""
    run = run_digest(_nonces())
    bus = MemoryFrameBus()
    transports = await _transports(bus, [None, run, run])
    parties: list[Party | None] = [None] + [
        Party(i, "job-run", t, *t.secrets(), run=run) for i, t in enumerate(transports) if i]
    inputs = split_replicated(VALUES)
    late = asyncio.create_task(
        run_parties(parties[1:], _square, inputs[1:]))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)  # node 1 already sent its round-0 message to node 0
    assert transports[0]._early and not transports[0].rejected
    transports[0].set_run(run)
    first = Party(0, "job-run", transports[0], *transports[0].secrets(), run=run)
    outs = [await _square(first, inputs[0]), *await late]
    assert reconstruct(outs).tolist() == [(v * v) % 2**64 for v in VALUES.tolist()]


# --- end to end over a broker ------------------------------------------------------------


async def _world(stack: AsyncExitStack, **kw: Any) -> tuple[Any, Any, Any]:
    w = await start_world(stack, pool_workers=2, **kw)
    return w, await stack.enter_async_context(w.client("phones")), \
        await stack.enter_async_context(w.client("owners"))


async def _restart_nodes(w: Any) -> None:
    """Stop every node process and start it again: same keys, same ledger file."""
    for i, old in enumerate(list(w.nodes)):
        await w.node_tasks[i].aclose()
        ns = AsyncExitStack()
        await w.stack.enter_async_context(ns)
        bus = await ns.enter_async_context(w.client(f"node{i}-again"))
        ledger = ns.enter_context(closing(NodeLedger(old.ledger.path)))
        node = ProcessingNode(bus, old.identity, old.pre, operator=w.operator.verify_key,
                              executor=old.executor, mpc_timeout_s=old.mpc_timeout_s,
                              latency_s=old.latency_s, ledger=ledger)
        w.nodes[i] = await ns.enter_async_context(node)
        w.node_tasks[i] = ns
    for _ in range(200):
        if all(n.active for n in w.nodes):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("restarted nodes never saw the roster")


async def _refused_by_all(w: Any, job: str, timeout: float = 10.0) -> list[str]:
    for _ in range(int(timeout / 0.05)):
        if all(job in n.refused for n in w.nodes):
            break
        await asyncio.sleep(0.05)
    return [n.refused.get(job, "") for n in w.nodes]


async def test_a_replayed_job_id_is_refused_after_node_restart() -> None:
    """The cloud records a finished job's node inputs and replays them to restarted nodes."""
    paths = random_paths(2, 4, RADIUS, seed=21)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack)
        t0, _ = await prepare(w, paths, 1, owners, phones)
        recorded: list[tuple[str, bytes]] = []

        async def record(topic: str, payload: bytes, retain: bool) -> None:
            recorded.append((topic, bytes(payload)))

        await owners.subscribe(owners.topics.filter("node_inputs"), record)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert status["state"] == "done" and result is not None
        job = status["job"]
        mine = [(t, p) for t, p in recorded if decode(p, "node_inputs")["job"] == job]
        assert {decode(p, "node_inputs")["chunk"] for _, p in mine} >= {0}
        await _restart_nodes(w)
        assert all(job not in n.refused for n in w.nodes)  # fresh memory: only the ledger knows
        statuses: list[dict[str, Any]] = []

        async def on_status(topic: str, payload: bytes, retain: bool) -> None:
            env = decode(payload, "job_status")
            if env["job"] == job and env["by"] != "cloud":
                statuses.append(env.body)

        await owners.subscribe(owners.topics.job_status(job), on_status)
        for topic, payload in mine:  # the replay, byte for byte
            await owners.publish(topic, payload)
        reasons = await _refused_by_all(w, job)
        assert all("already ran this job id" in r for r in reasons), reasons
        await asyncio.sleep(0.3)
        assert not any(s["state"] == "computing" for s in statuses)  # no node derived keys


async def test_a_token_job_budget_is_enforced_across_node_restarts() -> None:
    """max_jobs=2 per hour: the third overlapping job is refused, also by restarted nodes."""
    paths = random_paths(2, 4, RADIUS, seed=23)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack)
        t0, _ = await prepare(w, paths, 1, owners, phones,
                              limits={"max_jobs": 2, "window_s": 3600})
        s1, _ = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert s1["state"] == "done", s1["reason"]
        await _restart_nodes(w)  # without a durable count, the budget would start again
        s2, _ = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert s2["state"] == "done", s2["reason"]
        s3, r3 = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert s3["state"] == "failed" and r3 is None
        assert "max_jobs=2" in s3["reason"] and "budget" in s3["reason"]
        reasons = await _refused_by_all(w, s3["job"])
        assert all("budget" in r or "aborted" in r for r in reasons), reasons
        assert any("max_jobs=2 per window_s=3600" in r for r in reasons)


def test_the_default_budget_applies_when_the_owner_set_none() -> None:
    from ciphertwin.mpc_nodes.ledger import DEFAULT_MAX_JOBS, DEFAULT_WINDOW_S, token_budget

    assert token_budget({}) == (DEFAULT_MAX_JOBS, DEFAULT_WINDOW_S) == (20, 86400)
    assert token_budget({"max_jobs": 3}) == (3, 86400)
    ledger = NodeLedger()
    ledger.charge("j1", [(b"t" * 16, 1e12)])
    assert ledger.uses(b"t" * 16, 3600) == 1 and ledger.uses(b"u" * 16, 3600) == 0
    ledger.charge("j2", [(b"t" * 16, 0.0)])  # an expired token's use is dropped next time
    ledger.charge("j3", [])
    assert ledger.uses(b"t" * 16, 0) == 1


async def _submit_and_inject(w: Any, owners: Any, paths: Any, t0: float,
                             inject: Any) -> tuple[str, asyncio.Task[Any]]:
    """Submit a job; call ``inject(job)`` once node 0 reports round >= 1 (the job is running)."""
    job = f"ct-inject-{np.random.randint(1 << 30)}"
    params = _params(RADIUS)
    result = asyncio.create_task(w.receiver.result(job, params, timeout=60))
    fired = asyncio.Event()

    async def on_status(topic: str, payload: bytes, retain: bool) -> None:
        env = decode(payload, "job_status")
        if env["by"] == "node0" and env["state"] == "computing" and env["round"] >= 1 \
                and not fired.is_set():
            fired.set()
            await inject(job)

    await owners.subscribe(owners.topics.job_status(job), on_status)
    await submit_job(owners, job, "contact_tracing", params, job_inputs(w, paths), "health",
                     w.receiver_key.public_bytes, paths.points, t0 - 1, t0 + 86400)
    await asyncio.wait_for(fired.wait(), 60)
    return job, result


async def test_unsigned_or_forged_failed_statuses_do_not_abort_a_running_job() -> None:
    """The broker, the cloud or a node principal outside the roster shouts `failed`."""
    paths = random_paths(2, 4, RADIUS, seed=25)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, rtt_ms=400)
        t0, _ = await prepare(w, paths, 1, owners, phones)
        rogue = NodeIdentity.generate(0, "node9")  # a node principal not in the roster

        async def inject(job: str) -> None:
            topic = owners.topics.job_status(job)
            for payload in (
                build_status(job, "failed", "cloud", reason="unsigned cloud"),
                build_status(job, "failed", "node1", reason="unsigned node1"),
                build_status(job, "failed", "node1", reason="forged", signer=rogue.signing),
                build_status(job, "failed", "node9", reason="rogue", signer=rogue.signing),
            ):
                await owners.publish(topic, payload)

        job, result = await _submit_and_inject(w, owners, paths, t0, inject)
        got = await result
        assert got.as_dict() == plaintext_reference(paths, RADIUS)
        assert all(job not in n.refused for n in w.nodes)
        for _ in range(100):
            if await w.cloud.store.get_kv("jobs", job) == b"done":
                break
            await asyncio.sleep(0.05)
        assert await w.cloud.store.get_kv("jobs", job) == b"done"


async def test_a_signed_failed_status_of_a_roster_node_aborts_the_job() -> None:
    paths = random_paths(2, 4, RADIUS, seed=27)
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack, rtt_ms=400, mpc_timeout_s=3, node_timeout_s=20)
        t0, _ = await prepare(w, paths, 1, owners, phones)

        async def inject(job: str) -> None:
            await owners.publish(owners.topics.job_status(job), build_status(
                job, "failed", "node1", reason="node1 gives up",
                signer=w.nodes[1].identity.signing))

        job, result = await _submit_and_inject(w, owners, paths, t0, inject)
        reasons = await _refused_by_all(w, job, 20.0)
        assert reasons[0] == reasons[2] == "aborted: node1 gives up"
        for _ in range(200):
            if await w.cloud.store.get_kv("jobs", job) == b"failed":
                break
            await asyncio.sleep(0.05)
        assert await w.cloud.store.get_kv("jobs", job) == b"failed"
        with pytest.raises(JobFailedError, match="node1 gives up"):  # no three shares exist
            await result


async def test_the_cloud_ignores_statuses_of_nodes_outside_the_job_roster() -> None:
    """The roster is swapped mid-job: the new roster's nodes cannot fail the old roster's job."""
    from ciphertwin.cloud_twin.jobs import _Tracking
    from ciphertwin.crypto.kpcpre import PreKeyPair
    from ciphertwin.protocol.jobs import build_roster

    async with AsyncExitStack() as stack:
        w, _, owners = await _world(stack)
        jm, job = w.cloud.jobs, "ct-swapped"
        jm._tracking[job] = track = _Tracking(jm.roster)  # a job in flight on roster v1
        swapped = [NodeIdentity.generate(i, f"node{i}") for i in range(3)]  # same ids, new keys
        await owners.publish(owners.topics.config_nodes(), build_roster(
            w.operator, [n.entry() for n in swapped], [PreKeyPair.generate().public for _ in range(3)], 2),
            retain=True)
        for _ in range(100):
            if jm.roster.version == 2:
                break
            await asyncio.sleep(0.02)
        assert jm.roster.version == 2
        topic = owners.topics.job_status(job)
        await owners.publish(topic, build_status(job, "failed", "node1", reason="swapped in",
                                                 signer=swapped[1].signing))
        await asyncio.sleep(0.2)
        await owners.publish(topic, build_status(job, "delivered", "node0",
                                                 signer=w.nodes[0].identity.signing))
        for _ in range(100):
            if track.states:
                break
            await asyncio.sleep(0.02)
        assert track.states == {0: "delivered"} and track.failure is None


def test_owner_cli_sets_the_job_budget() -> None:
    import argparse

    from ciphertwin.agents.processing_cli import _budget, add_owner_commands

    parser = argparse.ArgumentParser()
    add_owner_commands(parser.add_subparsers())
    args = parser.parse_args(["grant-processing", "--name", "o", "--twins", "t", "--subset",
                              "type:location", "--receiver-key", "k", "--max-jobs", "3",
                              "--job-window", "2"])
    assert _budget(args) == {"max_jobs": 3, "window_s": 7200}
    args = parser.parse_args(["grant-processing", "--name", "o", "--twins", "t", "--subset",
                              "type:location", "--receiver-key", "k"])
    assert _budget(args) == {}  # the nodes' default budget applies


def test_a_damaged_ledger_or_roster_state_stops_the_node_with_a_clear_reason(tmp_path: Path) -> None:
    """Garbage in a node's state files is a refusal naming the file, not a traceback — and
    never a silent fresh start, which would forget the job ids and budgets it guards."""
    from ciphertwin.errors import ValidationError
    from ciphertwin.mpc_nodes.ledger import NodeLedger
    from ciphertwin.protocol.roster_trust import RosterHistory

    ledger = tmp_path / "node-ledger.db"
    ledger.write_bytes(b"this is not an SQLite database, just some bytes " * 100)
    with pytest.raises(ValidationError, match="not a usable node ledger"):
        NodeLedger(ledger)
    state = tmp_path / "roster-history.json"
    state.write_text("{not json")
    state.chmod(0o600)
    with pytest.raises(ValidationError, match="roster state"):
        RosterHistory(SigningKey.generate().verify_key, state)


def test_retained_results_are_remembered_across_restarts_until_cleared(tmp_path) -> None:
    """A node leaves each output share retained for its receiver; the ledger keeps the topic
    so the share is cleared once old, also by a restarted node."""
    path = tmp_path / "node-ledger.db"
    ledger = NodeLedger(path)
    ledger.record_result("j1", "ct/v1/receivers/r/results/j1/node0")
    time.sleep(0.01)
    cut = time.time()
    ledger.record_result("j2", "ct/v1/receivers/r/results/j2/node0")
    ledger.close()
    again = NodeLedger(path)
    assert again.results_before(cut) == [("j1", "ct/v1/receivers/r/results/j1/node0")]
    assert [j for j, _ in again.results_before(time.time() + 1)] == ["j1", "j2"]
    again.forget_result("j1")
    assert [j for j, _ in again.results_before(time.time() + 1)] == ["j2"]
    again.close()
