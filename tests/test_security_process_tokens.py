"""Attacks on processing (issue 8, holes 2, 5a and 8), each performed and refused.

* the cloud forges node inputs (a fresh capsule under the owner's public PRE key, re-encrypted
  with the node re-key it stores, any reading, a genuine write token) or alters a genuine
  item's time — nodes check every item's device signature;
* a receiver pads a job with many twins of one owner (its own) around one victim —
  ``min_owners`` / ``min_twins`` counts distinct other owners;
* a job names a twin of the owner its token does not list; a revoked token is used (the cloud
  and, with a cloud ignoring the revocation, the nodes refuse); a forged revocation is ignored.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import pytest

import processing_world as pw
from ciphertwin.agents.processing import ControlRefused, _control, revoke_processing
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy
from ciphertwin.crypto.kpcpre import Capsule, ReKey, reencrypt
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import ProcessToken, issue_process_token
from ciphertwin.demo.contact_tracing import prepare, process, random_paths, start_world
from ciphertwin.mpc_nodes.service import ProcessingNode
from ciphertwin.protocol.control import build_control
from ciphertwin.protocol.items import DeviceCredentials, build_item, decode_item

RADIUS = 5.0
PARAMS = {"radius": 80, "coord_bits": 24}
Entry = dict[str, bytes]


async def _world(stack: AsyncExitStack, users: int = 2, limits: dict[str, int] | None = None
                 ) -> tuple[Any, Any, Any, float]:
    w = await start_world(stack, pool_workers=2)
    phones = await stack.enter_async_context(w.client("phones"))
    owners = await stack.enter_async_context(w.client("owners"))
    paths = random_paths(users, 4, RADIUS, seed=21)
    t0, _ = await prepare(w, paths, 1, owners, phones, limits=limits)
    return w, owners, paths, t0


async def _wait(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _tamper_inputs(w: Any, change: Callable[[Any, int, Entry], Entry]) -> None:
    """Act as a cloud that rewrites the first input entry of every node before sending it."""
    real = w.cloud.jobs._prepare

    async def tampering(env: Any, plan: Any, twins: Any) -> list[list[Entry]]:
        out = await real(env, plan, twins)
        for i, entries in enumerate(out):
            if entries:
                entries[0] = change(w, i, entries[0])
        return out

    w.cloud.jobs._prepare = tampering


def _forged_entry(w: Any, index: int, genuine: Entry) -> Entry:
    """What the cloud can make alone: a fresh capsule under the owner's public PRE key,
    re-encrypted with node ``index``'s stored re-key, a reading of its choice sealed under
    the data key it now knows, the genuine write token copied from the stored item, and a
    signature by a key of its own (it has no device key)."""
    item = decode_item(genuine["item"])
    owner = w.cloud.trust.owner_of_twin(item["twin"])
    keys = DataKeyManager(owner.pre_pk, KeyEpochPolicy("day"))
    reading = {"type": "location", "time": item["time"], "share": index,
               "frac": {"x": 4, "y": 4}, "values": {"x": 7, "y": 7, "epoch": 600}}
    creds = DeviceCredentials(item["twin"], item["device"], SigningKey.generate(), item["token"])
    forged = build_item(creds, keys, item["seq"], reading, tuple(item["attrs"]))
    grant = w.cloud.grants.of_receiver(w.roster.node_ids[index], item["twin"])[0]
    capsule = Capsule.from_bytes(decode_item(forged)["capsule"])
    key = reencrypt(ReKey.from_bytes(grant.grant.rekey), capsule).to_bytes()
    return {"item": forged, "key": key}


def _retimed_entry(w: Any, index: int, genuine: Entry) -> Entry:
    """A genuine item whose time (which orders the points) the cloud moved by a minute."""
    body = dict(decode_item(genuine["item"]).body)
    body["time"] = body["time"] + 60.0
    return {"item": encode("item", body), "key": genuine["key"]}


async def _assert_refused_by_nodes(w: Any, status: Any, result: Any, reason: str) -> None:
    assert status["state"] == "failed" and result is None
    assert reason in status["reason"], status["reason"]
    job = status["job"]
    await _wait(lambda: all(job in n.refused for n in w.nodes), "every node to give up")
    assert all(reason in n.refused[job] or "aborted" in n.refused[job] for n in w.nodes)
    assert w.receiver._jobs.get(job) is None or not w.receiver._jobs[job].shares


async def _run_with_tampered_inputs(change: Callable[[Any, int, Entry], Entry]) -> None:
    """A job whose first input per node the cloud replaced: every node refuses it."""
    async with AsyncExitStack() as stack:
        w, owners, paths, t0 = await _world(stack)
        _tamper_inputs(w, change)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
        await _assert_refused_by_nodes(w, status, result, "SignatureInvalid")


async def test_cloud_forged_node_input_is_refused() -> None:
    await _run_with_tampered_inputs(_forged_entry)


async def test_item_time_altered_by_the_cloud_is_refused() -> None:
    await _run_with_tampered_inputs(_retimed_entry)


# --- job specs sent straight to the nodes (a cloud that skips its own checks) ---------------


async def _stored_token(w: Any, owner: str) -> bytes:
    entries = [v for k, v in (await w.cloud.store.list_kv("process_tokens")).items()
               if k.startswith(owner + "/")]
    return msgpack.unpackb(entries[0])["token"]


async def _send_spec(w: Any, bus: Any, job: str, twins: list[tuple[str, bytes, str]],
                     tokens: list[bytes]) -> None:
    """Chunk 0 (the spec, no items) of ``job`` to every node, as the cloud would send it."""
    spec = pw.job_spec(job, "health", w.receiver_key.public_bytes, w.roster.digest,
                       [{"twin": t, "owner_key": k, "role": r, "count": 0} for t, k, r in twins],
                       tokens, params=PARAMS)
    await pw.send_spec(bus, w.roster.node_ids, job, spec)


async def _refusals(w: Any, job: str) -> list[str]:
    await _wait(lambda: all(job in n.refused for n in w.nodes), f"the nodes to refuse {job}")
    return [n.refused[job] for n in w.nodes]


async def test_job_padded_with_one_owners_twins_around_a_victim_is_refused() -> None:
    """The receiver also owns twins: it pads a job with three of its own around one victim
    whose token asks for at least two other owners (old count: 4 twins, passed)."""
    async with AsyncExitStack() as stack:
        w, owners, paths, _ = await _world(stack, users=2, limits={"min_twins": 2})
        victim, mine = (w.phones[u] for u in sorted(paths.users))
        my_twins = [mine.user, f"{mine.user}-b", f"{mine.user}-c"]
        my_token = issue_process_token(
            mine.owner_sig, "type:location", ["proximity"], [w.receiver_key.public_bytes],
            w.roster.node_keys, twins=[*my_twins, "ref-path"], valid_for_s=600)
        vk, mk = victim.owner_sig.verify_key.raw, mine.owner_sig.verify_key.raw
        await _send_spec(w, owners, "padded-1",
                         [(victim.user, vk, "user")] + [(t, mk, "user") for t in my_twins]
                         + [("ref-path", mk, "reference")],
                         [await _stored_token(w, victim.owner), my_token.to_bytes()])
        refused = await _refusals(w, "padded-1")
        assert all("fewer than min_twins=2 other owners" in r for r in refused), refused
        token = ProcessToken.from_bytes(await _stored_token(w, victim.owner))
    # positive control: two other owners (whatever their twin counts) satisfy the limit
    ProcessingNode._check_limits({"points": 4, "twins": [
        {"twin": victim.user, "owner_key": vk, "count": 4},
        {"twin": mine.user, "owner_key": mk, "count": 4},
        {"twin": "x", "owner_key": os.urandom(32), "count": 4}]}, vk, token)


async def test_job_naming_a_twin_outside_the_token_is_refused_by_the_nodes() -> None:
    async with AsyncExitStack() as stack:
        w, owners, paths, _ = await _world(stack)
        phone = w.phones[sorted(paths.users)[0]]
        key = phone.owner_sig.verify_key.raw
        ref = w.phones["ref-path"]
        await _send_spec(w, owners, "outside-1",
                         [(phone.user, key, "user"), ("another-twin-of-hers", key, "user"),
                          ("ref-path", ref.owner_sig.verify_key.raw, "reference")],
                         [await _stored_token(w, phone.owner), await _stored_token(w, ref.owner)])
        refused = await _refusals(w, "outside-1")
        assert all("does not cover twin another-twin-of-hers" in r for r in refused), refused


async def test_revoked_token_is_refused_by_the_cloud_and_by_the_nodes() -> None:
    async with AsyncExitStack() as stack:
        w, owners, paths, t0 = await _world(stack)
        phone = w.phones[sorted(paths.users)[0]]
        raw = await _stored_token(w, phone.owner)
        token = ProcessToken.from_bytes(raw)
        await revoke_processing(owners, phone.owner, phone.owner_sig, token.token_id)
        key = phone.owner_sig.verify_key.raw
        await _wait(lambda: all(n.ledger.is_revoked(key, token.token_id) for n in w.nodes),
                    "the nodes to learn the revocation")
        # the cloud refuses the job and never takes the token back
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert status["state"] == "failed" and result is None
        assert f"owner {phone.owner}: no process token" in status["reason"], status["reason"]
        with pytest.raises(ControlRefused, match="revoked"):
            await _control(owners, phone.owner, phone.owner_sig, "process_token",
                           {"request_id": "ptok-again", "token": raw}, "ptok-again", 15)
        # a cloud that ignores the revocation sends the old token anyway: the nodes refuse
        ref = w.phones["ref-path"]
        await _send_spec(w, owners, "revoked-1",
                         [(phone.user, key, "user"),
                          ("ref-path", ref.owner_sig.verify_key.raw, "reference")],
                         [raw, await _stored_token(w, ref.owner)])
        refused = await _refusals(w, "revoked-1")
        assert all(f"token {token.token_id.hex()} was revoked" in r for r in refused), refused


async def test_forged_or_unsigned_revocation_is_ignored() -> None:
    async with AsyncExitStack() as stack:
        w, owners, paths, t0 = await _world(stack)
        phone = w.phones[sorted(paths.users)[0]]
        token = ProcessToken.from_bytes(await _stored_token(w, phone.owner))
        body = {"owner": phone.owner, "owner_key": phone.owner_sig.verify_key.raw,
                "request_id": "prev-forged", "token_id": token.token_id}
        forged = build_control("process_token_revoke", SigningKey.generate(), body)
        unsigned = encode("process_token_revoke", {**body, "time": time.time(), "sig": bytes(64)})
        topic = owners.topics.token_revoked(phone.owner, token.token_id.hex())
        reply_topic = owners.topics.replies(phone.owner, "prev-forged")
        for payload in (forged, unsigned):
            await owners.publish(topic, payload, retain=True)
            reply = decode(await owners.request(owners.topics.control(phone.owner), payload,
                                                reply_topic, timeout=15), "control_result")
            assert not reply["ok"] and "Signature" in reply["reason"]
        await asyncio.sleep(0.3)
        owner_key = phone.owner_sig.verify_key.raw
        assert not any(n.ledger.is_revoked(owner_key, token.token_id) for n in w.nodes)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=60)
        assert status["state"] == "done", status["reason"]
        assert result is not None


def test_a_revocation_outlives_a_node_restart_and_a_cleared_retained_message(tmp_path: Any) -> None:
    """The cloud may publish anywhere, so it can clear the retained revocation; a node that
    saw it once keeps refusing the token after a restart (its ledger), whatever the bus says."""
    from ciphertwin.mpc_nodes.ledger import NodeLedger

    owner, token_id = os.urandom(32), os.urandom(16)
    ledger = NodeLedger(tmp_path / "node-ledger.db")
    ledger.revoke(owner, token_id)
    ledger.revoke(owner, token_id)  # a redelivered revocation is harmless
    ledger.close()
    reopened = NodeLedger(tmp_path / "node-ledger.db")
    assert reopened.is_revoked(owner, token_id)
    assert not reopened.is_revoked(os.urandom(32), token_id)  # bound to the owner that signed
    assert not reopened.is_revoked(owner, os.urandom(16))
    reopened.close()


def test_owner_cannot_publish_revocations_under_another_owners_name() -> None:
    """The revocation topic is declared with its ACL: owner X publishes only under
    ``revocations/X/…``; nodes read every owner's; devices and receivers publish none."""
    from ciphertwin.broker.acl import acl_for
    from ciphertwin.bus.topics import Topics
    from ciphertwin.config import Principal

    t, h = Topics(), "$7$1000$" + "c2FsdHNhbHRzYWx0" + "$" + "A" * 86 + "=="
    clients = {c.id: c for c in [Principal("alice", "owner", h), Principal("bob", "owner", h),
                                 Principal("n0", "node", h), Principal("rec", "receiver", h),
                                 Principal("d1", "device", h, twin="t1", owner="alice")]}
    acl = {cid: acl_for(c, clients, t) for cid, c in clients.items()}
    tid = os.urandom(16).hex()
    assert acl["alice"].may_publish(t.token_revoked("alice", tid))
    assert not acl["alice"].may_publish(t.token_revoked("bob", tid))
    assert not any(acl[c].may_publish(t.token_revoked("alice", tid)) for c in ("n0", "rec", "d1"))
    assert acl["n0"].may_subscribe(t.filter("token_revoked"))


# --- tokens issued for another roster (M4) -------------------------------------------------


def test_a_token_for_another_roster_says_so_whatever_else_does_not_fit() -> None:
    """Before: a pre-swap token was refused as function-class-not-allowed (or receiver) when
    those checks came first; the roster is checked first and its reason names the cause."""
    from ciphertwin.crypto.errors import TokenRejected
    from ciphertwin.crypto.tokens import first_admitting, roster_digest, verify_process_token

    owner = SigningKey.generate()
    old_nodes, new_nodes = [os.urandom(32) for _ in range(3)], [os.urandom(32) for _ in range(3)]
    receiver = os.urandom(32)
    old = issue_process_token(owner, "type:location", ["proximity"], [receiver], old_nodes,
                              twins=["t"], valid_for_s=600)
    new_other = issue_process_token(owner, "type:location", ["aggregate"], [receiver],
                                    new_nodes, twins=["t"], valid_for_s=600)
    roster = roster_digest(new_nodes)
    with pytest.raises(TokenRejected, match="token was issued for another node roster") as exc:
        verify_process_token(old, owner.verify_key, function_class="raw-export",
                             receiver=os.urandom(32), roster=roster)
    assert exc.value.reason == "roster-mismatch" and "re-grant processing" in str(exc.value)

    def check(t: ProcessToken) -> None:
        verify_process_token(t, owner.verify_key, function_class="proximity", receiver=receiver,
                             roster=roster)

    assert first_admitting([old], check)[1].endswith(
        "the nodes changed since processing was granted; re-grant processing)")
    # a current token that does not fit says more than an old one that names other nodes
    for tokens in ([old, new_other], [new_other, old]):
        token, reason = first_admitting(tokens, check)
        assert token is None and "function-class-not-allowed" in reason
    assert first_admitting([], check) == (None, "no process token")
    ok = issue_process_token(owner, "type:location", ["proximity"], [receiver], new_nodes,
                             twins=["t"], valid_for_s=600)
    assert first_admitting([old, ok], check) == (ok, "")
