"""Data items: how a device seals and signs a reading, and how the others check or open it.

Layers of one item (kind ``item``, published on ``twins/{twin}/data``):

* inner plaintext  = canonical({reading, sig_d}) with sig_d = Sign_device("item-data",
  {twin, device, seq, reading}) — end-to-end authenticity that survives re-encryption;
* sealed           = AES-256-GCM under the key epoch's data key, AAD binds
  (twin, device, seq, attributes), so the cloud cannot move a ciphertext between items;
* outer signature  = Sign_device("item", every envelope field) — lets the cloud decide
  what to store without being able to read it; the write token (owner-signed) tells the
  cloud the device key and the attributes it may use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

from ciphertwin.bus.envelope import Envelope, decode, encode
from ciphertwin.crypto.epochs import DataKeyManager, SealedItem, open_sealed
from ciphertwin.crypto.kpcpre import (
    Capsule,
    PreKeyPair,
    ReCapsule,
    decapsulate_owner,
    decapsulate_receiver,
)
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import WriteToken, verify_write_token
from ciphertwin.crypto.wire import canonical
from ciphertwin.errors import ValidationError
from ciphertwin.protocol import kinds

_ = kinds  # the item kinds must be registered before encode/decode
ITEM_CONTEXT = "item"
ITEM_DATA_CONTEXT = "item-data"


def item_aad(twin: str, device: str, seq: int, attributes: Sequence[str]) -> bytes:
    """Associated data binding a sealed reading to its place in the twin.

    This is ``canonical([...])``; a list of strings and an int holds no map to sort, so
    packing directly gives the same bytes at a sixth of the cost (nodes compute it per item;
    tests/test_processing_share_open.py checks the equality)."""
    return msgpack.packb(["ct/item", twin, device, seq, list(attributes)], use_bin_type=True)


def _unsigned(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "sig"}


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a device needs to publish: its twin, its name, its signing key and write token."""

    twin: str
    device: str
    signing_key: SigningKey
    write_token: bytes


def build_item(
    creds: DeviceCredentials,
    keys: DataKeyManager,
    seq: int,
    reading: Mapping[str, Any],
    attributes: tuple[str, ...],
) -> bytes:
    """Seal and sign one reading ({type, values, time}) into envelope bytes."""
    attrs = tuple(sorted(set(attributes)))
    when = float(reading["time"])
    data_sig = creds.signing_key.sign_object(
        ITEM_DATA_CONTEXT,
        {"twin": creds.twin, "device": creds.device, "seq": seq, "reading": dict(reading)},
    )
    inner = canonical({"reading": dict(reading), "sig": data_sig})
    capsule, sealed = keys.seal(
        inner, attrs, item_aad(creds.twin, creds.device, seq, attrs),
        at=datetime.fromtimestamp(when, UTC),
    )
    body: dict[str, Any] = {
        "twin": creds.twin, "device": creds.device, "seq": seq, "time": when,
        "attrs": list(attrs), "capsule_id": sealed.capsule_id, "sealed": sealed.to_bytes(),
        "token": creds.write_token,
    }
    if capsule is not None:
        body["capsule"] = capsule.to_bytes()
    body["sig"] = creds.signing_key.sign_object(ITEM_CONTEXT, body)
    return encode("item", body)


def decode_item(payload: bytes) -> Envelope:
    """Schema-checked item envelope (raises EnvelopeError on garbage)."""
    return decode(payload, "item")


def token_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def verify_item_signature(body: Mapping[str, Any], device_key: VerifyKey) -> None:
    """Outer signature by the device over every field of an item's body (raises
    SignatureInvalid).

    ``body`` comes from the strict decoder (``decode_item``, ``unpack_checked``), which admits
    only the canonical encoding: its keys are sorted and its values of canonical types, so it
    is packed as it is — the canonicalising walk of :func:`wire.canonical` cost as much as
    everything else here but the signature (this runs for every stored and every processed
    item). A body in any other key order packs differently and fails; it never passes."""
    device_key.verify(ITEM_CONTEXT, msgpack.packb(_unsigned(body), use_bin_type=True), body["sig"])


TOKEN_LEEWAY_S = 300
"""Clock skew allowed between a device and whoever checks its write token."""


def device_token(token_bytes: bytes, owner_verify_key: VerifyKey, *, twin: str, device: str,
                 now: float, attributes: Sequence[str] = ()) -> WriteToken:
    """The write token a device-signed message carries, checked against the owner's key
    (the checker's own knowledge, never the cloud's word): this twin and device, the
    attributes, valid at ``now`` (± :data:`TOKEN_LEEWAY_S`). Its ``device_key`` is then the
    key the message must be signed with — items, reported state, answers, presence."""
    token = WriteToken.from_bytes(token_bytes)
    verify_write_token(token, owner_verify_key, twin=twin, device=device, attributes=attributes,
                       now=now, leeway_s=TOKEN_LEEWAY_S)
    return token


@dataclass(frozen=True, slots=True)
class OpenedItem:
    """A decrypted, authenticated reading and where it came from."""

    twin: str
    device: str
    seq: int
    attributes: tuple[str, ...]
    reading: dict[str, Any]


def key_from_capsule(owner: PreKeyPair, capsule_bytes: bytes) -> tuple[bytes, bytes]:
    """(capsule_id, data key) for the owner of a capsule."""
    capsule = Capsule.from_bytes(capsule_bytes)
    return capsule.capsule_id, decapsulate_owner(owner, capsule)


def key_from_recapsule(receiver: PreKeyPair, recapsule_bytes: bytes) -> tuple[bytes, bytes]:
    """(capsule_id, data key) for a receiver of a re-encrypted capsule."""
    recapsule = ReCapsule.from_bytes(recapsule_bytes)
    return recapsule.capsule_id, decapsulate_receiver(receiver, recapsule)


def open_item(item: Envelope, data_key: bytes, owner_verify_key: VerifyKey) -> OpenedItem:
    """Decrypt an item with its epoch's data key and check it end to end.

    The write token must be signed by the twin owner's key (the reader's own knowledge, not
    the cloud's word), name this twin and device, allow every attribute, and cover the item
    time; then both device signatures (outer envelope, inner plaintext) must verify.
    ``item`` is the envelope as ``decode_item`` returns it (readers decode once).
    """
    twin, device, seq = item["twin"], item["device"], item["seq"]
    attrs = tuple(item["attrs"])
    token = device_token(item["token"], owner_verify_key, twin=twin, device=device,
                         attributes=attrs, now=item["time"])
    verify_item_signature(item.body, token.device_key)
    sealed = SealedItem.from_bytes(item["sealed"])
    if sealed.capsule_id != item["capsule_id"]:
        raise ValidationError("sealed item names another capsule than its envelope")
    inner = open_sealed(sealed, data_key, item_aad(twin, device, seq, attrs))
    body = decode_inner(inner)
    token.device_key.verify_object(
        ITEM_DATA_CONTEXT, {"twin": twin, "device": device, "seq": seq, "reading": body["reading"]},
        body["sig"],
    )
    return OpenedItem(twin, device, seq, attrs, body["reading"])


def decode_inner(inner: bytes) -> dict[str, Any]:
    """The {reading, sig} map inside a sealed item."""
    try:
        body = msgpack.unpackb(inner, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - garbage inside an authentic ciphertext
        raise ValidationError(f"inner item is not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict) or set(body) != {"reading", "sig"} or not isinstance(
        body["reading"], dict
    ):
        raise ValidationError("inner item must be {reading, sig}")
    return body
