"""Ingest: check data items, store them in batches, acknowledge only what is committed.

Items arrive one per MQTT message; they are queued (at most ``queue_size`` items and
``queue_bytes`` bytes: a full queue makes ``submit`` wait) and taken in batches (whatever queued
up while the previous batch was busy, up to ``max_batch``), so one SQLite commit and one
pool call cover many items. Per batch: schema and binding checks on the event loop (cheap,
they read the trust registry), signatures and new capsules on the process pool (only the raw
envelope bytes cross: pickling decoded bodies cost more than decoding them again), one
commit, then one ack per device listing exactly the stored sequence numbers (and the refused
ones, with reasons).

Throughput — three stages, each a task, so that the pool, the event loop and the disk work
at the same time:

1. *prepare*: take a batch, decode it and send the signatures of items whose write token is
   already verified to the pool at once (the device key depends on nothing else); take the
   next batch when the pool is done;
2. *check and store*: binding and capsule checks (they read state the previous batch
   changed, so batches pass this stage one by one and in order), the pool's verdicts, one
   commit, first-use bindings;
3. *finish*: acks (all devices at once) and the live fan-out — awaiting the broker's PUBACK
   for each device before taking the next batch used to cost as much as everything else.

Stage 2 uses a verdict of stage 1 only for exactly the (payload, device key, owner key) it
checks itself; anything else is verified there, as before.

Capsules: the index of known capsules (id -> twin, attributes) holds only capsules that
passed every check and were committed, and an entry is never overwritten — else a sibling
device could send a forged capsule under another device's capsule id and get that device's
genuine items refused (finally: they would be stuck in its outbox). Items of a capsule new in
the batch use what the first good item carrying it says; if no carrier passed, they are not
refused but left for a resend (unless their own device sent the refused capsule).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import structlog

from ciphertwin.bus.budget import ByteBudget
from ciphertwin.bus.envelope import Envelope, encode, unpack_checked
from ciphertwin.cloud_twin.store import (
    Outcome,
    StoredEnvelope,
    StoreUnavailable,
    TwinStore,
    Unstorable,
)
from ciphertwin.cloud_twin.trust import Owner, Rejected, TrustRegistry
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.kpcpre import Capsule
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.items import decode_item, verify_item_signature
from ciphertwin.supervise import spawn

log = structlog.get_logger(__name__)

BAD_SIGNATURE = "bad signature"
CHECK_FAILED = "signature could not be checked"
SENDER_UNPROVEN = frozenset({BAD_SIGNATURE, CHECK_FAILED})
"""Refusals after which the named device is not told: nothing proves it sent the item."""
ACK_CHUNK = 1000
"""Seqs (and refusals) per ack message: 1000 refusals with 256-character reasons stay
within the ack kind's 512 KiB."""


SignedCheck = tuple[bytes, bytes, bytes]
"""(envelope bytes that passed ``decode_item``, device key, owner's PRE key id): raw bytes
only, the cheapest thing to pickle to a worker process."""


@dataclass(slots=True)
class Candidate:
    """An item that passed the cheap checks; expensive ones run on the process pool."""

    item: Envelope
    payload: bytes
    owner: Owner
    device_key: VerifyKey
    attributes: tuple[str, ...]
    capsule_bytes: bytes | None
    """A capsule the item carries that is not known yet (one known already is not stored
    again)."""
    capsule_known: bool
    index: int = -1
    """Position in the prepared batch (where its speculative check, if any, is)."""

    def check(self) -> SignedCheck:
        return (self.payload, self.device_key.raw, self.owner.pre_pk.key_id)


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


class CapsuleNotYetKnown(Rejected):
    """An item of an epoch whose capsule has not arrived (yet): the capsule-carrying item was
    lost between broker and cloud, or overtaken. Not told to the device — a refusal is final
    for it — so it resends the item, oldest first, and the capsule comes first then."""


class CapsuleIndex:
    """capsule_id -> (twin, attributes) of stored capsules: items reuse their key epoch's
    capsule, and a capsule serves only the twin it was first stored for (else a grantee of
    one twin could be handed the data key of another). Only committed capsules go in, and an
    entry is never overwritten (see the module docstring)."""

    def __init__(self, store: TwinStore, limit: int = 100_000) -> None:
        self.store = store
        self._info: OrderedDict[bytes, tuple[str, tuple[str, ...]]] = OrderedDict()
        self._limit = limit

    def remember(self, capsule_id: bytes, twin: str, attributes: tuple[str, ...]) -> None:
        """Record a stored capsule; a known id keeps what it was first stored with (the
        store keeps the first row too)."""
        if capsule_id in self._info:
            self._info.move_to_end(capsule_id)
            return
        self._info[capsule_id] = (twin, attributes)
        if len(self._info) > self._limit:
            self._info.popitem(last=False)

    async def prefetch(self, capsule_ids: set[bytes]) -> None:
        missing = [c for c in capsule_ids if c not in self._info]
        if missing:
            for cid, (twin, attrs) in (await self.store.capsule_info(missing)).items():
                self.remember(cid, twin, attrs)

    def get(self, capsule_id: bytes) -> tuple[str, tuple[str, ...]] | None:
        return self._info.get(capsule_id)




def expensive_checks(work: list[SignedCheck]) -> list[str | None]:
    """Worker: outer signature, and a new capsule's points, id, attributes and owner key."""
    keys: dict[bytes, VerifyKey] = {}
    return [_expensive_check(payload, _verify_key(keys, device_key), owner_pre_id)
            for payload, device_key, owner_pre_id in work]


def _verify_key(cache: dict[bytes, VerifyKey], raw: bytes) -> VerifyKey:
    """A batch holds many items per device: parse each device key once."""
    key = cache.get(raw)
    if key is None:
        key = cache[raw] = VerifyKey(raw)
    return key


def _expensive_check(payload: bytes, device_key: VerifyKey, owner_pre_id: bytes) -> str | None:
    """None if the item's signature (and new capsule, if any) is good, else the reason."""
    try:
        body = unpack_checked(payload)
        verify_item_signature(body, device_key)
        if "capsule" in body:
            capsule = Capsule.from_bytes(body["capsule"])
            if capsule.capsule_id != body["capsule_id"]:
                raise Rejected("capsule id does not match the capsule")
            if capsule.attributes != tuple(body["attrs"]):
                raise Rejected("item attributes differ from its capsule's")
            if capsule.owner_id != owner_pre_id:
                raise Rejected("capsule is not under the twin owner's key")
    except SignatureInvalid:
        return BAD_SIGNATURE
    except Rejected as exc:
        return exc.reason
    except ValidationError as exc:
        return f"malformed capsule: {exc}"
    except Exception:  # noqa: BLE001 - one odd item must not fail the whole batch
        return CHECK_FAILED
    return None


@dataclass(slots=True)
class Prepared:
    """A decoded batch whose signatures are already being checked on the pool."""

    decoded: list[tuple[str, Envelope, bytes]]
    speculative: list[SignedCheck | None]
    """Per decoded item: what was sent to the pool (None: nothing, its token is new)."""
    verdicts: asyncio.Future[list[str | None]]
    """One verdict per non-None entry of ``speculative``, in order."""
    result: BatchResult


@dataclass(slots=True)
class BatchResult:
    """What a committed batch still owes: acks (and refusals) per device, live fan-out."""

    accepted: list[AcceptedItem] = field(default_factory=list)
    acks: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    refusals: dict[tuple[str, str], list[dict[str, object]]] = field(
        default_factory=lambda: defaultdict(list))

    def absorb(self, other: BatchResult) -> None:
        """Take over what ``other`` (a later batch) owes: one ack per device covers both."""
        self.accepted += other.accepted
        for key, seqs in other.acks.items():
            self.acks[key] += seqs
        for key, refused in other.refusals.items():
            self.refusals[key] += refused


NewCapsules = dict[bytes, tuple[str, tuple[str, ...]]]


def _new_capsules(candidates: list[Candidate], reasons: list[str | None]) -> NewCapsules:
    """The capsules this batch will store, as the first good item carrying each says (its
    bytes hash to the id, so every good carrier of an id carries the same capsule)."""
    claims: NewCapsules = {}
    for c, r in zip(candidates, reasons, strict=True):
        if r is None and c.capsule_bytes is not None:
            claims.setdefault(c.item["capsule_id"], (c.item["twin"], c.attributes))
    return claims


def _capsule_refusal(c: Candidate, claims: NewCapsules,
                     refused_own: set[tuple[bytes, str, str]]) -> Rejected | None:
    """Why an item of a capsule new in this batch cannot be stored, if it cannot. No good
    carrier: left for a resend (a forged carrier must not get genuine items refused), unless
    the item's own device sent the refused capsule."""
    if c.capsule_known:
        return None  # checked against the index in the cheap pass
    twin, cid = c.item["twin"], c.item["capsule_id"]
    claim = claims.get(cid)
    if claim is None:
        if (cid, twin, c.item["device"]) in refused_own:
            return Rejected("its capsule was refused")
        return CapsuleNotYetKnown("no valid capsule for it arrived (yet)")
    if claim[0] != twin:
        return Rejected("capsule belongs to another twin")
    if claim[1] != c.attributes:
        return Rejected("item attributes differ from its capsule's")
    return None


def _discard(fut: asyncio.Future[Any]) -> None:
    """Cancel a future nobody will await (or mark its exception as seen)."""
    if not fut.done():
        fut.cancel()
    elif not fut.cancelled():
        fut.exception()


class _StoreOutage:
    """While the store fails (a full disk, a lost database) every batch would fail at once:
    retrying at full speed only floods the log and burns CPU. So back off (doubling, up to
    ``cap`` s) before the next batch, log the outage once when it starts, a summary every
    ``every`` s, and its length when it ends. Devices keep the items meanwhile."""

    def __init__(self, *, first: float = 0.1, cap: float = 2.0, every: float = 10.0) -> None:
        self.first, self.cap, self.every = first, cap, every
        self.since: float | None = None
        self.batches = self.items = 0
        self._delay = first
        self._logged = 0.0

    async def failed(self, items: int, reason: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self._logged = now, now
            log.error("ingest.store_unavailable", reason=reason,
                      hint="nothing is acknowledged; devices keep their items and resend")
        elif now - self._logged >= self.every:
            self._logged = now
            log.error("ingest.store_still_unavailable", reason=reason, batches=self.batches + 1,
                      items=self.items + items, for_s=round(now - self.since, 1))
        self.batches += 1
        self.items += items
        await asyncio.sleep(self._delay)
        self._delay = min(self.cap, self._delay * 2)

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("ingest.store_recovered", failed_batches=self.batches,
                        unacknowledged_items=self.items,
                        outage_s=round(time.monotonic() - self.since, 1))
            self.since, self.batches, self.items, self._delay = None, 0, 0, self.first


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
        queue_bytes: int = 128 * 1024 * 1024,
        executor: Executor | None = None,
        finish_backlog: int = 4,
    ) -> None:
        self.store, self.trust = store, trust
        self.capsules = CapsuleIndex(store)
        self._publish_ack = publish_ack
        self._on_stored = on_stored
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self._queued = ByteBudget(queue_bytes)
        self._committed: asyncio.Queue[BatchResult] = asyncio.Queue(finish_backlog)
        self.max_batch = max_batch
        self._executor = executor
        self.stored = 0
        self.rejected = 0

    async def submit(self, twin: str, payload: bytes) -> None:
        """Queue one item; wait while the queue is full — by count or by bytes (backpressure
        reaches the bus client, whose own queue is byte-bounded too)."""
        await self._queued.take(len(payload))
        try:
            await self._queue.put((twin, payload))
        except BaseException:
            self._queued.release(len(payload))
            raise

    async def run(self) -> None:
        """Forever: the three stages (see the module docstring), joined by short queues.

        No timer: while one batch is being checked and committed the next one queues up,
        so batches grow with the load and latency stays minimal when it is light. The
        hand-over queues are short, so work never piles up between stages.
        """
        prepared: asyncio.Queue[Prepared] = asyncio.Queue(1)
        helpers = [spawn("ingest:prepare", functools.partial(self._prepare_forever, prepared)),
                   spawn("ingest:finish", self._finish_forever)]  # a stage never dies silently
        outage = _StoreOutage()
        try:
            while True:
                batch = await prepared.get()
                try:
                    result = await self.check_and_store(batch)
                except StoreUnavailable as exc:  # nothing acknowledged: devices resend
                    await outage.failed(len(batch.decoded), str(exc))
                    continue
                except Exception:  # noqa: BLE001 - keep ingesting; nothing was acknowledged
                    log.exception("ingest.batch_failed", size=len(batch.decoded))
                    continue
                if result.accepted:  # a batch of duplicates only writes nothing: proves nothing
                    outage.recovered()
                await self._committed.put(result)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            while not prepared.empty():
                _discard(prepared.get_nowait().verdicts)

    async def _prepare_forever(self, out: asyncio.Queue[Prepared]) -> None:
        """Feed the pool one batch at a time: the next batch is taken when the pool is done
        with this one, so batches grow to what arrives meanwhile (small batches cost more
        per item: pool calls, commits, acks)."""
        while True:
            prepared = self.prepare(await self._next_batch())
            await out.put(prepared)
            await asyncio.wait([prepared.verdicts])

    async def _next_batch(self) -> list[tuple[str, bytes]]:
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        self._queued.release(sum(len(payload) for _, payload in batch))
        return batch

    async def _finish_forever(self) -> None:
        """Acks and fan-out; batches committed meanwhile are finished together (when the
        machine is busy, fewer and larger acks and stream messages)."""
        while True:
            result = await self._committed.get()
            while not self._committed.empty():
                result.absorb(self._committed.get_nowait())
            try:
                await self.finish(result)
            except Exception:  # noqa: BLE001 - devices resend what stays unacknowledged
                log.exception("ingest.finish_failed", size=len(result.accepted))

    async def process(self, batch: list[tuple[str, bytes]]) -> list[AcceptedItem]:
        """Check, store and acknowledge one batch; return the newly stored items."""
        result = await self.check_and_store(self.prepare(batch))
        await self.finish(result)
        return result.accepted

    def prepare(self, batch: list[tuple[str, bytes]]) -> Prepared:
        """Decode, and start checking the signatures whose device key is known already."""
        result = BatchResult()
        decoded = self._decode_all(batch, result)
        speculative = [self._known_check(item, payload) for _, item, payload in decoded]
        verdicts = asyncio.ensure_future(
            self._run_checks([w for w in speculative if w is not None]))
        return Prepared(decoded, speculative, verdicts, result)

    def _known_check(self, item: Envelope, payload: bytes) -> SignedCheck | None:
        signer = self.trust.known_signer(item["token"])
        return None if signer is None else (payload, *signer)

    async def check_and_store(self, prepared: Prepared) -> BatchResult:
        """Every check, then one commit; nothing is acknowledged yet (see ``finish``)."""
        try:
            result = prepared.result
            await self.capsules.prefetch({e["capsule_id"] for _, e, _ in prepared.decoded})
            candidates = self._cheap_pass(prepared.decoded, result)
            good = await self._expensive_pass(candidates, prepared, result)
            await self._store(good, result)
            return result
        finally:
            _discard(prepared.verdicts)

    async def finish(self, result: BatchResult) -> None:
        """After the commit: acks (all devices at once), then the live fan-out."""
        await self._send_acks(result.acks, result.refusals)
        if result.accepted:
            await self._on_stored(result.accepted)

    def _decode_all(self, batch: list[tuple[str, bytes]],
                    result: BatchResult) -> list[tuple[str, Envelope, bytes]]:
        decoded: list[tuple[str, Envelope, bytes]] = []
        for twin, payload in batch:
            try:
                decoded.append((twin, decode_item(payload), payload))
            except ValidationError as exc:
                self._refuse(None, twin, None, f"malformed item: {exc}", result.refusals)
        return decoded

    def _cheap_pass(self, decoded: list[tuple[str, Envelope, bytes]],
                    result: BatchResult) -> list[Candidate]:
        """Schema-level, token and binding checks; reserve new bindings for this batch."""
        now = time.time()
        self.trust.begin_batch()
        carried = {item["capsule_id"] for _, item, _ in decoded if "capsule" in item.body}
        candidates: list[Candidate] = []
        for index, (twin, item, payload) in enumerate(decoded):
            try:
                candidate = self._cheap_checks(twin, item, payload, now, carried)
                candidate.index = index
            except Rejected as exc:
                transient = isinstance(exc, CapsuleNotYetKnown)
                self._refuse(item, twin, item["device"], exc.reason, result.refusals,
                             notify=not transient and self._authentic(item, now))
                continue
            candidates.append(candidate)
            self.trust.reserve(twin, candidate.owner, item["device"], candidate.device_key)
        return candidates

    async def _expensive_pass(self, candidates: list[Candidate], prepared: Prepared,
                              result: BatchResult) -> list[Candidate]:
        """Signatures and new capsules (from the pool), then the items of capsules new in
        this batch against the capsule that will be stored."""
        reasons = await self._verdicts(candidates, prepared)
        claims = _new_capsules(candidates, reasons)
        refused_own = {(c.item["capsule_id"], c.item["twin"], c.item["device"])
                       for c, r in zip(candidates, reasons, strict=True)
                       if r is not None and r not in SENDER_UNPROVEN
                       and c.capsule_bytes is not None}
        good: list[Candidate] = []
        for c, r in zip(candidates, reasons, strict=True):
            refusal = Rejected(r) if r is not None else _capsule_refusal(c, claims, refused_own)
            if refusal is None:
                good.append(c)
            else:
                self._refuse(c.item, c.item["twin"], c.item["device"], refusal.reason,
                             result.refusals, notify=refusal.reason not in SENDER_UNPROVEN
                             and not isinstance(refusal, CapsuleNotYetKnown))
        return good

    async def _store(self, good: list[Candidate], result: BatchResult) -> None:
        """New capsules, then the envelopes in one commit; bind first-use names after it.

        An envelope the database refuses (the store splits the batch to find it) is refused
        to its device — it passed every check, so the device provably sent it; the rest is
        stored. A failure of the store itself (``StoreUnavailable``) propagates: nothing of
        the batch is acknowledged, and devices resend."""
        new_capsules = [
            (c.item["capsule_id"], c.item["twin"], c.attributes, c.capsule_bytes)
            for c in good if c.capsule_bytes is not None
        ]
        if new_capsules:
            await self.store.put_capsules(new_capsules)  # type: ignore[arg-type]
            for cid, twin, attrs, _ in new_capsules:
                self.capsules.remember(cid, twin, attrs)
        outcomes = await self.store.append_envelopes([
            StoredEnvelope(c.item["twin"], c.item["device"], c.item["seq"], c.item["capsule_id"],
                           c.attributes, float(c.item["time"]), c.payload)
            for c in good
        ])
        for c, outcome in zip(good, outcomes, strict=True):
            twin, device, seq = c.item["twin"], c.item["device"], c.item["seq"]
            if isinstance(outcome, Unstorable):
                self._refuse(c.item, twin, device, outcome.reason, result.refusals, notify=True)
                continue
            if outcome is Outcome.CONFLICT:
                self._refuse(c.item, twin, device, "another item is stored under this seq",
                             result.refusals, notify=True)
                continue
            result.acks[(twin, device)].append(seq)
            if outcome is Outcome.NEW:
                await self.trust.bind(twin, c.owner, device, c.device_key)
                result.accepted.append(AcceptedItem(twin, device, seq, c.attributes,
                                                    c.item["capsule_id"], c.owner, c.payload))
        self.stored += len(result.accepted)

    async def _verdicts(self, candidates: list[Candidate],
                        prepared: Prepared) -> list[str | None]:
        """Per candidate: the speculative verdict if it checked exactly this candidate's
        (payload, device key, owner key), else a verdict computed now."""
        speculative = iter(await prepared.verdicts)
        known = {i: next(speculative) for i, w in enumerate(prepared.speculative)
                 if w is not None}
        late = [c for c in candidates if prepared.speculative[c.index] != c.check()]
        late_verdicts = dict(zip((c.index for c in late),
                                 await self._run_checks([c.check() for c in late]), strict=True))
        return [late_verdicts[c.index] if c.index in late_verdicts else known[c.index]
                for c in candidates]

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

    def _cheap_checks(self, twin: str, item: Envelope, payload: bytes, now: float,
                      carried: set[bytes]) -> Candidate:
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
        known = self.capsules.get(item["capsule_id"])
        if known is not None:
            if known[0] != twin:
                raise Rejected("capsule belongs to another twin")
            if known[1] != attrs:
                raise Rejected("item attributes differ from its capsule's")
            return Candidate(item, payload, owner, token.device_key, attrs, None, True)
        if item["capsule_id"] not in carried:
            raise CapsuleNotYetKnown("unknown capsule (send the epoch's capsule first)")
        return Candidate(item, payload, owner, token.device_key, attrs, item.get("capsule"), False)

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
        """One ack per device, all in flight together (one broker round trip, not one per
        device)."""
        await asyncio.gather(*(
            self._send_ack(twin, device, acks.get((twin, device), []),
                           refusals.get((twin, device), []))
            for twin, device in dict.fromkeys([*acks, *refusals])))

    async def _send_ack(self, twin: str, device: str, seqs: list[int],
                        rejected: list[dict[str, object]]) -> None:
        """One message per ``ACK_CHUNK`` seqs and refusals (the ack kind's limits)."""
        for i in range(0, max(len(seqs), len(rejected)), ACK_CHUNK):
            body = {"seqs": seqs[i : i + ACK_CHUNK], "rejected": rejected[i : i + ACK_CHUNK]}
            try:
                await self._publish_ack(twin, device, encode("ack", body))
            except Exception as exc:  # noqa: BLE001 - the device will resend; we stored it
                log.warning("ingest.ack_failed", twin=twin, device=device, error=str(exc))
