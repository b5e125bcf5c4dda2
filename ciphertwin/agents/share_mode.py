"""Share mode (process 3+): one numeric reading becomes three share readings.

Each numeric field x of the reading is fixed-point encoded into Z_2^64 and split additively,
x = x0 + x1 + x2; share reading i holds the x_i of every field and is sealed under attributes
that include ``share:i``. Node i's grant has policy ``share:i AND <subset>``, so the cloud can
only ever re-encrypt share i for node i, and any one or two shares are uniformly random.

Pure Python (no numpy): this runs on the device. The device agent calls :func:`share_items`
and seals/publishes each (reading, attributes) pair like any other reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ciphertwin.agents.attribute_rules import check_attribute, time_attributes
from ciphertwin.crypto.shares import encode_fixed, split_additive
from ciphertwin.errors import ValidationError

__all__ = ["SHARES", "share_items", "share_attribute", "DEFAULT_FRAC_BITS"]

SHARES = 3
DEFAULT_FRAC_BITS = 16
"""Fractional bits for float fields not listed in ``frac_bits`` (ints default to 0)."""
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_FIELDS = 64


def share_attribute(index: int) -> str:
    return f"share:{index}"


def _encoded_fields(values: Mapping[str, Any], frac_bits: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(values, Mapping) or not 1 <= len(values) <= _MAX_FIELDS:
        raise ValidationError(f"reading values must be a map of 1..{_MAX_FIELDS} numbers")
    out = {}
    for name, v in sorted(values.items()):
        if not isinstance(name, str) or not _FIELD.fullmatch(name):
            raise ValidationError(f"field name {name!r} must match {_FIELD.pattern}")
        bits = frac_bits.get(name, 0 if isinstance(v, int) else DEFAULT_FRAC_BITS)
        out[name] = encode_fixed(v, bits)
    return out


def share_items(
    reading: Mapping[str, Any],
    base_attributes: Iterable[str],
    *,
    frac_bits: Mapping[str, int] | None = None,
) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """Three (share reading, attributes) pairs for one reading ``{type, values, time}``.

    Share reading i is ``{type, time, share: i, frac: {field: bits}, values: {field: x_i}}``
    with x_i in [0, 2^64); its attributes are ``base_attributes`` + ``type:<type>`` + the
    hierarchical UTC time attributes + ``share:i``. The shares use fresh os.urandom
    randomness on every call.
    """
    kind, when = reading.get("type"), reading.get("time")
    if not isinstance(kind, str) or not _FIELD.fullmatch(kind):
        raise ValidationError("reading type must be a short lower-case name")
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise ValidationError("reading time must be unix seconds")
    bits = dict(frac_bits or {})
    fields = _encoded_fields(reading.get("values"), bits)
    names = list(fields)
    columns = split_additive([fields[n] for n in names], SHARES)
    frac = {n: bits.get(n, 0 if isinstance(reading["values"][n], int) else DEFAULT_FRAC_BITS)
            for n in names}
    common = {check_attribute(a) for a in base_attributes}
    common |= {f"type:{kind}", *time_attributes(float(when))}
    out = []
    for i, column in enumerate(columns):
        share_reading = {"type": kind, "time": float(when), "share": i, "frac": frac,
                         "values": dict(zip(names, column, strict=True))}
        out.append((share_reading, tuple(sorted(common | {share_attribute(i)}))))
    return out
