"""Sealed documents: one sealing for desired state, reported state and requests.

Layers of one document (compare ``protocol/items.py``):

* inner plaintext = canonical({body, sig_a}), sig_a = Sign_author("doc", {kind, twin, author,
  meta, body}) — end-to-end authorship that survives re-encryption;
* sealed          = nonce ‖ AES-256-GCM(K, inner), K = ``os.urandom(32)`` fresh per document;
  the associated data binds (kind, twin, author, meta), so the cloud can neither move a
  ciphertext to another document nor change a version, deadline or permit next to it;
* wraps           = one ``kpcpre.encrypt(recipient_pk, {twin:T, type:X}, K, aad)`` per
  recipient (same AAD): the owner always (the cloud re-encrypts the owner's wrap for a device
  or reader through an existing grant, never learning K), plus e.g. the twin's devices for a
  request (readable by them whatever grants exist);
* outer signature = Sign_author("doc-envelope", {kind, every other envelope field}) — lets
  the cloud decide on metadata without being able to read anything.

Who the author is, and with which key, is the caller's business (owner key, an
:class:`InteractToken`'s holder key, a device's write token): :func:`author_key_for` and
:func:`device_key_for` do those checks once for every kind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ciphertwin.bus.envelope import Envelope, encode
from ciphertwin.crypto import kpcpre, wire
from ciphertwin.crypto.aead import KEY_BYTES, NONCE_BYTES, aead_open, aead_seal
from ciphertwin.crypto.errors import DecryptionFailed
from ciphertwin.crypto.kpcpre import (
    PreCiphertext,
    PreKeyPair,
    PrePublicKey,
    ReEncryptedCiphertext,
    ReKey,
)
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import InteractToken, WriteToken, verify_interact_token
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.items import device_token

__all__ = [
    "Recipient",
    "DOC_TYPES",
    "OWNER_RECIPIENT",
    "MAX_SKEW_S",
    "doc_aad",
    "doc_attributes",
    "seal_document",
    "open_document",
    "unwrap",
    "reencrypt_wrap",
    "sign_envelope",
    "verify_envelope",
    "wrap_for",
    "permit_of",
    "author_key_for",
    "check_fresh",
    "open_with_wrap",
    "verify_device_envelope",
    "meta_of",
    "seal_envelope",
    "new_request_id",
    "expect_kind",
]

DOC_CONTEXT = "doc"
ENVELOPE_CONTEXT = "doc-envelope"
_DOMAIN = b"ciphertwin/v1/doc"
DOC_TYPES: Mapping[str, str] = {"desired_set": "desired", "reported_set": "reported",
                                "request": "request"}
"""Envelope kind -> the ``type:`` attribute its wraps carry (what grant policies select)."""
OWNER_RECIPIENT = "owner"
"""The ``to`` of the owner's wrap (writers need not know the owner's principal name)."""
MAX_SKEW_S = 300
"""How far a message's ``time`` may lie in the future of the checker's clock."""


@dataclass(frozen=True)
class Recipient:
    """Who a document's key is wrapped for: a name (``to``) and a PRE public key."""

    name: str
    pre_pk: PrePublicKey


def _meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise ValidationError("document meta must be a mapping")
    return dict(meta)


def doc_aad(kind: str, twin: str, author: str, meta: Mapping[str, Any]) -> bytes:
    """Associated data of a document's payload and of each of its wraps."""
    return wire.canonical(["ct/doc", kind, twin, author, _meta(meta)])


def doc_attributes(kind: str, twin: str) -> tuple[str, ...]:
    """The wraps' attributes: ``twin:<T>`` and ``type:desired|reported``, so the owner's
    grants (a device's ``twin:<T>``, a reader's) let the cloud re-encrypt them.

    A request's are ``request:<T>`` alone: nobody needs a re-encryption of it (the devices
    get direct wraps), and no ordinary grant policy (``twin:<T>``, ``type:...``) can then
    admit it — not even by a cloud colluding with a reader who holds a broad grant."""
    if kind == "request":
        return (f"request:{twin}",)
    try:
        return (f"twin:{twin}", f"type:{DOC_TYPES[kind]}")
    except KeyError:
        raise ValidationError(f"{kind!r} is not a sealed-document kind") from None


def _signed_inner(kind: str, twin: str, author: str, meta: Mapping[str, Any],
                  body: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "twin": twin, "author": author, "meta": _meta(meta), "body": dict(body)}


def seal_document(kind: str, twin: str, author: str, signer: SigningKey, meta: Mapping[str, Any],
                  body: Mapping[str, Any], recipients: Sequence[Recipient],
                  ) -> tuple[list[dict[str, Any]], bytes]:
    """(wraps ``[{"to": name, "wrap": PreCiphertext bytes}]``, sealed bytes) of ``body``.

    The key is fresh per document and exists only in the wraps; each recipient gets it under
    its own PRE key with the document's AAD."""
    if not recipients:
        raise ValidationError("a sealed document needs at least one recipient")
    names = [r.name for r in recipients]
    if len(set(names)) != len(names):
        raise ValidationError("each recipient of a document is named once")
    aad = doc_aad(kind, twin, author, meta)
    attributes = doc_attributes(kind, twin)
    sig = signer.sign_object(DOC_CONTEXT, _signed_inner(kind, twin, author, meta, body))
    inner = wire.canonical({"body": dict(body), "sig": sig})
    key, nonce = os.urandom(KEY_BYTES), os.urandom(NONCE_BYTES)
    sealed = nonce + aead_seal(key, nonce, inner, _DOMAIN, b"", aad)
    wraps = [{"to": r.name, "wrap": kpcpre.encrypt(r.pre_pk, attributes, key, aad).to_bytes()}
             for r in recipients]
    return wraps, sealed


def unwrap(pre: PreKeyPair, wrap: bytes, kind: str, twin: str, author: str,
           meta: Mapping[str, Any]) -> bytes:
    """The document key K from a wrap addressed to ``pre``: a PreCiphertext (own wrap, or a
    request's device wrap) or a ReEncryptedCiphertext (re-encrypted through a grant)."""
    aad = doc_aad(kind, twin, author, meta)
    tag = wire.peek_tag(wrap, max_bytes=64 * 1024)
    if tag == PreCiphertext.TAG:
        key = kpcpre.decrypt_owner(pre, PreCiphertext.from_bytes(wrap), aad)
    elif tag == ReEncryptedCiphertext.TAG:
        key = kpcpre.decrypt_receiver(pre, ReEncryptedCiphertext.from_bytes(wrap), aad)
    else:
        raise ValidationError(f"a wrap is a PRE ciphertext, got {tag!r}")
    if len(key) != KEY_BYTES:
        raise ValidationError("wrapped document key has the wrong length")
    return key


def reencrypt_wrap(rk: ReKey, wrap: bytes) -> bytes:
    """The cloud's one operation on a document: turn the owner's wrap (a PreCiphertext) into
    one for the grant's receiver. Raises PolicyNotSatisfied if the grant's policy does not
    admit the document's attributes (e.g. any request: its wrap says only ``request:<T>``)."""
    return kpcpre.reencrypt(rk, PreCiphertext.from_bytes(wrap)).to_bytes()


def open_document(kind: str, twin: str, author: str, meta: Mapping[str, Any], sealed: bytes,
                  key: bytes, author_key: VerifyKey) -> dict[str, Any]:
    """Decrypt ``sealed`` with K and check the author's inner signature; returns the body."""
    if not isinstance(sealed, (bytes, bytearray)) or len(sealed) < NONCE_BYTES + 16:
        raise ValidationError("sealed document too short")
    inner = aead_open(key, bytes(sealed[:NONCE_BYTES]), bytes(sealed[NONCE_BYTES:]), _DOMAIN,
                      b"", doc_aad(kind, twin, author, meta))
    try:
        obj = msgpack.unpackb(inner, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - garbage inside an authentic ciphertext
        raise ValidationError(f"sealed document is not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or set(obj) != {"body", "sig"} or not isinstance(obj["body"], dict):
        raise ValidationError("sealed document must hold {body, sig}")
    author_key.verify_object(DOC_CONTEXT, _signed_inner(kind, twin, author, meta, obj["body"]),
                             obj["sig"])
    body: dict[str, Any] = obj["body"]
    return body


# --- envelope-level helpers shared by twin_state and twin_requests ------------------------


def new_request_id() -> str:
    """16 hex characters from the OS CSPRNG: where a reply to this message goes."""
    return secrets.token_hex(8)


def expect_kind(env: Envelope, kind: str) -> None:
    """Refuse anything but a decoded ``kind`` envelope (callers pass what they decoded)."""
    if not isinstance(env, Envelope) or env.kind != kind:
        raise ValidationError(f"expected a {kind} envelope")


def meta_of(env: Envelope, author_field: str) -> dict[str, Any]:
    """The fields of a sealed-document envelope bound into its AAD: all but the twin, the
    author (``author_field``), the wraps, the ciphertext and the signature."""
    skip = {"twin", author_field, "wraps", "sealed", "sig"}
    return {k: v for k, v in env.body.items() if k not in skip}


def seal_envelope(kind: str, twin: str, author_field: str, author: str, signer: SigningKey,
                  meta: dict[str, Any], body: Mapping[str, Any],
                  recipients: Sequence[Recipient]) -> bytes:
    """Seal ``body`` for ``recipients`` and wrap it in a signed ``kind`` envelope whose
    fields are the twin, the author, ``meta``, the wraps and the ciphertext."""
    wraps, sealed = seal_document(kind, twin, author, signer, meta, body, recipients)
    env = {"twin": twin, author_field: author, **meta, "wraps": wraps, "sealed": sealed}
    env["sig"] = sign_envelope(kind, signer, env)
    return encode(kind, env)


def sign_envelope(kind: str, signer: SigningKey, body: Mapping[str, Any]) -> bytes:
    """Outer signature over every field of ``body`` (but ``sig``) and the kind."""
    return signer.sign_object(ENVELOPE_CONTEXT, {"kind": kind, **{k: v for k, v in body.items()
                                                                   if k != "sig"}})


def verify_envelope(env: Envelope, key: VerifyKey) -> None:
    """Raise SignatureInvalid unless ``env`` carries ``key``'s outer signature."""
    unsigned = {k: v for k, v in env.body.items() if k != "sig"}
    key.verify_object(ENVELOPE_CONTEXT, {"kind": env.kind, **unsigned}, env["sig"])


def wrap_for(env: Envelope, name: str) -> bytes:
    """The wrap of ``env`` addressed to ``name`` (raise ValidationError if none)."""
    for w in env["wraps"]:
        if w["to"] == name:
            return bytes(w["wrap"])
    raise ValidationError(f"{env.kind} has no wrap for {name!r}")


def permit_of(env: Envelope) -> InteractToken | None:
    """The InteractToken an envelope carries as ``permit`` (None: written by the owner)."""
    raw = env.get("permit")
    return None if raw is None else InteractToken.from_bytes(raw)


def check_fresh(when: float, now: float, what: str) -> None:
    """Refuse a message dated further than :data:`MAX_SKEW_S` in the future."""
    if when > now + MAX_SKEW_S:
        raise ValidationError(f"{what} is dated {when - now:.0f} s in the future")


def author_key_for(env: Envelope, author: str, owner_key: VerifyKey, *, right: str,
                   now: float) -> tuple[VerifyKey, InteractToken | None]:
    """(key that must have signed ``env``, its permit) for writer/requester ``author``.

    Without a permit only the owner's key will do; with one, the permit must be the owner's,
    valid at ``now`` (± :data:`MAX_SKEW_S`, like write tokens: the owner's clock and the
    checker's differ), for ``author``, this twin and ``right`` — and its holder key signs."""
    permit = permit_of(env)
    if permit is None:
        return owner_key, None
    verify_interact_token(permit, owner_key, principal=author, twin=env["twin"], right=right,
                          now=now, leeway_s=MAX_SKEW_S)
    return permit.holder_key, permit


def open_with_wrap(env: Envelope, kind: str, author: str, meta: Mapping[str, Any],
                   key_material: bytes, pre: PreKeyPair, author_key: VerifyKey) -> dict[str, Any]:
    """unwrap + open_document in one step (the readers' path for every kind)."""
    try:
        key = unwrap(pre, key_material, kind, env["twin"], author, meta)
    except DecryptionFailed:
        raise DecryptionFailed(f"{kind}: the wrap does not open for this key and document") from None
    return open_document(kind, env["twin"], author, meta, env["sealed"], key, author_key)


def verify_device_envelope(env: Envelope, owner_key: VerifyKey, *, now: float) -> WriteToken:
    """A device-signed envelope (reported state, answer, presence): its write token is the
    owner's, for the envelope's twin and device, valid at ``now``; its device key signed
    every field. Returns the token (its ``device_key`` also signed the inner document)."""
    token = device_token(env["token"], owner_key, twin=env["twin"], device=env["device"], now=now)
    verify_envelope(env, token.device_key)
    return token
