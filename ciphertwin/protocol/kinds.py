"""Envelope kinds of the twin protocol, declared once for every service (one line each)."""

from __future__ import annotations

from ciphertwin.bus.envelope import (
    ID, STORED_INT, TIME, Bool, Bytes, ListOf, Opt, Str, Struct, register_kind,
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

CONTROL_KINDS = ("owner_register", "grant", "revoke")

# cloud -> owner on replies/{owner}/{request_id}: outcome of a control message
CONTROL_RESULT = register_kind("control_result", {
    "request_id": ID, "ok": Bool(), "reason": REASON,
})
