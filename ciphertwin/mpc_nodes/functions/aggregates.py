"""Aggregates twins commonly need: sum, mean, count above a threshold, histogram.

Input: ``values`` (replicated shares, any shape ≥ 1-D); every aggregate reduces the last axis,
so (points,) gives one result and (users, points) one per user. Sums are local (no round);
comparisons cost one sign extraction for all values and all thresholds/edges together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.fixed_point import decode_fixed
from ciphertwin.mpc_nodes.functions.registry import FunctionSpec, check_known, param_int, register
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import to_output
from ciphertwin.mpc_nodes.protocols.boolean import b2a_additive, ltz, ltz_rounds
from ciphertwin.mpc_nodes.ring import DTYPE, to_signed
from ciphertwin.mpc_nodes.shares import ArithShare

INPUTS = ("values",)
MAX_EDGES = 256


def _values(inputs: Mapping[str, Any]) -> Any:
    v = inputs["values"]
    if len(v.shape) < 1 or v.shape[-1] < 1:
        raise MpcValidationError(f"values must have at least one element on the last axis, got {v.shape}")
    return v


# -- sum and mean ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SumParams:
    frac_bits: int


def parse_sum(params: Mapping[str, Any]) -> SumParams:
    check_known(params, {"frac_bits"})
    return SumParams(frac_bits=param_int(params, "frac_bits", low=0, high=62, default=0))


async def sum_protocol(party: Party, _p: SumParams, inputs: Mapping[str, ArithShare]) -> np.ndarray:
    return to_output(party, _values(inputs).sum(axis=-1))


def sum_reference(_p: SumParams, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(_values(inputs).sum(axis=-1, dtype=DTYPE))


def sum_decode(p: SumParams, opened: np.ndarray) -> Any:
    return decode_fixed(opened, p.frac_bits).tolist() if p.frac_bits else to_signed(opened).tolist()


async def mean_protocol(party: Party, _p: SumParams, inputs: Mapping[str, ArithShare]) -> np.ndarray:
    """Output (..., 2): the secret sum and the public count (party 0 adds it, so it opens)."""
    values = _values(inputs)
    total = values.sum(axis=-1)
    count = ArithShare(party.index, np.zeros_like(total.own), np.zeros_like(total.own))
    count = count.add_public(values.shape[-1])
    stacked = ArithShare(
        party.index, np.stack([total.own, count.own], -1), np.stack([total.nxt, count.nxt], -1)
    )
    return to_output(party, stacked)


def mean_reference(p: SumParams, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    values = _values(inputs)
    total = np.asarray(values.sum(axis=-1, dtype=DTYPE))
    return np.stack([total, np.full_like(total, values.shape[-1])], -1)


def mean_decode(p: SumParams, opened: np.ndarray) -> Any:
    total = decode_fixed(opened[..., 0], p.frac_bits)
    return (total / to_signed(opened[..., 1]).astype(np.float64)).tolist()


# -- comparisons ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdParams:
    threshold: int
    value_bits: int

    @property
    def bits(self) -> int:
        return self.value_bits + 2  # |t - v| < 2^(value_bits + 1)


def parse_count_above(params: Mapping[str, Any]) -> ThresholdParams:
    check_known(params, {"threshold", "value_bits"})
    vb = param_int(params, "value_bits", low=1, high=62, default=62)
    bound = (1 << vb) - 1
    return ThresholdParams(param_int(params, "threshold", low=-bound, high=bound), vb)


async def count_above_protocol(
    party: Party, p: ThresholdParams, inputs: Mapping[str, ArithShare]
) -> np.ndarray:
    """#{v > t} = #{t - v < 0}: one sign extraction, one bit injection, a local sum."""
    values = _values(inputs)
    above = await ltz(party, (-values).add_public(p.threshold), p.bits)
    return (await b2a_additive(party, above)).reshape(values.shape).sum(axis=-1, dtype=DTYPE)


def _check_bound(values: np.ndarray, bits: int) -> np.ndarray:
    signed = to_signed(values)
    if np.any(np.abs(signed) >= 1 << bits):
        raise MpcValidationError(f"a value exceeds the declared bound 2^{bits}")
    return signed


def count_above_reference(p: ThresholdParams, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    signed = _check_bound(_values(inputs), p.value_bits)
    return np.asarray((signed > p.threshold).sum(axis=-1)).astype(DTYPE)


def counts_decode(_p: Any, opened: np.ndarray) -> Any:
    return to_signed(opened).tolist()


@dataclass(frozen=True)
class HistogramParams:
    edges: tuple[int, ...]
    value_bits: int

    @property
    def bits(self) -> int:
        return self.value_bits + 2


def parse_histogram(params: Mapping[str, Any]) -> HistogramParams:
    check_known(params, {"edges", "value_bits"})
    vb = param_int(params, "value_bits", low=1, high=62, default=62)
    edges = params.get("edges")
    if not isinstance(edges, (list, tuple)) or not 2 <= len(edges) <= MAX_EDGES:
        raise MpcValidationError(f"edges must be a list of 2..{MAX_EDGES} integers")
    bound = (1 << vb) - 1
    parsed = tuple(param_int({"edge": e}, "edge", low=-bound, high=bound) for e in edges)
    if any(b <= a for a, b in zip(parsed, parsed[1:])):
        raise MpcValidationError("edges must be strictly increasing")
    return HistogramParams(parsed, vb)


async def histogram_protocol(
    party: Party, p: HistogramParams, inputs: Mapping[str, ArithShare]
) -> np.ndarray:
    """Bin j counts e_j ≤ v < e_{j+1}: with S_j = #{v < e_j}, bin_j = S_{j+1} - S_j.

    All values against all edges in one sign extraction (values × edges elements).
    """
    values = _values(inputs)
    edges = np.array(p.edges, dtype=np.int64)[:, None]
    spread = ArithShare(party.index, values.own[..., None, :], values.nxt[..., None, :])
    diff = spread.add_public(-edges)  # (..., K, P): v - e_j
    below = await ltz(party, diff, p.bits)
    s = (await b2a_additive(party, below)).reshape(diff.shape).sum(axis=-1, dtype=DTYPE)
    return s[..., 1:] - s[..., :-1]


def histogram_reference(p: HistogramParams, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    signed = _check_bound(_values(inputs), p.value_bits)
    edges = np.array(p.edges, dtype=np.int64)
    below = (signed[..., None, :] < edges[:, None]).sum(axis=-1)
    return (below[..., 1:] - below[..., :-1]).astype(DTYPE)


SUM = register(FunctionSpec("sum", "aggregate", INPUTS, parse_sum, sum_protocol, sum_reference,
                            sum_decode, rounds=lambda _p: 0, doc="Σ over the last axis"))
MEAN = register(FunctionSpec("mean", "aggregate", INPUTS, parse_sum, mean_protocol, mean_reference,
                             mean_decode, rounds=lambda _p: 0, doc="mean over the last axis"))
COUNT_ABOVE = register(FunctionSpec(
    "count_above", "distribution", INPUTS, parse_count_above, count_above_protocol,
    count_above_reference, counts_decode, input_bits=lambda p: p.bits,
    rounds=lambda p: ltz_rounds(p.bits) + 1, doc="#{v > threshold} over the last axis"))
HISTOGRAM = register(FunctionSpec(
    "histogram", "distribution", INPUTS, parse_histogram, histogram_protocol,
    histogram_reference, counts_decode, input_bits=lambda p: p.bits,
    rounds=lambda p: ltz_rounds(p.bits) + 1, doc="counts per [e_j, e_j+1) over the last axis"))
