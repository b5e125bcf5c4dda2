"""P5: requests to a twin's device, its answers, approvals, and device presence.

* ``request`` (requester → cloud → device): a sealed document (``protocol/sealed_docs.py``)
  wrapped for the owner AND directly for each device the requester's InteractToken lists —
  only they can read it, whatever grants exist. Its metadata (twin, requester, request_id,
  time, deadline, wake, permit) is all the cloud needs to filter, queue and route it, and is
  bound into the AAD. The body holds a fresh X25519 ``reply_key``: only the requester, who
  keeps its private half, can read the answer.
* ``answer`` (device → cloud → requester): the reply HPKE-sealed to that key (AAD: twin,
  device, requester, request_id), the device's write token, and the device's signature over
  every field — the requester checks the token against the owner's key and the device
  against the token's ``devices``, so the forwarding cloud can neither read nor forge it.
* approvals: an approver's Ed25519 signature over ("approval", twin, request_id, op,
  sha256(args), sha256(attachment)) — bound to one request, so never reusable for another;
  a firmware image is signed as sha256(image) under signature context ``firmware``.
* ``presence`` (device → cloud): awake/asleep, until when, next wake-up; signed under the
  write token so nobody else can make the cloud deliver a queue to nowhere or wake a device.
"""

from __future__ import annotations

import hashlib
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ciphertwin.bus.envelope import Envelope, encode
from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import SignatureInvalid, TokenRejected
from ciphertwin.crypto.hpke import PUBLIC_KEY_BYTES, X25519KeyPair, hpke_open, hpke_seal
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey
from ciphertwin.crypto.signing import SIGNATURE_BYTES, SigningKey, VerifyKey
from ciphertwin.crypto.tokens import DeviceKeys, InteractToken
from ciphertwin.errors import ValidationError
from ciphertwin.protocol import kinds
from ciphertwin.protocol.items import DeviceCredentials
from ciphertwin.protocol.json_state import check_document, check_value
from ciphertwin.protocol.sealed_docs import (
    OWNER_RECIPIENT,
    Recipient,
    author_key_for,
    check_fresh,
    expect_kind,
    meta_of,
    new_request_id,
    open_with_wrap,
    seal_envelope,
    sign_envelope,
    verify_device_envelope,
    verify_envelope,
    wrap_for,
)

_ = kinds  # the kinds must be registered before encode/decode
__all__ = [
    "RequestBody",
    "OpenedRequest",
    "AnswerBody",
    "MAX_ATTACHMENT_BYTES",
    "MAX_DEADLINE_S",
    "build_request",
    "verify_request_outer",
    "open_request",
    "build_answer",
    "verify_answer_outer",
    "open_answer",
    "approval_message",
    "sign_approval",
    "verify_approval",
    "valid_approvers",
    "image_message",
    "sign_image",
    "verify_image",
    "build_presence",
    "verify_presence",
    "recipients_from_token",
]

REQUEST = "request"
ANSWER = "answer"
PRESENCE = "presence"
MAX_ATTACHMENT_BYTES = 256 * 1024
MAX_DEADLINE_S = 7 * 86400
"""A request may be pending at most a week (the cloud's queue is not an archive)."""
MAX_APPROVALS = 16
MAX_OP_CHARS = 64
MAX_RESULT_BYTES = 32 * 1024
MAX_REASON_CHARS = 256
_ANSWER_INFO = b"ciphertwin/v1/answer"
APPROVAL_CONTEXT = "approval"
IMAGE_CONTEXT = "firmware"


def _op(op: object) -> str:
    if not isinstance(op, str) or not 1 <= len(op) <= MAX_OP_CHARS or not op.isprintable():
        raise ValidationError(f"an operation is 1..{MAX_OP_CHARS} printable characters")
    return op


def _attachment(value: object) -> bytes | None:
    if value is None:
        return None
    return wire.check_bytes(value, "attachment", max_len=MAX_ATTACHMENT_BYTES)


def _approvals(values: object) -> list[dict[str, Any]]:
    if not isinstance(values, (list, tuple)) or len(values) > MAX_APPROVALS:
        raise ValidationError(f"approvals: a list of at most {MAX_APPROVALS}")
    out = []
    for a in values:
        if not isinstance(a, Mapping) or set(a) != {"approver", "sig"}:
            raise ValidationError("an approval is {approver, sig}")
        if not isinstance(a["approver"], str) or not 1 <= len(a["approver"]) <= 64:
            raise ValidationError("an approver is named by 1..64 characters")
        out.append({"approver": a["approver"],
                    "sig": wire.check_bytes(a["sig"], "approval.sig", SIGNATURE_BYTES)})
    return out


# --- approvals and image signatures -----------------------------------------------------------


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def approval_message(twin: str, request_id: str, op: str, args: Mapping[str, Any],
                     attachment: bytes | None) -> bytes:
    """What an approver signs: this request's twin, id and operation, and digests of its
    arguments and attachment."""
    return wire.canonical(["approval", twin, request_id, op, _digest(wire.canonical(dict(args))),
                           _digest(attachment or b"")])


def sign_approval(signer: SigningKey, approver: str, twin: str, request_id: str, op: str,
                  args: Mapping[str, Any], attachment: bytes | None) -> dict[str, Any]:
    """An approval entry ``{approver, sig}`` for a request's ``approvals``."""
    msg = approval_message(twin, request_id, op, args, attachment)
    return {"approver": approver, "sig": signer.sign(APPROVAL_CONTEXT, msg)}


def verify_approval(approval: Mapping[str, Any], approver_key: VerifyKey, twin: str,
                    request_id: str, op: str, args: Mapping[str, Any],
                    attachment: bytes | None) -> None:
    """Raise SignatureInvalid unless ``approval`` is ``approver_key``'s for this request."""
    approver_key.verify(APPROVAL_CONTEXT,
                        approval_message(twin, request_id, op, args, attachment), approval["sig"])


def valid_approvers(req: OpenedRequest, approvers: Mapping[str, VerifyKey]) -> set[str]:
    """The named ``approvers`` that validly approved ``req`` (each counted once; unknown
    names and bad signatures count for nothing) — an M-of-N rule checks ``len(...) >= M``."""
    ok: set[str] = set()
    b = req.body
    for a in b.approvals:
        key = approvers.get(a["approver"])
        if key is None or a["approver"] in ok:
            continue
        try:
            verify_approval(a, key, req.twin, req.request_id, b.op, b.args, b.attachment)
        except SignatureInvalid:
            continue
        ok.add(a["approver"])
    return ok


def image_message(image: bytes) -> bytes:
    """What an image signer signs (under context ``firmware``): sha256(image)."""
    return _digest(wire.check_bytes(image, "image", max_len=MAX_ATTACHMENT_BYTES))


def sign_image(signer: SigningKey, image: bytes) -> bytes:
    """The image signer's signature over ("firmware", sha256(image))."""
    return signer.sign(IMAGE_CONTEXT, image_message(image))


def verify_image(key: VerifyKey, image: bytes, signature: bytes) -> None:
    """Raise SignatureInvalid unless ``signature`` is ``key``'s over this image."""
    key.verify(IMAGE_CONTEXT, image_message(image), signature)


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestBody:
    op: str
    args: dict[str, Any]
    reply_key: bytes  # X25519 public key the answer is sealed to
    approvals: list[dict[str, Any]]
    attachment: bytes | None


@dataclass(frozen=True)
class OpenedRequest:
    twin: str
    requester: str
    request_id: str
    deadline: float
    body: RequestBody
    permit: InteractToken | None  # None: the owner itself asks
    wake: bool = False
    time: float = 0.0


def recipients_from_token(token: InteractToken, twin: str) -> list[Recipient]:
    """The devices an InteractToken lists for ``twin``, as recipients of a request's key
    (a device listed without a twin counts for every twin of the token)."""
    return [Recipient(d.device, PrePublicKey.from_bytes(d.pre_pk)) for d in token.devices_of(twin)]


def build_request(signer: SigningKey, twin: str, requester: str, owner_pk: PrePublicKey,
                  op: str, args: dict[str, Any], *, permit: bytes | None,
                  devices: Sequence[Recipient], deadline: float, wake: bool = False,
                  approvals: Sequence[dict[str, Any]] = (), attachment: bytes | None = None,
                  request_id: str | None = None) -> tuple[bytes, X25519KeyPair, str]:
    """(``request`` envelope, the reply key pair to keep, request_id).

    ``request_id`` may be chosen beforehand (approvers sign it); else a fresh one is drawn."""
    body: dict[str, Any] = {"op": _op(op), "args": check_document(args),
                            "approvals": _approvals(list(approvals))}
    att = _attachment(attachment)
    if att is not None:
        body["attachment"] = att
    reply = X25519KeyPair.generate()
    body["reply_key"] = reply.public_bytes
    rid = request_id or new_request_id()
    meta: dict[str, Any] = {"request_id": rid, "time": _time.time(), "deadline": float(deadline),
                            "wake": bool(wake)}
    if permit is not None:
        meta["permit"] = permit
    recipients = [Recipient(OWNER_RECIPIENT, owner_pk), *devices]
    env = seal_envelope(REQUEST, twin, "requester", requester, signer, meta, body, recipients)
    return env, reply, rid


def verify_request_outer(env: Envelope, owner_key: VerifyKey, *, now: float) -> None:
    """Cloud: not post-dated, deadline in the future and at most :data:`MAX_DEADLINE_S`
    ahead, the owner's wrap present, signed by the owner or by the holder of a permit
    (owner-signed, valid at ``now``, for this requester, twin and right ``request``).
    Replays, revocation, rate limits and queues are the caller's state."""
    _request_key(env, owner_key, now)


def _request_key(env: Envelope, owner_key: VerifyKey,
                 now: float) -> tuple[VerifyKey, InteractToken | None]:
    expect_kind(env, REQUEST)
    check_fresh(env["time"], now, "request")
    if env["deadline"] <= now:
        raise ValidationError("request deadline has passed")
    if env["deadline"] > now + MAX_DEADLINE_S:
        raise ValidationError(f"request deadline is more than {MAX_DEADLINE_S // 86400} days ahead")
    key, permit = author_key_for(env, env["requester"], owner_key, right="request", now=now)
    verify_envelope(env, key)
    wrap_for(env, OWNER_RECIPIENT)
    return key, permit


def _request_body(body: Mapping[str, Any]) -> RequestBody:
    keys = set(body)
    if not {"op", "args", "reply_key", "approvals"} <= keys <= {"op", "args", "reply_key",
                                                                "approvals", "attachment"}:
        raise ValidationError("request body must be {op, args, reply_key, approvals[, attachment]}")
    return RequestBody(
        op=_op(body["op"]),
        args=check_document(body["args"]),
        reply_key=wire.check_bytes(body["reply_key"], "reply_key", PUBLIC_KEY_BYTES),
        approvals=_approvals(body["approvals"]),
        attachment=_attachment(body.get("attachment")),
    )


def open_request(env: Envelope, wrap: bytes, pre: PreKeyPair, owner_key: VerifyKey,
                 *, now: float | None = None) -> OpenedRequest:
    """Open a request with the wrap addressed to ``pre`` (a device's own, or the owner's),
    checking everything the cloud checked plus the operation against the permit."""
    when = _time.time() if now is None else now
    key, permit = _request_key(env, owner_key, when)
    body = _request_body(open_with_wrap(env, REQUEST, env["requester"],
                                        meta_of(env, "requester"), wrap, pre, key))
    if permit is not None and not permit.allows_operation(body.op):  # (signature checked above)
        raise TokenRejected("operation-not-allowed", repr(body.op))
    return OpenedRequest(env["twin"], env["requester"], env["request_id"], float(env["deadline"]),
                         body, permit, bool(env["wake"]), float(env["time"]))


# --- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerBody:
    ok: bool
    result: Any
    reason: str
    device: str


def _answer_aad(twin: str, device: str, requester: str, request_id: str) -> bytes:
    return wire.canonical(["ct/answer", twin, device, requester, request_id])


def build_answer(creds: DeviceCredentials, req: OpenedRequest, ok: bool, result: Any,
                 reason: str = "") -> bytes:
    """The ``answer`` envelope to ``req``: {ok, result, reason} HPKE-sealed to its reply key,
    signed by this device (write token inside)."""
    if req.twin != creds.twin:
        raise ValidationError("answering a request to another twin")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise ValidationError(f"reason: at most {MAX_REASON_CHARS} characters")
    check_value(result, what="result", max_bytes=MAX_RESULT_BYTES)
    plaintext = wire.canonical({"ok": bool(ok), "result": result, "reason": reason})
    reply = hpke_seal(req.body.reply_key, plaintext, _ANSWER_INFO,
                      _answer_aad(req.twin, creds.device, req.requester, req.request_id))
    env: dict[str, Any] = {"twin": creds.twin, "device": creds.device,
                           "requester": req.requester, "request_id": req.request_id,
                           "time": _time.time(), "reply": reply, "token": creds.write_token}
    env["sig"] = sign_envelope(ANSWER, creds.signing_key, env)
    return encode(ANSWER, env)


def verify_answer_outer(env: Envelope, owner_key: VerifyKey, *, now: float) -> None:
    """Cloud: signed by the device its owner-signed write token names, not post-dated."""
    expect_kind(env, ANSWER)
    verify_device_envelope(env, owner_key, now=now)
    check_fresh(env["time"], now, "answer")


def open_answer(env: Envelope, reply_key: X25519KeyPair, owner_key: VerifyKey, request_id: str,
                devices: Sequence[DeviceKeys] | None, *, twin: str | None = None) -> AnswerBody:
    """The requester's view of an answer: to ``request_id`` (about ``twin``, if given), by a
    device the owner vouches for (write token; and if ``devices`` is given, listed there for
    this twin with this verify key), sealed to ``reply_key``. The owner passes
    ``devices=None``."""
    expect_kind(env, ANSWER)
    if env["request_id"] != request_id:
        raise ValidationError("answer is to another request")
    if twin is not None and env["twin"] != twin:
        raise ValidationError(f"answer is about twin {env['twin']!r}, not {twin!r}")
    token = verify_device_envelope(env, owner_key, now=float(env["time"]))
    if devices is not None and not any(
            d.device == env["device"] and d.verify_key == token.device_key.raw
            and d.serves(env["twin"]) for d in devices):
        raise ValidationError(f"answer from device {env['device']!r}, which the token does not list")
    plaintext = hpke_open(reply_key, env["reply"], _ANSWER_INFO,
                          _answer_aad(env["twin"], env["device"], env["requester"], request_id))
    try:
        obj = msgpack.unpackb(plaintext, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - garbage inside an authentic ciphertext
        raise ValidationError(f"answer is not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or set(obj) != {"ok", "result", "reason"} \
            or not isinstance(obj["ok"], bool) or not isinstance(obj["reason"], str):
        raise ValidationError("answer must be {ok, result, reason}")
    return AnswerBody(obj["ok"], obj["result"], obj["reason"][:MAX_REASON_CHARS], env["device"])


# --- presence ---------------------------------------------------------------------------------


def build_presence(creds: DeviceCredentials, *, awake: bool, until: float, window_s: float,
                   next_wake: float | None, wakeable: bool) -> bytes:
    """A ``presence`` envelope: awake (until ``until``) or asleep, next wake-up, whether a
    ``wake`` request may wake it; signed under the device's write token."""
    env: dict[str, Any] = {"twin": creds.twin, "device": creds.device, "awake": bool(awake),
                           "until": float(until), "window_s": float(window_s),
                           "wakeable": bool(wakeable), "time": _time.time(),
                           "token": creds.write_token}
    if next_wake is not None:
        env["next_wake"] = float(next_wake)
    env["sig"] = sign_envelope(PRESENCE, creds.signing_key, env)
    return encode(PRESENCE, env)


def verify_presence(env: Envelope, owner_key: VerifyKey, *, now: float) -> None:
    """Cloud: signed by the device its owner-signed write token names, not post-dated.
    (That the device's presence topic names this device is the caller's check.)"""
    expect_kind(env, PRESENCE)
    verify_device_envelope(env, owner_key, now=now)
    check_fresh(env["time"], now, "presence")
