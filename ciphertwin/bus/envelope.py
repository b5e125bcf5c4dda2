"""The msgpack envelope codec: versioned, strictly validated, size-limited messages.

Everything arriving over the bus is attacker-controlled (the broker and the cloud are not
trusted), so decoding checks the size *before* unpacking, refuses msgpack extension types,
and then checks every field of the declared schema: presence, type, length and range. A
malformed message raises :class:`EnvelopeError` (a ``ValidationError``) with a reason that
can be logged; nothing else escapes.

Every message has exactly one wire form, and decoding accepts only that one: the received
bytes must equal the re-encoding of what they decode to. Signatures are checked over
canonical re-encodings, so without this the broker could re-encode a signed message (reorder
keys, widen an integer, use a longer string header) without breaking its signature — and a
store that is idempotent on bytes would then take the re-encoding first and refuse the
genuine message as a conflict.

Schemas are declarative: one :func:`register_kind` call (one line per kind) declares the
fields of a message kind and its size limit::

    register_kind("ack", {"twin": ID, "device": ID, "seq": STORED_INT})

Numbers are bounded by what may be done with them: every integer that can reach a store (a
seq, a limit, a count, a version) is a :data:`STORED_INT` — what SQLite's INTEGER and
PostgreSQL's BIGINT hold — and every time a :data:`TIME`. Out of range is refused here, with
a reason, and never reaches a store: there it would fail a whole batch or a query.

Wire form: a msgpack map ``{"t": kind, "v": version, **fields}`` with sorted keys (in
nested maps too), each value in msgpack's shortest encoding, floats as float64 — exactly
what :func:`encode` produces.

The kinds' size limits are also the only source of the size limits further out: the
brokers' maximum packet size (:func:`max_packet_size`) and the bus client's per-subscription
limits (:func:`max_size_of`), which drop an oversize message before it is queued or decoded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack

from ciphertwin.bus.errors import EnvelopeError
from ciphertwin.bus.topics import ID_PATTERN
from ciphertwin.crypto.wire import is_canonical

VERSION = 1
"""Current envelope schema version; a decoder accepts exactly the versions of its kind."""

DEFAULT_MAX_SIZE = 256 * 1024
"""Default per-kind size limit in bytes (MPC chunks and bulk inputs register larger ones)."""

RESERVED = frozenset({"t", "v"})


class Spec:
    """A field constraint; ``check`` returns an error text or None."""

    optional = False
    holds_maps = False
    """Can a value hold a map? Only then does :meth:`canonical` need to walk it."""

    def check(self, value: Any) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def canonical(self, value: Any) -> Any:
        """``value`` (already checked) with the keys of every map in it sorted."""
        return value


def _len_err(n: int, lo: int, hi: int | None, unit: str) -> str | None:
    if n < lo:
        return f"too short ({n} {unit} < {lo})"
    if hi is not None and n > hi:
        return f"too long ({n} {unit} > {hi})"
    return None


@dataclass(frozen=True)
class Bytes(Spec):
    """Binary string of ``min_len``..``max_len`` bytes."""

    max_len: int
    min_len: int = 0

    def check(self, value: Any) -> str | None:
        if not isinstance(value, bytes):
            return f"expected bytes, got {type(value).__name__}"
        return _len_err(len(value), self.min_len, self.max_len, "bytes")


@dataclass(frozen=True)
class Str(Spec):
    """UTF-8 text of ``min_len``..``max_len`` characters."""

    max_len: int
    min_len: int = 0

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return f"expected str, got {type(value).__name__}"
        return _len_err(len(value), self.min_len, self.max_len, "chars")


@dataclass(frozen=True)
class Ident(Spec):
    """An identifier as used in topics (``[A-Za-z0-9_.:-]{1,64}``)."""

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
            return f"expected identifier [A-Za-z0-9_.:-]{{1,64}}, got {value!r:.80}"
        return None


@dataclass(frozen=True)
class Int(Spec):
    """Integer within ``lo``..``hi`` (booleans are not integers here)."""

    lo: int
    hi: int

    def check(self, value: Any) -> str | None:
        if type(value) is not int:
            return f"expected int, got {type(value).__name__}"
        if not self.lo <= value <= self.hi:
            return f"out of range [{self.lo}, {self.hi}]"
        return None


EXACT_INT = 2**53
"""The largest integer a float64 holds exactly (and every smaller one)."""


@dataclass(frozen=True)
class Float(Spec):
    """Finite float within ``lo``..``hi``.

    An int stands for a float only where a float holds it exactly (``|n| <= 2**53``): a
    signed body keeps the sender's int (re-encoding it as a float would break the signature),
    so without this bound a huge int would reach a REAL/DOUBLE column or float arithmetic."""

    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any) -> str | None:
        if type(value) is int:
            if abs(value) > EXACT_INT:
                return "int too large for a float (|n| > 2**53)"
        elif type(value) is not float:
            return f"expected float, got {type(value).__name__}"
        elif not math.isfinite(value):
            return "not finite"
        if not self.lo <= value <= self.hi:
            return f"out of range [{self.lo:g}, {self.hi:g}]"
        return None


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"expected bool, got {type(value).__name__}"


@dataclass(frozen=True)
class ListOf(Spec):
    """List of at most ``max_items`` items, each satisfying ``item``."""

    item: Spec
    max_items: int
    min_items: int = 0

    def check(self, value: Any) -> str | None:
        if not isinstance(value, list):
            return f"expected list, got {type(value).__name__}"
        err = _len_err(len(value), self.min_items, self.max_items, "items")
        if err:
            return err
        for i, v in enumerate(value):
            err = self.item.check(v)
            if err:
                return f"[{i}]: {err}"
        return None

    @property
    def holds_maps(self) -> bool:  # type: ignore[override]
        return self.item.holds_maps

    def canonical(self, value: Any) -> Any:
        return [self.item.canonical(v) for v in value] if self.item.holds_maps else value


@dataclass(frozen=True)
class MapOf(Spec):
    """Map with at most ``max_items`` entries, keys satisfying ``key``, values ``value``."""

    key: Spec
    value: Spec
    max_items: int

    def check(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"expected map, got {type(value).__name__}"
        if len(value) > self.max_items:
            return f"too many entries ({len(value)} > {self.max_items})"
        for k, v in value.items():
            err = self.key.check(k)
            if err:
                return f"key {k!r:.40}: {err}"
            err = self.value.check(v)
            if err:
                return f"[{k!r:.40}]: {err}"
        return None

    holds_maps = True

    def canonical(self, value: Any) -> Any:
        return {k: self.value.canonical(value[k]) for k in sorted(value)}


@dataclass(frozen=True)
class Struct(Spec):
    """Nested map with a fixed field schema (same strictness as a top-level envelope)."""

    fields: Mapping[str, Spec]

    def check(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"expected map, got {type(value).__name__}"
        return _check_fields(value, self.fields)

    holds_maps = True

    def canonical(self, value: Any) -> Any:
        return {k: self.fields[k].canonical(value[k]) for k in sorted(value)}


@dataclass(frozen=True)
class Opt(Spec):
    """The wrapped field may be absent (but if present, must be valid; None is not allowed)."""

    inner: Spec
    optional = True

    def check(self, value: Any) -> str | None:
        return self.inner.check(value)

    @property
    def holds_maps(self) -> bool:  # type: ignore[override]
        return self.inner.holds_maps

    def canonical(self, value: Any) -> Any:
        return self.inner.canonical(value)


# Handy constants for schemas.
ID = Ident()
U64 = Int(0, 2**64 - 1)
"""Not for anything that may be stored: SQLite and PostgreSQL hold signed 64-bit integers."""
I64 = Int(-(2**63), 2**63 - 1)
STORED_INT = Int(0, 2**63 - 1)
"""A seq, limit, count or version: what SQLite INTEGER and PostgreSQL BIGINT hold."""
U32 = Int(0, 2**32 - 1)
BOOL = Bool()
FLOAT = Float()
TIME = Float(0.0, 1e12)
"""A Unix time in seconds: 1970 up to 1e12 (the CLIs' "no upper bound"); anything else is a
mistake or an attack, and would only ever match nothing."""
SIG = Bytes(64, 64)  # Ed25519 signature
KEY32 = Bytes(32, 32)  # Ed25519 / X25519 public key, AES-256 key id, etc.


def _check_fields(body: Mapping[Any, Any], fields: Mapping[str, Spec]) -> str | None:
    extra = [k for k in body if k not in fields]
    if extra:
        return f"unexpected field(s) {sorted(map(repr, extra))[:5]}"
    for name, spec in fields.items():
        if name not in body:
            if spec.optional:
                continue
            return f"missing field {name!r}"
        err = spec.check(body[name])
        if err:
            return f"field {name!r}: {err}"
    return None


@dataclass(frozen=True)
class Kind:
    """Schema of one message kind."""

    name: str
    fields: Mapping[str, Spec]
    max_size: int = DEFAULT_MAX_SIZE
    versions: frozenset[int] = frozenset({VERSION})

    @cached_property
    def nested(self) -> frozenset[str]:
        """Fields whose values can hold maps (most kinds have none: nothing to walk)."""
        return frozenset(name for name, spec in self.fields.items() if spec.holds_maps)

    def pack(self, msg: Mapping[str, Any]) -> bytes:
        """The one wire form of a checked message (``t`` and ``v`` included): keys sorted at
        every level."""
        if self.nested:
            msg = {k: self.fields[k].canonical(v) if k in self.nested else v
                   for k, v in msg.items()}
        data: bytes = msgpack.packb(dict(sorted(msg.items())), use_bin_type=True)
        return data


_KINDS: dict[str, Kind] = {}


def register_kind(
    name: str,
    fields: Mapping[str, Spec],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    versions: Iterable[int] = (VERSION,),
) -> Kind:
    """Declare a message kind. Re-registering the identical schema is a no-op."""
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name):
        raise EnvelopeError(f"invalid kind name {name!r}")
    bad = RESERVED.intersection(fields)
    if bad:
        raise EnvelopeError(f"kind {name!r}: field names {sorted(bad)} are reserved")
    if not all(isinstance(s, Spec) for s in fields.values()):
        raise EnvelopeError(f"kind {name!r}: every field needs a Spec")
    if not 16 <= max_size <= 256 * 1024 * 1024:
        raise EnvelopeError(f"kind {name!r}: max_size {max_size} out of range")
    kind = Kind(name, dict(fields), max_size, frozenset(versions))
    existing = _KINDS.get(name)
    if existing is not None and existing != kind:
        raise EnvelopeError(f"kind {name!r} is already registered with another schema")
    _KINDS[name] = kind
    return kind


def get_kind(name: str) -> Kind:
    try:
        return _KINDS[name]
    except KeyError:
        raise EnvelopeError(f"unknown envelope kind {name!r}") from None


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


MQTT_HEADER_ROOM = 4096
"""Room for an MQTT PUBLISH's fixed header, topic and packet id around an envelope (topics of
the bus layout stay far below it)."""


def max_size_of(*kinds: str) -> int:
    """The largest ``max_size`` among ``kinds``: what a subscription carrying only them may
    refuse above, before decoding anything."""
    return max(get_kind(k).max_size for k in kinds)


def max_packet_size() -> int:
    """The largest MQTT packet a broker must let through: the largest registered kind plus
    header room. Both brokers' limits come from here (import every kind first, e.g.
    ``ciphertwin.protocol.jobs``), so raising a kind's size raises them too."""
    return max_size_of(*_KINDS) + MQTT_HEADER_ROOM


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded, validated message."""

    kind: str
    version: int
    body: dict[str, Any]
    size: int

    def __getitem__(self, name: str) -> Any:
        return self.body[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.body.get(name, default)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise EnvelopeError(f"msgpack extension type {code} is not allowed")


def encode(kind: str, body: Mapping[str, Any], *, version: int = VERSION) -> bytes:
    """Validate ``body`` against the schema of ``kind`` and pack it."""
    k = get_kind(kind)
    if version not in k.versions:
        raise EnvelopeError(f"kind {kind!r} has no version {version}")
    if not isinstance(body, Mapping):
        raise EnvelopeError(f"body must be a mapping, got {type(body).__name__}")
    err = _check_fields(body, k.fields)
    if err:
        raise EnvelopeError(f"cannot encode {kind!r}: {err}")
    try:
        data = k.pack({"t": kind, "v": version, **body})
    except (TypeError, ValueError, OverflowError) as exc:
        raise EnvelopeError(f"cannot encode {kind!r}: {exc}") from None
    if len(data) > k.max_size:
        raise EnvelopeError(f"cannot encode {kind!r}: {len(data)} bytes > limit {k.max_size}")
    return data


def _unpack(payload: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                           timestamp=0)


def unpack_checked(payload: bytes) -> dict[str, Any]:
    """The body of an envelope that already passed :func:`decode` — in another process, say,
    where shipping the raw bytes and unpacking them again is cheaper than pickling the body.
    Skips the schema check, so never call it on bytes that did not pass ``decode``."""
    body: dict[str, Any] = _unpack(payload)
    del body["t"], body["v"]
    return body


def decode(
    payload: bytes,
    expected_kinds: str | Iterable[str],
    max_size: int | None = None,
) -> Envelope:
    """Unpack and validate ``payload``; it must be one of ``expected_kinds``.

    ``max_size`` (if given) further lowers the kinds' own limits. Raises EnvelopeError.
    """
    kinds = [expected_kinds] if isinstance(expected_kinds, str) else list(expected_kinds)
    if not kinds:
        raise EnvelopeError("no expected kinds given")
    schemas = {name: get_kind(name) for name in kinds}
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EnvelopeError(f"payload must be bytes, got {type(payload).__name__}")
    size = len(payload)
    limit = max(k.max_size for k in schemas.values())
    if max_size is not None:
        limit = min(limit, max_size)
    if size > limit:
        raise EnvelopeError(f"envelope of {size} bytes exceeds limit {limit}")
    if size == 0:
        raise EnvelopeError("empty payload")
    try:
        msg = _unpack(payload)
    except EnvelopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise EnvelopeError(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise EnvelopeError(f"envelope must be a map, got {type(msg).__name__}")
    kind_name = msg.get("t")
    version = msg.get("v")
    if not isinstance(kind_name, str):
        raise EnvelopeError("envelope has no kind ('t')")
    kind = schemas.get(kind_name)
    if kind is None:
        raise EnvelopeError(f"unexpected kind {kind_name!r:.40}; expected one of {sorted(schemas)}")
    if type(version) is not int or version not in kind.versions:
        raise EnvelopeError(
            f"unsupported version {version!r:.20} of {kind_name!r}; "
            f"supported {sorted(kind.versions)}"
        )
    if size > kind.max_size:
        raise EnvelopeError(f"{kind_name!r} of {size} bytes exceeds limit {kind.max_size}")
    if not is_canonical(msg, payload, flat=not kind.nested):
        raise _not_canonical(kind_name)
    del msg["t"], msg["v"]
    err = _check_fields(msg, kind.fields)
    if err:
        raise EnvelopeError(f"invalid {kind_name!r}: {err}")
    return Envelope(kind_name, version, msg, size)


def salvage(payload: bytes, kind_name: str, field: str) -> Any | None:
    """``field`` of a ``kind_name`` message that failed :func:`decode`, if it is present and
    valid by itself (else None) — so a refused request can still be answered on its reply
    topic instead of being left to time out. Never trust anything else of such a message."""
    kind = get_kind(kind_name)
    spec = kind.fields.get(field)
    if spec is None or not isinstance(payload, bytes | bytearray | memoryview):
        return None
    if not 0 < len(payload) <= kind.max_size:
        return None
    try:
        msg = _unpack(payload)
    except Exception:  # noqa: BLE001 - garbage: nothing to salvage
        return None
    if not isinstance(msg, dict) or msg.get("t") != kind_name or field not in msg:
        return None
    value = msg[field]
    return value if spec.check(value) is None else None


def _not_canonical(kind_name: str) -> EnvelopeError:
    return EnvelopeError(f"{kind_name!r} is not in canonical form (re-encoded: keys out of "
                         "order, or a longer encoding than needed)")


# Kinds owned by the bus layer itself (generic replies to request/response exchanges).
register_kind("error", {"request_id": Opt(ID), "code": Str(64, 1), "reason": Str(1024)})
