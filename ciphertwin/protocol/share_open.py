"""Opening share items on a processing node (runs in worker processes, bytes in, bytes out).

For every (item, re-encrypted capsule) the node receives, in this order:

* the item's write token must be issued by the owner key the job names for the twin (so the
  cloud cannot slip in items signed by a device key of its own), valid at the item's time;
* the item's attributes must carry ``share:i`` for this node's index and satisfy the owner's
  process-token selector — node i never opens another share index, whatever a grant says;
* the capsule is decapsulated with the node's PRE key (cached per capsule: one per key epoch);
* the sealed reading is decrypted (AAD binds twin, device, seq and attributes); with
  ``check_signatures`` the device's signature on the plaintext is checked as well;
* the reading must say ``share: i`` and hold every needed field as a ring element.

The outer envelope signature is not checked: AES-GCM under a data key that only the device,
the owner and grantees of ``share:i`` items hold already binds everything a node relies on;
the argument, and when to turn ``check_signatures`` on, is in docs/processing.md.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ciphertwin.crypto.epochs import SealedItem, open_sealed
from ciphertwin.crypto.errors import DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.policy import Policy
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import WriteToken, verify_write_token
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.items import (
    ITEM_DATA_CONTEXT,
    decode_inner,
    decode_item,
    item_aad,
    key_from_recapsule,
)

_RING = 1 << 64
_REFUSED = (ValidationError, DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected)


@dataclass(frozen=True, slots=True)
class OpenedShare:
    """One decrypted, authenticated share reading (values are ring elements)."""

    twin: str
    seq: int
    time: float
    values: dict[str, int]
    device: str = ""


# Worker-process caches. Write tokens are verified once per (owner key, token bytes); data keys
# are derived once per (node PRE key, re-capsule bytes): the 0.8 ms GT-membership check and the
# GT exponentiation then cost nothing for the other items of the epoch or a repeated job.
# Both results are deterministic functions of their (hashed) inputs, so a hit is exactly as
# good as a fresh computation.
_TOKENS: OrderedDict[bytes, WriteToken] = OrderedDict()
_KEYS: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
_ALLOWED: OrderedDict[tuple[bytes, tuple[str, ...]], bool] = OrderedDict()
_CACHE_LIMIT = 20_000


def _remember(cache: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
    cache[key] = value
    if len(cache) > _CACHE_LIMIT:
        cache.popitem(last=False)


def open_share_batch(pre_bytes: bytes, index: int, owner_of: Mapping[str, bytes],
                     selectors: Mapping[bytes, str], fields: Sequence[str],
                     entries: Sequence[Mapping[str, bytes]], *,
                     check_signatures: bool = True) -> list[OpenedShare] | str:
    """Open ``entries`` ({item, key}) for node ``index``; a string is the refusal reason.

    ``check_signatures=False`` skips the device's Ed25519 signature on each plaintext; see
    docs/processing.md ("Authenticity of node inputs") for what that does and does not give up.
    """
    pre = PreKeyPair.from_bytes(pre_bytes)
    pre_id = pre.key_id
    policies = {owner: Policy.parse(text) for owner, text in selectors.items()}
    share_attr = f"share:{index}"
    out: list[OpenedShare] = []
    for entry in entries:
        where = "item"
        try:
            item = decode_item(entry["item"])
            twin, seq, device = item["twin"], item["seq"], item["device"]
            where = f"twin {twin} seq {seq}"
            owner = owner_of.get(twin)
            if owner is None:
                raise ValidationError("twin is not part of this job")
            raw_token = item["token"]
            tkey = hashlib.sha256(owner + raw_token).digest()
            token = _TOKENS.get(tkey)
            if token is None:
                token = WriteToken.from_bytes(raw_token)
                verify_write_token(token, VerifyKey(owner), twin=twin, now=token.not_before)
                _remember(_TOKENS, tkey, token)
            if token.twin != twin or token.device != device:
                raise ValidationError("write token names another twin or device")
            if not token.not_before - 300 <= item["time"] < token.not_after + 300:
                raise ValidationError("item time is outside its write token's validity")
            attrs = tuple(item["attrs"])
            ok = _ALLOWED.get((tkey, attrs))
            if ok is None:
                ok = all(token.allows_attribute(a) for a in attrs)
                _remember(_ALLOWED, (tkey, attrs), ok)
            if not ok:
                raise ValidationError("attributes are not allowed by the write token")
            if share_attr not in attrs or not policies[owner].allows(attrs):
                raise ValidationError(f"attributes are not {share_attr} within the token's subset")
            kkey = hashlib.sha256(pre_id + entry["key"]).digest()
            got = _KEYS.get(kkey)
            if got is None:
                got = key_from_recapsule(pre, entry["key"])
                _remember(_KEYS, kkey, got)
            cid, key = got
            if cid != item["capsule_id"]:
                raise ValidationError("key material is for another capsule")
            sealed = SealedItem.from_bytes(item["sealed"])
            if sealed.capsule_id != item["capsule_id"]:
                raise ValidationError("sealed item names another capsule")
            inner = decode_inner(open_sealed(sealed, key, item_aad(twin, device, seq, attrs)))
            reading = inner["reading"]
            if check_signatures:
                token.device_key.verify_object(
                    ITEM_DATA_CONTEXT,
                    {"twin": twin, "device": device, "seq": seq, "reading": reading},
                    inner["sig"])
            out.append(OpenedShare(twin, seq, float(item["time"]), _values(reading, index, fields),
                                   device))
        except _REFUSED as exc:
            return f"input refused ({where}): {type(exc).__name__}: {exc}"[:256]
    return out


def _values(reading: object, index: int, fields: Sequence[str]) -> dict[str, int]:
    if not isinstance(reading, dict) or reading.get("share") != index:
        raise ValidationError(f"reading is not share {index}")
    values = reading.get("values")
    if not isinstance(values, dict):
        raise ValidationError("reading has no values")
    out = {}
    for f in fields:
        v = values.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _RING:
            raise ValidationError(f"field {f!r} is not a ring element")
        out[f] = v
    return out
