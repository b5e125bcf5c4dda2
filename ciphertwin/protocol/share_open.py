"""Opening share items on a processing node (runs in worker processes, bytes in, bytes out).

For every (item, re-encrypted capsule) the node receives, in this order:

* the item's write token must be issued by the owner key the job names for the twin (so the
  cloud cannot slip in items signed by a device key of its own), name the item's twin and
  device, and be valid at the item's time;
* the device's signature over the whole envelope (``protocol.items.verify_item_signature``,
  under the write token's device key) must verify: it covers the time (which orders the
  points), the attributes, the capsule id and the sealed ciphertext, so the cloud can neither
  forge an input nor alter a genuine one. AES-GCM alone would not do: anyone — the cloud
  included — can encapsulate a fresh capsule under the owner's *public* PRE key, re-encrypt
  it with the node's stored re-key and seal any reading under a data key it then knows;
* the item's attributes must carry ``share:i`` for this node's index and satisfy the owner's
  process-token selector — node i never opens another share index, whatever a grant says;
* the capsule is decapsulated with the node's PRE key (once per capsule: one per key epoch);
* the sealed reading is decrypted (AAD binds twin, device, seq and attributes) — the
  ciphertext is the device's (signed), so the plaintext is too;
* the reading must say ``share: i``, hold every needed field as a ring element, and declare
  for each of them (``enc``) exactly the encoding the job declares — unit, scale and range;
  readings of the old format (a bare ``frac``) are refused. A conforming device never encodes
  outside its declared range, so the functions' comparison widths, derived from the job's
  ranges, are exact.

Items are opened grouped by what they share: the write token, the attribute-set checks and
the data key are worked out once per distinct token, attribute set and re-capsule (memoised
for the batch, and across batches by digest of the exact bytes), so the per-item work is the
envelope check, one Ed25519 verification (remembered by digest of the exact bytes, so a
repeated job skips it), AES-GCM and the value checks. Results come back as
columns (numpy arrays), which are cheap to pickle out of the worker and to arrange.

What every batch of a job shares — the node's PRE key, the job's twins, owners, selectors and
encodings — is packed once per job (:func:`job_context`) and unpacked and parsed once per
worker (cached by digest); the owners' selectors are parsed only for owners whose items the
worker meets. Before, each batch re-parsed the key and *every* owner's selector, so with N
users a job cost O(N) per batch and O(N²) in all.
See docs/processing.md ("Authenticity of node inputs").
"""


from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.crypto.epochs import SealedItem, open_sealed
from ciphertwin.crypto.errors import DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.policy import Policy
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import WriteToken, verify_write_token
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.job_epochs import FieldEncoding
from ciphertwin.protocol.items import (
    decode_inner,
    decode_item,
    item_aad,
    key_from_recapsule,
    verify_item_signature,
)

_RING = 1 << 64
_REFUSED = (ValidationError, DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected)


@dataclass(frozen=True)
class OpenedColumns:
    """Decrypted, authenticated share readings, one position per item (values in the ring)."""

    twins: list[str]
    devices: list[str]
    seqs: np.ndarray  # uint64
    times: np.ndarray  # float64
    values: dict[str, np.ndarray]  # field -> uint64

    def __len__(self) -> int:
        return len(self.twins)

    @classmethod
    def concat(cls, parts: Sequence[OpenedColumns], fields: Sequence[str]) -> OpenedColumns:
        """One set of columns from several batches (the node opens chunk by chunk)."""
        if not parts:
            return cls([], [], np.zeros(0, np.uint64), np.zeros(0, np.float64),
                       {f: np.zeros(0, np.uint64) for f in fields})
        return cls([t for p in parts for t in p.twins], [d for p in parts for d in p.devices],
                   np.concatenate([p.seqs for p in parts]),
                   np.concatenate([p.times for p in parts]),
                   {f: np.concatenate([p.values[f] for p in parts]) for f in fields})


# Worker-process caches. Write tokens are verified once per (owner key, token bytes); data keys
# are derived once per (node PRE key, re-capsule bytes): the 0.8 ms GT-membership check and the
# GT exponentiation then cost nothing for the other items of the epoch or a repeated job;
# item signatures once per (device key, item bytes), so a repeated job does no Ed25519 work.
# All results are deterministic functions of their (hashed) inputs, so a hit is exactly as
# good as a fresh computation.
_TOKENS: OrderedDict[bytes, WriteToken] = OrderedDict()
_KEYS: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
_ALLOWED: OrderedDict[tuple[bytes, tuple[str, ...]], bool] = OrderedDict()
_SIGNED: OrderedDict[bytes, bool] = OrderedDict()
"""digests of (device key, exact item bytes) whose signature verified: a repeated job skips it"""
_CACHE_LIMIT = 20_000


def _remember(cache: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
    cache[key] = value
    if len(cache) > _CACHE_LIMIT:
        cache.popitem(last=False)


class _Job:
    """What every batch of one job shares at one node, parsed once per worker process."""

    def __init__(self, pre_bytes: bytes, index: int, owner_of: Mapping[str, bytes],
                 selectors: Mapping[bytes, str], encodings: Mapping[str, Mapping[str, Any]]) -> None:
        self.pre = PreKeyPair.from_bytes(pre_bytes)
        self.index, self.owner_of, self.selectors = index, owner_of, selectors
        self.fields = tuple(encodings)
        self.encodings = {f: FieldEncoding.from_dict(e) for f, e in encodings.items()}
        self.declared = {f: e.as_dict() for f, e in self.encodings.items()}
        """field -> the declared encoding in its canonical form (what a device sends)"""
        self._policies: dict[bytes, Policy] = {}

    def policy(self, owner: bytes) -> Policy:
        """The owner's token selector, parsed the first time one of its items is opened."""
        got = self._policies.get(owner)
        if got is None:
            got = self._policies[owner] = Policy.parse(self.selectors[owner])
        return got


def job_context(pre_bytes: bytes, index: int, owner_of: Mapping[str, bytes],
                selectors: Mapping[bytes, str],
                encodings: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Everything :func:`open_shares` needs besides the items, packed once per job.

    Only ever handed from a node to its own worker processes (like the items themselves,
    which cross that boundary pickled too)."""
    return pickle.dumps((pre_bytes, index, dict(owner_of), dict(selectors),
                         {f: dict(e) for f, e in encodings.items()}),
                        protocol=pickle.HIGHEST_PROTOCOL)


_JOBS: OrderedDict[bytes, _Job] = OrderedDict()
_JOBS_LIMIT = 8


def _job(context: bytes) -> _Job:
    """The parsed job context, once per worker and job (keyed by digest of the bytes)."""
    key = hashlib.sha256(context).digest()
    job = _JOBS.get(key)
    if job is None:
        job = _JOBS[key] = _Job(*pickle.loads(context))  # noqa: S301 - the node's own bytes
        if len(_JOBS) > _JOBS_LIMIT:
            _JOBS.popitem(last=False)
    else:
        _JOBS.move_to_end(key)
    return job


_NUMBER = (int, float)


class _Opener:
    """Opens one batch for node ``index``; memoises per token, attribute set and re-capsule."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.pre, self.pre_id, self.index = job.pre, job.pre.key_id, job.index
        self.owner_of, self.fields = job.owner_of, job.fields
        self.encodings, self.declared = job.encodings, job.declared
        self._enc_seen: dict[tuple[str, tuple[Any, ...], tuple[type, ...]], bool] = {}
        self.share_attr = f"share:{job.index}"
        self._tokens: dict[tuple[bytes, bytes], tuple[bytes, WriteToken]] = {}
        self._attrs: dict[tuple[bytes, tuple[str, ...]], str | None] = {}
        self._keys: dict[bytes, tuple[bytes, bytes]] = {}

    def token(self, owner: bytes, raw: bytes) -> tuple[bytes, WriteToken]:
        """(cache digest, write token signed by ``owner``) — the signature is checked once per
        owner and token bytes; twin, device and time are checked per item (``open``)."""
        got = self._tokens.get((owner, raw))
        if got is None:
            tkey = hashlib.sha256(owner + raw).digest()
            token = _TOKENS.get(tkey)
            if token is None:
                token = WriteToken.from_bytes(raw)
                verify_write_token(token, VerifyKey(owner), now=token.not_before)
                _remember(_TOKENS, tkey, token)
            got = self._tokens[(owner, raw)] = (tkey, token)
        return got

    def attrs_problem(self, tkey: bytes, token: WriteToken, owner: bytes,
                      attrs: tuple[str, ...]) -> str | None:
        """Why these attributes may not be opened here (None: they may), once per set."""
        key = (tkey, attrs)
        if key in self._attrs:
            return self._attrs[key]
        ok = _ALLOWED.get(key)
        if ok is None:
            ok = all(token.allows_attribute(a) for a in attrs)
            _remember(_ALLOWED, key, ok)
        problem = None
        if not ok:
            problem = "attributes are not allowed by the write token"
        elif self.share_attr not in attrs or not self.job.policy(owner).allows(attrs):
            problem = f"attributes are not {self.share_attr} within the token's subset"
        self._attrs[key] = problem
        return problem

    def data_key(self, raw: bytes) -> tuple[bytes, bytes]:
        """(capsule id, data key) of a re-capsule: one decapsulation per distinct re-capsule."""
        got = self._keys.get(raw)
        if got is None:
            kkey = hashlib.sha256(self.pre_id + raw).digest()
            got = _KEYS.get(kkey)
            if got is None:
                got = key_from_recapsule(self.pre, raw)
                _remember(_KEYS, kkey, got)
            self._keys[raw] = got
        return got

    def open(self, raw: bytes, raw_key: bytes) -> tuple[str, str, int, float, tuple[int, ...]]:
        """(twin, device, seq, time, field values) of one item envelope, or raise."""
        item = decode_item(raw)
        twin, seq, device = item["twin"], item["seq"], item["device"]
        owner = self.owner_of.get(twin)
        if owner is None:
            raise ValidationError("twin is not part of this job")
        tkey, token = self.token(owner, item["token"])
        if token.twin != twin or token.device != device:
            raise ValidationError("write token names another twin or device")
        signed = hashlib.sha256(token.device_key.raw + raw).digest()
        if signed not in _SIGNED:  # every field below is the device's
            verify_item_signature(item.body, token.device_key)
            _remember(_SIGNED, signed, True)
        when = float(item["time"])
        if not token.not_before - 300 <= when < token.not_after + 300:
            raise ValidationError("item time is outside its write token's validity")
        attr_list = item["attrs"]
        problem = self.attrs_problem(tkey, token, owner, tuple(attr_list))
        if problem is not None:
            raise ValidationError(problem)
        cid, key = self.data_key(raw_key)
        if cid != item["capsule_id"]:
            raise ValidationError("key material is for another capsule")
        sealed = SealedItem.from_bytes(item["sealed"])
        if sealed.capsule_id != cid:
            raise ValidationError("sealed item names another capsule")
        inner = decode_inner(open_sealed(sealed, key, item_aad(twin, device, seq, attr_list)))
        reading = inner["reading"]
        values = _values(reading, self.index, self.fields)
        self.check_encodings(reading)
        return twin, device, seq, when, values

    def check_encodings(self, reading: Mapping[str, Any]) -> None:
        """Every field read must declare exactly the job's encoding.

        A conforming device sends the declared encoding itself (``FieldEncoding.as_dict``):
        that is one dict comparison plus a type check (``==`` alone would let ``True`` pass
        for 1, or ``4.0`` for 4). Anything else goes through ``FieldEncoding.from_dict`` and
        the comparison of the parsed encodings, memoised per distinct declaration."""
        enc = reading.get("enc")
        if not isinstance(enc, dict):
            raise ValidationError("reading declares no field encodings ('enc'; the old 'frac' "
                                  "format is no longer accepted)")
        for f in self.fields:
            raw = enc.get(f)
            if (raw == self.declared[f] and type(raw["frac"]) is int
                    and type(raw["min"]) in _NUMBER and type(raw["max"]) in _NUMBER):
                continue  # == on dicts: same keys, unit a str; the types checked here
            if not self._declares(f, raw):
                want = self.encodings[f]
                raise ValidationError(
                    f"field {f!r} is encoded as {_describe(raw)}, the job declares "
                    f"{want.unit!r} frac {want.frac} in [{want.min:g}, {want.max:g}]")

    def _declares(self, f: str, raw: object) -> bool:
        """Does ``raw`` parse to the job's encoding of ``f`` (e.g. an integer bound)?"""
        try:  # the types too: True == 1 and 1 == 1.0 must not share an entry
            key = (f, tuple(raw.items()), tuple(map(type, raw.values())))  # type: ignore[union-attr]
            ok = self._enc_seen.get(key)
        except (AttributeError, TypeError):  # not a map, or unhashable values
            key, ok = None, None
        if ok is None:
            try:
                ok = FieldEncoding.from_dict(raw) == self.encodings[f]
            except ValidationError:
                ok = False
            if key is not None and len(self._enc_seen) < 1024:
                self._enc_seen[key] = ok
        return ok


def _describe(raw: object) -> str:
    if not isinstance(raw, dict):
        return "nothing" if raw is None else "something malformed"
    try:
        e = FieldEncoding.from_dict(raw)
    except ValidationError:
        return "something malformed"
    return f"{e.unit!r} frac {e.frac} in [{e.min:g}, {e.max:g}]"


def open_share_batch(pre_bytes: bytes, index: int, owner_of: Mapping[str, bytes],
                     selectors: Mapping[bytes, str], encodings: Mapping[str, Mapping[str, Any]],
                     entries: Sequence[Mapping[str, bytes]]) -> OpenedColumns | str:
    """Open ``entries`` ({item, key}) for node ``index``; a string is the refusal reason.

    ``encodings``: field -> the job's declared encoding (``FieldEncoding.as_dict``) of every
    field to read. Every item's device signature is checked: there is no switch to skip it.
    A node opening many batches of one job packs the rest once (:func:`job_context`) and
    calls :func:`open_shares`."""
    return open_shares(job_context(pre_bytes, index, owner_of, selectors, encodings), entries)


def open_shares(context: bytes, entries: Sequence[Mapping[str, bytes]]) -> OpenedColumns | str:
    """Open ``entries`` ({item, key}) with a job's :func:`job_context`; a string is the
    refusal reason (the first item refused ends the batch)."""
    opener = _Opener(_job(context))
    fields = opener.fields
    twins: list[str] = []
    devices: list[str] = []
    seqs: list[int] = []
    times: list[float] = []
    columns: list[list[int]] = [[] for _ in fields]
    for entry in entries:
        try:
            twin, device, seq, when, vals = opener.open(entry["item"], entry["key"])
        except _REFUSED as exc:
            where = _where(entry["item"])
            return f"input refused ({where}): {type(exc).__name__}: {exc}"[:256]
        twins.append(twin)
        devices.append(device)
        seqs.append(seq)
        times.append(when)
        for column, v in zip(columns, vals):
            column.append(v)
    return OpenedColumns(twins, devices, np.array(seqs, dtype=np.uint64),
                         np.array(times, dtype=np.float64),
                         {f: np.array(c, dtype=np.uint64) for f, c in zip(fields, columns)})


def _where(raw: bytes) -> str:
    """Which item a refusal is about (for the reason), if it decodes at all."""
    try:
        item = decode_item(raw)
    except ValidationError:
        return "item"
    return f"twin {item['twin']} seq {item['seq']}"


def _values(reading: object, index: int, fields: Sequence[str]) -> tuple[int, ...]:
    if not isinstance(reading, dict) or reading.get("share") != index:
        raise ValidationError(f"reading is not share {index}")
    values = reading.get("values")
    if not isinstance(values, dict):
        raise ValidationError("reading has no values")
    out = []
    for f in fields:
        v = values.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _RING:
            raise ValidationError(f"field {f!r} is not a ring element")
        out.append(v)
    return tuple(out)
