"""JSON state documents (desired / reported / request args): limits, merge patch, delta.

Everything here runs where the plaintext is — writer, device, reader — never at the cloud,
which only sees the size of the sealed blob. The limits keep a document cheap to carry
(≤ 16 KiB, like a shadow document) and cheap to walk (depth ≤ 8): a device checks every
document it is sent before anything else touches it.

* :func:`merge_patch` is RFC 7386 (JSON Merge Patch): a writer turns a partial update into
  the full document it stores (stored desired documents are always full).
* :func:`delta` is what is still to be done: the desired keys whose value differs in the
  reported state (recursively for objects; ``null`` in desired means "remove" and is pending
  only while reported still has the key). ``merge_patch(reported, delta(d, r)) ==
  merge_patch(reported, d)``, and the delta is empty exactly when applying ``d`` to ``r``
  would change nothing — that is what ``in_sync`` reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ciphertwin.errors import ValidationError

__all__ = [
    "MAX_DOC_BYTES",
    "MAX_DEPTH",
    "MAX_KEY_CHARS",
    "MAX_JSON_INT",
    "check_document",
    "check_value",
    "document_bytes",
    "merge_patch",
    "delta",
    "same_value",
]

MAX_DOC_BYTES = 16 * 1024
"""Canonical JSON of one document (AWS shadows allow 8 KiB of state; Ditto things more)."""
MAX_DEPTH = 8
"""Nesting of containers: the top-level object is depth 1."""
MAX_KEY_CHARS = 64
MAX_JSON_INT = 2**53
"""Integers a JSON number holds exactly everywhere (JavaScript, float64): |n| ≤ 2**53."""


def document_bytes(doc: Any) -> bytes:
    """The canonical JSON of ``doc`` (sorted keys, no spaces, UTF-8): what the size limit
    counts, identical at every party."""
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"document is not JSON: {exc}") from None


def check_value(value: Any, *, what: str = "document", max_bytes: int = MAX_DOC_BYTES,
                max_depth: int = MAX_DEPTH) -> Any:
    """``value`` if it is JSON within the limits (any JSON type at the top), else raise
    ValidationError saying where and why. Walks the structure before measuring it, so a
    deeply nested or cyclic value is refused without recursing without bound."""
    _walk(value, what, 1, max_depth)
    size = len(document_bytes(value))
    if size > max_bytes:
        raise ValidationError(f"{what} is {size} bytes of JSON, the limit is {max_bytes}")
    return value


def check_document(doc: object) -> dict[str, Any]:
    """``doc`` if it is a JSON object within the limits (size, depth, key length)."""
    if not isinstance(doc, dict):
        raise ValidationError(f"a state document is a JSON object, got {type(doc).__name__}")
    check_value(doc)
    return doc


def _walk(value: Any, where: str, depth: int, max_depth: int) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise ValidationError(f"{where}: integer beyond ±2**53")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{where}: number is not finite")
        return
    if not isinstance(value, (dict, list)):
        raise ValidationError(f"{where}: {type(value).__name__} is not a JSON type")
    if depth > max_depth:
        raise ValidationError(f"{where}: nested deeper than {max_depth}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{where}[{i}]", depth + 1, max_depth)
        return
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValidationError(f"{where}: object keys are strings")
        if not 1 <= len(k) <= MAX_KEY_CHARS:
            raise ValidationError(f"{where}: key {k[:20]!r} must be 1..{MAX_KEY_CHARS} characters")
        _walk(v, f"{where}.{k}", depth + 1, max_depth)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2, MergePatch(Target, Patch), on copies."""
    if not isinstance(patch, dict):
        return _copy(patch)
    result = _copy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = _merge(result.get(name), value)
    return result


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch of two objects; returns a new dict (inputs untouched).
    Neither argument is size-checked: check the result with :func:`check_document`."""
    if not isinstance(target, dict) or not isinstance(patch, dict):
        raise ValidationError("merge_patch works on two JSON objects")
    result: dict[str, Any] = _merge(target, patch)
    return result


def same_value(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but a boolean is never a number (Python says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """What of ``desired`` is not (yet) true of ``reported``; ``{}`` when in sync.

    As a merge patch it brings ``reported`` to where ``desired`` would: for an object in
    desired whose counterpart in reported is not an object, the pending part is its delta
    against ``{}`` (maybe ``{}`` itself: "make this an object")."""
    if not isinstance(desired, dict) or not isinstance(reported, dict):
        raise ValidationError("delta works on two JSON objects")
    out: dict[str, Any] = {}
    for key, want in desired.items():
        if want is None:
            if key in reported:
                out[key] = None
        elif isinstance(want, dict):
            have = reported.get(key)
            if isinstance(have, dict):
                sub = delta(want, have)
                if sub:
                    out[key] = sub
            else:
                out[key] = delta(want, {})
        elif key not in reported or not same_value(want, reported[key]):
            out[key] = _copy(want)
    return out
