"""Location paths for the contact-tracing demo: simulated walks, or CSV files of real readings.

A reading is ``(t, a, b)``: ``t`` Unix seconds (the device-signed item time that decides its
epoch), and either metres ``(x, y)`` in a flat frame or WGS84 ``(lat, lon)`` — then
``Paths.geo`` is the frame the phones project into (:mod:`ciphertwin.agents.geo`), as a device
in share mode does. Nothing is sorted, merged or padded: gaps, duplicates, rows out of time
order and users without readings reach the phones as given, because the processing must be
right on exactly such data.

CSV (header optional only for the old ``user,epoch,x,y``)::

    user,time,lat,lon      time: ISO-8601 with offset or Z, or Unix seconds
    user,epoch,x,y         epoch: minute number (time = epoch · 60), x/y metres
    (also user,time,x,y and user,epoch,lat,lon)

The reference file has the same columns without ``user``. A row ``user,,,`` declares a user
with no readings. Bad rows are refused with their line numbers.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from ciphertwin.agents.geo import GeoFrame, check_lat_lon
from ciphertwin.errors import ValidationError

Reading = tuple[float, float, float]
"""(Unix seconds, x or lat, y or lon)"""

POINT_INTERVAL_S = 60
MAX_USER_ID = 256
MAX_ERRORS_SHOWN = 10
_TIME_COLUMNS = ("time", "epoch")
_COORD_COLUMNS = (("lat", "lon"), ("x", "y"))


@dataclass
class Paths:
    """Per user its readings (any order), one reference path, and the coordinate frame."""

    users: dict[str, list[Reading]]
    reference: list[Reading]
    geo: GeoFrame | None = None
    """set: readings are (t, lat, lon), projected by each phone; unset: (t, x, y) metres"""
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """The unit of the x, y fields the phones declare: plain metres or the aeqd frame."""
        return self.geo.unit if self.geo is not None else "m"

    @property
    def points(self) -> int:
        """The most readings any one twin contributes (the job's ``points``)."""
        return max([len(p) for p in self.users.values()] + [len(self.reference), 1])

    def span(self) -> tuple[float, float]:
        """(earliest, latest) reading time over every path."""
        times = [r[0] for path in (*self.users.values(), self.reference) for r in path]
        if not times:
            raise ValidationError("no readings at all")
        return min(times), max(times)

    def metres(self, reading: Reading) -> tuple[float, float]:
        """(x, y) of a reading in the frame the phones declare."""
        _, a, b = reading
        return self.geo.project(a, b) if self.geo is not None else (a, b)

    def subset(self, users: Iterable[str]) -> Paths:
        return replace(self, users={u: self.users[u] for u in users})

    def shifted(self, seconds: float) -> Paths:
        """Every reading moved by ``seconds`` (replaying old data as recent)."""
        move = lambda path: [(t + seconds, a, b) for t, a, b in path]  # noqa: E731
        return replace(self, users={u: move(p) for u, p in self.users.items()},
                       reference=move(self.reference))


def random_paths(users: int, points: int, radius: float, seed: int | None = None, *,
                 start: float | None = None) -> Paths:
    """Random walks, one reading a minute from ``start`` (default: yesterday 00:00 UTC).

    About a third of the users shadow the reference for a stretch. Simulation data, not key
    material: ``random.Random`` is fine here.
    """
    rng = random.Random(seed)
    t0 = float(start if start is not None else (int(time.time()) // 86400 - 1) * 86400)
    ref, x, y = [], rng.uniform(0, 2000), rng.uniform(0, 2000)
    for j in range(points):
        x, y = x + rng.gauss(0, 15), y + rng.gauss(0, 15)
        ref.append((t0 + j * POINT_INTERVAL_S, round(x, 2), round(y, 2)))
    out: dict[str, list[Reading]] = {}
    for u in range(users):
        px, py = rng.uniform(0, 2000), rng.uniform(0, 2000)
        begin, length = rng.randrange(points), rng.randrange(1, points + 1)
        near = u % 3 == 0
        path = []
        for j in range(points):
            if near and begin <= j < begin + length:
                _, rx, ry = ref[j]
                px, py = rx + rng.uniform(-1.5, 1.5) * radius, ry + rng.uniform(-1.5, 1.5) * radius
            else:
                px, py = px + rng.gauss(0, 15), py + rng.gauss(0, 15)
            path.append((t0 + j * POINT_INTERVAL_S, round(px, 2), round(py, 2)))
        out[f"user-{u:05d}"] = path
    return Paths(out, ref)


# -- CSV --------------------------------------------------------------------------------------


def parse_time(text: str, column: str) -> float:
    """Unix seconds from ``time`` (ISO-8601 with offset/Z, or seconds) or ``epoch`` (minutes)."""
    text = text.strip()
    if column == "epoch":
        try:
            minute = int(text)
        except ValueError:
            raise ValidationError(f"epoch {text!r} is not an integer minute number") from None
        return float(minute * 60)
    try:
        t = float(text)
    except ValueError:
        try:
            d = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(f"time {text!r} is neither ISO-8601 nor Unix seconds") from None
        if d.tzinfo is None or d.utcoffset() is None:
            raise ValidationError(f"time {text!r} has no UTC offset (add Z or +hh:mm)")
        return d.timestamp()
    if not math.isfinite(t) or not 0 <= t < 253402300800:
        raise ValidationError(f"time {text!r} is not a Unix time in years 1970..9999")
    return t


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValidationError(f"{what} {text.strip()!r} is not a number") from None
    if not math.isfinite(v):
        raise ValidationError(f"{what} must be finite")
    return v


@dataclass
class _Table:
    """One CSV file: rows as (line number, cells), plus which time and coordinate columns."""

    name: str
    rows: list[tuple[int, list[str]]]
    time_column: str
    geo: bool


def _read_table(path: Path, with_user: bool) -> _Table:
    lead = ["user"] if with_user else []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{path}: cannot read ({exc})") from None
    rows = [(n, r) for n, r in enumerate(csv.reader(text.splitlines()), 1)
            if r and any(c.strip() for c in r)]
    known = {",".join(lead + [t, *c]): (t, c == ("lat", "lon"))
             for t in _TIME_COLUMNS for c in _COORD_COLUMNS}
    time_column, geo = "epoch", False  # the old headerless format
    if rows and not _looks_numeric(rows[0][1][-1]):
        header = ",".join(c.strip().lower() for c in rows[0][1])
        if header not in known:
            raise ValidationError(f"{path} line {rows[0][0]}: header {header!r} is not one of "
                                  f"{', '.join(sorted(known))}")
        time_column, geo = known[header]
        rows = rows[1:]
    width = len(lead) + 3
    bad = [n for n, r in rows if len(r) != width]
    if bad:
        raise ValidationError(f"{path}: line(s) {_lines(bad)} do not have {width} columns")
    return _Table(str(path), rows, time_column, geo)


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return not cell.strip()  # an empty cell: a user without readings
    return True


def _lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_ERRORS_SHOWN])
    return shown + (f" (+{len(numbers) - MAX_ERRORS_SHOWN} more)"
                    if len(numbers) > MAX_ERRORS_SHOWN else "")


def _reading(cells: Sequence[str], table: _Table) -> Reading:
    t = parse_time(cells[0], table.time_column)
    if table.geo:
        lat, lon = check_lat_lon(_number(cells[1], "latitude"), _number(cells[2], "longitude"))
        return (t, lat, lon)
    return (t, _number(cells[1], "x"), _number(cells[2], "y"))


def _collect(table: _Table, with_user: bool) -> tuple[dict[str, list[Reading]], list[Reading]]:
    """Parse every row; all refusals are gathered and reported together with line numbers."""
    users: dict[str, list[Reading]] = {}
    plain: list[Reading] = []
    errors: list[str] = []
    for n, cells in table.rows:
        try:
            if with_user:
                user, cells = cells[0].strip(), cells[1:]
                if not user or len(user) > MAX_USER_ID:
                    raise ValidationError(f"user id must be 1..{MAX_USER_ID} characters")
                path = users.setdefault(user, [])
                if not any(c.strip() for c in cells):
                    continue  # declares a user with no readings
                path.append(_reading(cells, table))
            else:
                plain.append(_reading(cells, table))
        except ValidationError as exc:
            errors.append(f"line {n}: {exc}")
    if errors:
        more = f"\n  … and {len(errors) - MAX_ERRORS_SHOWN} more" \
            if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ValidationError(f"{table.name}: {len(errors)} bad row(s):\n  "
                              + "\n  ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return users, plain


def load_paths(paths_csv: Path, reference_csv: Path, *,
               origin: tuple[float, float] | None = None) -> Paths:
    """Users' readings and the reference path from CSV (see the module docstring).

    Both files must use the same coordinates (lat/lon or metres). For lat/lon the phones
    project around ``origin`` (default: the mean of the reference path, rounded to 4 decimals
    ≈ 11 m — the origin only has to be near the data).
    """
    table, ref_table = _read_table(Path(paths_csv), True), _read_table(Path(reference_csv), False)
    if table.geo != ref_table.geo:
        raise ValidationError("paths and reference must both be lat/lon or both be metres")
    users, _ = _collect(table, True)
    _, ref = _collect(ref_table, False)
    if not users or not ref:
        raise ValidationError("paths and reference must not be empty")
    geo = None
    if table.geo:
        if origin is None:
            origin = (round(sum(r[1] for r in ref) / len(ref), 4),
                      round(sum(r[2] for r in ref) / len(ref), 4))
        geo = GeoFrame.from_origin(origin)
    elif origin is not None:
        raise ValidationError("an origin applies to lat/lon files only")
    return Paths(users, ref, geo)


def iso(t: float) -> str:
    """ISO-8601 UTC with a Z, to the second (how the demo prints every date)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
