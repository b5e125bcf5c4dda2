"""Registered functions against their plaintext references, and HPKE output delivery."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.engine import expected_rounds, load_inputs, run_function
from ciphertwin.mpc_nodes.errors import TamperedMessageError, UnknownFunctionError
from ciphertwin.mpc_nodes.functions import REGISTRY, get_function
from ciphertwin.mpc_nodes.local_cluster import simulate
from ciphertwin.mpc_nodes.output import OutputShare, combine_outputs, open_output, seal_output
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.ring import to_ring
from ciphertwin.mpc_nodes.shares import split_additive

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_job(name: str, params: dict[str, Any], plain: dict[str, Any]) -> tuple[np.ndarray, list[OutputShare], int]:
    """Devices split, nodes load + compute; returns (opened output, shares, rounds)."""
    per_node: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for key, values in plain.items():
        for i, s in enumerate(split_additive(values)):
            per_node[i][key] = s

    async def prog(party: Party, additive: dict[str, np.ndarray]) -> OutputShare:
        inputs = await load_inputs(party, name, params, additive)
        return await run_function(party, name, params, inputs)

    outs, parties = simulate(prog, per_node, job="job-fn")
    return combine_outputs(outs), outs, parties[0].round


def check(name: str, params: dict[str, Any], plain: dict[str, Any]) -> np.ndarray:
    spec = get_function(name)
    opened, _, rounds = run_job(name, params, plain)
    ref = spec.reference(spec.parse(params), {k: to_ring(np.asarray(v)) for k, v in plain.items()})
    assert np.array_equal(opened, ref)
    assert rounds == expected_rounds(name, params)
    return opened


def path(draw: st.DrawFn, shape: tuple[int, ...], bound: int) -> np.ndarray:
    return np.array(draw(st.lists(st.integers(-bound, bound), min_size=int(np.prod(shape)),
                                  max_size=int(np.prod(shape))))).reshape(shape)


@st.composite
def contact_cases(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    users, points = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    cb, eb = draw(st.integers(4, 12)), draw(st.integers(1, 8))
    radius = draw(st.integers(1, 2**cb))
    bound, ebound = 2**cb - 1, 2**eb - 1
    ref = {k: path(draw, (points,), bound) for k in ("ref_x", "ref_y")}
    ref["ref_epoch"] = path(draw, (points,), ebound)
    near = draw(st.integers(0, radius))
    user = {
        # half of the users walk close to the reference path, the others anywhere
        "user_x": np.clip(ref["ref_x"] + path(draw, (users, points), near), -bound, bound),
        "user_y": np.clip(ref["ref_y"] + path(draw, (users, points), near), -bound, bound),
        "user_epoch": np.where(path(draw, (users, points), 1) > 0, path(draw, (users, points), ebound),
                               np.broadcast_to(ref["ref_epoch"], (users, points))),
    }
    params = {"radius": radius, "coord_bits": cb, "epoch_bits": eb}
    return params, {**user, **ref}


@FAST
@given(contact_cases())
def test_contact_tracing_matches_reference(case: tuple[dict[str, Any], dict[str, np.ndarray]]) -> None:
    params, plain = case
    check("contact_tracing", params, plain)


def test_contact_tracing_boundary_and_epochs() -> None:
    # distance exactly r is NOT within (strict <), r-1 is; a different epoch never counts
    plain = {
        "ref_x": np.array([0, 0, 0, 0]), "ref_y": np.array([0, 0, 0, 0]),
        "ref_epoch": np.array([10, 11, 12, 13]),
        "user_x": np.array([[3, 2, 0, -100], [-3, 0, 1, 0]]),
        "user_y": np.array([[4, 2, 0, 0], [0, -4, 1, 0]]),
        "user_epoch": np.array([[10, 11, 12, 13], [10, 11, 99, 13]]),
    }
    out = check("contact_tracing", {"radius": 5, "coord_bits": 8, "epoch_bits": 8}, plain)
    assert out.tolist() == [2, 3]


@FAST
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=30), st.integers(1, 3))
def test_sum_and_mean(values: list[int], rows: int) -> None:
    plain = {"values": np.array(values * rows).reshape(rows, len(values))}
    check("sum", {}, plain)
    opened = check("mean", {}, plain)
    decoded = get_function("mean").decode(get_function("mean").parse({}), opened)
    assert decoded == pytest.approx([sum(values) / len(values)] * rows)


@FAST
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=40), st.integers(-1000, 1000))
def test_count_above(values: list[int], threshold: int) -> None:
    values = values + [threshold, threshold + 1, threshold - 1]
    opened = check("count_above", {"threshold": threshold, "value_bits": 11}, {"values": np.array(values)})
    assert opened.tolist() == sum(v > threshold for v in values)


@FAST
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=40),
       st.lists(st.integers(-1000, 1000), min_size=2, max_size=6, unique=True))
def test_histogram(values: list[int], edges: list[int]) -> None:
    edges = sorted(edges)
    params = {"edges": edges, "value_bits": 11}
    opened = check("histogram", params, {"values": np.array(values + edges)})
    assert len(opened) == len(edges) - 1


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
        ("contact_tracing", {"radius": 5, "coord_bits": 30, "epoch_bits": 30}),  # > 64 bits
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


def test_wrong_inputs_are_rejected_before_any_round() -> None:
    async def prog(party: Party, _: None) -> OutputShare:
        return await run_function(party, "sum", {}, {})

    with pytest.raises(ValidationError, match="inputs"):
        simulate(prog, [None] * 3)


def _receiver() -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_output_shares_are_sealed_for_the_receiver_only() -> None:
    opened, outs, _ = run_job("sum", {}, {"values": np.array([[1, 2, 3], [4, 5, -6]])})
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


def test_output_shares_are_rerandomised() -> None:
    values = {"values": np.array([[7, 7, 7]])}
    _, first, _ = run_job("sum", {}, values)
    _, second, _ = run_job("sum", {}, values)
    assert not np.array_equal(first[0].values, second[0].values)
    assert combine_outputs(first).tolist() == combine_outputs(second).tolist() == [21]


def test_round_count_does_not_grow_with_users_or_points() -> None:
    params = {"radius": 9, "coord_bits": 10, "epoch_bits": 6}
    rounds = []
    for users, points in ((1, 1), (3, 50), (400, 25)):
        plain = {
            "user_epoch": np.zeros((users, points), dtype=np.int64),
            "user_x": np.full((users, points), 3), "user_y": np.full((users, points), -4),
            "ref_epoch": np.zeros(points, dtype=np.int64),
            "ref_x": np.zeros(points, dtype=np.int64), "ref_y": np.zeros(points, dtype=np.int64),
        }
        opened, _, r = run_job("contact_tracing", params, plain)
        assert opened.tolist() == [points] * users
        rounds.append(r)
    assert rounds == [expected_rounds("contact_tracing", params)] * 3
    assert rounds[0] <= 14
