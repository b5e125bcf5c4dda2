"""Interacting with a twin: desired state (P4) and requests to its devices (P5).

Both the owner (signing with its own key) and a requester holding an owner-signed
:class:`~ciphertwin.crypto.tokens.InteractToken` (the *permit*) write through here:

* :class:`DesiredWriter` sets desired state with optimistic concurrency — the cloud accepts a
  write only from the version it was based on. A partial update (``merge``) is done HERE, on
  plaintext: fetch and open the current desired document, apply the RFC 7386 merge patch,
  write the full document, and start over (at most :data:`MERGE_ATTEMPTS` times) if someone
  else wrote in between. The cloud never sees a document, only versions.
* :class:`Requester` seals a request for the owner and the twin's devices (their keys come
  from the token, or the owner's device book — never from the cloud), follows its status
  (queued, delivered, answered …) on ``replies/{me}/{request_id}`` and opens the device's
  answer, which only the fresh reply key made for this request can decrypt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ciphertwin.agents.identity import Identity
from ciphertwin.agents.reader import TwinReader, TwinState
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.bus.errors import RequestTimeout
from ciphertwin.crypto.kpcpre import PrePublicKey
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import DeviceKeys, InteractToken
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.json_state import check_document, merge_patch
from ciphertwin.protocol.sealed_docs import Recipient
from ciphertwin.protocol.twin_requests import AnswerBody, build_request, open_answer
from ciphertwin.protocol.twin_state import build_desired

log = structlog.get_logger(__name__)

MERGE_ATTEMPTS = 3
DEFAULT_DEADLINE_S = 3600.0
TERMINAL_STATES = ("answered", "refused", "expired")


class StaleVersion(CipherTwinError):
    """The cloud refused a desired write: it was based on an older version than the current."""

    def __init__(self, message: str, current: int) -> None:
        super().__init__(message)
        self.current = current


class InteractionRefused(CipherTwinError):
    """The cloud refused a desired write or a request; the reason is the cloud's."""


class InteractionTimeout(CipherTwinError):
    """No (final) word on a desired write or a request in time."""


@dataclass(frozen=True)
class RequestOutcome:
    """Where a request ended up: its last state (``queued`` … ``answered``), every state seen
    in order, the cloud's reason, and the device's answer once there is one."""

    request_id: str
    state: str
    reason: str
    states: tuple[str, ...]
    answer: AnswerBody | None = None

    @property
    def ok(self) -> bool:
        """Answered, and the device says it did it."""
        return self.state == "answered" and self.answer is not None and self.answer.ok

    def as_json(self) -> dict[str, Any]:
        answer = None if self.answer is None else {
            "ok": self.answer.ok, "result": self.answer.result, "reason": self.answer.reason,
            "device": self.answer.device}
        return {"request_id": self.request_id, "state": self.state, "reason": self.reason,
                "states": list(self.states), "answer": answer}


def _checked(doc: object, what: str) -> dict[str, Any]:
    """A document within the limits (size, depth, key length), or a ValidationError."""
    try:
        return check_document(doc)
    except ValidationError as exc:
        raise ValidationError(f"{what}: {exc}") from None


class DesiredWriter:
    """Writes desired state of twins as ``name`` (signing with ``signer``), sealed for the
    owner's PRE key; ``permit`` is the writer's interact token (None for the owner)."""

    def __init__(self, bus: BusClient, name: str, signer: SigningKey, owner_pre_pk: PrePublicKey,
                 reader: TwinReader, permit: bytes | None = None, timeout: float = 15.0) -> None:
        self.bus, self.name, self.signer = bus, name, signer
        self.owner_pre_pk, self.reader, self.permit = owner_pre_pk, reader, permit
        self.timeout = timeout

    async def _write(self, twin: str, doc: dict[str, Any], base_version: int) -> int:
        """One attempt: publish ``desired_set`` and wait for the cloud's ``state_result``."""
        payload = build_desired(self.signer, twin, self.name, self.owner_pre_pk, doc,
                                base_version, permit=self.permit)
        request_id = decode(payload, "desired_set")["request_id"]
        try:
            reply = await self.bus.request(self.bus.topics.desired(twin), payload,
                                           self.bus.topics.replies(self.name, request_id),
                                           timeout=self.timeout)
        except RequestTimeout:
            raise InteractionTimeout(f"desired state of {twin!r}: no answer from the cloud "
                                     f"within {self.timeout:g} s") from None
        result = decode(reply, "state_result")
        if result["ok"]:
            return int(result["desired_version"])
        reason = result["reason"]
        if reason.startswith("stale"):
            raise StaleVersion(f"desired state of {twin!r} refused: {reason} (this write was "
                               f"based on version {base_version})", result["desired_version"])
        raise InteractionRefused(f"desired state of {twin!r} refused: {reason}")

    async def set(self, twin: str, doc: Mapping[str, Any], *, merge: bool = False,
                  base_version: int | None = None) -> int:
        """Set ``doc`` (or merge it into the current desired) as the desired state of
        ``twin``; returns the new version.

        With ``base_version`` the write happens only if nobody wrote since that version
        (:class:`StaleVersion` otherwise). Without it, the current version is fetched and —
        if another writer got in between — fetched again (a merge is then redone on the
        newer document, so no concurrent change is lost).
        """
        patch = dict(doc)
        if not merge:
            _checked(patch, "desired document")
        attempts = 1 if base_version is not None else MERGE_ATTEMPTS
        for attempt in range(attempts):
            base, current = base_version, None
            if merge or base is None:
                state = await self.reader.state(twin, timeout=self.timeout)
                if merge and state.desired is None and state.desired_version > 0:
                    raise InteractionRefused(
                        f"cannot merge into the desired state of {twin!r}: this principal "
                        "may not read it (ask the owner for a read grant), or write a full "
                        "document instead")
                if base is None:
                    base = state.desired_version
                current = state.desired.doc if state.desired is not None else {}
                if merge and base != state.desired_version:
                    raise StaleVersion(f"desired state of {twin!r}: current desired_version is "
                                       f"{state.desired_version}, not {base}",
                                       state.desired_version)
            full = _checked(merge_patch(current or {}, patch), "merged desired document") \
                if merge else patch
            try:
                return await self._write(twin, full, base)
            except StaleVersion:
                if attempt == attempts - 1:
                    raise
                log.info("desired.retry_stale", twin=twin, attempt=attempt + 1)
        raise AssertionError("unreachable")


class Requester:
    """Sends requests to the devices of twins, as ``identity`` holding ``token`` (None: the
    owner itself, whose ``devices`` then come from its device book), and writes desired
    state through the token's ``desired`` right.

    ``owner_pre_pk`` / ``owner_verify``: the twins' owner's keys, from its ``public.key``
    (never from the cloud): requests are sealed for the owner, answers checked against it.
    """

    def __init__(self, identity: Identity, bus: BusClient, token: InteractToken | None,
                 owner_pre_pk: PrePublicKey, owner_verify: VerifyKey, *,
                 devices: Iterable[DeviceKeys] = ()) -> None:
        self.identity, self.bus, self.token = identity, bus, token
        self.owner_pre_pk, self.owner_verify = owner_pre_pk, owner_verify
        self.devices: tuple[DeviceKeys, ...] = tuple(token.devices if token else devices)
        self.reader = TwinReader(bus, identity.name, identity.pre, owner_verify)
        self.writer = DesiredWriter(bus, identity.name, identity.signing, owner_pre_pk,
                                    self.reader, token.to_bytes() if token else None)

    @property
    def name(self) -> str:
        return self.identity.name

    def _check_allowed(self, twin: str, right: str, op: str | None = None) -> None:
        """Refuse locally what the token does not allow (the cloud and device would too)."""
        if self.token is None:
            return
        if twin not in self.token.twins:
            raise ValidationError(f"the interact token of {self.name} does not name twin "
                                  f"{twin!r} (it names {', '.join(self.token.twins)})")
        if right not in self.token.rights:
            raise ValidationError(f"the interact token of {self.name} has no {right!r} right")
        if op is not None and not self.token.allows_operation(op):
            raise ValidationError(f"the interact token of {self.name} does not allow "
                                  f"operation {op!r}")

    async def set_desired(self, twin: str, doc: Mapping[str, Any], *, merge: bool = False,
                          base_version: int | None = None) -> int:
        """Desired state through the token's ``desired`` right (see :meth:`DesiredWriter.set`)."""
        self._check_allowed(twin, "desired")
        return await self.writer.set(twin, doc, merge=merge, base_version=base_version)

    async def get_state(self, twin: str) -> TwinState:
        return await self.reader.state(twin)

    async def send(self, twin: str, op: str, args: Mapping[str, Any], *, wait: bool = True,
                   timeout: float = 30.0, wake: bool = False, approvals: Sequence[dict] = (),
                   attachment: bytes | None = None, deadline: float | None = None,
                   request_id: str | None = None) -> RequestOutcome:
        """Send one request; with ``wait`` follow it until answered, refused or expired
        (else until the cloud's first word: queued, delivered or refused).

        Raises :class:`InteractionTimeout` if that takes longer than ``timeout``.
        """
        self._check_allowed(twin, "request", op)
        devices = [d for d in self.devices if d.serves(twin)]
        if not devices:
            raise ValidationError(f"no device keys for twin {twin!r}: the request could be "
                                  "read by nobody but the owner")
        recipients = [Recipient(d.device, PrePublicKey.from_bytes(d.pre_pk)) for d in devices]
        payload, reply_key, request_id = build_request(
            self.identity.signing, twin, self.name, self.owner_pre_pk, op, dict(args),
            permit=self.token.to_bytes() if self.token else None, devices=recipients,
            deadline=deadline if deadline is not None else time.time() + DEFAULT_DEADLINE_S,
            wake=wake, approvals=list(approvals), attachment=attachment, request_id=request_id)
        statuses: asyncio.Queue[bytes] = asyncio.Queue(64)

        async def on_status(topic: str, status: bytes, retain: bool) -> None:
            await statuses.put(status)

        reply_topic = self.bus.topics.replies(self.name, request_id)
        await self.bus.subscribe(reply_topic, on_status)
        seen: list[str] = []
        try:
            await self.bus.publish(self.bus.topics.requests(twin), payload)
            end = time.monotonic() + timeout
            while True:
                try:
                    raw = await asyncio.wait_for(statuses.get(), max(0.0, end - time.monotonic()))
                except TimeoutError:
                    last = f" (last state: {seen[-1]})" if seen else " (no word from the cloud)"
                    raise InteractionTimeout(f"request {request_id} ({op} on {twin}): no "
                                             f"{'answer' if wait else 'status'} within "
                                             f"{timeout:g} s{last}") from None
                try:
                    status = decode(raw, "request_status")
                except CipherTwinError as exc:
                    log.warning("requester.status_refused", request_id=request_id, reason=str(exc))
                    continue
                if status["request_id"] != request_id:
                    continue
                state = status["state"]
                seen.append(state)
                answer = None
                if state == "answered":
                    answer = self._open_answer(status.get("answer"), reply_key, request_id,
                                               twin, devices)
                    if answer is None:
                        seen.pop()  # not a genuine answer: keep waiting for one
                        continue
                if state in TERMINAL_STATES or not wait:
                    return RequestOutcome(request_id, state, status["reason"], tuple(seen),
                                          answer)
        finally:
            await self.bus.unsubscribe(reply_topic)

    def _open_answer(self, answer: bytes | None, reply_key: Any, request_id: str, twin: str,
                     devices: Sequence[DeviceKeys]) -> AnswerBody | None:
        """The device's answer, checked against the owner's key and the twin's devices
        (None — logged — if it is missing, forged or not for this request)."""
        if answer is None:
            log.warning("requester.answer_missing", request_id=request_id)
            return None
        try:
            env = decode(answer, "answer")
            return open_answer(env, reply_key, self.owner_verify, request_id, devices, twin=twin)
        except CipherTwinError as exc:
            log.warning("requester.answer_refused", request_id=request_id,
                        reason=f"{type(exc).__name__}: {exc}")
            return None
