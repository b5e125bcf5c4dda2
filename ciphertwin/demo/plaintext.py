"""The plaintext reference the demo, the tests and the benchmark check the MPC results against.

Written straight from the definitions (docs/processing.md, "Functions"), with dicts of
epochs and plain loops — deliberately *not* from the flat share vectors and the layout the
nodes use, so a mistake there cannot hide in the reference too. The only thing shared with the
devices is the declared encoding (:class:`FieldEncoding`): a value counts as the device encodes
it, ``round(v · 2^frac)``, and the radius, thresholds and edges are job parameters in those
encoded units, exactly as the nodes receive them.

Epochs: a reading at time t in the window [since, until) belongs to epoch
``floor(t / epoch_s) - floor(since / epoch_s)``; readings outside the window are not part
of the job (the cloud selects by window).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ciphertwin.protocol.job_epochs import FieldEncoding

Point = tuple[int, int]


def epochs_of(readings: Iterable[tuple[float, ...]], since: float, until: float,
              epoch_s: int) -> dict[int, list[tuple[float, ...]]]:
    """{epoch index: [reading without its time, …]} for the readings inside the window."""
    first = math.floor(since / epoch_s)
    out: dict[int, list[tuple[float, ...]]] = {}
    for t, *values in readings:
        if since <= t < until:
            out.setdefault(math.floor(t / epoch_s) - first, []).append(tuple(values))
    return out


def contact_tracing(users: Mapping[str, Iterable[tuple[float, float, float]]],
                    reference: Iterable[tuple[float, float, float]], *,
                    encoding: FieldEncoding, radius: int, since: float, until: float,
                    epoch_s: int = 60, window: int = 0) -> dict[str, int]:
    """Per user: the number of epochs e in which the user has a reading and the reference has
    a reading in an epoch of [e - window, e + window] such that some (user reading, reference
    reading) pair is within ``radius``: dx² + dy² < radius² on encoded coordinates.

    Readings are ``(t, x, y)`` in the encoding's unit; ``radius`` is in encoded units (the
    job's parameter). An epoch counts once however many pairs are close; a user without
    readings gets 0.
    """
    def encoded(readings: Iterable[tuple[float, float, float]]) -> dict[int, list[Point]]:
        by_epoch = epochs_of(readings, since, until, epoch_s)
        return {e: [(encoding.encode(x), encoding.encode(y)) for x, y in pts]
                for e, pts in by_epoch.items()}

    ref = encoded(reference)
    counts = {}
    for user, readings in users.items():
        count = 0
        for e, mine in encoded(readings).items():
            theirs = [q for d in range(-window, window + 1) for q in ref.get(e + d, [])]
            if any((px - qx) ** 2 + (py - qy) ** 2 < radius * radius
                   for px, py in mine for qx, qy in theirs):
                count += 1
        counts[user] = count
    return counts


def _values(readings: Iterable[tuple[float, float]], encoding: FieldEncoding, since: float,
            until: float) -> list[int]:
    """The encoded values of one user's readings ``(t, v)`` inside the window."""
    return [encoding.encode(v) for t, v in readings if since <= t < until]


def aggregate(function: str, users: Mapping[str, Iterable[tuple[float, float]]], *,
              encoding: FieldEncoding, params: Mapping[str, Any], since: float,
              until: float) -> dict[str, Any]:
    """Per user, over the user's readings in the window (encoded values e = round(v·2^frac)):

    * ``sum``: Σ e · 2^-frac (0 without readings);
    * ``mean``: that sum / number of readings (None without readings);
    * ``count_above``: #{e > threshold};
    * ``histogram``: [#{edges[j] ≤ e < edges[j+1]} for each j].
    """
    scale = 1 << encoding.frac
    out: dict[str, Any] = {}
    for user, readings in users.items():
        values = _values(readings, encoding, since, until)
        if function == "sum":
            out[user] = sum(values) / scale
        elif function == "mean":
            out[user] = (sum(values) / scale) / len(values) if values else None
        elif function == "count_above":
            out[user] = sum(1 for e in values if e > params["threshold"])
        elif function == "histogram":
            edges: Sequence[int] = params["edges"]
            out[user] = [sum(1 for e in values if lo <= e < hi)
                         for lo, hi in zip(edges, edges[1:])]
        else:
            raise ValueError(f"no plaintext reference for {function!r}")
    return out
