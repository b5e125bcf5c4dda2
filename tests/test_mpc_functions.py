"""Registered functions, end to end in memory, against oracles written from their definitions.

Readings (twin, device, time, values) → what each node opens (own arrival order, own seqs) →
arrange() → additive shares → three parties → opened, decoded output per label. The oracles
below use only dicts of epochs and plain loops over the readings — never the layout, the pair
plan or the vectorised ``reference`` (which is checked against them separately).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciphertwin.demo import plaintext
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.engine import check_encodings, expected_rounds, load_inputs, run_function
from ciphertwin.mpc_nodes.errors import TamperedMessageError, UnknownFunctionError
from ciphertwin.mpc_nodes.functions import REGISTRY, get_function
from ciphertwin.mpc_nodes.functions.segments import group_ids, segment_sums
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.local_cluster import simulate
from ciphertwin.mpc_nodes.output import OutputShare, combine_outputs, open_output, seal_output
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.boolean import ltz_rounds
from ciphertwin.mpc_nodes.ring import DTYPE
from ciphertwin.mpc_nodes.shares import split_additive
from ciphertwin.protocol.job_epochs import FieldEncoding
from tests.test_mpc_arrange import BASE, Reading, arrange_at_nodes, job_spec, opened_at_nodes

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CT_BINDINGS = {"user_x": {"role": "user", "field": "x"}, "user_y": {"role": "user", "field": "y"},
               "ref_x": {"role": "reference", "field": "x"},
               "ref_y": {"role": "reference", "field": "y"}}
AGG_BINDINGS = {"values": {"role": "user", "field": "v"}}


def run_readings(name: str, params: dict[str, Any], spec: dict[str, Any], readings: Sequence[Reading],
                 fields: Sequence[str], seed: int = 0) -> tuple[dict[str, Any], np.ndarray, Layout, int]:
    """The whole node-side path; returns ({label: decoded}, opened, layout, rounds)."""
    per_node, layout, labels = arrange_at_nodes(spec, opened_at_nodes(readings, fields, seed))

    async def prog(party: Party, additive: dict[str, np.ndarray]) -> OutputShare:
        inputs = await load_inputs(party, name, params, additive, layout)
        return await run_function(party, name, params, inputs, layout)

    outs, parties = simulate(prog, per_node, job="job-fn")
    opened = combine_outputs(outs)
    spec_fn = get_function(name)
    parsed = spec_fn.parse(params)
    # the vectorised reference agrees with the protocol (and, via the callers, the oracle)
    plain = {k: sum(p[k] for p in per_node) for k in per_node[0]}
    assert np.array_equal(opened, spec_fn.reference(parsed, plain, layout))
    assert parties[0].round == expected_rounds(name, params, layout)
    decoded = spec_fn.decode(parsed, opened)
    assert len(decoded) == len(labels)
    return dict(zip(labels, decoded, strict=True)), opened, layout, parties[0].round


# -- contact tracing -----------------------------------------------------------------------------


def contact_oracle(readings: Sequence[Reading], users: Sequence[str], ref: str, *, radius: int,
                   window: int, since: float, epoch_s: int) -> dict[str, int]:
    """The definition (``demo.plaintext``: dicts of epochs, plain loops) on the readings as the
    devices sent them — already integers, so the encoding is the identity."""
    identity = FieldEncoding("1", 0, -float(2**40), float(2**40))
    track = lambda twin: [(r.time, r.values["x"], r.values["y"])  # noqa: E731
                          for r in readings if r.twin == twin]
    return plaintext.contact_tracing({u: track(u) for u in users}, track(ref), encoding=identity,
                                     radius=radius, since=since, until=math.inf,
                                     epoch_s=epoch_s, window=window)


@st.composite
def contact_jobs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[Reading], list[str]]:
    cb = draw(st.integers(3, 12))
    bound = 2**cb - 1
    radius = draw(st.one_of(st.integers(1, 8), st.integers(1, 2 ** (cb + 1))))
    window = draw(st.sampled_from([0, 0, 1, 2]))
    epoch_s = draw(st.sampled_from([1, 60]))
    since = BASE + draw(st.integers(0, epoch_s)) + draw(st.sampled_from([0.0, 0.5]))
    until = since + draw(st.integers(1, 7)) * epoch_s
    ticks = int((until - since) * 2)  # half-second steps: equal times and shared epochs happen

    def when() -> float:
        return since + draw(st.integers(0, ticks - 1)) / 2

    coord = st.one_of(st.integers(-bound, bound), st.sampled_from([-bound, bound, 0]))
    ref_points = [(when(), draw(coord), draw(coord)) for _ in range(draw(st.integers(0, 7)))]
    readings = [Reading("ref", "ref-phone", t, {"x": x, "y": y}) for t, x, y in ref_points]
    users = [f"user-{u:03d}" for u in range(draw(st.integers(1, 4)))]
    for u in users:
        for _ in range(draw(st.integers(0, 6))):
            if ref_points and draw(st.booleans()):  # near a reference reading, maybe in its epoch
                t, x, y = draw(st.sampled_from(ref_points))
                t = draw(st.sampled_from([t, when()]))
                x = max(-bound, min(bound, x + draw(st.integers(-radius, radius))))
                y = max(-bound, min(bound, y + draw(st.integers(-radius, radius))))
            else:
                t, x, y = when(), draw(coord), draw(coord)
            readings.append(Reading(u, f"{u}/{draw(st.sampled_from('ab'))}", t, {"x": x, "y": y}))
    draw(st.randoms()).shuffle(readings)  # upload order means nothing
    twins = [(u, "user") for u in users] + [("ref", "reference")]
    draw(st.randoms()).shuffle(twins)
    spec = job_spec(twins, readings, since=since, until=until, epoch_s=epoch_s, bindings=CT_BINDINGS)
    params = {"radius": radius, "coord_bits": cb, "window": window}
    return params, spec, readings, users


@FAST
@given(contact_jobs(), st.integers(0, 99))
def test_contact_tracing_matches_the_definition(job: Any, seed: int) -> None:
    params, spec, readings, users = job
    got, _, _, _ = run_readings("contact_tracing", params, spec, readings, ["x", "y"], seed)
    assert got == contact_oracle(readings, users, "ref", radius=params["radius"],
                                 window=params["window"], since=spec["since"],
                                 epoch_s=spec["epoch_s"])


def _ct(readings: list[Reading], users: list[str], params: dict[str, Any], *, until: float = BASE + 600
        ) -> tuple[dict[str, Any], int]:
    twins = [(u, "user") for u in users] + [("ref", "reference")]
    spec = job_spec(twins, readings, since=BASE, until=until, epoch_s=60, bindings=CT_BINDINGS)
    got, _, _, rounds = run_readings("contact_tracing", params, spec, readings, ["x", "y"])
    assert got == contact_oracle(readings, users, "ref", radius=params["radius"],
                                 window=params.get("window", 0), since=BASE, epoch_s=60)
    return got, rounds


def _plain_rounds(params: dict[str, Any]) -> int:
    """inputs + products + sign + bit → ring, when no (user, epoch) has two pairs."""
    return 1 + 1 + ltz_rounds(get_function("contact_tracing").parse(params).bits) + 1


def R(twin: str, minute: float, x: int, y: int = 0, device: str = "") -> Reading:  # noqa: N802
    return Reading(twin, device or f"{twin}-phone", BASE + 60 * minute, {"x": x, "y": y})


def test_contact_gap_does_not_shift_later_epochs() -> None:
    # the bug: a user missing one reading lost every later contact
    ref = [R("ref", m, 10 * m) for m in range(10)]
    gap = [R("u-gap", m, 10 * m + 1) for m in range(10) if m != 3]
    full = [R("u-full", m, 10 * m + 1) for m in range(10)]
    got, rounds = _ct(ref + gap + full, ["u-gap", "u-full"], {"radius": 5, "coord_bits": 8})
    assert got == {"u-gap": 9, "u-full": 10}
    assert rounds == _plain_rounds({"radius": 5, "coord_bits": 8})  # no extra comparison


def test_contact_boundary_duplicates_and_empty_users() -> None:
    ref = [R("ref", 0, 0), R("ref", 1, 0), R("ref", 2, 0), R("ref", 2, 100)]
    user = [R("u", 0, 3, 4),            # distance exactly r = 5: not within (strict <)
            R("u", 1, 3, 3), R("u", 1.5, 1, 1),   # two readings in one epoch: counts once
            R("u", 2, 50), R("u", 2.2, 99),       # minute 2: far from (0,0), near (100,0)
            R("u", 3, 0)]                          # no reference reading in minute 3
    got, rounds = _ct(ref + user, ["u", "nobody"], {"radius": 5, "coord_bits": 8})
    assert got == {"u": 2, "nobody": 0}
    # minute 1 has two pairs, minute 2 four: one extra 3-bit comparison (+1 +3 +1 rounds)
    assert rounds == _plain_rounds({"radius": 5, "coord_bits": 8}) + 5


def test_contact_window_reaches_neighbouring_epochs_only() -> None:
    ref = [R("ref", 5, 0)]
    user = [R("u", m, 1) for m in (2, 3, 4, 5, 6, 7, 8)]
    for w, want in ((0, 1), (1, 3), (2, 5), (3, 7)):
        got, _ = _ct(ref + user, ["u"], {"radius": 5, "coord_bits": 8, "window": w})
        assert got == {"u": want}


def test_contact_negative_coordinates_and_range_edges() -> None:
    b = 2**10 - 1
    ref = [R("ref", 0, -b, -b), R("ref", 1, b, b), R("ref", 2, -b, b)]
    user = [R("u", 0, -b, -b + 1), R("u", 1, -b, -b), R("u", 2, -b + 3, b - 4)]
    got, _ = _ct(ref + user, ["u"], {"radius": 5, "coord_bits": 10})
    assert got == {"u": 1}  # minute 1 is the largest distance, minute 2 is exactly 5
    got, _ = _ct(ref + user, ["u"], {"radius": 2 ** 12 - 1, "coord_bits": 10})
    assert got == {"u": 3}  # radius above every distance: the widest comparison still holds


def test_contact_without_reference_readings() -> None:
    got, _ = _ct([R("u", 0, 0)], ["u"], {"radius": 5, "coord_bits": 8})
    assert got == {"u": 0}


def test_contact_round_count_does_not_grow_with_users_or_readings() -> None:
    params = {"radius": 9, "coord_bits": 10}
    rounds = set()
    for users, minutes in ((1, 1), (3, 10), (300, 8)):
        names = [f"u{k}" for k in range(users)]
        readings = [R("ref", m, 0) for m in range(minutes)]
        readings += [R(u, m, 3, -4) for u in names for m in range(minutes)]
        got, r = _ct(readings, names, params)
        assert got == dict.fromkeys(names, minutes)
        rounds.add(r)
    assert rounds == {_plain_rounds(params)} and max(rounds) <= 14


# -- aggregates ----------------------------------------------------------------------------------


def aggregate_oracle(readings: Sequence[Reading], users: Sequence[str]) -> dict[str, list[int]]:
    per: dict[str, list[int]] = {u: [] for u in users}
    for r in readings:
        if r.twin in per:
            per[r.twin].append(r.values["v"])
    return per


@st.composite
def aggregate_jobs(draw: st.DrawFn, bits: int) -> tuple[dict[str, Any], list[Reading], list[str]]:
    top = 2**bits - 1
    value = st.one_of(st.integers(-top, top), st.sampled_from([-top, top, 0, 1, -1]))
    users = [f"user-{u:03d}" for u in range(draw(st.integers(1, 4)))]
    readings = [Reading(u, f"{u}/d", BASE + draw(st.integers(0, 599)), {"v": draw(value)})
                for u in users for _ in range(draw(st.integers(0, 6)))]
    twins = [(u, "user") for u in users]
    if draw(st.booleans()):  # a twin of another role is not an output row
        twins.append(("other", "reference"))
        readings.append(Reading("other", "o", BASE + 1, {"v": 1}))
    draw(st.randoms()).shuffle(readings)
    spec = job_spec(twins, readings, since=BASE, until=BASE + 600, epoch_s=60,
                    bindings=AGG_BINDINGS)
    return spec, readings, users


@FAST
@given(aggregate_jobs(40))
def test_sum_and_mean(job: Any) -> None:
    spec, readings, users = job
    per = aggregate_oracle(readings, users)
    got, _, _, rounds = run_readings("sum", {}, spec, readings, ["v"])
    assert got == {u: sum(v) for u, v in per.items()} and rounds == 1
    got, _, _, _ = run_readings("mean", {}, spec, readings, ["v"])
    assert got == {u: (sum(v) / len(v) if v else None) for u, v in per.items()}


def test_sum_and_mean_decode_fixed_point() -> None:
    readings = [Reading("u", "d", BASE + k, {"v": v}) for k, v in enumerate([3 << 16, -(1 << 15)])]
    spec = job_spec([("u", "user"), ("e", "user")], readings, since=BASE, until=BASE + 60,
                    epoch_s=60, bindings=AGG_BINDINGS)
    got, _, _, _ = run_readings("sum", {"frac_bits": 16}, spec, readings, ["v"])
    assert got == {"u": 2.5, "e": 0.0}
    got, _, _, _ = run_readings("mean", {"frac_bits": 16}, spec, readings, ["v"])
    assert got == {"u": 1.25, "e": None}


@FAST
@given(aggregate_jobs(10), st.data())
def test_count_above(job: Any, data: st.DataObject) -> None:
    spec, readings, users = job
    threshold = data.draw(st.one_of(st.integers(-1023, 1023), st.sampled_from([-1023, 1023, 0])))
    got, _, _, _ = run_readings("count_above", {"threshold": threshold, "value_bits": 10},
                                spec, readings, ["v"])
    per = aggregate_oracle(readings, users)
    assert got == {u: sum(1 for v in vs if v > threshold) for u, vs in per.items()}


@FAST
@given(aggregate_jobs(10), st.lists(st.integers(-1023, 1023), min_size=2, max_size=6, unique=True))
def test_histogram(job: Any, edges: list[int]) -> None:
    spec, readings, users = job
    edges = sorted(edges)
    got, _, _, _ = run_readings("histogram", {"edges": edges, "value_bits": 10}, spec, readings, ["v"])
    per = aggregate_oracle(readings, users)
    want = {}
    for u, vs in per.items():
        bins = [0] * (len(edges) - 1)
        for v in vs:
            for j in range(len(bins)):
                if edges[j] <= v < edges[j + 1]:
                    bins[j] += 1
        want[u] = bins
    assert got == want


# -- local building blocks -------------------------------------------------------------------


@FAST
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2**64 - 1)), max_size=40))
def test_segment_sums_and_group_ids(pairs: list[tuple[int, int]]) -> None:
    keys = np.array([k for k, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=DTYPE)
    want = [0] * 7
    for k, v in pairs:
        want[k] = (want[k] + v) % 2**64
    assert segment_sums(values, keys, 7).tolist() == want
    distinct, gid = group_ids(keys)
    assert distinct.tolist() == sorted(set(keys.tolist()))
    assert [distinct[g] for g in gid.tolist()] == keys.tolist()


# -- registry, parameters, encodings -------------------------------------------------------------


def test_registry_declares_classes_and_rejects_unknowns() -> None:
    assert {n: s.function_class for n, s in REGISTRY.items()} == {
        "contact_tracing": "proximity", "sum": "aggregate", "mean": "aggregate",
        "count_above": "distribution", "histogram": "distribution",
    }
    with pytest.raises(UnknownFunctionError, match="registered"):
        get_function("launch_missiles")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("contact_tracing", {"radius": 0}),
        ("contact_tracing", {"radius": 5, "coord_bits": 30, "window": -1}),
        ("contact_tracing", {"radius": 2**31, "coord_bits": 30}),
        ("contact_tracing", {"radius": 2**12, "coord_bits": 10}),  # beyond any distance
        ("contact_tracing", {"radius": 5, "epoch_bits": 8}),  # gone: epochs are the layout's
        ("contact_tracing", {"radius": 5, "typo": 1}),
        ("count_above", {"threshold": "3"}),
        ("count_above", {"threshold": 2**20, "value_bits": 8}),
        ("histogram", {"edges": [3, 1]}),
        ("histogram", {"edges": [1]}),
        ("sum", {"frac_bits": -1}),
    ],
)
def test_bad_parameters_are_rejected(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        get_function(name).parse(params)


def _enc(unit: str = "m", frac: int = 4, lo: float = -50_000.0, hi: float = 50_000.0) -> dict[str, Any]:
    return FieldEncoding(unit, frac, lo, hi).as_dict()


def test_contact_tracing_checks_the_declared_encodings() -> None:
    ok = {n: _enc() for n in CT_BINDINGS}  # ±50 km at 1/16 m: 800,000 < 2^20
    check_encodings("contact_tracing", {"radius": 80, "coord_bits": 20}, ok)
    cases = [
        ({**ok, "ref_y": _enc(unit="ft")}, "share unit and scale"),
        ({**ok, "user_y": _enc(frac=5)}, "share unit and scale"),
        ({**ok, "ref_x": _enc(hi=70_000.0)}, "does not fit coord_bits=20"),
        ({k: v for k, v in ok.items() if k != "ref_y"}, "expected"),
        ({**ok, "user_x": {"unit": "m"}}, "encoding of user_x"),
    ]
    for encodings, reason in cases:
        with pytest.raises(ValidationError, match=reason):
            check_encodings("contact_tracing", {"radius": 80, "coord_bits": 20}, encodings)


def test_aggregates_check_the_declared_encoding() -> None:
    v = {"values": _enc(unit="1", frac=16, lo=-(2.0**30), hi=2.0**30)}  # 2^46 encoded
    check_encodings("sum", {"frac_bits": 16}, v)
    check_encodings("count_above", {"threshold": 0, "value_bits": 47}, v)
    with pytest.raises(ValidationError, match="set frac_bits to 16"):
        check_encodings("mean", {}, v)
    with pytest.raises(ValidationError, match="does not fit value_bits=46"):
        check_encodings("histogram", {"edges": [0, 1], "value_bits": 46}, v)


def test_wrong_inputs_are_rejected_before_any_round() -> None:
    layout = Layout.build(1, user=(1, [0, 0], [0, 0]))

    async def prog(party: Party, inputs: Any) -> OutputShare:
        return await run_function(party, "sum", {}, inputs, layout)

    with pytest.raises(ValidationError, match="inputs"):
        simulate(prog, [{}] * 3)

    async def short(party: Party, _: None) -> OutputShare:
        return await load_inputs(party, "sum", {}, {"values": np.zeros(3, DTYPE)}, layout)

    with pytest.raises(ValidationError, match="has 2 readings"):
        simulate(short, [None] * 3)

    async def no_ref(party: Party, _: None) -> OutputShare:
        z = np.zeros(2, DTYPE)
        return await load_inputs(party, "contact_tracing", {"radius": 3},
                                 {"user_x": z, "user_y": z, "ref_x": z, "ref_y": z}, layout)

    with pytest.raises(ValidationError, match="no role 'reference'"):
        simulate(no_ref, [None] * 3)
    with pytest.raises(ValidationError, match="exactly one twin of role 'reference'"):
        expected_rounds("contact_tracing", {"radius": 3},
                        Layout.build(1, user=(1, [], []), reference=(2, [], [])))


# -- output delivery -----------------------------------------------------------------------------


def _sum_job(values: Mapping[str, list[int]]) -> tuple[np.ndarray, list[OutputShare]]:
    readings = [Reading(u, "d", BASE + k, {"v": v}) for u, vs in values.items() for k, v in enumerate(vs)]
    spec = job_spec([(u, "user") for u in values], readings, since=BASE, until=BASE + 60,
                    epoch_s=60, bindings=AGG_BINDINGS)
    per_node, layout, _ = arrange_at_nodes(spec, opened_at_nodes(readings, ["v"]))

    async def prog(party: Party, additive: dict[str, np.ndarray]) -> OutputShare:
        return await run_function(party, "sum", {}, await load_inputs(party, "sum", {}, additive), layout)

    outs, _ = simulate(prog, per_node, job="job-fn")
    return combine_outputs(outs), outs


def _receiver() -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_output_shares_are_sealed_for_the_receiver_only() -> None:
    opened, outs = _sum_job({"a": [1, 2, 3], "b": [4, 5, -6]})
    assert opened.tolist() == [6, 3]
    sk, pk = _receiver()
    blobs = [seal_output(o, pk) for o in outs]
    got = [open_output(b, sk, job="job-fn", function="sum", party=i) for i, b in enumerate(blobs)]
    assert combine_outputs(got).tolist() == [6, 3]
    other, _ = _receiver()
    with pytest.raises(TamperedMessageError):
        open_output(blobs[0], other, job="job-fn", function="sum", party=0)
    with pytest.raises(TamperedMessageError):  # party 1's share posing as party 0's
        open_output(blobs[1], sk, job="job-fn", function="sum", party=0)
    with pytest.raises(TamperedMessageError):  # replay into another job
        open_output(blobs[0], sk, job="job-other", function="sum", party=0)
    flipped = bytearray(blobs[2])
    flipped[-1] ^= 1
    with pytest.raises(TamperedMessageError):
        open_output(bytes(flipped), sk, job="job-fn", function="sum", party=2)
    with pytest.raises(ValidationError):
        seal_output(outs[0], b"short")


def test_output_shares_are_rerandomised_even_for_empty_rows() -> None:
    _, first = _sum_job({"a": [7, 7, 7], "empty": []})
    _, second = _sum_job({"a": [7, 7, 7], "empty": []})
    assert not np.array_equal(first[0].values, second[0].values)
    assert first[0].values[1] != 0  # a row without readings is not a recognisable zero share
    assert combine_outputs(first).tolist() == combine_outputs(second).tolist() == [21, 0]


def test_split_shares_of_devices_are_fresh() -> None:
    a, b = split_additive(np.array([5], dtype=np.int64)), split_additive(np.array([5], dtype=np.int64))
    assert a[0][0] != b[0][0]


def test_functions_do_not_rely_on_the_reading_order() -> None:
    # arrange() sorts by (row, time, …); a layout in any other order gives the same counts
    rows, epochs = [2, 0, 1, 0, 2, 0], [1, 0, 3, 0, 1, 2]
    xs, ref_x = [0, 9, 1, 1, 50, 0], [0, 0, 0, 0]
    layout = Layout.build(4, user=(3, rows, epochs), reference=(1, [0] * 4, [0, 1, 2, 3]))
    plain = {"user_x": xs, "user_y": [0] * 6, "ref_x": ref_x, "ref_y": [0] * 4}
    per_node: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for key, values in plain.items():
        for i, share in enumerate(split_additive(np.array(values, dtype=np.int64))):
            per_node[i][key] = share
    params = {"radius": 3, "coord_bits": 8}

    async def prog(party: Party, additive: dict[str, np.ndarray]) -> OutputShare:
        inputs = await load_inputs(party, "contact_tracing", params, additive, layout)
        return await run_function(party, "contact_tracing", params, inputs, layout)

    outs, parties = simulate(prog, per_node)
    # row 0: epoch 0 (9 far, 1 near) counts, epoch 2 (0) counts; row 1: epoch 3; row 2: epoch 1 once
    assert combine_outputs(outs).tolist() == [2, 1, 1]
    assert parties[0].round == expected_rounds("contact_tracing", params, layout)


def test_rounds_without_a_layout_are_an_upper_bound() -> None:
    params = {"radius": 3, "coord_bits": 8}
    busy = Layout.build(1, user=(1, [0] * 9, [0] * 9), reference=(1, [0] * 9, [0] * 9))
    assert expected_rounds("contact_tracing", params, busy) <= expected_rounds("contact_tracing", params)
    for name, p in (("sum", {}), ("count_above", {"threshold": 1}), ("histogram", {"edges": [0, 1]})):
        assert expected_rounds(name, p) == expected_rounds(name, p, busy)
