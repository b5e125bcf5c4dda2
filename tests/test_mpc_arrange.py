"""arrange(): opened share readings → flat inputs + public layout, identical at the three nodes.

The helpers here (readings → what each node opens, in its own arrival order and with its own
item seqs) are shared with tests/test_mpc_functions.py.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.arrange import arrange
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.ring import to_ring, to_signed
from ciphertwin.mpc_nodes.shares import split_additive
from ciphertwin.protocol.job_epochs import epoch_index, epoch_window
from ciphertwin.protocol.share_open import OpenedColumns

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = 1_700_000_000.0


@dataclass(frozen=True)
class Reading:
    """One plaintext reading as a device signs it (values in encoded integer units)."""

    twin: str
    device: str
    time: float
    values: Mapping[str, int]


def job_spec(twins: Sequence[tuple[str, str]], readings: Sequence[Reading], *, since: float,
             until: float, epoch_s: int, bindings: Mapping[str, Mapping[str, str]],
             points: int | None = None) -> dict[str, Any]:
    """The parts of a job spec arrange() reads; counts from the readings."""
    counts: dict[str, int] = defaultdict(int)
    for r in readings:
        counts[r.twin] += 1
    return {"twins": [{"twin": t, "owner_key": b"k" * 32, "role": role, "count": counts[t]}
                      for t, role in twins],
            "bindings": {k: dict(v) for k, v in bindings.items()}, "since": since,
            "until": until, "epoch_s": epoch_s,
            "points": max(counts.values(), default=0) if points is None else points}


def opened_at_nodes(readings: Sequence[Reading], fields: Sequence[str],
                    seed: int = 0) -> list[OpenedColumns]:
    """What node 0, 1, 2 open: share i of every reading, each node in its own arrival order.

    Each share travels as its own item, so the seqs differ per node (3k + i for a device's
    k-th reading) while their order within a device does not.
    """
    per_device: dict[str, int] = defaultdict(int)
    seq_k = []
    for r in readings:
        seq_k.append(per_device[r.device])
        per_device[r.device] += 1
    shares = {f: split_additive(to_ring(np.array([r.values[f] for r in readings], dtype=np.int64)))
              for f in fields}
    rng = random.Random(seed)
    out = []
    for i in range(3):
        order = list(range(len(readings)))
        rng.shuffle(order)
        out.append(OpenedColumns(
            [readings[k].twin for k in order], [readings[k].device for k in order],
            np.array([3 * seq_k[k] + i for k in order], dtype=np.uint64),
            np.array([readings[k].time for k in order], dtype=np.float64),
            {f: shares[f][i][order] for f in fields}))
    return out


def arrange_at_nodes(spec: Mapping[str, Any], opened: Sequence[OpenedColumns]
                     ) -> tuple[list[dict[str, np.ndarray]], Layout, list[str]]:
    """arrange() at the three nodes; they must agree on the layout and the labels."""
    results = [arrange(spec, o) for o in opened]
    layouts = {r[1].digest() for r in results}
    assert len(layouts) == 1, "nodes disagree on the layout"
    assert all(r[2] == results[0][2] for r in results)
    return [r[0] for r in results], results[0][1], results[0][2]


# -- ordering and layout -------------------------------------------------------------------------


@st.composite
def jobs(draw: st.DrawFn) -> tuple[dict[str, Any], list[Reading], list[tuple[str, str]]]:
    epoch_s = draw(st.sampled_from([1, 7, 60]))
    since = BASE + draw(st.integers(0, 2 * epoch_s)) + draw(st.sampled_from([0.0, 0.25]))
    until = since + draw(st.integers(1, 6 * epoch_s))
    users = draw(st.integers(1, 4))
    twins = [(f"user-{u:03d}", "user") for u in range(users)] + [("ref-A", "reference")]
    draw(st.randoms()).shuffle(twins)
    span = int((until - since) * 4)
    readings = []
    for twin, _ in twins:
        for _ in range(draw(st.integers(0, 6))):
            t = since + draw(st.integers(0, span - 1)) / 4
            device = f"{twin}/d{draw(st.integers(0, 1))}"
            readings.append(Reading(twin, device, t, {"x": draw(st.integers(-99, 99))}))
    spec = job_spec(twins, readings, since=since, until=until, epoch_s=epoch_s,
                    bindings={"ux": {"role": "user", "field": "x"},
                              "rx": {"role": "reference", "field": "x"}})
    return spec, readings, twins


@FAST
@given(jobs(), st.integers(0, 1000))
def test_every_node_builds_the_same_layout_and_order(job: Any, seed: int) -> None:
    spec, readings, twins = job
    per_node, layout, labels = arrange_at_nodes(spec, opened_at_nodes(readings, ["x"], seed))
    assert labels == [t for t, role in twins if role == "user"]
    first, count = epoch_window(spec["since"], spec["until"], spec["epoch_s"])
    assert layout.epochs == count
    for name, role in (("ux", "user"), ("rx", "reference")):
        role_twins = [t for t, r in twins if r == role]
        # the oracle: readings of the role sorted by (twin's row, time, device, order on device)
        expect = sorted(((role_twins.index(r.twin), r.time, r.device, k), r)
                        for k, r in enumerate(readings) if r.twin in role_twins)
        opened = to_signed(sum(inputs[name] for inputs in per_node))
        rows, epochs = layout.row[role].tolist(), layout.epoch[role].tolist()
        assert layout.rows[role] == len(role_twins)
        assert len(opened) == len(expect) == len(rows)
        assert rows == [row for (row, _, _, _), _ in expect]
        assert epochs == [epoch_index(t, first, spec["epoch_s"]) for (_, t, _, _), _ in expect]
        assert opened.tolist() == [r.values["x"] for _, r in expect]


def test_order_is_time_then_device_then_seq_at_every_node() -> None:
    t = BASE + 5
    readings = [Reading("u", "d2", t, {"x": 1}), Reading("u", "d1", t, {"x": 2}),
                Reading("u", "d1", t, {"x": 3}), Reading("u", "d1", t - 1, {"x": 4})]
    spec = job_spec([("u", "user")], readings, since=BASE, until=BASE + 60, epoch_s=60,
                    bindings={"v": {"role": "user", "field": "x"}})
    for seed in range(5):
        per_node, layout, labels = arrange_at_nodes(spec, opened_at_nodes(readings, ["x"], seed))
        assert to_signed(sum(p["v"] for p in per_node)).tolist() == [4, 2, 3, 1]
        assert labels == ["u"] and layout.row["user"].tolist() == [0, 0, 0, 0]


def test_labels_are_verbatim_and_rows_without_readings_stay() -> None:
    twins = [("user-000", "user"), ("ref", "reference"), ("uuser-1", "user"), ("Ω", "user")]
    readings = [Reading("Ω", "dev", BASE + 61, {"x": 7}), Reading("ref", "r", BASE + 1, {"x": 1})]
    spec = job_spec(twins, readings, since=BASE, until=BASE + 120, epoch_s=60,
                    bindings={"v": {"role": "user", "field": "x"},
                              "r": {"role": "reference", "field": "x"}})
    per_node, layout, labels = arrange_at_nodes(spec, opened_at_nodes(readings, ["x"]))
    assert labels == ["user-000", "uuser-1", "Ω"]
    assert layout.rows == {"user": 3, "reference": 1}
    assert layout.row["user"].tolist() == [2] and layout.epoch["user"].tolist() == [1]
    assert layout.counts("user").tolist() == [0, 0, 1]
    assert all(p["v"].dtype == np.uint64 and p["v"].ndim == 1 for p in per_node)


def test_epochs_follow_the_clock_not_the_window_start() -> None:
    # window starts mid-minute: epoch 0 is the partial minute, epoch 1 starts at the whole minute
    since = 60 * math.floor(BASE / 60) + 30
    readings = [Reading("u", "d", since, {"x": 0}), Reading("u", "d", since + 29.9, {"x": 0}),
                Reading("u", "d", since + 30, {"x": 0}), Reading("u", "d", since + 149.5, {"x": 0})]
    spec = job_spec([("u", "user")], readings, since=since, until=since + 150, epoch_s=60,
                    bindings={"v": {"role": "user", "field": "x"}})
    _, layout, _ = arrange_at_nodes(spec, opened_at_nodes(readings, ["x"]))
    assert layout.epoch["user"].tolist() == [0, 0, 1, 2] and layout.epochs == 3


def test_empty_job_arranges() -> None:
    spec = job_spec([("u", "user"), ("r", "reference")], [], since=BASE, until=BASE + 60,
                    epoch_s=60, bindings={"v": {"role": "user", "field": "x"}})
    per_node, layout, labels = arrange_at_nodes(spec, opened_at_nodes([], ["x"]))
    assert labels == ["u"] and layout.readings("user") == 0 and per_node[0]["v"].shape == (0,)


# -- refusals --------------------------------------------------------------------------------


def _spec_and_opened(readings: list[Reading], **kw: Any) -> tuple[dict[str, Any], OpenedColumns]:
    spec = job_spec([("alice", "user"), ("bob", "user")], readings, since=BASE,
                    until=BASE + 600, epoch_s=60, bindings={"v": {"role": "user", "field": "x"}})
    spec.update(kw)
    return spec, opened_at_nodes(readings, ["x"])[0]


GOOD = [Reading("alice", "a1", BASE + 10, {"x": 1}), Reading("alice", "a1", BASE + 70, {"x": 2}),
        Reading("bob", "b1", BASE + 20, {"x": 3})]


def test_counts_other_than_the_spec_are_refused() -> None:
    spec, opened = _spec_and_opened(GOOD)
    spec["twins"][0]["count"] = 3  # the cloud promised one more than it sent
    with pytest.raises(ValidationError, match=r"twin alice: 2 readings, the job spec says 3"):
        arrange(spec, opened)
    spec["twins"][0]["count"] = 2
    spec["twins"][1]["count"] = 0  # … or slipped one in
    with pytest.raises(ValidationError, match=r"twin bob: 1 readings, the job spec says 0"):
        arrange(spec, opened)


def test_more_readings_than_points_are_refused() -> None:
    spec, opened = _spec_and_opened(GOOD, points=1)
    with pytest.raises(ValidationError, match=r"twin alice: 2 readings, more than the job's 1 points"):
        arrange(spec, opened)


def test_a_replayed_item_is_refused() -> None:
    spec, opened = _spec_and_opened(GOOD)
    seqs = opened.seqs.copy()
    alice = [k for k, t in enumerate(opened.twins) if t == "alice"]
    seqs[alice[1]] = seqs[alice[0]]  # the same (device, seq) twice, e.g. at another time
    with pytest.raises(ValidationError, match=r"twin alice: seq \d+ of one device appears twice"):
        arrange(spec, OpenedColumns(opened.twins, opened.devices, seqs, opened.times, opened.values))
    # the same seq from two devices of one twin is fine
    devices = list(opened.devices)
    devices[alice[1]] = "a2"
    arrange(spec, OpenedColumns(opened.twins, devices, seqs, opened.times, opened.values))


@pytest.mark.parametrize("when", [BASE - 0.001, BASE + 600, BASE + 1e6, float("nan"), float("-inf")])
def test_a_reading_outside_the_window_is_refused(when: float) -> None:
    spec, opened = _spec_and_opened(GOOD)
    times = opened.times.copy()
    times[opened.twins.index("bob")] = when
    with pytest.raises(ValidationError, match=r"twin bob: a reading at t=.* is outside the job window"):
        arrange(spec, OpenedColumns(opened.twins, opened.devices, opened.seqs, times, opened.values))


def test_window_edges_are_inclusive_then_exclusive() -> None:
    readings = [Reading("alice", "a", BASE, {"x": 1}), Reading("alice", "a", BASE + 599.999, {"x": 1})]
    spec, opened = _spec_and_opened(readings)
    _, layout, _ = arrange(spec, opened)
    assert layout.epoch["user"].tolist() == [0, 10] and layout.epochs == 11  # BASE is mid-minute


def test_unknown_twin_and_missing_field_are_refused() -> None:
    spec, opened = _spec_and_opened(GOOD)
    twins = ["mallory" if t == "bob" else t for t in opened.twins]
    with pytest.raises(ValidationError, match="twin 'mallory' is not part of this job"):
        arrange(spec, OpenedColumns(twins, opened.devices, opened.seqs, opened.times, opened.values))
    spec["bindings"] = {"v": {"role": "user", "field": "y"}}
    with pytest.raises(ValidationError, match="no field 'y'"):
        arrange(spec, opened)


def test_arrange_is_vectorised_enough_for_a_million_readings() -> None:
    n, users = 1_000_000, 10_000
    rng = np.random.default_rng(1)  # test data only
    row = rng.integers(0, users, n)
    twins = [f"user-{u:05d}" for u in range(users)]
    opened = OpenedColumns([twins[r] for r in row], [twins[r] for r in row],
                           rng.permutation(n).astype(np.uint64),
                           BASE + rng.random(n) * 3000, {"x": rng.integers(0, 2**63, n, dtype=np.uint64)})
    counts = np.bincount(row, minlength=users)
    spec = {"twins": [{"twin": t, "role": "user", "count": int(c)} for t, c in zip(twins, counts)],
            "bindings": {"v": {"role": "user", "field": "x"}}, "since": BASE,
            "until": BASE + 3000, "epoch_s": 60, "points": int(counts.max())}
    t0 = time.perf_counter()
    inputs, layout, labels = arrange(spec, opened)
    assert time.perf_counter() - t0 < 10  # ~1 s here; a per-reading Python loop takes far longer
    assert len(labels) == users and layout.readings("user") == n
    assert np.all(np.diff(layout.row["user"]) >= 0)
    order = np.lexsort((opened.seqs, opened.times, row))
    assert np.array_equal(inputs["v"], opened.values["x"][order])
