"""Versioned msgpack wire formats: canonical encoding and strict, bounded decoding.

Every crypto object is a msgpack map ``{"t": <tag>, "v": 1, ...fields}`` with its keys sorted,
so the same object always has the same bytes (ids and signatures are computed over them).
Decoding checks size, tag, version, the exact field set and every field's type and length;
anything else raises ``ValidationError`` — never an exception from msgpack or mcl. It also
accepts only the canonical bytes: ids and signatures are computed over re-encodings, so a
re-encoded object (keys reordered, an integer or a string header widened) would otherwise
pass as the same object under different bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from ciphertwin.errors import ValidationError

__all__ = [
    "VERSION",
    "canonical",
    "encode",
    "decode",
    "decode_any",
    "peek_tag",
    "Fields",
    "register",
]

VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

_DECODERS: dict[str, Callable[[bytes], Any]] = {}


def _normalise(obj: Any, depth: int = 0) -> Any:
    """Copy ``obj`` with map keys sorted and tuples as lists; reject non-canonical types."""
    if depth > 32:
        raise ValidationError("structure nested too deeply to encode")
    if obj is None or isinstance(obj, (bool, str, bytes, float)):
        return obj
    if isinstance(obj, int):
        if not _INT_MIN <= obj <= _INT_MAX:
            raise ValidationError("integer out of msgpack range")
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return [_normalise(v, depth + 1) for v in obj]
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise ValidationError("canonical maps need string keys")
        return {k: _normalise(obj[k], depth + 1) for k in sorted(obj)}
    raise ValidationError(f"type {type(obj).__name__} has no canonical encoding")


def _keys_sorted(obj: Any) -> bool:
    """Are the keys of every map in ``obj`` (as unpacked: their order kept) sorted strings?"""
    if type(obj) is dict:
        keys = list(obj)
        if not all(type(k) is str for k in keys) or keys != sorted(keys):
            return False
        values: Any = obj.values()
    elif type(obj) is list:
        values = obj
    else:
        return True
    for v in values:
        if (type(v) is dict or type(v) is list) and not _keys_sorted(v):
            return False
    return True


def is_canonical(obj: Any, data: bytes | bytearray | memoryview, *, flat: bool = False) -> bool:
    """Is ``data``, which unpacked to ``obj``, the one canonical encoding of it?

    Unpacking keeps the keys' order, so: sorted string keys at every level, and packing
    ``obj`` as it is gives ``data`` back (msgpack's shortest encodings, float64) — the same
    bytes :func:`canonical` makes, without its copying walk (this runs for every item).
    ``flat``: only the top level's keys are looked at — for callers whose schema refuses a
    map anywhere below the top level (the envelope kinds without nested maps)."""
    if flat:
        keys = list(obj)
        sorted_keys = all(type(k) is str for k in keys) and keys == sorted(keys)
    else:
        sorted_keys = _keys_sorted(obj)
    return sorted_keys and msgpack.packb(obj, use_bin_type=True) == data
def canonical(obj: Any) -> bytes:
    """Deterministic msgpack bytes of ``obj`` (sorted keys, bin type for bytes)."""
    return msgpack.packb(_normalise(obj), use_bin_type=True)


def encode(tag: str, fields: Mapping[str, Any]) -> bytes:
    """The canonical ``{"t": tag, "v": 1, **fields}`` encoding."""
    if "t" in fields or "v" in fields:
        raise ValueError("field names 't' and 'v' are reserved for the tag and version")
    return canonical({"t": tag, "v": VERSION, **fields})


def _unpack(data: object, max_bytes: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValidationError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ValidationError(f"encoded object is {len(data)} bytes, limit is {max_bytes}")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise ValidationError(f"not valid msgpack: {type(exc).__name__}") from exc


def peek_tag(data: bytes, max_bytes: int = 16 * 1024 * 1024) -> str:
    """The ``t`` tag of an encoded object (for dispatch), validating the framing."""
    obj = _unpack(data, max_bytes)
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ValidationError("not a tagged ciphertwin object")
    return obj["t"]


def decode(
    data: bytes,
    tag: str,
    fields: Sequence[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Fields:
    """Unpack ``data`` and check it is a version-1 ``tag`` map with exactly ``fields``."""
    obj = _unpack(data, max_bytes)
    if not isinstance(obj, dict):
        raise ValidationError(f"{tag}: expected a msgpack map")
    if obj.get("t") != tag:
        raise ValidationError(f"expected a {tag!r} object, got tag {obj.get('t')!r}")
    if obj.get("v") != VERSION:
        raise ValidationError(f"{tag}: unsupported version {obj.get('v')!r}")
    expected = set(fields) | {"t", "v"}
    if set(obj) != expected:
        missing = sorted(expected - set(obj))
        extra = sorted(set(obj) - expected)
        raise ValidationError(f"{tag}: missing fields {missing}, unknown fields {extra}")
    if not is_canonical(obj, data):
        raise ValidationError(f"{tag}: not in canonical form (re-encoded: keys out of order, "
                              "or a longer encoding than needed)")
    return Fields(tag, obj)


class Fields:
    """Typed, bounds-checked access to the fields of a decoded map."""

    def __init__(self, tag: str, obj: Mapping[str, Any]) -> None:
        self.tag = tag
        self._obj = obj

    def _fail(self, key: str, problem: str) -> ValidationError:
        return ValidationError(f"{self.tag}.{key}: {problem}")

    def raw(self, key: str) -> Any:
        return self._obj[key]

    def bytes(self, key: str, length: int | None = None, max_len: int = 1 << 24) -> bytes:
        value = self._obj[key]
        return check_bytes(value, f"{self.tag}.{key}", length, max_len)

    def str(self, key: str, max_len: int = 4096) -> str:
        value = self._obj[key]
        if not isinstance(value, str):
            raise self._fail(key, "must be a string")
        if len(value) > max_len:
            raise self._fail(key, f"longer than {max_len} characters")
        return value

    def int(self, key: str, lo: int = _INT_MIN, hi: int = _INT_MAX) -> int:
        value = self._obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "must be an integer")
        if not lo <= value <= hi:
            raise self._fail(key, f"must be in [{lo}, {hi}]")
        return value

    def list(self, key: str, max_items: int = 1024, min_items: int = 0) -> list[Any]:
        value = self._obj[key]
        if not isinstance(value, list):
            raise self._fail(key, "must be a list")
        if not min_items <= len(value) <= max_items:
            raise self._fail(key, f"must have {min_items}..{max_items} items, has {len(value)}")
        return value

    def bytes_list(
        self, key: str, length: int | None = None, max_items: int = 1024, min_items: int = 0
    ) -> list[bytes]:
        return [
            check_bytes(v, f"{self.tag}.{key}[{i}]", length)
            for i, v in enumerate(self.list(key, max_items, min_items))
        ]

    def str_list(
        self, key: str, max_items: int = 1024, max_len: int = 4096, min_items: int = 0
    ) -> list[str]:
        items = self.list(key, max_items, min_items)
        for i, v in enumerate(items):
            if not isinstance(v, str) or len(v) > max_len:
                raise self._fail(f"{key}[{i}]", f"must be a string of at most {max_len} chars")
        return items

    def map(self, key: str, max_items: int = 64) -> dict[str, Any]:
        value = self._obj[key]
        if not isinstance(value, dict) or len(value) > max_items:
            raise self._fail(key, f"must be a map with at most {max_items} entries")
        return value


def check_bytes(value: object, what: str, length: int | None = None, max_len: int = 1 << 24) -> bytes:
    """Check ``value`` is bytes of the given exact length (or at most ``max_len``)."""
    if not isinstance(value, (bytes, bytearray)):
        raise ValidationError(f"{what}: must be bytes, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValidationError(f"{what}: must be {length} bytes, got {len(value)}")
    if len(value) > max_len:
        raise ValidationError(f"{what}: longer than {max_len} bytes")
    return bytes(value)


def register(tag: str, decoder: Callable[[bytes], Any]) -> None:
    """Make ``decode_any`` recognise objects tagged ``tag``."""
    _DECODERS[tag] = decoder


def decode_any(data: bytes) -> Any:
    """Decode any registered ciphertwin crypto object by its tag."""
    import ciphertwin.crypto  # noqa: F401  (importing the package registers every type)

    tag = peek_tag(data)
    try:
        decoder = _DECODERS[tag]
    except KeyError:
        raise ValidationError(f"unknown object tag {tag!r}") from None
    return decoder(data)
