"""The device's side of twin interaction: desired state in, reported state and answers out.

Everything arrives on the device's inbox (``devices/{device}/inbox``), relayed by the cloud,
which is not trusted: each message is opened and checked here end to end before anything
moves.

* ``inbox_desired``: the owner's desired document, re-encrypted for this device through its
  ``dev-<device>`` grant. It must be signed by the owner or by the holder of an owner-signed
  InteractToken with right ``desired`` that the owner has not revoked (``inbox_revoke``); its
  version must be above the last one applied (a replay, or an old document the cloud sends
  again, is never applied twice — the same version again only repeats the report, so a
  report the cloud missed is not lost). Then the gatekeeper (access → clamp → simulator)
  decides, the handler applies, and the device publishes ``reported_set`` with its own
  strictly increasing version and ``in_sync`` = the delta (desired vs reported) is empty.
  A refused document is reported too (``in_sync`` false): the cloud then knows the device
  saw it and stops re-sending it.
* ``inbox_request``: opened with this device's own wrap, checked (requester's permit, its
  operation, deadline, revocation), remembered by (requester, request_id) *before* it runs —
  a second copy is answered from the cached answer, never executed again — then gatekeeper,
  handler, and an ``answer`` HPKE-sealed to the requester's reply key. Silent refusals get
  no answer.
* ``inbox_revoke``: the owner-signed ``interact_revoke`` (checked with the owner's key from
  the enrolment bundle, not the cloud's word); the token is refused from then on.
* ``inbox_wake``: ends a sleep early if the device is wakeable (at most
  ``max_wakes_per_hour``, whatever the cloud sends).

Presence (``devices/{device}/presence``) tells the cloud when to deliver: on start, every
``window_s / 2`` while awake, and just before sleeping or stopping.

Every gatekeeper decision goes to the decision log (sealed items of type ``decision``). The
device's own log names reasons for malformed or forged messages, never plaintext.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import structlog

from ciphertwin.agents.device import DeviceAgent
from ciphertwin.agents.device_settings import WakeSchedule
from ciphertwin.agents.gatekeeper import DESIRED_OP, Change, Decision, DecisionLog, Gatekeeper
from ciphertwin.agents.handlers import Handler, HandlerError, call_handler, handler_state
from ciphertwin.agents.interaction_store import INTERACTION_DB, InteractionStore
from ciphertwin.bus.envelope import Envelope, decode, max_size_of
from ciphertwin.bus.errors import BusError
from ciphertwin.crypto.tokens import InteractToken
from ciphertwin.crypto.wire import canonical
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.control import verify_control
from ciphertwin.protocol.json_state import check_document, delta
from ciphertwin.protocol.kinds import INBOX_KINDS
from ciphertwin.protocol.sealed_docs import wrap_for
from ciphertwin.protocol.twin_requests import (
    MAX_REASON_CHARS, OpenedRequest, build_answer, build_presence, open_request,
)
from ciphertwin.protocol.twin_state import build_reported, open_desired
from ciphertwin.supervise import spawn

__all__ = ["DeviceInteraction"]

log = structlog.get_logger(__name__)

DESIRED_COUNTER = "desired_version"
REPORTED_COUNTER = "reported_version"
LAST_DESIRED_DOC = "desired_doc"
REVOKED_KEEP_S = 400 * 86400
"""A revoked token is remembered longer than any token is valid (one year by default)."""
PUBLISH_TIMEOUT_S = 30.0


def _where(exc: BaseException) -> str:
    """Where an unexpected error was raised (file:line), for the log. Not the traceback with
    its locals: those hold plaintext (documents, arguments)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno} in {last.name}"


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


class DeviceInteraction:
    """Run with ``await interaction.run()`` next to ``agent.run(...)`` (same bus)."""

    def __init__(self, agent: DeviceAgent, handler: Handler, gatekeeper: Gatekeeper, *,
                 wake_schedule: WakeSchedule | None = None, store_path: str | Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.agent, self.handler, self.gatekeeper = agent, handler, gatekeeper
        self.config, self.bus, self.creds = agent.config, agent.bus, agent.creds
        self.wake = wake_schedule or WakeSchedule()
        self.store = InteractionStore(store_path or Path(agent.outbox.path).with_name(
            INTERACTION_DB))
        self.decisions = DecisionLog(agent.record)
        self.clock = clock
        self._lock = asyncio.Lock()
        self._revoked: set[bytes] = set()
        self._state: dict[str, Any] = {}  # last reported state
        self._last_report: tuple[int, bytes] | None = None  # (desired version, envelope)
        self._wake_event = asyncio.Event()
        self._wakes: collections.deque[float] = collections.deque()
        self._stopping = asyncio.Event()
        self._result: Any = None  # the handler's result for the request being served
        self.ready = asyncio.Event()
        self.awake = True
        self.applied = self.answered = self.refused = self.reported = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Subscribe to the inbox, announce presence, follow the wake schedule until stop()."""
        t = self.bus.topics
        inbox, replies = t.inbox(self.config.device), t.filter("replies",
                                                               principal=self.config.device)
        async with self.store:
            self._revoked = await self.store.revoked()
            subscribed: list[str] = []
            presence: asyncio.Task[None] | None = None
            try:
                await self.bus.subscribe(inbox, self._on_inbox,
                                         max_payload=max_size_of(*INBOX_KINDS))
                subscribed.append(inbox)
                await self.bus.subscribe(replies, self._on_reply,
                                         max_payload=max_size_of("state_result"))
                subscribed.append(replies)
                presence = spawn("device:presence", self._presence_loop)
                self.ready.set()
                await self._stopping.wait()
            finally:  # a supervisor may run us again: leave nothing subscribed
                if presence is not None:
                    presence.cancel()
                    await asyncio.gather(presence, return_exceptions=True)
                for topic in subscribed:
                    with contextlib.suppress(CipherTwinError):
                        await self.bus.unsubscribe(topic)
                async with self._lock:  # let a change being applied finish
                    if presence is not None:
                        with contextlib.suppress(CipherTwinError):  # going offline: say so
                            await self._presence(False, self.clock(), None, timeout=2.0)

    def stop(self) -> None:
        self._stopping.set()

    # -- inbox ----------------------------------------------------------------------------------
    async def _on_inbox(self, topic: str, payload: bytes, retain: bool) -> None:
        """Dispatch one inbox message; anything wrong is refused with a logged reason."""
        kind = "?"
        try:
            env = decode(payload, INBOX_KINDS)
            kind = env.kind
            await {"inbox_desired": self._desired, "inbox_request": self._request,
                   "inbox_revoke": self._revoke, "inbox_wake": self._wake}[kind](env)
        except CipherTwinError as exc:
            self.refused += 1
            log.warning("device.inbox_refused", device=self.config.device, kind=kind,
                        reason=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug must not end the subscription
            self.refused += 1
            log.error("device.inbox_failed", device=self.config.device, kind=kind,
                      error=_where(exc))

    async def _on_reply(self, topic: str, payload: bytes, retain: bool) -> None:
        """The cloud's verdict on our reports: refusals are worth a log line."""
        try:
            result = decode(payload, "state_result")
        except CipherTwinError as exc:
            log.warning("device.reply_refused", reason=str(exc))
            return
        if not result["ok"]:
            log.warning("device.report_refused_by_cloud", reason=result["reason"],
                        reported_version=result["reported_version"])

    def _own_twin(self, twin: str, what: str) -> None:
        if twin != self.config.twin:
            raise ValidationError(f"{what} is for twin {twin!r}, not ours")

    def _author(self, name: str, permit: InteractToken | None) -> tuple[str, bool]:
        """(principal, is_owner) of a verified author; refuses a revoked permit."""
        if permit is None:
            return name, True
        if permit.token_id in self._revoked:
            raise _Revoked(f"permit {permit.token_id.hex()[:16]} of {name!r} is revoked")
        return permit.principal, False

    def _refusal(self, change: Change, code: str, reason: str) -> Decision:
        return Decision(False, change.twin, change.principal, change.op, change.ref,
                        "device", code, reason, time=self.clock())

    def _current_state(self) -> dict[str, Any]:
        return handler_state(self.handler) or dict(self._state)

    async def _judge(self, change: Change, revoked: str | None) -> Decision:
        if revoked is not None:
            return self._refusal(change, "revoked", revoked)
        return self.gatekeeper.check(change, state=self._current_state(), now=self.clock())

    # -- desired --------------------------------------------------------------------------------
    async def _desired(self, inbox: Envelope) -> None:
        self._own_twin(inbox["twin"], "inbox_desired")
        env = decode(inbox["doc"], "desired_set")
        self._own_twin(env["twin"], "desired document")
        if env["version"] != inbox["version"]:
            raise ValidationError("inbox_desired names another version than its document")
        doc = open_desired(env, inbox["key"], self.config.identity.pre,
                           self.config.owner_verify, now=self.clock())
        async with self._lock:
            claimed, last, report_version = await self.store.claim_desired(
                doc.version, canonical(doc.doc), desired=DESIRED_COUNTER,
                reported=REPORTED_COUNTER, doc_name=LAST_DESIRED_DOC)
            if not claimed and doc.version < last:
                raise ValidationError(f"desired version {doc.version} is older than the "
                                      f"applied {last} (replayed or stale)")
            if not claimed:
                log.info("device.desired_again", version=doc.version, hint="reported again")
                await self._report_again(doc.version, doc.doc)
                return
            revoked = None
            try:
                principal, is_owner = self._author(doc.writer, doc.permit)
            except _Revoked as exc:
                principal, is_owner, revoked = doc.writer, False, str(exc)
            change = Change(self.config.twin, principal, DESIRED_OP, doc.doc, is_owner=is_owner,
                            ref=f"desired:{doc.version}")
            decision = await self._judge(change, revoked)
            if decision.allowed:
                decision = await self._apply(decision, DESIRED_OP, dict(decision.args))
                self.applied += decision.allowed
            # the report first on the wire; the decision's (durable) outbox append alongside
            await asyncio.gather(self._report(doc.version, doc.doc, version=report_version),
                                 self.decisions.append(decision))

    async def _apply(self, decision: Decision, op: str, args: dict[str, Any]) -> Decision:
        """Run the handler; returns the decision (turned into a refusal if it failed) and
        keeps the state to report in ``self._state``."""
        try:
            result = await call_handler(self.handler, op, args)
        except HandlerError as exc:
            return replace(decision, allowed=False, rule="handler", code="failed",
                           reason=_short(str(exc)))
        except Exception as exc:  # noqa: BLE001 - the actuator's bug is a refusal, not a crash
            log.error("device.handler_failed", op=op, error=_where(exc))
            return replace(decision, allowed=False, rule="handler", code="failed",
                           reason=f"handler failed ({type(exc).__name__})")
        state = handler_state(self.handler)
        if state is None and op == DESIRED_OP:
            state = result if isinstance(result, dict) else args
        if state is not None:
            self._state = state
        self._result = result
        return decision

    async def _report(self, desired_version: int, desired: Mapping[str, Any] | None, *,
                      version: int | None = None) -> None:
        """Publish the current state as ``reported_set`` under a new own version (or the
        one reserved with the desired version)."""
        state = handler_state(self.handler) or self._state
        try:
            check_document(state)
        except ValidationError as exc:
            log.error("device.state_not_reportable", reason=str(exc))
            return
        in_sync = desired is not None and not delta(dict(desired), state)
        if version is None:
            version = await self.store.next_counter(REPORTED_COUNTER)
        env = build_reported(self.creds, self.config.owner_pre, version, desired_version, state,
                             in_sync)
        self._state = state
        self._last_report = (desired_version, env)
        if await self._publish(self.bus.topics.reported(self.config.twin), env, "reported"):
            self.reported += 1

    async def _report_again(self, desired_version: int, desired: Mapping[str, Any]) -> None:
        if self._last_report is not None and self._last_report[0] == desired_version:
            await self._publish(self.bus.topics.reported(self.config.twin),
                                self._last_report[1], "reported")
        else:  # after a restart: a fresh report of the current state
            self._state = self._current_state()
            await self._report(desired_version, desired)

    async def _last_desired(self) -> dict[str, Any] | None:
        raw = await self.store.get_doc(LAST_DESIRED_DOC)
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    # -- requests -------------------------------------------------------------------------------
    async def _request(self, inbox: Envelope) -> None:
        env = decode(inbox["request"], "request")
        self._own_twin(env["twin"], "request")
        try:  # our own wrap, as the requester addressed it (the cloud's copy only as fallback)
            wrap = wrap_for(env, self.config.device)
        except ValidationError:
            wrap = inbox["wrap"]
        req = open_request(env, wrap, self.config.identity.pre, self.config.owner_verify,
                           now=self.clock())
        async with self._lock:
            new, cached = await self.store.claim_request(req.requester, req.request_id,
                                                         req.deadline)
            if not new:
                log.info("device.request_replayed", requester=req.requester,
                         request_id=req.request_id, answered_from_cache=cached is not None)
                if cached is not None:
                    await self._publish(self.bus.topics.answers(self.config.twin), cached,
                                        "answer")
                return
            await self._serve(req)

    async def _serve(self, req: OpenedRequest) -> None:
        b = req.body
        revoked = None
        try:
            principal, is_owner = self._author(req.requester, req.permit)
        except _Revoked as exc:
            principal, is_owner, revoked = req.requester, False, str(exc)
        change = Change(self.config.twin, principal, b.op, b.args, is_owner=is_owner,
                        ref=req.request_id, request_id=req.request_id, approvals=b.approvals,
                        attachment=b.attachment)
        if b.op == DESIRED_OP:  # desired state has its own path: versions, reports
            decision = self._refusal(change, "reserved",
                                     f"operation {DESIRED_OP!r} is set through desired state")
        else:
            decision = await self._judge(change, revoked)
        before = self._current_state()
        self._result = None
        if decision.allowed:
            args = dict(decision.args)
            if b.attachment is not None:
                args["attachment"] = b.attachment
            decision = await self._apply(decision, b.op, args)
        if decision.silent:
            await self.decisions.append(decision)
            return
        answer = self._answer(req, decision)
        published, *_ = await asyncio.gather(
            self._publish(self.bus.topics.answers(self.config.twin), answer, "answer"),
            self.store.store_answer(req.requester, req.request_id, answer),
            self.decisions.append(decision))
        self.answered += bool(published)
        if decision.allowed and self._changed(before):
            await self._report(await self.store.counter(DESIRED_COUNTER),
                               await self._last_desired())

    def _answer(self, req: OpenedRequest, decision: Decision) -> bytes:
        """The sealed answer; a result that is no JSON value becomes a failure answer."""
        reason = _short(decision.reason)
        if decision.allowed:
            try:
                return build_answer(self.creds, req, True, self._result, reason)
            except ValidationError as exc:
                reason = _short(f"the result cannot be sent: {exc}")
        return build_answer(self.creds, req, False, None, reason)

    def _changed(self, before: Mapping[str, Any]) -> bool:
        """Did the request change the state beyond what changes by itself?"""
        volatile = set(getattr(self.handler, "volatile", ()))
        after = self._current_state()
        return {k: v for k, v in after.items() if k not in volatile} != {
            k: v for k, v in before.items() if k not in volatile}

    # -- revocations and wake-ups ---------------------------------------------------------------
    async def _revoke(self, inbox: Envelope) -> None:
        env = decode(inbox["revoke"], "interact_revoke")
        verify_control(env, self.config.owner_verify)  # the owner's word, not the cloud's
        token_id = bytes(env["token_id"])
        await self.store.revoke(token_id, self.clock() + REVOKED_KEEP_S)
        self._revoked.add(token_id)
        log.info("device.interact_token_revoked", token=token_id.hex()[:16])

    async def _wake(self, inbox: Envelope) -> None:
        self._own_twin(inbox["twin"], "inbox_wake")
        if self.awake:
            return
        if not self.wake.wakeable:
            raise ValidationError("wake-up refused: this device is not wakeable")
        now = self.clock()
        while self._wakes and self._wakes[0] < now - 3600:
            self._wakes.popleft()
        if len(self._wakes) >= self.wake.max_wakes_per_hour:
            raise ValidationError(f"wake-up refused: {self.wake.max_wakes_per_hour} this hour")
        self._wakes.append(now)
        log.info("device.woken", device=self.config.device)
        self._wake_event.set()

    # -- presence -------------------------------------------------------------------------------
    async def _presence(self, awake: bool, until: float, next_wake: float | None, *,
                        timeout: float = PUBLISH_TIMEOUT_S) -> None:
        env = build_presence(self.creds, awake=awake, until=until, window_s=self.wake.window_s,
                             next_wake=next_wake, wakeable=self.wake.wakeable)
        await self._publish(self.bus.topics.presence(self.config.device), env, "presence",
                            timeout=timeout)

    async def _presence_loop(self) -> None:
        """Awake windows and sleeps per the schedule; presence renewed every window_s/2."""
        w = self.wake
        while True:
            self.awake = True
            end = None if w.always_awake else self.clock() + w.window_s
            while True:
                now = self.clock()
                if end is not None and now >= end:
                    break
                until = now + w.window_s if end is None else end
                await self._presence(True, until, None if end is None else end + w.sleep_s)
                pause = w.window_s / 2 if end is None else min(w.window_s / 2, end - now)
                await asyncio.sleep(max(pause, 0.05))
            async with self._lock:  # never fall asleep in the middle of a change
                self.awake = False
                self._wake_event.clear()
                wake_at = self.clock() + w.sleep_s
                await self._presence(False, self.clock(), wake_at)
            log.info("device.sleeping", device=self.config.device, for_s=w.sleep_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_event.wait(), w.sleep_s)

    async def _publish(self, topic: str, payload: bytes, what: str, *,
                       timeout: float = PUBLISH_TIMEOUT_S) -> bool:
        try:
            await self.bus.publish(topic, payload, timeout=timeout)
            return True
        except BusError as exc:
            log.warning("device.publish_failed", what=what, error=f"{type(exc).__name__}: {exc}")
            return False


class _Revoked(CipherTwinError):
    """The author's InteractToken was revoked by the owner."""
