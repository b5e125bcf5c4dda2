"""Ingest: check data items, store them in batches, acknowledge only what is committed.

Items arrive one per MQTT message; they are queued and taken in batches (whatever queued
up while the previous batch was busy, up to ``max_batch``), so one SQLite commit and one
thread hop cover many items. Per batch: schema and binding checks on the event loop (cheap, they read the trust
registry), signatures and new capsules in a worker thread, one commit, then one ack per
device listing exactly the stored sequence numbers (and the refused ones, with reasons).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import structlog

from ciphertwin.bus.envelope import Envelope, encode
from ciphertwin.cloud_twin.store import Outcome, StoredEnvelope, TwinStore
from ciphertwin.cloud_twin.trust import Owner, Rejected, TrustRegistry
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.kpcpre import Capsule
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.items import decode_item, verify_item_signature

log = structlog.get_logger(__name__)

BAD_SIGNATURE = "bad signature"


@dataclass(slots=True)
class Candidate:
    """An item that passed the cheap checks; expensive ones run in a worker thread."""

    item: Envelope
    payload: bytes
    owner: Owner
    device_key: VerifyKey
    attributes: tuple[str, ...]
    capsule_bytes: bytes | None


@dataclass(frozen=True, slots=True)
class AcceptedItem:
    """A stored item, handed to the live fan-out."""

    twin: str
    device: str
    seq: int
    attributes: tuple[str, ...]
    capsule_id: bytes
    owner: Owner
    payload: bytes


Publish = Callable[[str, bytes], Awaitable[None]]


class CapsuleIndex:
    """capsule_id -> (twin, attributes): items reuse their key epoch's capsule, and a capsule
    serves only the twin it was first stored for (else a grantee of one twin could be handed
    the data key of another)."""

    def __init__(self, store: TwinStore, limit: int = 100_000) -> None:
        self.store = store
        self._info: OrderedDict[bytes, tuple[str, tuple[str, ...]]] = OrderedDict()
        self._limit = limit

    def remember(self, capsule_id: bytes, twin: str, attributes: tuple[str, ...]) -> None:
        self._info[capsule_id] = (twin, attributes)
        self._info.move_to_end(capsule_id)
        if len(self._info) > self._limit:
            self._info.popitem(last=False)

    async def prefetch(self, capsule_ids: set[bytes]) -> None:
        missing = [c for c in capsule_ids if c not in self._info]
        if missing:
            for cid, (twin, attrs) in (await self.store.capsule_info(missing)).items():
                self.remember(cid, twin, attrs)

    def forget(self, capsule_ids: set[bytes]) -> None:
        for cid in capsule_ids:
            self._info.pop(cid, None)

    def get(self, capsule_id: bytes) -> tuple[str, tuple[str, ...]] | None:
        return self._info.get(capsule_id)


@dataclass(frozen=True, slots=True)
class SignedCheck:
    """What a worker needs to check one item: plain data, so it can cross to a process."""

    body: dict[str, Any]
    device_key: bytes
    attributes: tuple[str, ...]
    capsule: bytes | None
    owner_pre_id: bytes


def expensive_checks(work: list[SignedCheck]) -> list[str | None]:
    """Worker: outer signature, and a new capsule's points, id, attributes and owner key."""
    reasons: list[str | None] = []
    for w in work:
        try:
            verify_item_signature(w.body, VerifyKey(w.device_key))
            if w.capsule is not None:
                capsule = Capsule.from_bytes(w.capsule)
                if capsule.capsule_id != w.body["capsule_id"]:
                    raise Rejected("capsule id does not match the capsule")
                if capsule.attributes != w.attributes:
                    raise Rejected("item attributes differ from its capsule's")
                if capsule.owner_id != w.owner_pre_id:
                    raise Rejected("capsule is not under the twin owner's key")
            reasons.append(None)
        except SignatureInvalid:
            reasons.append(BAD_SIGNATURE)
        except Rejected as exc:
            reasons.append(exc.reason)
        except ValidationError as exc:
            reasons.append(f"malformed capsule: {exc}")
    return reasons


class IngestPipeline:
    """Queue → batch checks → one commit → acks → ``on_stored`` for the new items."""

    def __init__(
        self,
        store: TwinStore,
        trust: TrustRegistry,
        publish_ack: Callable[[str, str, bytes], Awaitable[None]],
        on_stored: Callable[[list[AcceptedItem]], Awaitable[None]],
        *,
        max_batch: int = 1000,
        queue_size: int = 50_000,
        executor: Executor | None = None,
    ) -> None:
        self.store, self.trust = store, trust
        self.capsules = CapsuleIndex(store)
        self._publish_ack = publish_ack
        self._on_stored = on_stored
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self.max_batch = max_batch
        self._executor = executor
        self.stored = 0
        self.rejected = 0

    async def submit(self, twin: str, payload: bytes) -> None:
        await self._queue.put((twin, payload))

    async def run(self) -> None:
        """Forever: take what is queued (up to ``max_batch``) and process it as one batch.

        No timer: while one batch is being checked and committed the next one queues up,
        so batches grow with the load and latency stays minimal when it is light.
        """
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self.process(batch)
            except Exception:  # noqa: BLE001 - keep ingesting; nothing was acknowledged
                log.exception("ingest.batch_failed", size=len(batch))

    async def process(self, batch: list[tuple[str, bytes]]) -> list[AcceptedItem]:
        """Check, store and acknowledge one batch; return the newly stored items."""
        acks: dict[tuple[str, str], list[int]] = defaultdict(list)
        refusals: dict[tuple[str, str], list[dict[str, object]]] = defaultdict(list)
        decoded: list[tuple[str, Envelope, bytes]] = []
        for twin, payload in batch:
            try:
                decoded.append((twin, decode_item(payload), payload))
            except ValidationError as exc:
                self._refuse(None, twin, None, f"malformed item: {exc}", refusals)
        await self.capsules.prefetch({e["capsule_id"] for _, e, _ in decoded})
        now = time.time()
        self.trust.begin_batch()
        candidates: list[Candidate] = []
        for twin, item, payload in decoded:
            try:
                candidate = self._cheap_checks(twin, item, payload, now)
            except Rejected as exc:
                self._refuse(item, twin, item["device"], exc.reason, refusals,
                             notify=self._authentic(item, now))
                continue
            candidates.append(candidate)
            self.trust.reserve(twin, candidate.owner, item["device"], candidate.device_key)
            if candidate.capsule_bytes is not None:  # later items of this batch may use it
                self.capsules.remember(item["capsule_id"], twin, candidate.attributes)
        reasons = await self._run_checks([
            SignedCheck(c.item.body, c.device_key.raw, c.attributes, c.capsule_bytes,
                        c.owner.pre_pk.key_id) for c in candidates])
        refused_capsules = {c.item["capsule_id"] for c, r in zip(candidates, reasons, strict=True)
                            if r is not None and c.capsule_bytes is not None}
        good: list[Candidate] = []
        for c, r in zip(candidates, reasons, strict=True):
            if r is None and c.item["capsule_id"] in refused_capsules:
                r = "its capsule was refused"
            if r is None:
                good.append(c)
            else:  # only a bad signature leaves the sender unknown
                self._refuse(c.item, c.item["twin"], c.item["device"], r, refusals,
                             notify=r != BAD_SIGNATURE)
        self.capsules.forget(refused_capsules)

        new_capsules = [
            (c.item["capsule_id"], c.item["twin"], c.attributes, c.capsule_bytes)
            for c in good if c.capsule_bytes is not None
        ]
        if new_capsules:
            await self.store.put_capsules(new_capsules)  # type: ignore[arg-type]
        outcomes = await self.store.append_envelopes([
            StoredEnvelope(c.item["twin"], c.item["device"], c.item["seq"], c.item["capsule_id"],
                           c.attributes, float(c.item["time"]), c.payload)
            for c in good
        ])
        accepted: list[AcceptedItem] = []
        for c, outcome in zip(good, outcomes, strict=True):
            twin, device, seq = c.item["twin"], c.item["device"], c.item["seq"]
            if outcome is Outcome.CONFLICT:
                self._refuse(c.item, twin, device, "another item is stored under this seq",
                             refusals, notify=True)
                continue
            acks[(twin, device)].append(seq)
            if outcome is Outcome.NEW:
                await self.trust.bind(twin, c.owner, device, c.device_key)
                accepted.append(AcceptedItem(twin, device, seq, c.attributes,
                                             c.item["capsule_id"], c.owner, c.payload))
        self.stored += len(accepted)
        await self._send_acks(acks, refusals)
        if accepted:
            await self._on_stored(accepted)
        return accepted

    async def _run_checks(self, work: list[SignedCheck]) -> list[str | None]:
        """Signatures and capsules off the event loop: on the process pool when given (Ed25519
        verification holds the GIL, so only processes run it in parallel), split in chunks."""
        if not work:
            return []
        if self._executor is None:
            return await asyncio.to_thread(expensive_checks, work)
        loop = asyncio.get_running_loop()
        size = max(64, -(-len(work) // 2))
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._executor, expensive_checks, work[i : i + size])
            for i in range(0, len(work), size)))
        return [r for part in parts for r in part]

    def _cheap_checks(self, twin: str, item: Envelope, payload: bytes, now: float) -> Candidate:
        if item["twin"] != twin:
            raise Rejected("item names another twin than its topic")
        token, owner = self.trust.write_token(item["token"], twin, item["device"], now)
        self.trust.check_device(twin, item["device"], token.device_key)
        attrs = tuple(item["attrs"])
        if list(attrs) != sorted(set(attrs)):
            raise Rejected("attributes must be sorted and unique")
        for a in attrs:
            if not token.allows_attribute(a):
                raise Rejected(f"attribute {a!r} not allowed by the write token")
        if abs(float(item["time"]) - now) > 366 * 86400:
            raise Rejected("item time is implausible")
        capsule = item.get("capsule")
        known = self.capsules.get(item["capsule_id"])
        if known is not None and known[0] != twin:
            raise Rejected("capsule belongs to another twin")
        if capsule is None:
            if known is None:
                raise Rejected("unknown capsule (send the epoch's capsule first)")
            if known[1] != attrs:
                raise Rejected("item attributes differ from its capsule's")
        return Candidate(item, payload, owner, token.device_key, attrs, capsule)

    def _authentic(self, item: Envelope, now: float) -> bool:
        """Did the named device really send this? Only then may a refusal reach it — a
        forged refusal would make the device give up an item it never sent wrongly."""
        try:
            token, _ = self.trust.write_token(item["token"], item["twin"], item["device"], now)
            self.trust.check_device(item["twin"], item["device"], token.device_key)
            verify_item_signature(item.body, token.device_key)
        except (Rejected, SignatureInvalid, ValidationError):
            return False
        return True

    def _refuse(self, item: Envelope | None, twin: str, device: str | None, reason: str,
                refusals: dict[tuple[str, str], list[dict[str, object]]], *,
                notify: bool = False) -> None:
        """Log a refusal; tell the device only if the item provably came from it."""
        self.rejected += 1
        seq = item["seq"] if item is not None else None
        log.warning("ingest.rejected", twin=twin, device=device, seq=seq, reason=reason,
                    device_told=notify)
        if notify and device is not None and seq is not None:
            refusals[(twin, device)].append({"seq": seq, "reason": reason[:256]})

    async def _send_acks(self, acks: dict[tuple[str, str], list[int]],
                         refusals: dict[tuple[str, str], list[dict[str, object]]]) -> None:
        for key in set(acks) | set(refusals):
            twin, device = key
            body = {"seqs": acks.get(key, []), "rejected": refusals.get(key, [])}
            try:
                await self._publish_ack(twin, device, encode("ack", body))
            except Exception as exc:  # noqa: BLE001 - the device will resend; we stored it
                log.warning("ingest.ack_failed", twin=twin, device=device, error=str(exc))
