"""From the share readings a node opened to a function's inputs and the public layout.

Every node opens its own share of each reading; the k-th element of an input vector must be a
share of the *same* reading at all three nodes. Readings carry no secret ordering: twin,
device, seq and the device-signed time are public, so every node sorts by

    (twin row in the job spec, time, device, seq)

and gets the same order (the device breaks ties between two devices of one twin that signed
the same time; seq between two readings of one device). Each binding ``{"role", "field"}``
becomes one flat uint64 vector over the readings of that role's twins — no padding — and the
:class:`~ciphertwin.mpc_nodes.layout.Layout` records each reading's row within its role and its
epoch in the job window (:func:`ciphertwin.protocol.job_epochs.epoch_window`).

Refused, with a reason naming the twin (:class:`~ciphertwin.errors.ValidationError`):
a twin whose number of readings differs from the spec's count (the cloud dropped or added
items), a twin with more than ``points`` readings (more than its owner's token admits), the
same (device, seq) twice in a twin (a replayed item), a reading outside [since, until), and a
reading of a twin the job does not name. All of it is vectorised (one lexsort for the order,
one for the replay check); the only per-reading Python work is mapping names to integers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.protocol.job_epochs import epoch_window
from ciphertwin.protocol.share_open import OpenedColumns

USER = "user"


def _codes(names: Sequence[str], index: Mapping[str, int], what: str) -> np.ndarray:
    try:
        return np.fromiter(map(index.__getitem__, names), dtype=np.int64, count=len(names))
    except KeyError as exc:
        raise ValidationError(f"{what} {exc.args[0]!r} is not part of this job") from None


def _check_counts(twins: Sequence[Mapping[str, Any]], row: np.ndarray, points: int) -> None:
    got = np.bincount(row, minlength=len(twins))
    want = np.array([int(t["count"]) for t in twins], dtype=np.int64)
    wrong = np.flatnonzero(got != want)
    if wrong.size:
        i = int(wrong[0])
        raise ValidationError(f"twin {twins[i]['twin']}: {int(got[i])} readings, "
                              f"the job spec says {int(want[i])}")
    over = np.flatnonzero(got > points)
    if over.size:
        i = int(over[0])
        raise ValidationError(f"twin {twins[i]['twin']}: {int(got[i])} readings, more than "
                              f"the job's {points} points per twin")


def _check_replays(twins: Sequence[Mapping[str, Any]], row: np.ndarray, device: np.ndarray,
                   seqs: np.ndarray) -> None:
    by_key = np.lexsort((seqs, device, row))
    r, d, s = row[by_key], device[by_key], seqs[by_key]
    same = (r[1:] == r[:-1]) & (d[1:] == d[:-1]) & (s[1:] == s[:-1])
    if same.any():
        k = int(np.flatnonzero(same)[0])
        raise ValidationError(f"twin {twins[int(r[k])]['twin']}: seq {int(s[k])} of one device "
                              "appears twice (replayed item)")


def _epochs(spec: Mapping[str, Any], twins: Sequence[Mapping[str, Any]], row: np.ndarray,
            times: np.ndarray) -> tuple[np.ndarray, int]:
    since, until, epoch_s = float(spec["since"]), float(spec["until"]), spec["epoch_s"]
    first, count = epoch_window(since, until, epoch_s)
    outside = np.flatnonzero(~((times >= since) & (times < until)))  # NaN is outside too
    if outside.size:
        k = int(outside[0])
        raise ValidationError(f"twin {twins[int(row[k])]['twin']}: a reading at t={times[k]!r} "
                              f"is outside the job window [{since}, {until})")
    # floor(t / epoch_s) as job_epochs.epoch_index computes it (same IEEE division);
    # the clip only guards a last-ulp rounding up to the window's end
    epoch = np.floor(times / epoch_s).astype(np.int64) - first
    return np.clip(epoch, 0, count - 1), count


def arrange(spec: Mapping[str, Any], opened: OpenedColumns
            ) -> tuple[dict[str, np.ndarray], Layout, list[str]]:
    """(inputs by binding name, public layout, output labels) for one job at one node.

    ``spec`` holds ``twins`` [{twin, role, count, …}] in job order, ``bindings``
    {name: {role, field}}, ``since``, ``until``, ``epoch_s`` and ``points``. Labels are the
    ids of the twins of role ``"user"``, verbatim, in spec order — one per output row.
    """
    twins = list(spec["twins"])
    bindings: Mapping[str, Mapping[str, str]] = spec["bindings"]
    n = len(opened)
    row = _codes(opened.twins, {t["twin"]: i for i, t in enumerate(twins)}, "twin")
    _check_counts(twins, row, int(spec["points"]))
    times = np.asarray(opened.times, dtype=np.float64)
    epoch, epochs = _epochs(spec, twins, row, times)
    seqs = np.asarray(opened.seqs, dtype=np.uint64)
    distinct = sorted(set(opened.devices))
    device = _codes(opened.devices, {d: i for i, d in enumerate(distinct)}, "device")
    _check_replays(twins, row, device, seqs)
    order = np.lexsort((seqs, device, times, row)) if n else np.zeros(0, dtype=np.int64)

    roles = sorted({t["role"] for t in twins} | {b["role"] for b in bindings.values()})
    role_of_twin = np.array([roles.index(t["role"]) for t in twins], dtype=np.int64)
    row_in_role = np.zeros(len(twins), dtype=np.int64)
    for r in range(len(roles)):
        mine = role_of_twin == r
        row_in_role[mine] = np.arange(int(mine.sum()))
    ordered_role = role_of_twin[row[order]]
    picks = {role: order[ordered_role == r] for r, role in enumerate(roles)}
    layout = Layout(
        {role: int((role_of_twin == r).sum()) for r, role in enumerate(roles)},
        {role: row_in_role[row[picks[role]]] for role in roles},
        {role: epoch[picks[role]] for role in roles}, epochs)

    inputs: dict[str, np.ndarray] = {}
    for name, b in bindings.items():
        column = opened.values.get(b["field"])
        if column is None:
            raise ValidationError(f"input {name}: no field {b['field']!r} was opened")
        inputs[name] = np.ascontiguousarray(np.asarray(column, dtype=np.uint64)[picks[b["role"]]])
    labels = [str(t["twin"]) for t in twins if t["role"] == USER]
    return inputs, layout, labels
