"""The manipulator twin: rewrites traffic at the device, in both directions.

Incoming set-points are clamped to safe ranges before anything else sees them (the simulator
judges the clamped value, the actuator gets it). Outgoing readings lose the fields the owner
wants no one — not even grantees with a broad grant — to receive (``redact``), and positions
are coarsened to a grid in metres (``coarsen``) before they are sealed: once sealed, a grant
cannot hand out less than the whole value.

Coarsening snaps to a grid on the sphere (radius 6 371 008.8 m), not to decimal places
(0.001° of longitude is 111 m at the equator but 39 m in Tromsø): the latitude is snapped to
rows N metres apart along the meridian; within a row, longitudes are snapped to cells whose
width is at most N metres on the row's parallel closest to the equator (the row's widest), and
a whole number of cells wraps the globe. So every point of a cell lies within the cell's
half-diagonal (N·√2/2) of the point it is reported as, and every point of one cell is
reported the same — a reported position says "somewhere in this N×N square", nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ciphertwin.agents.geo import check_lat_lon
from ciphertwin.agents.sources import Reading
from ciphertwin.errors import ValidationError

__all__ = ["Manipulator", "Clamped", "coarsen_point", "EARTH_RADIUS_M"]

EARTH_RADIUS_M = 6_371_008.8
_M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0
MAX_FIELDS = 64
MIN_GRID_M, MAX_GRID_M = 1.0, 1_000_000.0


def coarsen_point(lat: float, lon: float, grid_m: float) -> tuple[float, float]:
    """The centre of the ``grid_m``-metre cell holding (lat, lon) — see the module doc."""
    lat, lon = check_lat_lon(lat, lon)
    row = round(lat * _M_PER_DEG / grid_m)
    lat_c = max(-90.0, min(90.0, row * grid_m / _M_PER_DEG))
    # the parallel of this row closest to the equator is its widest one
    edge = max(0.0, abs(row * grid_m) - grid_m / 2) / _M_PER_DEG
    width = math.cos(math.radians(min(edge, 90.0))) * 2 * math.pi * EARTH_RADIUS_M
    cells = max(1, math.ceil(width / grid_m))
    step = 360.0 / cells
    lon_c = round(lon / step) * step
    if lon_c > 180.0:
        lon_c -= 360.0
    elif lon_c <= -180.0:
        lon_c += 360.0
    if cells == 1:
        lon_c = 0.0
    return lat_c, lon_c


@dataclass(frozen=True)
class Clamped:
    """The clamped copy and which paths were changed (their names, never their values)."""

    args: dict[str, Any]
    changed: tuple[str, ...]
    problems: tuple[str, ...] = ()


def _path(name: object, what: str) -> tuple[str, ...]:
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise ValidationError(f"{what}: field names are strings (dotted paths for nested fields)")
    parts = tuple(name.split("."))
    if not all(parts) or len(parts) > 8:
        raise ValidationError(f"{what}: bad field path {name!r}")
    return parts


def _number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Manipulator:
    clamp: Mapping[tuple[str, ...], tuple[float, float]]
    redact: frozenset[str]
    coarsen: Mapping[str, float]

    @classmethod
    def from_config(cls, raw: object) -> Manipulator:
        if raw is None:
            return cls({}, frozenset(), {})
        if not isinstance(raw, Mapping):
            raise ValidationError("[gatekeeper.manipulator] must be a table")
        unknown = set(raw) - {"clamp", "redact", "coarsen"}
        if unknown:
            raise ValidationError(f"gatekeeper.manipulator: unknown key(s) {sorted(unknown)}")
        clamp_raw = raw.get("clamp", {})
        if not isinstance(clamp_raw, Mapping) or len(clamp_raw) > MAX_FIELDS:
            raise ValidationError(f"gatekeeper.manipulator.clamp: at most {MAX_FIELDS} fields")
        clamp = {}
        for name, rng in clamp_raw.items():
            what = f"gatekeeper.manipulator.clamp.{name}"
            if (not isinstance(rng, list) or len(rng) != 2 or not all(map(_number, rng))
                    or rng[0] > rng[1]):
                raise ValidationError(f"{what} must be [low, high] with low <= high")
            clamp[_path(name, what)] = (float(rng[0]), float(rng[1]))
        redact = raw.get("redact", [])
        if not isinstance(redact, list) or len(redact) > MAX_FIELDS or not all(
                isinstance(r, str) and 1 <= len(r) <= 64 for r in redact):
            raise ValidationError("gatekeeper.manipulator.redact must be a list of field names")
        coarsen_raw = raw.get("coarsen", {})
        if not isinstance(coarsen_raw, Mapping) or len(coarsen_raw) > MAX_FIELDS:
            raise ValidationError("gatekeeper.manipulator.coarsen must be { type = metres }")
        coarsen = {}
        for rtype, metres in coarsen_raw.items():
            if not _number(metres) or not MIN_GRID_M <= metres <= MAX_GRID_M:
                raise ValidationError(f"gatekeeper.manipulator.coarsen.{rtype}: a grid of "
                                      f"{MIN_GRID_M:g}..{MAX_GRID_M:g} metres")
            coarsen[str(rtype)] = float(metres)
        return cls(clamp, frozenset(redact), coarsen)

    # -- incoming ---------------------------------------------------------------------------
    def clamp_args(self, args: Mapping[str, Any]) -> Clamped:
        """A copy of ``args`` with every configured set-point inside its range. A configured
        field that is present but not a finite number is a problem (the change is refused:
        the device cannot make a safe value out of it)."""
        out = _copy(args)
        changed, problems = [], []
        for path, (low, high) in self.clamp.items():
            parent = out
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(parent, dict) or path[-1] not in parent:
                continue
            value = parent[path[-1]]
            name = ".".join(path)
            if value is None:  # a merge-patch "remove": nothing to clamp
                continue
            if not _number(value):
                problems.append(f"{name} must be a finite number")
                continue
            clamped = min(max(value, low), high)
            if clamped != value:
                parent[path[-1]] = clamped
                changed.append(name)
        return Clamped(out, tuple(changed), tuple(problems))

    # -- outgoing ---------------------------------------------------------------------------
    @property
    def rewrites_outgoing(self) -> bool:
        return bool(self.redact or self.coarsen)

    def outgoing(self, reading: Reading) -> Reading:
        """The reading as it may leave the device: redacted fields dropped, lat/lon of the
        configured reading types (``*``: any) snapped to their grid."""
        values = {k: v for k, v in reading.values.items() if k not in self.redact}
        grid = self.coarsen.get(reading.type, self.coarsen.get("*"))
        if grid is not None and "lat" in values and "lon" in values:
            values["lat"], values["lon"] = coarsen_point(values["lat"], values["lon"], grid)
        if values == reading.values:
            return reading
        return Reading(reading.type, values, reading.time)


def _copy(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of the JSON-like maps we rewrite (lists are not descended into)."""
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in obj.items()}
