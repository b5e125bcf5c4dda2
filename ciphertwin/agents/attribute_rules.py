"""Derive the KP-CPRE attributes of a reading from the device's config.

Attributes are what grants are written against: a receiver's re-encryption key only transforms
capsules whose attributes satisfy its policy. So the device, which sees the plaintext, labels
each reading with

* fixed identity attributes — `twin:…`, `device:…`, `type:…`;
* hierarchical UTC time attributes — `year:2026`, `month:2026-11`, `day:2026-11-22`,
  `hour:2026-11-22T13` — so a policy can grant any hour-aligned time window with a handful of
  terms (`time_window_policy`);
* whatever the configured rules add, chosen by reading type, by content (a tiny comparison
  grammar, parsed once, never `eval`) and by hour of day.

A rule is a table with one or more conditions (all must hold) and `add`, a list of attributes:

    {"when_type": "location", "add": ["sensitivity:high"]}
    {"when": "celsius > 30", "add": ["alert:heat"]}
    {"when_hour_between": [22, 6], "add": ["period:night"]}      # 22:00–05:59 UTC
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ciphertwin.agents.sources import NAME_RE, Reading
from ciphertwin.errors import ValidationError

ATTRIBUTE_RE = re.compile(r"[a-z][a-z0-9_]*:[A-Za-z0-9_.:\-]+")
MAX_ATTRIBUTE_CHARS = 64
MAX_RULES = 256


def check_attribute(attr: object) -> str:
    """Return `attr` if it is a well-formed attribute, else raise ValidationError."""
    if not isinstance(attr, str) or not ATTRIBUTE_RE.fullmatch(attr):
        raise ValidationError(
            "attribute must look like 'name:value' ([a-z][a-z0-9_]*:[A-Za-z0-9_.:-]+)"
        )
    if len(attr) > MAX_ATTRIBUTE_CHARS:
        raise ValidationError(f"attribute longer than {MAX_ATTRIBUTE_CHARS} characters")
    return attr


def time_attributes(t: float) -> frozenset[str]:
    """The four nested UTC time attributes of an instant (epoch seconds)."""
    d = datetime.fromtimestamp(t, UTC)
    return frozenset(_unit_attribute(unit, d) for unit in ("year", "month", "day", "hour"))


def _unit_attribute(unit: str, d: datetime) -> str:
    if unit == "year":
        return f"year:{d.year:04d}"
    if unit == "month":
        return f"month:{d.year:04d}-{d.month:02d}"
    if unit == "day":
        return f"day:{d.year:04d}-{d.month:02d}-{d.day:02d}"
    return f"hour:{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}"


# --------------------------------------------------------------------------- content conditions

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_STRING = r'"[^"\\]{0,256}"'
_CONDITION_RE = re.compile(
    rf"\s*(?P<key>[a-z][a-z0-9_]{{0,31}})\s*(?P<op><=|>=|==|!=|<|>)\s*"
    rf"(?P<lit>{_NUMBER}|{_STRING}|true|false)\s*"
)


@dataclass(frozen=True)
class Comparison:
    """`<key> <op> <literal>` over one value of a reading.

    Numbers compare with numbers (ints and floats alike, never booleans), strings with
    strings, booleans (true/false, == and != only) with booleans. A missing key or a value of
    another kind makes the comparison false — a rule simply does not apply to that reading.
    """

    key: str
    op: str
    literal: float | str | bool

    @classmethod
    def parse(cls, text: object) -> Comparison:
        if not isinstance(text, str):
            raise ValidationError("'when' must be a string like 'celsius > 30'")
        m = _CONDITION_RE.fullmatch(text)
        if m is None:
            raise ValidationError(
                f"bad condition {text[:80]!r}: expected <key> <op> <number|\"string\"|true|false> "
                "with op one of < <= > >= == !="
            )
        lit_text, op = m["lit"], m["op"]
        literal: float | str | bool
        if lit_text in ("true", "false"):
            if op not in ("==", "!="):
                raise ValidationError(f"booleans only compare with == or !=: {text[:80]!r}")
            literal = lit_text == "true"
        elif lit_text.startswith('"'):
            literal = lit_text[1:-1]
        else:
            literal = float(lit_text)
            if not math.isfinite(literal):
                raise ValidationError(f"number out of range in condition {text[:80]!r}")
        return cls(m["key"], op, literal)

    def holds(self, values: Mapping[str, object]) -> bool:
        if self.key not in values:
            return False
        v = values[self.key]
        lit = self.literal
        if isinstance(lit, bool):
            if not isinstance(v, bool):
                return False
        elif isinstance(lit, str):
            if not isinstance(v, str):
                return False
        elif isinstance(v, bool) or not isinstance(v, int | float):
            return False
        return _OPS[self.op](v, lit)


# --------------------------------------------------------------------------- rules


def _hour_in(hour: int, start: int, end: int) -> bool:
    """Is `hour` in [start, end), wrapping past midnight when start > end?"""
    return start <= hour < end if start < end else hour >= start or hour < end


@dataclass(frozen=True)
class Rule:
    """Conditions (all must hold; None = not constrained) and the attributes they add."""

    add: frozenset[str]
    types: frozenset[str] | None = None
    comparison: Comparison | None = None
    hours: tuple[int, int] | None = None

    _KEYS = frozenset({"when_type", "when", "when_hour_between", "add"})

    @classmethod
    def from_config(cls, spec: object) -> Rule:
        if not isinstance(spec, Mapping):
            raise ValidationError("a rule must be a table")
        unknown = set(spec) - cls._KEYS
        if unknown:
            raise ValidationError(f"unknown rule key(s): {', '.join(sorted(map(str, unknown)))}")
        if not set(spec) & {"when_type", "when", "when_hour_between"}:
            raise ValidationError("a rule needs a condition: when_type, when or when_hour_between")
        add = spec.get("add")
        if not isinstance(add, list) or not add:
            raise ValidationError("a rule needs 'add', a non-empty list of attributes")
        return cls(
            add=frozenset(check_attribute(a) for a in add),
            types=_parse_types(spec["when_type"]) if "when_type" in spec else None,
            comparison=Comparison.parse(spec["when"]) if "when" in spec else None,
            hours=_parse_hours(spec["when_hour_between"]) if "when_hour_between" in spec else None,
        )

    def matches(self, reading: Reading, hour: int) -> bool:
        if self.types is not None and reading.type not in self.types:
            return False
        if self.comparison is not None and not self.comparison.holds(reading.values):
            return False
        return self.hours is None or _hour_in(hour, *self.hours)


def _parse_types(spec: object) -> frozenset[str]:
    types = [spec] if isinstance(spec, str) else spec
    if not isinstance(types, list) or not types:
        raise ValidationError("when_type must be a reading type or a non-empty list of them")
    for t in types:
        if not isinstance(t, str) or not NAME_RE.fullmatch(t):
            raise ValidationError("when_type entries must match [a-z][a-z0-9_]{0,31}")
    return frozenset(types)


def _parse_hours(spec: object) -> tuple[int, int]:
    if (
        not isinstance(spec, list | tuple)
        or len(spec) != 2
        or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in spec)
    ):
        raise ValidationError("when_hour_between must be [start, end], hours 0-23 (UTC)")
    start, end = spec
    if start == end:
        raise ValidationError("when_hour_between needs start != end (end is exclusive)")
    return start, end


class AttributeRules:
    """The attribute labelling of one device: fixed identity attributes plus config rules."""

    def __init__(self, rules: Iterable[Rule], twin: str, device: str) -> None:
        self.rules = tuple(rules)
        try:
            self._fixed = frozenset(
                {check_attribute(f"twin:{twin}"), check_attribute(f"device:{device}")}
            )
        except ValidationError as exc:
            raise ValidationError(f"twin/device id unusable as an attribute: {exc}") from None

    @classmethod
    def from_config(cls, rules: object, twin: str, device: str) -> AttributeRules:
        """Parse the config's rule list; ValidationError naming the first bad rule."""
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise ValidationError("attribute rules must be a list of tables")
        if len(rules) > MAX_RULES:
            raise ValidationError(f"at most {MAX_RULES} attribute rules")
        parsed = []
        for i, spec in enumerate(rules):
            try:
                parsed.append(Rule.from_config(spec))
            except ValidationError as exc:
                raise ValidationError(f"attribute rule #{i + 1}: {exc}") from None
        return cls(parsed, twin, device)

    def attributes_for(self, reading: Reading) -> frozenset[str]:
        hour = datetime.fromtimestamp(reading.time, UTC).hour
        attrs = set(self._fixed)
        attrs.add(f"type:{reading.type}")
        attrs |= time_attributes(reading.time)
        for rule in self.rules:
            if rule.matches(reading, hour):
                attrs |= rule.add
        return frozenset(attrs)


# --------------------------------------------------------------------------- time windows


def _next_unit(d: datetime, unit: str) -> datetime:
    if unit == "year":
        return d.replace(year=d.year + 1)
    if unit == "month":
        return d.replace(year=d.year + d.month // 12, month=d.month % 12 + 1)
    return d + (timedelta(days=1) if unit == "day" else timedelta(hours=1))


def _starts_unit(d: datetime, unit: str) -> bool:
    if unit == "year":
        return (d.month, d.day, d.hour) == (1, 1, 0)
    if unit == "month":
        return (d.day, d.hour) == (1, 0)
    return unit == "hour" or d.hour == 0


def _as_utc_hour(d: object, name: str) -> datetime:
    if not isinstance(d, datetime) or d.tzinfo is None or d.utcoffset() is None:
        raise ValidationError(f"{name} must be a timezone-aware datetime")
    d = d.astimezone(UTC)
    if (d.minute, d.second, d.microsecond) != (0, 0, 0):
        raise ValidationError(
            f"{name} must be on a full hour: time attributes have hour granularity, "
            "and rounding would grant more or less than asked"
        )
    return d


def time_window_attributes(start: datetime, end: datetime) -> list[str]:
    """The fewest time attributes whose hours are exactly [start, end) (end exclusive).

    Greedy over aligned units from coarse to fine — year, month, day, hour — which is minimal
    because the units nest.
    """
    s, e = _as_utc_hour(start, "start"), _as_utc_hour(end, "end")
    if s >= e:
        raise ValidationError("the time window is empty: start must be before end")
    terms: list[str] = []
    while s < e:
        for unit in ("year", "month", "day", "hour"):
            if _starts_unit(s, unit):
                try:
                    nxt = _next_unit(s, unit)
                except (ValueError, OverflowError):  # past year 9999
                    continue
                if nxt <= e:
                    terms.append(_unit_attribute(unit, s))
                    s = nxt
                    break
    return terms


def time_window_policy(start: datetime, end: datetime) -> str:
    """Policy text granting exactly the hour-aligned window [start, end), e.g.
    `(day:2026-11-21 OR hour:2026-11-22T00 OR hour:2026-11-22T01)`; combine it with AND."""
    return "(" + " OR ".join(time_window_attributes(start, end)) + ")"
