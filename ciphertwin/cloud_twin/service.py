"""The cloud twin service: stores what devices send, shares it as owners allow.

It holds ciphertexts, public keys, tokens and re-encryption keys — never a plaintext or a
secret key. Subscriptions:

* ``twins/+/data``   → ingest (check, store, ack) → live fan-out to the owner and grantees;
  a payload larger than an item may be is dropped by the bus client before it is queued;
* ``control/+``      → owner registration, grants and revocations, process tokens and their
  revocations (signed by the owner);
* ``queries/+``      → history, answered on ``replies/{asker}/{request_id}``, each item with
  the key material the asker can open (its own capsule for the owner, a re-encrypted capsule
  for a grantee; items no grant of the asker admits are left out); ``state_query`` likewise
  (versions, and the desired/reported documents the asker can open);
* issue 11 (``twin_state.StateBook``, ``requests.RequestRouter``, ``requests.InteractBook``):
  ``twins/+/desired`` and ``twins/+/reported`` (versioned state, answered with
  ``state_result``), ``twins/+/requests`` (answered with ``request_status``),
  ``twins/+/answers`` and ``devices/+/presence`` (device-signed); control kinds
  ``interact_grant`` / ``interact_revoke``. Each message is authenticated on metadata only
  (owner key, installed and unrevoked permit, device write token); garbage is logged and
  dropped, a refusal of a readable message is answered with its reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import Envelope, decode, encode, max_size_of, salvage
from ciphertwin.bus.topics import Topics
from ciphertwin.cloud_twin.grants import ActiveGrant, GrantBook
from ciphertwin.cloud_twin.ingest import AcceptedItem, IngestPipeline
from ciphertwin.cloud_twin.jobs import JobManager
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.requests import (
    REFUSED,
    IncomingRequest,
    InteractBook,
    Presence,
    RequestRouter,
    Status,
)
from ciphertwin.cloud_twin.store import Delivery, Grant, StoredEnvelope, TwinStore
from ciphertwin.cloud_twin.trust import Owner, Rejected, TrustRegistry
from ciphertwin.cloud_twin.twin_state import StateBook, Summary, device_grant_id
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.kpcpre import PrePublicKey, ReKey
from ciphertwin.crypto.policy import Policy
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import InteractToken, WriteToken
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.control import control_request_id, verify_control
from ciphertwin.protocol.kinds import CONTROL_KINDS
from ciphertwin.protocol.sealed_docs import OWNER_RECIPIENT, permit_of
from ciphertwin.protocol.twin_requests import (
    verify_answer_outer,
    verify_presence,
    verify_request_outer,
)
from ciphertwin.protocol.twin_state import verify_desired_outer, verify_reported_outer
from ciphertwin.supervise import spawn

log = structlog.get_logger(__name__)

MAX_HISTORY_PAGE = 2000
QUERY_KINDS = ("history_query", "state_query")
STORE_FAILED = "the cloud's store failed (try again later)"


def _reason(exc: BaseException) -> str:
    """A refusal's reason, short enough for any reply."""
    text = exc.reason if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
    return text[:256]


@dataclass(frozen=True, slots=True)
class Keyed:
    """A stored item with the key material one reader can open it with."""

    item: StoredEnvelope
    key: bytes
    grant_id: str | None


class CloudTwin:
    """Run with ``async with CloudTwin(...) as cloud: await cloud.serve_forever()``."""

    def __init__(self, bus: BusClient, store: TwinStore, *,
                 pool: ReencryptionPool | None = None, operator: VerifyKey | None = None,
                 request_limits: Mapping[str, Any] | None = None,
                 sweep_interval_s: float = 1.0) -> None:
        """``request_limits``: keyword arguments of :class:`RequestRouter` (rate limits,
        queue cap, wake-ups per hour, ...); ``sweep_interval_s``: how often expired requests
        are dropped and their requesters told."""
        self.bus, self.store = bus, store
        self.topics: Topics = bus.topics
        self.trust = TrustRegistry(store)
        self.grants = GrantBook(store)
        self.pool = pool or ReencryptionPool()
        self.ingest = IngestPipeline(store, self.trust, self._publish_ack, self._fan_out,
                                     executor=self.pool.executor)
        self._recapsules: OrderedDict[tuple[bytes, str], bytes] = OrderedDict()
        self._twin_of: dict[str, str] = {}
        self._capsule_cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self.jobs = JobManager(self, operator=operator)  # 6+: without operator key, no roster
        self.interact = InteractBook(store)
        self.state = StateBook(store, self.grants, self.pool, self.topics, self._publish,
                               excluded_reader=self.jobs.is_node)
        self.requests = RequestRouter(store, deliver=self._deliver_request,
                                      wake=self._wake_device, status=self._request_status,
                                      still_valid=self._permit_still_valid,
                                      **dict(request_limits or {}))
        self._permits: OrderedDict[tuple[str, str], InteractToken | None] = OrderedDict()
        """(requester, request_id) -> the permit of a queued request, parsed once."""
        self.sweep_interval_s = sweep_interval_s

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> CloudTwin:
        """Start; if starting fails, stop what did start (tasks, worker pool, the store's
        thread) — any of them left running would keep the process from exiting."""
        try:
            return await self._start()
        except BaseException:
            try:
                await self.__aexit__(None, None, None)
            except Exception as exc:  # noqa: BLE001 - the start failure is the error to report
                log.warning("cloud.stop_failed", error=f"{type(exc).__name__}: {exc}")
            raise

    async def _start(self) -> CloudTwin:
        await self.store.open()
        await self.trust.load()
        await self.grants.load()
        await self.interact.load()
        await self.requests.load()
        self._tasks.append(spawn("cloud:ingest", self.ingest.run))  # logged + restarted
        self._tasks.append(spawn("cloud:requests-sweep", lambda: self.requests.run_sweeper(
            self.sweep_interval_s)))
        t = self.topics
        # each topic's kinds bound its payloads: larger ones are dropped before queueing
        await self.bus.subscribe(t.filter("twin_data"), self._on_data,
                                 max_payload=max_size_of("item"))
        await self.bus.subscribe(t.filter("control"), self._on_control,
                                 max_payload=max_size_of(*CONTROL_KINDS, "process_token"))
        await self.bus.subscribe(t.filter("query"), self._on_query, concurrency=4,
                                 max_payload=max_size_of(*QUERY_KINDS))
        # requests and desired writes one at a time: they keep their arrival order; a
        # presence may deliver a long queue, so several run at once (per-device locks)
        for kind, handler, payload_kind, concurrency in (
                ("desired", self._on_desired, "desired_set", 1),
                ("reported", self._on_reported, "reported_set", 1),
                ("requests", self._on_request, "request", 1),
                ("presence", self._on_presence, "presence", 4),
                ("answers", self._on_answer, "answer", 4)):
            await self.bus.subscribe(t.filter(kind), handler, concurrency=concurrency,
                                     max_payload=max_size_of(payload_kind))
        await self.jobs.start()
        log.info("cloud.started", owners=len(self.trust.owners))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.jobs.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pool.close()
        await self.store.close()

    # -- data ---------------------------------------------------------------------------
    async def _on_data(self, topic: str, payload: bytes, retain: bool) -> None:
        twin = self._twin_of.get(topic)
        if twin is None:  # parsing a topic costs as much as queueing the item: remember it
            twin = self.topics.parse(topic)["twin"]
            if len(self._twin_of) >= 100_000:
                self._twin_of.clear()
            self._twin_of[topic] = twin
        await self.ingest.submit(twin, payload)

    async def _publish_ack(self, twin: str, device: str, payload: bytes) -> None:
        await self.bus.publish(self.topics.ack(twin, device), payload)

    async def _fan_out(self, items: list[AcceptedItem]) -> None:
        """Live stream: new items to their owner, re-encrypted to matching grantees — one
        message per (twin, reader) per ingest batch."""
        capsules = await self._capsules([i.capsule_id for i in items])
        batches: dict[tuple[str, str, str | None], list[dict[str, bytes]]] = {}
        for item in items:
            batches.setdefault((item.twin, item.owner.name, None), []).append(
                {"item": item.payload, "key": capsules[item.capsule_id]})
        wanted = [(item, g) for item in items
                  for g in self.grants.matching(item.twin, item.attributes)
                  if not self.jobs.is_node(g.grant.receiver)]  # nodes get inputs per job
        keys = await self._recapsules_for([(i.capsule_id, g) for i, g in wanted], capsules)
        for item, grant in wanted:
            key = keys.get((item.capsule_id, grant.grant_id))
            if key is not None and self.grants.get(grant.grant_id) is not None:
                batches.setdefault((item.twin, grant.grant.receiver, grant.grant_id), []).append(
                    {"item": item.payload, "key": key})
        await asyncio.gather(*(self._stream(twin, reader, entries, grant_id)
                               for (twin, reader, grant_id), entries in batches.items()))

    async def _capsules(self, capsule_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        """Stored capsules by id, remembered: a key epoch's capsule serves many items, and a
        store query per ingest batch would queue behind (and delay) the next commit."""
        found = {c: v for c in capsule_ids if (v := self._capsule_cache.get(c)) is not None}
        missing = [c for c in dict.fromkeys(capsule_ids) if c not in found]
        if missing:
            fetched = await self.store.get_capsules(missing)
            found.update(fetched)
            self._capsule_cache.update(fetched)
            while len(self._capsule_cache) > 10_000:
                self._capsule_cache.popitem(last=False)
        return found

    async def _stream(self, twin: str, reader: str, entries: list[dict[str, bytes]],
                      grant_id: str | None) -> None:
        for start in range(0, len(entries), 1000):
            body: dict[str, object] = {"items": entries[start : start + 1000]}
            if grant_id is not None:
                body["grant_id"] = grant_id
            try:  # QoS 0: the live view is best effort; history is the reliable path
                await self.bus.publish(self.topics.stream(twin, reader),
                                       encode("stream_items", body), qos=0)
            except Exception as exc:  # noqa: BLE001 - never let the live view stop ingest
                log.warning("cloud.stream_failed", twin=twin, reader=reader, error=str(exc))

    async def _recapsules_for(
        self, wanted: Sequence[tuple[bytes, ActiveGrant]], capsules: dict[bytes, bytes]
    ) -> dict[tuple[bytes, str], bytes]:
        """Re-encrypted capsules for (capsule, grant) pairs: memory, store, then the pool."""
        unique = list(dict.fromkeys(wanted))
        found = {k: v for cid, g in unique
                 if (v := self._recapsules.get(k := (cid, g.grant_id))) is not None}
        missing = [(cid, g.grant_id) for cid, g in unique if (cid, g.grant_id) not in found]
        if missing:
            found.update(await self.store.cached_recapsules(missing))
        todo = [(cid, g) for cid, g in unique if (cid, g.grant_id) not in found]
        if todo:
            missing = [cid for cid, _ in todo if cid not in capsules]
            if missing:
                capsules = {**capsules, **await self._capsules(missing)}
            results = await self.pool.reencrypt(
                [(g.grant.rekey, capsules[cid]) for cid, g in todo]
            )
            fresh: list[tuple[bytes, str, bytes]] = []
            for (cid, grant), result in zip(todo, results, strict=True):
                if isinstance(result, str):
                    log.warning("cloud.reencrypt_refused", grant=grant.grant_id, reason=result)
                    continue
                found[(cid, grant.grant_id)] = result
                fresh.append((cid, grant.grant_id, result))
            await self.store.cache_recapsules(fresh)
        for key, value in found.items():
            self._recapsules[key] = value
            if len(self._recapsules) > 50_000:
                self._recapsules.popitem(last=False)
        return found

    # -- control ------------------------------------------------------------------------
    async def _on_control(self, topic: str, payload: bytes, retain: bool) -> None:
        owner = self.topics.parse(topic)["owner"]
        request_id = None
        try:
            env = decode(payload, (*CONTROL_KINDS, "process_token", "process_token_revoke"))
            request_id = control_request_id(env)
            if env["owner"] != owner:
                raise Rejected("control message names another owner than its topic")
            await self._apply_control(owner, env)
            if env.kind == "interact_revoke":  # after the answer would be too late for devices
                await self._forward_revoke(owner, env, payload)
            await self._control_result(owner, request_id, True, "ok")
            log.info("cloud.control_applied", owner=owner, kind=env.kind, request=request_id)
        except CipherTwinError as exc:  # Rejected, ValidationError, SignatureInvalid, tokens
            reason = _reason(exc)
            log.warning("cloud.control_rejected", owner=owner, reason=reason)
            if request_id is not None:
                await self._control_result(owner, request_id, False, reason)

    async def _apply_control(self, owner: str, env: Envelope) -> None:
        if env.kind == "owner_register":
            vk = VerifyKey(env["verify_key"])
            verify_control(env, vk)  # proves possession of the signing key
            await self.trust.register_owner(owner, vk, PrePublicKey.from_bytes(env["pre_pk"]))
            return
        known = self.trust.owners.get(owner)
        if known is None:
            raise Rejected("owner is not registered")
        verify_control(env, known.verify_key)
        await self.trust.accept_control_time(owner, float(env["time"]))
        if env.kind == "grant":
            rekey = ReKey.from_bytes(env["rekey"])
            if rekey.owner_id != known.pre_pk.key_id:
                raise Rejected("re-encryption key is not from this owner's key")
            if str(rekey.policy) != str(Policy.parse(env["policy"])):
                raise Rejected("policy text differs from the re-encryption key's policy")
            foreign = [t for t in env["twins"]
                       if (o := self.trust.owner_of_twin(t)) is not None and o.name != owner]
            if foreign:
                raise Rejected(f"twins of another owner: {', '.join(foreign[:5])}")
            if not await self.grants.install(Grant(
                env["grant_id"], owner, env["receiver"], tuple(env["twins"]),
                str(rekey.policy), env["rekey"], time.time(),
            )):
                raise Rejected("grant id is in use by another owner")
            self._forget_recapsules(env["grant_id"])
        elif env.kind == "process_token":
            await self.jobs.accept_token(owner, env)
        elif env.kind == "process_token_revoke":
            await self.jobs.revoke_token(owner, env)
        elif env.kind == "revoke":
            if not await self.grants.revoke(owner, env["grant_id"], time.time()):
                raise Rejected("no such active grant of this owner")
            self._forget_recapsules(env["grant_id"])
        elif env.kind == "interact_grant":
            token = InteractBook.parse(env["token"])
            foreign = [t for t in token.twins
                       if (o := self.trust.owner_of_twin(t)) is not None and o.name != owner]
            if foreign:
                raise Rejected(f"twins of another owner: {', '.join(foreign[:5])}")
            await self.interact.install(known, env["token"], time.time())
        elif env.kind == "interact_revoke":
            await self.interact.revoke(known, env["token_id"], encode(env.kind, env.body))

    async def _forward_revoke(self, owner: str, env: Envelope, payload: bytes) -> None:
        """The owner-signed revocation to every device of the token's twins (of all the
        owner's twins when the token is unknown here): devices refuse the token at once."""
        token = self.interact.tokens.get(env["token_id"])
        twins = set(token.twins) if token is not None else {
            t for g in self.grants.owned_by(owner) for t in g.grant.twins}
        devices = {g.grant.receiver for t in twins for g in self.state.device_grants(t)}
        body = encode("inbox_revoke", {"revoke": payload})
        for device in sorted(devices):
            try:
                await self.bus.publish(self.topics.inbox(device), body)
            except Exception as exc:  # noqa: BLE001 - resent at its next awake presence
                log.warning("cloud.revoke_forward_failed", device=device, error=str(exc))
        log.info("cloud.interact_revoked", owner=owner, token=env["token_id"].hex(),
                 devices=len(devices))

    def _forget_recapsules(self, grant_id: str) -> None:
        self._recapsules = OrderedDict(
            (k, v) for k, v in self._recapsules.items() if k[1] != grant_id)

    async def _control_result(self, owner: str, request_id: str, ok: bool, reason: str) -> None:
        body = {"request_id": request_id, "ok": ok, "reason": reason[:256]}
        await self.bus.publish(self.topics.replies(owner, request_id),
                               encode("control_result", body))

    # -- queries ------------------------------------------------------------------------
    async def _on_query(self, topic: str, payload: bytes, retain: bool) -> None:
        """Answer every query whose reply topic is known — a refused query and a store
        failure with an ``error`` (the asker learns why instead of timing out)."""
        asker = self.topics.parse(topic)["principal"]
        try:
            env = decode(payload, QUERY_KINDS)
        except ValidationError as exc:
            log.warning("cloud.query_rejected", asker=asker, reason=str(exc))
            request_id = salvage(payload, "history_query", "request_id")
            if request_id is not None:
                await self._history_reply(asker, {"request_id": request_id, "items": [],
                                                  "error": f"query refused: {exc}"[:256]})
            return
        if env.kind == "state_query":
            await self._state_query(asker, env)
            return
        if self.jobs.is_node(asker):  # nodes get share items per job, under process tokens
            log.warning("cloud.query_rejected", asker=asker, reason="processing nodes have no history")
            await self._history_reply(asker, {"request_id": env["request_id"], "items": []})
            return
        try:
            body = await self._history_page(asker, env)
        except Exception as exc:  # noqa: BLE001 - answered: the store failed, not the asker
            log.error("cloud.history_failed", asker=asker, twin=env["twin"],
                      error=f"{type(exc).__name__}: {exc}"[:300])
            body = {"request_id": env["request_id"], "items": [],
                    "error": "history unavailable: the cloud's store failed (try again later)"}
        await self._history_reply(asker, body)

    async def _history_page(self, asker: str, env: Envelope) -> dict[str, object]:
        """One page of a twin's history as ``asker`` may read it."""
        after = env.get("after")
        limit = min(env["limit"], MAX_HISTORY_PAGE)
        rows = await self.store.history(
            env["twin"], env["since"], env["until"], limit,
            (after["time"], after["device"], after["seq"]) if after else None,
        )
        keyed = await self.readable(asker, env["twin"], rows)
        body: dict[str, object] = {
            "request_id": env["request_id"],
            "items": [{"item": k.item.payload, "key": k.key} for k in keyed],
        }
        if len(rows) == limit and rows:
            last = rows[-1]
            body["more"] = {"time": last.item_time, "device": last.device, "seq": last.seq}
        log.info("cloud.history_served", asker=asker, twin=env["twin"], items=len(keyed),
                 of=len(rows))
        return body

    async def _history_reply(self, asker: str, body: dict[str, object]) -> None:
        await self.bus.publish(self.topics.replies(asker, str(body["request_id"])),
                               encode("history_reply", body))

    async def readable(self, reader: str, twin: str,
                       rows: Sequence[StoredEnvelope]) -> list[Keyed]:
        """The rows ``reader`` may read, each with key material for it (owner or grantee)."""
        capsules = await self._capsules([r.capsule_id for r in rows])
        owner = self.trust.owner_of_twin(twin)
        if owner is not None and owner.name == reader:
            return [Keyed(r, capsules[r.capsule_id], None) for r in rows]
        grants = self.grants.of_receiver(reader, twin)
        chosen = [(r, next((g for g in grants if g.policy.allows(r.attributes)), None))
                  for r in rows]
        pairs = [(r.capsule_id, g) for r, g in chosen if g is not None]
        keys = await self._recapsules_for(pairs, capsules)
        return [Keyed(r, keys[(r.capsule_id, g.grant_id)], g.grant_id) for r, g in chosen
                if g is not None and (r.capsule_id, g.grant_id) in keys]

    # -- issue 11: state, requests, presence ---------------------------------------------------
    async def _publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await self.bus.publish(topic, payload, qos=qos)

    def _owner_for(self, twin: str) -> Owner:
        """The twin's owner: bound by its devices' items, else the one owner whose grants
        or installed permits name it (a twin may get desired state before any reading)."""
        owner = self.trust.owner_of_twin(twin)
        if owner is not None:
            return owner
        names = {g.grant.owner for g in self.grants.of_twin(twin)}
        keys = {t.issuer.raw for t in self.interact.tokens.values() if twin in t.twins}
        names |= {o.name for o in self.trust.owners.values() if o.verify_key.raw in keys}
        if len(names) == 1 and (found := self.trust.owners.get(names.pop())) is not None:
            return found
        raise Rejected("unknown twin: no owner's items, grants or permits name it")

    def _check_author(self, env: Envelope, author: str, owner: Owner) -> None:
        """After ``verify_*_outer``: the owner writes under its own name; anyone else under a
        permit the owner installed here and has not revoked."""
        permit = permit_of(env)
        if permit is None:
            if author != owner.name:
                raise Rejected("signed with the owner's key under another name")
        else:
            self.interact.check(permit)

    def _device_of(self, twin: str, device: str) -> bool:
        """Is ``device`` one of the twin's devices as far as the owner told the cloud?"""
        grant = self.grants.get(device_grant_id(device))
        return (grant is not None and twin in grant.grant.twins) \
            or self.trust.device_key_of(twin, device) is not None

    def _device_token(self, env: Envelope) -> WriteToken:
        """The device's (already verified) write token; its key must be the one the name is
        bound to, as for items."""
        token = WriteToken.from_bytes(env["token"])
        self.trust.check_device(env["twin"], env["device"], token.device_key)
        return token

    def _topic_twin(self, topic: str, env: Envelope) -> None:
        if env["twin"] != self.topics.parse(topic)["twin"]:
            raise Rejected("message names another twin than its topic")

    async def _summary_or_zero(self, twin: str) -> Summary:
        try:
            return await self.state.summary(twin)
        except Exception:  # noqa: BLE001 - a refusal is answered even if the store fails
            return Summary(0, 0, False)

    async def _state_result(self, principal: str, request_id: str, ok: bool, reason: str,
                            summary: Summary) -> None:
        body = {"request_id": request_id, "ok": ok, "reason": reason[:256],
                "desired_version": summary.desired_version,
                "reported_version": summary.reported_version}
        try:
            await self.bus.publish(self.topics.replies(principal, request_id),
                                   encode("state_result", body))
        except Exception as exc:  # noqa: BLE001 - the writer retries or queries
            log.warning("cloud.state_result_failed", principal=principal, error=str(exc))

    async def _on_desired(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "desired_set")
        except ValidationError as exc:
            await self._garbage(topic, "desired_set", payload, exc, "writer")
            return
        writer, rid, twin = env["writer"], env["request_id"], env["twin"]
        try:
            self._topic_twin(topic, env)
            owner = self._owner_for(twin)
            writer = verify_desired_outer(env, owner.verify_key, now=time.time())
            self._check_author(env, writer, owner)
            outcome, summary = await self.state.accept_desired(owner, env, payload, writer)
        except Exception as exc:  # noqa: BLE001 - refused, or the store failed: answered
            reason = _reason(exc) if isinstance(exc, CipherTwinError) else STORE_FAILED
            log.warning("cloud.desired_refused", twin=twin, writer=writer, reason=reason,
                        error=None if isinstance(exc, CipherTwinError) else _reason(exc))
            await self._state_result(writer, rid, False, reason,
                                     await self._summary_or_zero(twin))
            return
        reason = "ok" if outcome.accepted else \
            f"stale: current desired_version is {outcome.current}"
        await self._state_result(writer, rid, outcome.accepted, reason, summary)

    async def _on_reported(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "reported_set")
        except ValidationError as exc:
            await self._garbage(topic, "reported_set", payload, exc, "device")
            return
        device, rid, twin = env["device"], env["request_id"], env["twin"]
        try:
            self._topic_twin(topic, env)
            owner = self._owner_for(twin)
            verify_reported_outer(env, owner.verify_key, now=time.time())
            self._device_token(env)
            outcome, summary = await self.state.accept_reported(owner, env, payload)
        except Exception as exc:  # noqa: BLE001 - refused, or the store failed: answered
            reason = _reason(exc) if isinstance(exc, CipherTwinError) else STORE_FAILED
            log.warning("cloud.reported_refused", twin=twin, device=device, reason=reason,
                        error=None if isinstance(exc, CipherTwinError) else _reason(exc))
            await self._state_result(device, rid, False, reason,
                                     await self._summary_or_zero(twin))
            return
        reason = "ok" if outcome.accepted else (
            f"stale: reported version {env['version']} is not above {outcome.current}")
        await self._state_result(device, rid, outcome.accepted, reason, summary)

    async def _state_query(self, asker: str, env: Envelope) -> None:
        twin, rid = env["twin"], env["request_id"]
        try:
            owner = self._owner_for(twin)
            may_see = (asker == owner.name or bool(self.grants.of_receiver(asker, twin))
                       or asker in self.interact.holders(twin))
            body = await self.state.query(asker, owner, twin, rid, may_see=may_see)
        except CipherTwinError as exc:
            body = {"request_id": rid, "twin": twin, "desired_version": 0,
                    "reported_version": 0, "in_sync": False, "error": _reason(exc)}
        except Exception as exc:  # noqa: BLE001 - answered: the store failed, not the asker
            log.error("cloud.state_query_failed", asker=asker, twin=twin,
                      error=f"{type(exc).__name__}: {exc}"[:300])
            body = {"request_id": rid, "twin": twin, "desired_version": 0,
                    "reported_version": 0, "in_sync": False,
                    "error": "state unavailable: the cloud's store failed (try again later)"}
        if "error" in body:
            log.warning("cloud.state_query_refused", asker=asker, twin=twin, reason=body["error"])
        await self.bus.publish(self.topics.replies(asker, rid), encode("state_reply", body))

    async def _on_request(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "request")
        except ValidationError as exc:
            await self._garbage(topic, "request", payload, exc, "requester")
            return
        requester, rid, twin = env["requester"], env["request_id"], env["twin"]
        try:
            self._topic_twin(topic, env)
            owner = self._owner_for(twin)
            verify_request_outer(env, owner.verify_key, now=time.time())
            self._check_author(env, requester, owner)
        except CipherTwinError as exc:
            log.warning("requests.refused", twin=twin, requester=requester, request=rid,
                        reason=_reason(exc))
            await self._request_status(requester, rid, Status(REFUSED, _reason(exc)), None)
            return
        wraps = {w["to"]: w["wrap"] for w in env["wraps"]
                 if w["to"] != OWNER_RECIPIENT and self._device_of(twin, w["to"])}
        try:
            await self.requests.submit(IncomingRequest(
                twin, requester, rid, float(env["deadline"]), bool(env["wake"]), payload, wraps))
        except Exception as exc:  # noqa: BLE001 - the store failed: answered, not dropped
            log.error("requests.submit_failed", twin=twin, requester=requester, request=rid,
                      error=_reason(exc))
            await self._request_status(requester, rid, Status(REFUSED, STORE_FAILED), None)

    async def _on_answer(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "answer")
            self._topic_twin(topic, env)
            owner = self._owner_for(env["twin"])
            verify_answer_outer(env, owner.verify_key, now=time.time())
            self._device_token(env)
        except CipherTwinError as exc:
            log.warning("cloud.answer_refused", topic=topic, reason=_reason(exc))
            return
        await self.requests.on_answer(env["twin"], env["device"], env["requester"],
                                      env["request_id"], payload)

    async def _on_presence(self, topic: str, payload: bytes, retain: bool) -> None:
        """A device's (signed) presence; at the start of an awake period it gets, in this
        order, the owner's revocations, the desired state it has not seen, its queue."""
        try:
            env = decode(payload, "presence")
            if env["device"] != self.topics.parse(topic)["device"]:
                raise Rejected("presence names another device than its topic")
            owner = self._owner_for(env["twin"])
            verify_presence(env, owner.verify_key, now=time.time())
            self._device_token(env)
        except CipherTwinError as exc:
            log.warning("cloud.presence_refused", topic=topic, reason=_reason(exc))
            return
        p = Presence(env["twin"], env["device"], env["awake"], float(env["until"]),
                     env.get("next_wake"), float(env["window_s"]), env["wakeable"],
                     float(env["time"]))
        if self.requests.starts_awake_period(p):
            for revoke in self.interact.revocations_for(owner.name, p.twin, time.time()):
                await self.bus.publish(self.topics.inbox(p.device),
                                       encode("inbox_revoke", {"revoke": revoke}))
            try:
                await self.state.redeliver_desired(owner, p.twin, p.device)
            except CipherTwinError as exc:
                log.warning("cloud.desired_redelivery_failed", twin=p.twin, device=p.device,
                            reason=_reason(exc))
        await self.requests.on_presence(p)

    def _permit_still_valid(self, d: Delivery, now: float) -> str | None:
        """At delivery: a queued request whose permit was revoked, or expired, meanwhile is
        refused instead of reaching the device (which would refuse it too)."""
        key = (d.requester, d.request_id)
        permit = self._permits.get(key)
        if key not in self._permits:
            try:
                permit = permit_of(decode(d.envelope, "request"))
            except CipherTwinError:  # it decoded when admitted: the store's bytes changed
                return "stored request no longer decodes"
            self._permits[key] = permit
            if len(self._permits) > 2000:
                self._permits.popitem(last=False)
        if permit is None:
            return None
        if permit.token_id in self.interact.revoked:
            return "permit revoked by the owner"
        if now >= permit.not_after:
            return "permit expired while queued"
        return None

    async def _deliver_request(self, d: Delivery) -> None:
        await self.bus.publish(self.topics.inbox(d.device),
                               encode("inbox_request", {"request": d.envelope, "wrap": d.wrap}))

    async def _wake_device(self, twin: str, device: str) -> None:
        await self.bus.publish(self.topics.inbox(device),
                               encode("inbox_wake", {"twin": twin, "time": time.time()}))

    async def _request_status(self, requester: str, request_id: str, status: Status,
                              answer: bytes | None) -> None:
        body: dict[str, object] = {"request_id": request_id, "state": status.state,
                                   "reason": status.reason[:256]}
        if answer is not None:
            body["answer"] = answer
        await self.bus.publish(self.topics.replies(requester, request_id),
                               encode("request_status", body))

    async def _garbage(self, topic: str, kind: str, payload: bytes, exc: Exception,
                       author_field: str) -> None:
        """Log and drop a message that does not decode; if its author and request id can
        be read on their own, tell them why (they would otherwise wait for a timeout)."""
        log.warning("cloud.garbage", topic=topic, kind=kind, size=len(payload),
                    reason=str(exc)[:200])
        author = salvage(payload, kind, author_field)
        rid = salvage(payload, kind, "request_id")
        if author is None or rid is None:
            return
        reason = f"malformed {kind}: {exc}"[:256]
        try:
            if kind == "request":
                await self._request_status(author, rid, Status(REFUSED, reason), None)
            else:
                await self._state_result(author, rid, False, reason, Summary(0, 0, False))
        except Exception as exc2:  # noqa: BLE001 - best effort
            log.warning("cloud.garbage_reply_failed", topic=topic, error=str(exc2))
