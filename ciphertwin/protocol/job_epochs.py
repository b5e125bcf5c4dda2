"""Time slots of a processing job, and the declared encoding of every input field.

**Epochs.** A reading belongs to the epoch of its own (device-signed) timestamp, never to its
upload position. Epochs are aligned to the clock — with ``epoch_s = 60`` they start at every
whole UTC minute — and numbered relative to the job window, so an index stays small whatever
the absolute time::

    first   = floor(since / epoch_s)
    count   = ceil(until / epoch_s) - first          (epochs the window [since, until) touches)
    index(t) = floor(t / epoch_s) - first             in [0, count) for since <= t < until

**Field encodings.** Every numeric field a job reads has a declared unit, scale and range:
the device encodes ``round(value · 2^frac)`` (scale 2^-frac) and refuses a value outside
[min, max]; the job names the encoding it expects and a node refuses a reading whose encoding
differs. Since an encoded value is bounded by ``bound = max(|round(min·2^frac)|,
|round(max·2^frac)|)``, a function knows the widest difference it can meet and therefore its
comparison width — realistic units can no longer overflow it into false results.

Pure Python: devices import this.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ciphertwin.errors import ValidationError

DEFAULT_EPOCH_S = 60
MAX_EPOCH_S = 86_400
MAX_EPOCHS = 1_000_000
_UNIT = re.compile(r"[A-Za-z0-9_.:@,+\-/ ]{1,64}")
_ENCODING_KEYS = frozenset({"unit", "frac", "min", "max"})
_LIMIT = float(1 << 62)  # |encoded| stays far inside the signed 64-bit ring


def epoch_window(since: float, until: float, epoch_s: int) -> tuple[int, int]:
    """(first epoch number, number of epochs) of the window [since, until)."""
    _check_epoch_s(epoch_s)
    if not (math.isfinite(since) and math.isfinite(until)) or until <= since:
        raise ValidationError("job window must be finite with until > since")
    first = math.floor(since / epoch_s)
    count = math.ceil(until / epoch_s) - first
    if count > MAX_EPOCHS:
        raise ValidationError(f"job window holds {count} epochs of {epoch_s} s; at most "
                              f"{MAX_EPOCHS} — use longer epochs or a shorter window")
    return first, count


def epoch_index(t: float, first: int, epoch_s: int) -> int:
    """Index of the epoch holding time ``t`` in a window starting at epoch ``first``."""
    return math.floor(t / epoch_s) - first


def _check_epoch_s(epoch_s: object) -> int:
    if isinstance(epoch_s, bool) or not isinstance(epoch_s, int) or not 1 <= epoch_s <= MAX_EPOCH_S:
        raise ValidationError(f"epoch length must be an integer in [1, {MAX_EPOCH_S}] s, "
                              f"got {epoch_s!r}")
    return epoch_s


@dataclass(frozen=True)
class FieldEncoding:
    """How one field is put into the ring: unit, scale 2^-frac, inclusive range in real units.

    ``unit`` is free text that must match exactly (e.g. ``"m"``, ``"m@aeqd:48.2082,16.3738"``
    for metres projected around an origin, ``"degC"``)."""

    unit: str
    frac: int
    min: float
    max: float

    def __post_init__(self) -> None:
        if not isinstance(self.unit, str) or not _UNIT.fullmatch(self.unit):
            raise ValidationError(f"unit must match {_UNIT.pattern}, got {self.unit!r}")
        if isinstance(self.frac, bool) or not isinstance(self.frac, int) or not 0 <= self.frac <= 40:
            raise ValidationError(f"frac must be an integer in [0, 40], got {self.frac!r}")
        for name in ("min", "max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValidationError(f"{name} must be a finite number, got {v!r}")
        if not self.min <= self.max:
            raise ValidationError(f"range [{self.min}, {self.max}] is empty")
        if self.bound >= _LIMIT:
            raise ValidationError("range and scale do not fit in 62 bits")

    @property
    def bound(self) -> int:
        """Largest |encoded value| a conforming device can produce."""
        scale = 1 << self.frac
        return max(abs(round(self.min * scale)), abs(round(self.max * scale)))

    @property
    def span(self) -> int:
        """Largest difference between two encoded values."""
        scale = 1 << self.frac
        return round(self.max * scale) - round(self.min * scale)

    def encode(self, value: object) -> int:
        """round(value · 2^frac) as a signed integer; refuses anything outside [min, max]."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValidationError(f"value must be a finite number, got {value!r}")
        if not self.min <= value <= self.max:
            raise ValidationError(f"{value} {self.unit} is outside the declared range "
                                  f"[{self.min}, {self.max}]")
        return round(value * (1 << self.frac))

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "frac": self.frac, "min": float(self.min), "max": float(self.max)}

    @classmethod
    def from_dict(cls, raw: object) -> FieldEncoding:
        if not isinstance(raw, Mapping) or set(raw) != _ENCODING_KEYS:
            raise ValidationError(f"a field encoding is a map with exactly {sorted(_ENCODING_KEYS)}")
        mn, mx = raw["min"], raw["max"]
        if isinstance(mn, int) and not isinstance(mn, bool):
            mn = float(mn)
        if isinstance(mx, int) and not isinstance(mx, bool):
            mx = float(mx)
        return cls(raw["unit"], raw["frac"], mn, mx)


def parse_encodings(raw: object, *, limit: int = 64) -> dict[str, FieldEncoding]:
    """A ``{field: encoding}`` map, strictly."""
    if not isinstance(raw, Mapping) or not 1 <= len(raw) <= limit:
        raise ValidationError(f"field encodings must be a map of 1..{limit} fields")
    out = {}
    for name, enc in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
            raise ValidationError(f"field name {name!r} is not a valid field name")
        out[name] = FieldEncoding.from_dict(enc)
    return out
