"""WGS84 latitude/longitude → metres in a local frame around a declared origin (on the device).

Why project on the device: MPC compares squared distances of fixed-point integers, so the
inputs must be metres in one flat frame, and a device is the only party that sees the
plaintext position. Why an azimuthal equidistant projection (PROJ ``aeqd`` through pyproj, the
library every GIS stack uses, rather than a home-made formula): distances *from the origin*
are exact on the ellipsoid, and between two points within 50 km of the origin the error is
below 1e-5 of the distance (a 5 m radius is off by far less than a millimetre), which
is all contact tracing needs.

The frame is named in the field's unit: ``m@aeqd:<lat0>,<lon0>`` (degrees, at most six
decimals, trailing zeros dropped), so a job declared in another frame — or in plain ``m`` —
refuses the readings instead of comparing positions from different planes.

pyproj does not import numpy for scalar transforms, so this stays light on a Raspberry Pi.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ciphertwin.errors import ValidationError

__all__ = ["GeoFrame", "check_lat_lon"]

_UNIT = re.compile(r"m@aeqd:(-?\d{1,2}(?:\.\d{1,6})?),(-?\d{1,3}(?:\.\d{1,6})?)")


def _degrees(v: float) -> str:
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def check_lat_lon(lat: object, lon: object) -> tuple[float, float]:
    """(lat, lon) as floats, or a ValidationError saying which one is wrong (never its value:
    a position is plaintext, and devices log their refusals)."""
    for name, v, limit in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValidationError(f"{name} must be a finite number of degrees")
        if not -limit <= v <= limit:
            raise ValidationError(f"{name} is outside [-{limit:g}, {limit:g}] degrees")
    return float(lat), float(lon)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=16)
def _transformer(lat0: float, lon0: float) -> Any:
    from pyproj import CRS, Transformer

    local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat0!r} +lon_0={lon0!r} +datum=WGS84 +units=m")
    return Transformer.from_crs(CRS.from_epsg(4326), local, always_xy=True)


@dataclass(frozen=True)
class GeoFrame:
    """A local metric frame: azimuthal equidistant around (lat0, lon0), x east, y north."""

    lat0: float
    lon0: float

    def __post_init__(self) -> None:
        lat, lon = check_lat_lon(self.lat0, self.lon0)
        # the unit carries six decimals: keep the frame exactly what the unit says
        object.__setattr__(self, "lat0", float(_degrees(lat)))
        object.__setattr__(self, "lon0", float(_degrees(lon)))

    @classmethod
    def from_origin(cls, origin: object) -> GeoFrame:
        if not isinstance(origin, Sequence) or isinstance(origin, str) or len(origin) != 2:
            raise ValidationError("geo origin must be [latitude, longitude] in degrees")
        return cls(*check_lat_lon(origin[0], origin[1]))

    @classmethod
    def from_unit(cls, unit: str) -> GeoFrame | None:
        """The frame a unit string names, or None if it names no aeqd frame."""
        m = _UNIT.fullmatch(unit) if isinstance(unit, str) else None
        return cls(float(m.group(1)), float(m.group(2))) if m else None

    @property
    def unit(self) -> str:
        return f"m@aeqd:{_degrees(self.lat0)},{_degrees(self.lon0)}"

    def project(self, lat: object, lon: object) -> tuple[float, float]:
        """(x, y) in metres east and north of the origin."""
        la, lo = check_lat_lon(lat, lon)
        x, y = _transformer(self.lat0, self.lon0).transform(lo, la)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValidationError(f"a position cannot be projected around {self.unit}")
        return x, y

    def project_reading(self, reading: Mapping[str, Any]) -> dict[str, Any]:
        """The reading with ``lat``/``lon`` values replaced by ``x``/``y`` metres."""
        values = reading.get("values")
        if not isinstance(values, Mapping) or "lat" not in values or "lon" not in values:
            raise ValidationError("with a geo origin, a reading must carry lat and lon values")
        if "x" in values or "y" in values:
            raise ValidationError("a reading carries lat/lon and x/y at once; which frame?")
        x, y = self.project(values["lat"], values["lon"])
        rest = {k: v for k, v in values.items() if k not in ("lat", "lon")}
        return {**reading, "values": {**rest, "x": x, "y": y}}
