"""Envelope kinds of the twin protocol, declared once for every service (one line each)."""

from __future__ import annotations

from typing import Any

from ciphertwin.bus.envelope import (
    ID, STORED_INT, TIME, Bool, Bytes, Float, ListOf, Opt, Spec, Str, Struct, register_kind,
)

ATTRIBUTE = Str(64, 3)
ATTRIBUTES = ListOf(ATTRIBUTE, 64, 1)
SIG = Bytes(64, 64)
DIGEST = Bytes(32, 32)
TOKEN = Bytes(4096, 16)
CAPSULE = Bytes(16 * 1024, 16)
SEALED = Bytes(64 * 1024, 16)
REASON = Str(256)
CURSOR = Struct({"time": TIME, "device": ID, "seq": STORED_INT})
"""Where a history page ended: (item time, device, seq) of its last row."""

# device -> cloud: one signed, sealed reading (plus its epoch's capsule the first time)
ITEM = register_kind("item", {
    "twin": ID, "device": ID, "seq": STORED_INT, "time": TIME, "attrs": ATTRIBUTES,
    "capsule_id": DIGEST, "capsule": Opt(CAPSULE), "sealed": SEALED, "token": TOKEN, "sig": SIG,
}, max_size=96 * 1024)

# cloud -> device: what is durably stored (the outbox drops exactly these) and what never will be
ACK = register_kind("ack", {
    "seqs": ListOf(STORED_INT, 10_000),
    "rejected": ListOf(Struct({"seq": STORED_INT, "reason": REASON}), 10_000),
}, max_size=512 * 1024)

# owner -> cloud on control/{owner}; every one signed by the owner's Ed25519 key
OWNER_REGISTER = register_kind("owner_register", {
    "owner": ID, "pre_pk": Bytes(1024, 16), "verify_key": Bytes(128, 16), "time": TIME,
    "sig": SIG,
})
GRANT = register_kind("grant", {
    "owner": ID, "grant_id": ID, "receiver": ID, "twins": ListOf(ID, 256, 1),
    "policy": Str(4096, 1), "rekey": Bytes(128 * 1024, 16), "time": TIME, "sig": SIG,
}, max_size=160 * 1024)
REVOKE = register_kind("revoke", {"owner": ID, "grant_id": ID, "time": TIME, "sig": SIG})

# anyone -> cloud on queries/{principal}: history of a twin, answered on replies/{principal}/{id}
# (with ``error`` instead of items when the query was refused or the store failed)
HISTORY_QUERY = register_kind("history_query", {
    "request_id": ID, "twin": ID, "since": TIME, "until": TIME, "limit": STORED_INT,
    "after": Opt(CURSOR),
})
KEYED_ITEM = Struct({"item": Bytes(96 * 1024, 16), "key": Bytes(16 * 1024, 16)})
HISTORY_REPLY = register_kind("history_reply", {
    "request_id": ID, "items": ListOf(KEYED_ITEM, 2000), "more": Opt(CURSOR),
    "error": Opt(REASON),
}, max_size=32 * 1024 * 1024)

# cloud -> reader on twins/{twin}/stream/{reader}: the device's envelope plus the key material
# the reader can open: the capsule itself for the owner, a re-encrypted capsule for a grantee
# (one message per reader and ingest batch, so the live view costs the broker little)
STREAM_ITEMS = register_kind("stream_items", {
    "items": ListOf(KEYED_ITEM, 1000, 1), "grant_id": Opt(ID),
}, max_size=32 * 1024 * 1024)

CONTROL_KINDS = ("owner_register", "grant", "revoke", "interact_grant", "interact_revoke")

# cloud -> owner on replies/{owner}/{request_id}: outcome of a control message
CONTROL_RESULT = register_kind("control_result", {
    "request_id": ID, "ok": Bool(), "reason": REASON,
})


# --- issue 11: desired/reported state (P4), requests (P5), presence -----------------------
# Sealed documents: see protocol/sealed_docs.py. Every int is a STORED_INT, every time a TIME.


class OneOf(Spec):
    """A string out of a fixed set (e.g. a request's state)."""

    def __init__(self, *values: str) -> None:
        self.values = frozenset(values)

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or value not in self.values:
            return f"expected one of {sorted(self.values)}, got {value!r:.40}"
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OneOf) and self.values == other.values

    def __hash__(self) -> int:
        return hash(self.values)


PERMIT = Bytes(32 * 1024, 16)
"""An InteractToken (crypto/tokens.py: at most 64 devices, 32 KiB)."""
WRAP = Bytes(4096, 16)
"""A document key wrapped for one recipient: PreCiphertext or ReEncryptedCiphertext."""
WRAPS = ListOf(Struct({"to": ID, "wrap": WRAP}), 65, 1)
"""The owner's wrap plus at most one per device an interact token lists (64)."""
SEALED_DOC = Bytes(24 * 1024, 28)
SEALED_REQUEST = Bytes(320 * 1024, 28)
DOC_ENVELOPE = Bytes(96 * 1024, 16)
"""A whole desired_set / reported_set envelope carried inside another message."""
REQUEST_STATES = OneOf("queued", "delivered", "answered", "refused", "expired")
WINDOW_S = Float(0.0, 7 * 86400.0)

# writer (owner, or a holder of an InteractToken with right "desired") -> cloud on
# twins/{twin}/desired; answered with state_result on replies/{writer}/{request_id}
DESIRED_SET = register_kind("desired_set", {
    "twin": ID, "writer": ID, "request_id": ID, "base_version": STORED_INT,
    "version": STORED_INT, "time": TIME, "permit": Opt(PERMIT), "wraps": WRAPS,
    "sealed": SEALED_DOC, "sig": SIG,
}, max_size=96 * 1024)
# device -> cloud on twins/{twin}/reported (signed under its write token)
REPORTED_SET = register_kind("reported_set", {
    "twin": ID, "device": ID, "request_id": ID, "version": STORED_INT,
    "desired_version": STORED_INT, "in_sync": Bool(), "time": TIME, "token": TOKEN,
    "wraps": WRAPS, "sealed": SEALED_DOC, "sig": SIG,
}, max_size=96 * 1024)
STATE_RESULT = register_kind("state_result", {
    "request_id": ID, "ok": Bool(), "reason": REASON, "desired_version": STORED_INT,
    "reported_version": STORED_INT,
})
# anyone -> cloud on queries/{principal}; answered on replies/{principal}/{request_id}
STATE_QUERY = register_kind("state_query", {"request_id": ID, "twin": ID})
STATE_REPLY = register_kind("state_reply", {
    "request_id": ID, "twin": ID, "desired_version": STORED_INT,
    "reported_version": STORED_INT, "in_sync": Bool(), "desired": Opt(DOC_ENVELOPE),
    "desired_key": Opt(WRAP), "reported": Opt(DOC_ENVELOPE), "reported_key": Opt(WRAP),
    "error": Opt(REASON),
}, max_size=256 * 1024)
# cloud -> reader on twins/{twin}/stream/{reader}: a new desired or reported document
STATE_UPDATE = register_kind("state_update", {
    "twin": ID, "desired_version": STORED_INT, "reported_version": STORED_INT,
    "in_sync": Bool(), "doc": DOC_ENVELOPE, "key": WRAP,
}, max_size=128 * 1024)

# requester -> cloud on twins/{twin}/requests (status on replies/{requester}/{request_id})
REQUEST = register_kind("request", {
    "twin": ID, "requester": ID, "request_id": ID, "time": TIME, "deadline": TIME,
    "wake": Bool(), "permit": Opt(PERMIT), "wraps": WRAPS, "sealed": SEALED_REQUEST,
    "sig": SIG,
}, max_size=640 * 1024)
# device -> cloud on twins/{twin}/answers: the reply is HPKE-sealed to the request's reply key
ANSWER = register_kind("answer", {
    "twin": ID, "device": ID, "requester": ID, "request_id": ID, "time": TIME,
    "reply": Bytes(48 * 1024, 48), "token": TOKEN, "sig": SIG,
}, max_size=64 * 1024)
REQUEST_STATUS = register_kind("request_status", {
    "request_id": ID, "state": REQUEST_STATES, "reason": REASON,
    "answer": Opt(Bytes(64 * 1024, 16)),
}, max_size=80 * 1024)
# device -> cloud on devices/{device}/presence
PRESENCE = register_kind("presence", {
    "twin": ID, "device": ID, "awake": Bool(), "until": TIME, "next_wake": Opt(TIME),
    "window_s": WINDOW_S, "wakeable": Bool(), "time": TIME, "token": TOKEN, "sig": SIG,
})

# cloud -> device on devices/{device}/inbox
INBOX_DESIRED = register_kind("inbox_desired", {
    "twin": ID, "version": STORED_INT, "doc": DOC_ENVELOPE, "key": WRAP,
}, max_size=128 * 1024)
INBOX_REQUEST = register_kind("inbox_request", {
    "request": Bytes(640 * 1024, 16), "wrap": WRAP,
}, max_size=660 * 1024)
INBOX_WAKE = register_kind("inbox_wake", {"twin": ID, "time": TIME})
INBOX_REVOKE = register_kind("inbox_revoke", {"revoke": Bytes(4096, 16)})
INBOX_KINDS = ("inbox_desired", "inbox_request", "inbox_wake", "inbox_revoke")

# owner -> cloud on control/{owner} (signed like every control message, protocol/control.py)
INTERACT_GRANT = register_kind("interact_grant", {
    "owner": ID, "request_id": ID, "token": PERMIT, "time": TIME, "sig": SIG,
}, max_size=48 * 1024)
INTERACT_REVOKE = register_kind("interact_revoke", {
    "owner": ID, "request_id": ID, "token_id": Bytes(16, 16), "time": TIME, "sig": SIG,
})
