"""Share mode (process 3+): one numeric reading becomes three share readings.

Each numeric field x of the reading is encoded with its **declared** encoding
(:class:`~ciphertwin.protocol.job_epochs.FieldEncoding`: unit, scale 2^-frac, range) into
Z_2^64 and split additively, x = x0 + x1 + x2; share reading i holds the x_i of every field
and is sealed under attributes that include ``share:i``. Node i's grant has policy
``share:i AND <subset>``, so the cloud can only ever re-encrypt share i for node i, and any
one or two shares are uniformly random.

Why the encoding is declared and enforced *here*: once a value is split nobody can look at it
again, so the device is the last place where a range can be checked. A conforming device never
encodes a value outside [min, max]; every share reading names the encoding it used
(``enc``), and a node refuses a reading whose encoding differs from the job's. Hence the
comparison width a function derives from the declared ranges is exact. A device that lies
(skips the check) can only corrupt the rows it contributes to — its own user's row, or every
row if it is the reference.

Pure Python (no numpy): this runs on the device. The device agent calls a :class:`ShareMode`
(configured from a TOML file, see :func:`load_share_mode`) and seals/publishes each
(reading, attributes) pair like any other reading.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciphertwin.agents.attribute_rules import check_attribute, time_attributes
from ciphertwin.crypto.shares import split_additive
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.job_epochs import FieldEncoding, parse_encodings

__all__ = ["SHARES", "SHARE_MODE_FILE", "ShareMode", "load_share_mode", "share_items", "share_attribute"]

SHARES = 3
SHARE_MODE_FILE = "share-mode.toml"
"""The device's share-mode settings, in its home folder unless ``--share-config`` names one."""
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_FIELDS = 64


def share_attribute(index: int) -> str:
    return f"share:{index}"


def _encoded_fields(values: object, encodings: Mapping[str, FieldEncoding]) -> dict[str, int]:
    """Every field encoded with its declared encoding; refuses undeclared fields by name."""
    if not isinstance(values, Mapping) or not 1 <= len(values) <= _MAX_FIELDS:
        raise ValidationError(f"reading values must be a map of 1..{_MAX_FIELDS} numbers")
    out = {}
    for name, v in sorted(values.items()):
        if not isinstance(name, str) or not _FIELD.fullmatch(name):
            raise ValidationError(f"field name {name!r} must match {_FIELD.pattern}")
        enc = encodings.get(name)
        if enc is None:
            raise ValidationError(f"field {name!r} has no declared encoding (declared: "
                                  f"{', '.join(sorted(encodings)) or 'none'})")
        # the reasons name the field and the declared range, never the value (plaintext)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValidationError(f"field {name!r} must be a finite number")
        if not enc.min <= v <= enc.max:
            raise ValidationError(f"field {name!r} is outside its declared range "
                                  f"[{enc.min:g}, {enc.max:g}] {enc.unit}")
        out[name] = enc.encode(v)
    return out


def share_items(
    reading: Mapping[str, Any],
    base_attributes: Iterable[str],
    *,
    encodings: Mapping[str, FieldEncoding],
) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """Three (share reading, attributes) pairs for one reading ``{type, values, time}``.

    Share reading i is ``{type, time, share: i, enc: {field: encoding}, values: {field: x_i}}``
    with x_i in [0, 2^64) and ``enc`` the declared encoding (``FieldEncoding.as_dict``) of each
    field it carries; its attributes are ``base_attributes`` + ``type:<type>`` + the
    hierarchical UTC time attributes + ``share:i``. A value outside its declared range, or a
    field without a declared encoding, is refused (ValidationError naming the field). The
    shares use fresh os.urandom randomness on every call.
    """
    if not isinstance(encodings, Mapping) or not all(
            isinstance(e, FieldEncoding) for e in encodings.values()):
        raise ValidationError("encodings must map field names to FieldEncoding")
    kind, when = reading.get("type"), reading.get("time")
    if not isinstance(kind, str) or not _FIELD.fullmatch(kind):
        raise ValidationError("reading type must be a short lower-case name")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ValidationError("reading time must be unix seconds")
    fields = _encoded_fields(reading.get("values"), encodings)
    names = list(fields)
    columns = split_additive([fields[n] for n in names], SHARES)
    enc = {n: encodings[n].as_dict() for n in names}
    common = {check_attribute(a) for a in base_attributes}
    common |= {f"type:{kind}", *time_attributes(float(when))}
    out = []
    for i, column in enumerate(columns):
        share_reading = {"type": kind, "time": float(when), "share": i,
                         "enc": {n: dict(e) for n, e in enc.items()},
                         "values": dict(zip(names, column, strict=True))}
        out.append((share_reading, tuple(sorted(common | {share_attribute(i)}))))
    return out


@dataclass(frozen=True)
class ShareMode:
    """The device's share-mode settings: field encodings, and optionally a geographic frame.

    With ``geo`` set, a reading carrying ``lat`` and ``lon`` (WGS84 degrees) is projected to
    ``x``, ``y`` metres in that frame on the device (:mod:`ciphertwin.agents.geo`) before it is
    encoded; then ``x`` and ``y`` must be declared with the frame's unit (e.g.
    ``m@aeqd:48.2082,16.3738``), so a job in another frame refuses the readings.
    Call it like the device agent's ``expand`` hook: ``mode(reading, attributes)``.
    """

    encodings: Mapping[str, FieldEncoding]
    geo: Any = None  # ciphertwin.agents.geo.GeoFrame (imported lazily: pyproj only if used)

    def __post_init__(self) -> None:
        if not self.encodings:
            raise ValidationError("share mode needs at least one declared field encoding")
        if self.geo is not None:
            for name in ("x", "y"):
                enc = self.encodings.get(name)
                if enc is None or enc.unit != self.geo.unit:
                    raise ValidationError(
                        f"share mode: with a [geo] origin, field {name!r} must be declared with "
                        f"unit {self.geo.unit!r} (got {enc.unit if enc else 'nothing'!r})")

    def __call__(self, reading: Mapping[str, Any],
                 attributes: Iterable[str]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
        if self.geo is not None:
            reading = self.geo.project_reading(reading)
        return share_items(reading, attributes, encodings=self.encodings)


def load_share_mode(path: str | Path) -> ShareMode:
    """Read a share-mode TOML file (see docs/processing.md, "Device share mode")::

        [geo]                       # optional: project lat/lon readings to x/y metres
        origin = [48.2082, 16.3738]

        [fields.x]
        unit = "m@aeqd:48.2082,16.3738"
        frac = 4
        min = -50000.0
        max = 50000.0
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ValidationError(f"share-mode file {p} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f"share-mode file {p}: invalid TOML ({exc})") from None
    unknown = set(raw) - {"fields", "geo"}
    if unknown:
        raise ValidationError(f"share-mode file {p}: unknown section(s) {sorted(unknown)}; "
                              "known: fields, geo")
    try:
        geo = None
        if "geo" in raw:
            from ciphertwin.agents.geo import GeoFrame

            section = raw["geo"]
            if not isinstance(section, dict) or set(section) != {"origin"}:
                raise ValidationError("[geo] takes exactly origin = [lat, lon]")
            geo = GeoFrame.from_origin(section["origin"])
        try:
            encodings = parse_encodings(raw.get("fields"))
        except ValidationError as exc:
            raise ValidationError(f"[fields]: {exc}") from None
        return ShareMode(encodings, geo)
    except ValidationError as exc:
        raise ValidationError(f"share-mode file {p}: {exc}") from None
