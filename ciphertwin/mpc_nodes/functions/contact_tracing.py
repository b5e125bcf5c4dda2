"""Contact tracing: per user, the number of epochs spent within radius r of a reference path.

Inputs (replicated shares, fixed-point integers in the job's units):
  user_epoch, user_x, user_y : (users, P)  — point j of every user is slot j of the job window
  ref_epoch, ref_x, ref_y    : (P,)        — the reference (e.g. an infected person's) path
Output: (users,) counts of j with  dx² + dy² < r²  and  user_epoch == ref_epoch.

Why it needs only one multiplication round before the comparison: the epoch check is folded
into the distance, D = dx² + dy² + r²·de². If the epochs differ, de² ≥ 1 and D ≥ r², so the
single test D - r² < 0 decides "same epoch and close" — no equality circuit, no AND.
The declared bounds (|coord| < 2^coord_bits, |epoch| < 2^epoch_bits) fix the largest D and
thereby the comparison width ℓ; nothing above bit ℓ is ever computed or sent.
Rounds: 1 (products) + 2 + ceil(log2(ℓ-1)) (sign) + 1 (bit → ring), plus 1 to load inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.fixed_point import bits_needed
from ciphertwin.mpc_nodes.functions.registry import FunctionSpec, check_known, param_int, register
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import inner
from ciphertwin.mpc_nodes.protocols.boolean import b2a_additive, ltz, ltz_rounds
from ciphertwin.mpc_nodes.ring import DTYPE, RING_BITS, to_signed
from ciphertwin.mpc_nodes.shares import ArithShare

USER_INPUTS = ("user_epoch", "user_x", "user_y")
REF_INPUTS = ("ref_epoch", "ref_x", "ref_y")


@dataclass(frozen=True)
class ContactParams:
    radius: int
    coord_bits: int
    epoch_bits: int

    @property
    def r2(self) -> int:
        return self.radius * self.radius

    @property
    def max_distance(self) -> int:
        """Largest possible D = dx² + dy² + r²·de² under the declared bounds."""
        d_coord = 1 << (self.coord_bits + 1)
        d_epoch = 1 << (self.epoch_bits + 1)
        return 2 * d_coord * d_coord + self.r2 * d_epoch * d_epoch

    @property
    def bits(self) -> int:
        """Comparison width ℓ: D - r² lies in (-2^(ℓ-1), 2^(ℓ-1))."""
        return bits_needed(self.max_distance)


def parse(params: Mapping[str, Any]) -> ContactParams:
    check_known(params, {"radius", "coord_bits", "epoch_bits"})
    p = ContactParams(
        radius=param_int(params, "radius", low=1, high=(1 << 31) - 1),
        coord_bits=param_int(params, "coord_bits", low=1, high=30, default=24),
        epoch_bits=param_int(params, "epoch_bits", low=1, high=30, default=16),
    )
    if p.radius >= 1 << (p.coord_bits + 2):
        raise MpcValidationError("radius exceeds any possible distance under coord_bits")
    if p.bits > RING_BITS:
        raise MpcValidationError(
            f"coord_bits={p.coord_bits}, epoch_bits={p.epoch_bits}, radius={p.radius} need a "
            f"{p.bits}-bit comparison; Z_2^64 allows 64 — lower the bounds or the resolution"
        )
    return p


def _check_shapes(inputs: Mapping[str, Any]) -> tuple[int, int]:
    shape = inputs["user_x"].shape
    if len(shape) != 2:
        raise MpcValidationError(f"user inputs must be (users, points), got {shape}")
    for name in USER_INPUTS:
        if inputs[name].shape != shape:
            raise MpcValidationError(f"{name} has shape {inputs[name].shape}, expected {shape}")
    for name in REF_INPUTS:
        if inputs[name].shape != (shape[1],):
            raise MpcValidationError(f"{name} has shape {inputs[name].shape}, expected ({shape[1]},)")
    return shape


async def protocol(party: Party, p: ContactParams, inputs: Mapping[str, ArithShare]) -> np.ndarray:
    users, points = _check_shapes(inputs)
    de = inputs["user_epoch"] - inputs["ref_epoch"]
    dx = inputs["user_x"] - inputs["ref_x"]
    dy = inputs["user_y"] - inputs["ref_y"]
    dist = await inner(party, [(dx, dx), (dy, dy), (de, de)], [1, 1, p.r2], bits=p.bits)
    close = await ltz(party, dist.add_public(-p.r2), p.bits)
    hits = await b2a_additive(party, close)
    return hits.reshape(users, points).sum(axis=1, dtype=DTYPE)


def _bounded(values: np.ndarray, bits: int, name: str) -> np.ndarray:
    signed = to_signed(values)
    if np.any(np.abs(signed) >= 1 << bits):
        raise MpcValidationError(f"{name}: a value exceeds the declared 2^{bits} bound")
    return signed


def reference(p: ContactParams, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    _check_shapes(inputs)
    ue = _bounded(inputs["user_epoch"], p.epoch_bits, "user_epoch")
    re = _bounded(inputs["ref_epoch"], p.epoch_bits, "ref_epoch")
    ux, uy = (_bounded(inputs[n], p.coord_bits, n) for n in ("user_x", "user_y"))
    rx, ry = (_bounded(inputs[n], p.coord_bits, n) for n in ("ref_x", "ref_y"))
    d2 = (ux - rx) ** 2 + (uy - ry) ** 2
    hit = (d2 < p.r2) & (ue == re)
    return hit.sum(axis=1).astype(DTYPE)


def decode(_p: ContactParams, opened: np.ndarray) -> list[int]:
    return [int(v) for v in to_signed(opened)]


def rounds(p: ContactParams) -> int:
    return 1 + ltz_rounds(p.bits) + 1


CONTACT_TRACING = register(
    FunctionSpec(
        name="contact_tracing",
        function_class="proximity",
        input_names=USER_INPUTS + REF_INPUTS,
        parse=parse,
        protocol=protocol,
        reference=reference,
        decode=decode,
        input_bits=lambda p: p.bits,
        rounds=rounds,
        doc=__doc__ or "",
    )
)
