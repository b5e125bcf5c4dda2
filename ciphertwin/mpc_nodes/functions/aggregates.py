"""Aggregates twins commonly need, per user twin: sum, mean, count above a threshold, histogram.

Input ``values``: one flat share vector over the readings of every twin of role ``"user"``
(the job's single declared field), with the public layout saying which row each reading
belongs to. Every aggregate is *per user row over that row's readings in the job window*:
a row without readings gets sum 0, count 0, an all-zero histogram and mean ``None``.

Sums are local (prefix sums per row on each share half, no round); comparisons cost one sign
extraction for all readings and all thresholds/edges together, then one bit → ring round whose
output stays additive because the bits are only summed. Values, thresholds and edges are in
the field's encoded units (round(v · 2^frac)); mean's count is public (the layout has it), so
the receiver divides a secret sum by a count the nodes already knew.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.fixed_point import decode_fixed
from ciphertwin.mpc_nodes.functions.registry import (
    USER,
    FunctionSpec,
    check_known,
    encodings_for,
    param_int,
    register,
)
from ciphertwin.mpc_nodes.functions.segments import segment_sums
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import mask_additive
from ciphertwin.mpc_nodes.protocols.boolean import b2a_additive, ltz, ltz_rounds
from ciphertwin.mpc_nodes.ring import DTYPE, to_signed
from ciphertwin.mpc_nodes.shares import ArithShare
from ciphertwin.protocol.job_epochs import FieldEncoding

INPUTS = {"values": USER}
MAX_EDGES = 256


def _per_row(values: np.ndarray, layout: Layout) -> np.ndarray:
    """Σ per user row of a (..., readings) ring array → (..., rows); local on shares."""
    return segment_sums(values, layout.row[USER], layout.rows[USER])


def _values_encoding(name: str, encodings: Mapping[str, Any]) -> Any:
    return encodings_for(name, INPUTS, encodings)["values"]


# -- sum and mean ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SumParams:
    frac_bits: int


def parse_sum(params: Mapping[str, Any]) -> SumParams:
    check_known(params, {"frac_bits"})
    return SumParams(frac_bits=param_int(params, "frac_bits", low=0, high=62, default=0))


def _check_frac(name: str) -> Any:
    def check(p: SumParams, encodings: Mapping[str, Any]) -> None:
        enc = _values_encoding(name, encodings)
        if enc.frac != p.frac_bits:
            raise MpcValidationError(
                f"{name}: the field is encoded with frac {enc.frac} but frac_bits={p.frac_bits}; "
                f"set frac_bits to {enc.frac} so the result decodes in {enc.unit!r}")
    return check


def _frac_default(encodings: Mapping[str, FieldEncoding]) -> dict[str, Any]:
    """A sum or mean decodes in the field's own scale."""
    return {"frac_bits": encodings["values"].frac} if "values" in encodings else {}


def _value_bits_default(encodings: Mapping[str, FieldEncoding]) -> dict[str, Any]:
    """The narrowest comparison the declared range allows (fewer bits, fewer bytes sent)."""
    enc = encodings.get("values")
    return {"value_bits": max(1, enc.bound.bit_length())} if enc is not None else {}


async def sum_protocol(party: Party, _p: SumParams, inputs: Mapping[str, ArithShare],
                       layout: Layout) -> np.ndarray:
    return mask_additive(party, _per_row(inputs["values"].own, layout))


def sum_reference(_p: SumParams, inputs: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    return _per_row(np.asarray(inputs["values"], dtype=DTYPE), layout)


def sum_decode(p: SumParams, opened: np.ndarray) -> Any:
    return decode_fixed(opened, p.frac_bits).tolist() if p.frac_bits else to_signed(opened).tolist()


async def mean_protocol(party: Party, _p: SumParams, inputs: Mapping[str, ArithShare],
                        layout: Layout) -> np.ndarray:
    """Output (rows, 2): the secret sum and the public count (party 0's share carries it)."""
    out = np.zeros((layout.rows[USER], 2), dtype=DTYPE)
    out[:, 0] = _per_row(inputs["values"].own, layout)
    if party.index == 0:
        out[:, 1] = layout.counts(USER).astype(DTYPE)
    return mask_additive(party, out)


def mean_reference(p: SumParams, inputs: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    return np.stack([sum_reference(p, inputs, layout), layout.counts(USER).astype(DTYPE)], -1)


def mean_decode(p: SumParams, opened: np.ndarray) -> list[float | None]:
    total = decode_fixed(opened[..., 0], p.frac_bits)
    count = to_signed(opened[..., 1])
    return [float(t / c) if c > 0 else None
            for t, c in zip(total.tolist(), count.tolist(), strict=True)]


# -- comparisons ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdParams:
    threshold: int
    value_bits: int

    @property
    def bits(self) -> int:
        return self.value_bits + 2  # |t - v| < 2^(value_bits + 1)


def _check_value_bits(name: str) -> Any:
    def check(p: Any, encodings: Mapping[str, Any]) -> None:
        enc = _values_encoding(name, encodings)
        if enc.bound >= 1 << p.value_bits:
            raise MpcValidationError(
                f"{name}: the field may encode up to {enc.bound}, which does not fit "
                f"value_bits={p.value_bits} (|encoded| < {1 << p.value_bits}); raise value_bits")
    return check


def parse_count_above(params: Mapping[str, Any]) -> ThresholdParams:
    check_known(params, {"threshold", "value_bits"})
    vb = param_int(params, "value_bits", low=1, high=62, default=62)
    bound = (1 << vb) - 1
    return ThresholdParams(param_int(params, "threshold", low=-bound, high=bound), vb)


async def count_above_protocol(party: Party, p: ThresholdParams, inputs: Mapping[str, ArithShare],
                               layout: Layout) -> np.ndarray:
    """#{v > t} = #{t - v < 0}: one sign extraction, one bit injection, local row sums."""
    above = await ltz(party, (-inputs["values"]).add_public(p.threshold), p.bits)
    return mask_additive(party, _per_row(await b2a_additive(party, above), layout))


def _check_bound(values: np.ndarray, bits: int) -> np.ndarray:
    signed = to_signed(values)
    if np.any(np.abs(signed) >= 1 << bits):
        raise MpcValidationError(f"a value exceeds the declared bound 2^{bits}")
    return signed


def count_above_reference(p: ThresholdParams, inputs: Mapping[str, np.ndarray],
                          layout: Layout) -> np.ndarray:
    above = _check_bound(inputs["values"], p.value_bits) > p.threshold
    return _per_row(above.astype(DTYPE), layout)


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


def _bins(below: np.ndarray, layout: Layout) -> np.ndarray:
    """(edges, readings) bits [v < e_j] → (rows, bins): bin_j = S_{j+1} − S_j."""
    s = _per_row(below, layout)
    return np.ascontiguousarray((s[1:] - s[:-1]).T)


async def histogram_protocol(party: Party, p: HistogramParams, inputs: Mapping[str, ArithShare],
                             layout: Layout) -> np.ndarray:
    """Bin j counts e_j ≤ v < e_{j+1}: with S_j = #{v < e_j}, bin_j = S_{j+1} − S_j.

    All readings against all edges in one sign extraction (edges × readings elements).
    """
    values = inputs["values"]
    edges = np.array(p.edges, dtype=np.int64)[:, None]
    spread = ArithShare(party.index, values.own[None, :], values.nxt[None, :])
    diff = spread.add_public(-edges)  # (K, n): v − e_j
    below = await ltz(party, diff, p.bits)
    bits = (await b2a_additive(party, below)).reshape(diff.shape)
    return mask_additive(party, _bins(bits, layout))


def histogram_reference(p: HistogramParams, inputs: Mapping[str, np.ndarray],
                        layout: Layout) -> np.ndarray:
    signed = _check_bound(inputs["values"], p.value_bits)
    below = signed[None, :] < np.array(p.edges, dtype=np.int64)[:, None]
    return _bins(below.astype(DTYPE), layout)


def _fixed(rounds: int) -> Any:
    return lambda _p, _layout: rounds


SUM = register(FunctionSpec(
    "sum", "aggregate", INPUTS, parse_sum, sum_protocol, sum_reference, sum_decode,
    rounds=_fixed(0), check_encodings=_check_frac("sum"), defaults=_frac_default, doc="Σ of each user row's readings"))
MEAN = register(FunctionSpec(
    "mean", "aggregate", INPUTS, parse_sum, mean_protocol, mean_reference, mean_decode,
    rounds=_fixed(0), check_encodings=_check_frac("mean"), defaults=_frac_default,
    doc="mean of each user row's readings (None for a row without readings)"))
COUNT_ABOVE = register(FunctionSpec(
    "count_above", "distribution", INPUTS, parse_count_above, count_above_protocol,
    count_above_reference, counts_decode, rounds=lambda p, _layout: ltz_rounds(p.bits) + 1,
    check_encodings=_check_value_bits("count_above"), input_bits=lambda p: p.bits,
    defaults=_value_bits_default,
    doc="#{v > threshold} per user row"))
HISTOGRAM = register(FunctionSpec(
    "histogram", "distribution", INPUTS, parse_histogram, histogram_protocol,
    histogram_reference, counts_decode, rounds=lambda p, _layout: ltz_rounds(p.bits) + 1,
    check_encodings=_check_value_bits("histogram"), input_bits=lambda p: p.bits,
    defaults=_value_bits_default,
    doc="counts per [e_j, e_j+1) per user row"))
