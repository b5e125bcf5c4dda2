"""Requests to devices (P5) at the cloud: admission by metadata, a durable queue per
device, delivery when the device is awake, wake-ups, expiry.

The cloud reads no request: it sees who asks (a requester whose InteractToken the owner
installed), for which twin, until when (deadline), whether to wake the device, and one wrap
per device. Everything it decides is decided on that:

* *admission* — deadline in the future and at most ``max_deadline_s`` ahead, rate limits per
  requester and per twin (sliding minute), the replay guard (a (requester, request_id) seen
  before) and a cap on each device's queue; every refusal is answered with a reason;
* *queue* — every admitted request is stored before anything else (so it survives a cloud
  restart) and delivered in arrival order, per device, under a per-device lock, so a new
  request never overtakes an older one of the same device;
* *presence* — a device is awake iff its last presence said awake and ``until`` is still
  ahead; an awake presence delivers the queue (after a restart, or when it starts a new
  awake period, requests delivered earlier but not answered are delivered again: the device
  drops the duplicates by request id and answers them from its cache);
* *wake* — a ``wake`` request for an asleep, wakeable device sends one ``inbox_wake`` (none
  while one is outstanding), at most ``wakes_per_hour`` per device (a denial-of-sleep cap);
  beyond it the request waits for the next window, answered ``queued: wake cap reached``;
* *expiry* — requests whose deadline passed are dropped and their requesters told
  ``expired`` (by the periodic ``sweep`` and when a delivery meets one).

Publishing is the service's: the router calls ``deliver``, ``wake`` and ``status``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import msgpack
import structlog

from ciphertwin.cloud_twin.store import (
    Delivery,
    Enqueued,
    RequestRecord,
    RequestState,
    TwinStore,
)
from ciphertwin.cloud_twin.trust import Owner, Rejected
from ciphertwin.crypto.errors import TokenRejected
from ciphertwin.crypto.tokens import InteractToken, verify_interact_token
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.sealed_docs import MAX_SKEW_S

log = structlog.get_logger(__name__)

QUEUED, DELIVERED, ANSWERED, REFUSED, EXPIRED = (
    "queued", "delivered", "answered", "refused", "expired")
PURGE_EVERY_S = 60.0
"""How often the sweeper forgets final requests (a write transaction; expiry runs every sweep)."""
WAKE_CAP_REACHED = "wake cap reached"
_PRESENCE_NS, _WAKES_NS = "presence", "wakes"
_TOKENS_NS, _REVOKED_NS = "interact_token", "interact_revoked"


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    """A request whose signature and permit the service has checked: metadata only."""

    twin: str
    requester: str
    request_id: str
    deadline: float
    wake: bool
    envelope: bytes
    wraps: Mapping[str, bytes]
    """device -> the wrap addressed to it (the owner's wrap is not in here)."""


@dataclass(frozen=True, slots=True)
class Presence:
    """What a device's (checked) ``presence`` says about when it listens."""

    twin: str
    device: str
    awake: bool
    until: float
    next_wake: float | None
    window_s: float
    wakeable: bool
    time: float

    def awake_at(self, now: float) -> bool:
        return self.awake and now < self.until

    def pack(self) -> bytes:
        return msgpack.packb([self.twin, self.device, self.awake, self.until, self.next_wake,
                              self.window_s, self.wakeable, self.time])  # type: ignore[no-any-return]

    @classmethod
    def unpack(cls, data: bytes) -> Presence:
        t, d, a, u, n, w, k, at = msgpack.unpackb(data)
        return cls(str(t), str(d), bool(a), float(u), None if n is None else float(n),
                   float(w), bool(k), float(at))


@dataclass(frozen=True, slots=True)
class Status:
    """What the requester is told: ``state`` (queued, delivered, answered, refused,
    expired) and why."""

    state: str
    reason: str = ""


Deliver = Callable[[Delivery], Awaitable[None]]
Wake = Callable[[str, str], Awaitable[None]]
StatusSink = Callable[[str, str, Status, "bytes | None"], Awaitable[None]]


class RateWindow:
    """At most ``limit`` events per key in any ``window_s`` (a sliding log, in memory: a
    restart forgets it, which costs at most one window of extra requests)."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._events: dict[str, deque[float]] = defaultdict(deque)

    def _trim(self, key: str, now: float) -> deque[float]:
        events = self._events[key]
        while events and events[0] <= now - self.window_s:
            events.popleft()
        return events

    def full(self, key: str, now: float) -> bool:
        return len(self._trim(key, now)) >= self.limit

    def take(self, key: str, now: float) -> None:
        self._trim(key, now).append(now)

    def give_back(self, key: str, at: float) -> None:
        """Undo ``take`` (the request was refused later, e.g. as a replay)."""
        events = self._events.get(key)
        if events and at in events:
            events.remove(at)

    def forget_idle(self, now: float) -> None:
        for key in [k for k in self._events if not self._trim(k, now)]:
            del self._events[key]


class RequestRouter:
    """Admission, durable queue, presence, wake-ups and expiry of requests (see module)."""

    def __init__(
        self,
        store: TwinStore,
        *,
        deliver: Deliver,
        wake: Wake,
        status: StatusSink,
        requests_per_min: int = 60,
        twin_requests_per_min: int = 120,
        queue_cap: int = 1000,
        wakes_per_hour: int = 6,
        max_deadline_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
        still_valid: Callable[[Delivery, float], str | None] | None = None,
    ) -> None:
        """``still_valid(delivery, now)``: why a queued request may no longer go out (its
        permit was revoked or has expired meanwhile), or None — checked at delivery."""
        self.store = store
        self._still_valid = still_valid
        self._deliver, self._wake, self._status = deliver, wake, status
        self.per_requester = RateWindow(requests_per_min)
        self.per_twin = RateWindow(twin_requests_per_min)
        self.queue_cap, self.wakes_per_hour = queue_cap, wakes_per_hour
        self.max_deadline_s = max_deadline_s
        self.clock = clock
        self._purged_at = -math.inf
        self.presence: dict[tuple[str, str], Presence] = {}
        self._live: set[tuple[str, str]] = set()
        """Devices whose current awake period this process has seen begin (and so has
        delivered the whole queue to): for them, new requests go out at once and nothing
        already delivered is sent again."""
        self._wakes: dict[tuple[str, str], list[float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._more: set[tuple[str, str]] = set()
        """Devices with requests admitted while their delivery run held the lock."""

    async def load(self) -> None:
        """Presence and wake-up counts from the store (the queue itself stays there)."""
        for raw in (await self.store.list_kv(_PRESENCE_NS)).values():
            try:
                p = Presence.unpack(raw)
            except Exception:  # noqa: BLE001 - a bad record costs only its device's presence
                continue
            self.presence[(p.twin, p.device)] = p
        for key, raw in (await self.store.list_kv(_WAKES_NS)).items():
            twin, _, device = key.partition("/")
            try:
                self._wakes[(twin, device)] = [float(t) for t in msgpack.unpackb(raw)]
            except Exception:  # noqa: BLE001
                continue

    def is_awake(self, twin: str, device: str, now: float | None = None) -> bool:
        p = self.presence.get((twin, device))
        return p is not None and p.awake_at(self.clock() if now is None else now)

    # -- admission ----------------------------------------------------------------------
    async def submit(self, req: IncomingRequest) -> Status:
        """Admit (store) and route one checked request; the requester is told the outcome."""
        now = self.clock()
        status = await self._admit(req, now)
        if status.state == REFUSED:
            log.warning("requests.refused", twin=req.twin, requester=req.requester,
                        request=req.request_id, reason=status.reason)
            await self._tell(req.requester, req.request_id, status)
            return status
        log.info("requests.admitted", twin=req.twin, requester=req.requester,
                 request=req.request_id, devices=sorted(req.wraps), wake=req.wake)
        delivered_now = []
        for device in sorted(req.wraps):
            if not self.is_awake(req.twin, device, now):
                continue
            if self._locks[(req.twin, device)].locked():  # a delivery run is under way:
                self._more.add((req.twin, device))  # it takes this one too, in order
                delivered_now.append(0)
                continue
            delivered_now.append(await self._flush_logged(
                req.twin, device, quiet=(req.requester, req.request_id)))
        if delivered_now and all(delivered_now):
            status = Status(DELIVERED)
        elif delivered_now and len(delivered_now) == len(req.wraps):
            status = Status(QUEUED, "delivery to the awake device under way")
        else:
            status = await self._asleep(req, now)
        await self._tell(req.requester, req.request_id, status)
        return status

    async def _admit(self, req: IncomingRequest, now: float) -> Status:
        if not req.wraps:
            return Status(REFUSED, "no wrap for any device of the twin")
        if req.deadline <= now:
            return Status(REFUSED, "deadline already passed")
        if req.deadline > now + self.max_deadline_s:
            return Status(REFUSED, f"deadline more than {self.max_deadline_s / 86400:g} days ahead")
        if self.per_requester.full(req.requester, now):
            return Status(REFUSED, f"rate limit: at most {self.per_requester.limit} requests "
                                   "per minute per requester")
        if self.per_twin.full(req.twin, now):
            return Status(REFUSED, f"rate limit: at most {self.per_twin.limit} requests per "
                                   "minute for this twin")
        self.per_requester.take(req.requester, now)
        self.per_twin.take(req.twin, now)
        record = RequestRecord(req.requester, req.request_id, req.twin, req.envelope,
                               req.deadline, req.wake, now)
        try:
            outcome, device = await self.store.enqueue_request(record, req.wraps, self.queue_cap)
        except BaseException:
            self._give_back(req, now)
            raise
        if outcome is Enqueued.NEW:
            return Status(QUEUED)
        self._give_back(req, now)
        if outcome is Enqueued.REPLAYED:
            return Status(REFUSED, "replayed: request_id already seen")
        return Status(REFUSED, f"queue full: device {device} holds {self.queue_cap} requests")

    def _give_back(self, req: IncomingRequest, now: float) -> None:
        self.per_requester.give_back(req.requester, now)
        self.per_twin.give_back(req.twin, now)

    async def _asleep(self, req: IncomingRequest, now: float) -> Status:
        """Queued for an asleep device: wake it if asked (and allowed), else say when."""
        reasons = []
        for device in sorted(req.wraps):
            if self.is_awake(req.twin, device, now):
                continue
            p = self.presence.get((req.twin, device))
            if req.wake and p is not None and p.wakeable:
                reasons.append(await self._try_wake(req.twin, device, p, now))
            elif p is not None and p.next_wake is not None:
                reasons.append(f"device {device} asleep until {p.next_wake:.0f}")
            else:
                reasons.append(f"device {device} asleep")
        return Status(QUEUED, "; ".join(reasons))

    async def _try_wake(self, twin: str, device: str, p: Presence, now: float) -> str:
        key = (twin, device)
        recent = [t for t in self._wakes.get(key, []) if t > now - 3600]
        if recent and recent[-1] >= p.time:
            return f"waking device {device}"  # a wake is outstanding: do not send another
        if len(recent) >= self.wakes_per_hour:
            log.warning("requests.wake_capped", twin=twin, device=device,
                        wakes=len(recent), cap=self.wakes_per_hour)
            return WAKE_CAP_REACHED
        recent.append(now)
        self._wakes[key] = recent
        await self.store.put_kv(_WAKES_NS, f"{twin}/{device}", msgpack.packb(recent))
        try:
            await self._wake(twin, device)
        except Exception as exc:  # noqa: BLE001 - the request stays queued
            log.warning("requests.wake_failed", twin=twin, device=device, error=str(exc))
        log.info("requests.wake_sent", twin=twin, device=device, wakes_this_hour=len(recent))
        return f"waking device {device}"

    # -- presence and delivery ---------------------------------------------------------------
    async def on_presence(self, p: Presence) -> int:
        """Record a (checked) presence; an awake one delivers the device's queue. Returns
        how many requests were delivered."""
        key = (p.twin, p.device)
        known = self.presence.get(key)
        if known is not None and p.time < known.time:
            log.info("requests.presence_stale", twin=p.twin, device=p.device)
            return 0
        now = self.clock()
        new_period = self.starts_awake_period(p)
        self.presence[key] = p
        await self.store.put_kv(_PRESENCE_NS, f"{p.twin}/{p.device}", p.pack())
        if not p.awake_at(now):
            self._live.discard(key)
            return 0
        self._live.add(key)
        return await self._flush(p.twin, p.device, redeliver=new_period)

    def starts_awake_period(self, p: Presence) -> bool:
        """Does this (not yet recorded) presence begin an awake period this process has not
        served yet? Then everything the device may have missed is sent again."""
        key = (p.twin, p.device)
        known = self.presence.get(key)
        if not p.awake_at(self.clock()) or (known is not None and p.time < known.time):
            return False
        return not (key in self._live and known is not None and known.awake_at(p.time))

    async def _flush_logged(self, twin: str, device: str, *, quiet: tuple[str, str]) -> int:
        """``_flush`` of new requests; a failure (the broker, the store) leaves them queued
        for the device's next presence."""
        try:
            return await self._flush(twin, device, redeliver=False, quiet=quiet)
        except Exception as exc:  # noqa: BLE001 - stored: delivered at the next presence
            log.warning("requests.delivery_failed", twin=twin, device=device,
                        error=f"{type(exc).__name__}: {exc}")
            return 0

    async def _flush(self, twin: str, device: str, *, redeliver: bool,
                     quiet: tuple[str, str] | None = None) -> int:
        """Deliver the device's queue in order (pending ones; with ``redeliver`` also the
        delivered, unanswered ones) while it is awake; expired ones are dropped on the way.
        ``quiet``: a request whose status the caller sends itself."""
        delivered = 0
        async with self._locks[(twin, device)]:
            after = 0
            while self.is_awake(twin, device):
                batch = await self.store.device_queue(twin, device, after=after,
                                                      include_delivered=redeliver, limit=200)
                if not batch:
                    if (twin, device) in self._more:  # admitted while we ran: look again
                        self._more.discard((twin, device))
                        continue
                    break
                now = self.clock()
                fresh: list[Delivery] = []
                try:
                    for d in batch:
                        if d.deadline <= now:
                            await self.expire(d.requester, d.request_id, now)
                            continue
                        if self._still_valid is not None and (
                                why := self._still_valid(d, now)) is not None:
                            await self._refuse_queued(d, why, now)
                            continue
                        await self._deliver(d)
                        delivered += 1
                        if not d.delivered:
                            fresh.append(d)
                finally:
                    if fresh:
                        await self.store.mark_delivered(twin, device, fresh[0].ord, fresh[-1].ord)
                await asyncio.gather(*(  # statuses go to many requesters: no order to keep
                    self._tell(d.requester, d.request_id, Status(DELIVERED))
                    for d in fresh if (d.requester, d.request_id) != quiet))
                after = batch[-1].ord
        if delivered:
            log.info("requests.delivered", twin=twin, device=device, count=delivered,
                     redelivery=redeliver)
        return delivered

    # -- answers and expiry --------------------------------------------------------------
    async def on_answer(self, twin: str, device: str, requester: str, request_id: str,
                        answer: bytes) -> bool:
        """A (checked) answer of ``device``: the request is final, the requester gets the
        answer envelope. False (dropped, logged) if the request is not open for it."""
        record = await self.store.close_request(requester, request_id, RequestState.ANSWERED,
                                                self.clock(), twin=twin, device=device)
        if record is None:
            log.info("requests.answer_dropped", twin=twin, device=device, requester=requester,
                     request=request_id, reason="no open request of this requester for it")
            return False
        log.info("requests.answered", twin=twin, device=device, requester=requester,
                 request=request_id)
        await self._tell(requester, request_id, Status(ANSWERED), answer)
        return True

    async def expire(self, requester: str, request_id: str, now: float) -> bool:
        record = await self.store.close_request(requester, request_id, RequestState.EXPIRED, now)
        if record is None:
            return False
        log.info("requests.expired", twin=record.twin, requester=requester, request=request_id)
        await self._tell(requester, request_id, Status(EXPIRED, "deadline passed"))
        return True

    async def _refuse_queued(self, d: Delivery, reason: str, now: float) -> None:
        if await self.store.close_request(d.requester, d.request_id, RequestState.REFUSED, now):
            log.warning("requests.refused_at_delivery", twin=d.twin, device=d.device,
                        requester=d.requester, request=d.request_id, reason=reason)
            await self._tell(d.requester, d.request_id, Status(REFUSED, reason))

    async def sweep(self) -> int:
        """Expire every request whose deadline passed; forget old final ones and idle rate
        windows. Returns how many expired."""
        now = self.clock()
        expired = 0
        while due := await self.store.due_requests(now, 500):
            for r in due:
                expired += await self.expire(r.requester, r.request_id, now)
            if len(due) < 500:
                break
        if now - self._purged_at >= PURGE_EVERY_S:  # a write transaction: not every second,
            self._purged_at = now                    # so ingest's writer rarely waits on it
            await self.store.purge_requests(now - 3600)
        self.per_requester.forget_idle(now)
        self.per_twin.forget_idle(now)
        return expired

    async def run_sweeper(self, interval_s: float = 1.0) -> None:
        """Forever: ``sweep`` every ``interval_s`` (a failure is logged, never fatal)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - next round tries again
                log.warning("requests.sweep_failed", error=f"{type(exc).__name__}: {exc}")

    async def _tell(self, requester: str, request_id: str, status: Status,
                    answer: bytes | None = None) -> None:
        try:
            await self._status(requester, request_id, status, answer)
        except Exception as exc:  # noqa: BLE001 - the request's fate is stored either way
            log.warning("requests.status_failed", requester=requester, request=request_id,
                        error=f"{type(exc).__name__}: {exc}")



class InteractBook:
    """The InteractTokens owners installed (``interact_grant``) and revoked
    (``interact_revoke``), in memory and in the store.

    A permit in a desired write or a request counts only if its owner installed exactly
    these bytes and has not revoked it: a revocation takes effect with the next message,
    even for a token that is otherwise valid for a year (the device checks it again)."""

    def __init__(self, store: TwinStore) -> None:
        self.store = store
        self.tokens: dict[bytes, InteractToken] = {}
        self._raw: dict[bytes, bytes] = {}
        self.revoked: dict[bytes, tuple[str, bytes]] = {}
        """token id -> (owner, the owner-signed interact_revoke envelope, to forward)."""

    async def load(self) -> None:
        for key, raw in (await self.store.list_kv(_TOKENS_NS)).items():
            try:
                token = InteractToken.from_bytes(raw)
            except ValidationError:
                log.warning("interact.bad_stored_token", token=key)
                continue
            self.tokens[token.token_id], self._raw[token.token_id] = token, raw
        for key, raw in (await self.store.list_kv(_REVOKED_NS)).items():
            owner, _, envelope = raw.partition(b"\x00")
            self.revoked[bytes.fromhex(key)] = (owner.decode(), envelope)

    async def install(self, owner: Owner, raw: bytes, now: float) -> InteractToken:
        """Install a token the owner signed (still valid, not revoked); returns it."""
        try:
            token = verify_interact_token(self.parse(raw), owner.verify_key, now=now,
                                          leeway_s=MAX_SKEW_S)  # owner clock ahead
        except TokenRejected as exc:
            raise Rejected(f"interact token refused: {exc}") from None
        if token.token_id in self.revoked:
            raise Rejected("interact token was revoked")
        await self.store.put_kv(_TOKENS_NS, token.token_id.hex(), raw)
        self.tokens[token.token_id], self._raw[token.token_id] = token, raw
        return token

    async def revoke(self, owner: Owner, token_id: bytes, envelope: bytes) -> InteractToken | None:
        """Record the owner's revocation (also of a token never installed here: it may be
        shown to devices directly); the token if it was installed."""
        token = self.tokens.get(token_id)
        if token is not None and token.issuer != owner.verify_key:
            raise Rejected("interact token of another owner")
        await self.store.put_kv(_REVOKED_NS, token_id.hex(), owner.name.encode() + b"\x00" + envelope)
        self.revoked[token_id] = (owner.name, envelope)
        return token

    @staticmethod
    def parse(raw: bytes) -> InteractToken:
        try:
            return InteractToken.from_bytes(raw)
        except ValidationError as exc:
            raise Rejected(f"malformed interact token: {exc}") from None

    def check(self, permit: InteractToken) -> None:
        """Raise Rejected unless ``permit`` (already verified against the owner's key) was
        installed as these very bytes and is not revoked."""
        if permit.token_id in self.revoked:
            raise Rejected("permit revoked by the owner")
        if self._raw.get(permit.token_id) != permit.to_bytes():
            raise Rejected("unknown permit: the owner has not installed it at the cloud")

    def holders(self, twin: str) -> set[str]:
        """Principals with a live (installed, not revoked) token for ``twin``."""
        return {t.principal for tid, t in self.tokens.items()
                if twin in t.twins and tid not in self.revoked}

    def revocations_for(self, owner: str, twin: str, now: float) -> list[bytes]:
        """The owner's revoke envelopes a device of ``twin`` should know (tokens of the twin
        still within their validity; unknown tokens too, as the cloud cannot tell)."""
        out = []
        for tid, (who, envelope) in self.revoked.items():
            token = self.tokens.get(tid)
            if who == owner and (token is None or (twin in token.twins and token.not_after > now)):
                out.append(envelope)
        return out
