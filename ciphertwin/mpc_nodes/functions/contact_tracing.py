"""Contact tracing: per user, the number of epochs spent within radius r of a reference path.

Definition (what the plaintext oracles in the tests are written from). With E_u the epochs in
which user u has a reading and, for an epoch e, A_u(e) the user's readings in e and
B(e) the reference's readings in epochs [e-w, e+w] (``window`` w ≥ 0, default 0):

    count(u) = #{ e ∈ E_u : ∃ a ∈ A_u(e), b ∈ B(e) with dx² + dy² < r² }

Duplicates in one epoch mean "any pair", so an epoch counts at most once; users without
readings (or without reference readings near their epochs) get 0. Gaps, out-of-order uploads
and a clock-aligned epoch that a device skips therefore cost nothing — readings are matched by
their own epochs (:mod:`ciphertwin.protocol.job_epochs`), never by upload position.

Inputs: flat share vectors user_x, user_y (every reading of every user twin) and ref_x,
ref_y (the one reference twin), plus the public :class:`~ciphertwin.mpc_nodes.layout.Layout`
(row and epoch of every reading). Coordinates are the job's declared encoding of x and y (same
unit and scale), |encoded| < 2^coord_bits; ``radius`` is in the same encoded units.

How, and why it costs what it costs:

1. **Pairs are public.** Which user reading meets which reference reading depends only on
   epochs, which the layout holds in the clear. Sorting the reference epochs and two
   ``searchsorted`` calls give, for every user reading a, the range of reference readings b
   with |epoch(a) − epoch(b)| ≤ w; ``np.repeat`` expands them into the pair list — no loop
   per reading. Gathering ``x[a]`` and ``x[b]`` is local: each node indexes its two share
   halves.
2. **Distance, one round.** D = dx² + dy² for all pairs with one inner product (one reshare).
3. **Comparison.** [D − r² < 0] by the carry-only sign circuit, ℓ = bits_needed(max(D_max − r²,
   r²)) with D_max = 2·(2^(coord_bits+1) − 2)²: for 20-bit coordinates ℓ = 44. Epochs are not
   in the comparison any more (they were folded in as r²·de² before), so ℓ depends on the
   coordinates alone and nothing above bit ℓ is computed or sent. Then bit → ring (1 round,
   3-out-of-3 additive: the bits are only summed).
4. **Per (user, epoch) "any".** Pairs are grouped by (user row, user epoch). A group with one
   pair *is* its bit. If some group has k > 1 pairs, those groups only — the pair bits summed
   locally into c ∈ [0, k] — go through one more, small comparison [−c < 0] ("c > 0"):
   reshare (1 round, ℓ' bits), sign with ℓ' = max(2, ⌈log2 k_max⌉ + 1), bit → ring (1 round).
   Which groups have several pairs is public, so no secret decides anything. Why a count
   and not an OR tree over each group's bits: summing is free for groups of any size, and
   the count's comparison costs 2 + ⌈log2(ℓ'−1)⌉ rounds with ℓ' ≈ log2 k_max — with its
   reshare and bit → ring at most 9 more rounds, whatever a device sends — while an OR tree
   needs ⌈log2 k_max⌉ rounds, fewer for a few duplicates but growing with the busiest
   (user, epoch). Groups of one pair, the usual case, skip it altogether.
5. **Per-user sums** of the group bits are local (prefix sums on the share halves).

Rounds (inputs not counted): 1 + (2 + ⌈log2(ℓ−1)⌉) + 1 = 10 for 33 < ℓ ≤ 64 (9 for 17 < ℓ ≤ 33),
plus 1 + (2 + ⌈log2(ℓ'−1)⌉) + 1 only when some (user, epoch) has more than one pair: +4 for
k_max = 2, +5 for k_max ≤ 4, +6 for k_max ≤ 8. Independent of the number of users and points;
``rounds(p, layout)`` reads the public layout to say which.

Guarantee: a conforming device never encodes outside its declared range, so the width above
is exact; a device that lies can corrupt only the rows its readings feed (its user's row, or
every row if it is the reference), never leak anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.fixed_point import bits_needed
from ciphertwin.mpc_nodes.functions.registry import (
    USER,
    FunctionSpec,
    check_known,
    encodings_for,
    param_int,
    register,
)
from ciphertwin.mpc_nodes.functions.segments import group_ids, segment_sums
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import inner, mask_additive, reshare
from ciphertwin.mpc_nodes.protocols.boolean import b2a_additive, ltz, ltz_rounds
from ciphertwin.mpc_nodes.ring import DTYPE, RING_BITS, to_signed
from ciphertwin.mpc_nodes.shares import ArithShare
from ciphertwin.protocol.job_epochs import MAX_EPOCHS, FieldEncoding

REFERENCE = "reference"
INPUTS = {"user_x": USER, "user_y": USER, "ref_x": REFERENCE, "ref_y": REFERENCE}
MAX_PAIRS = 1 << 27
"""More (user reading, reference reading) pairs than this is refused (memory, not secrecy)."""


@dataclass(frozen=True)
class ContactParams:
    radius: int
    coord_bits: int
    window: int

    @property
    def r2(self) -> int:
        return self.radius * self.radius

    @property
    def max_distance(self) -> int:
        """Largest D = dx² + dy² when |coordinate| ≤ 2^coord_bits − 1."""
        d = 2 * ((1 << self.coord_bits) - 1)
        return 2 * d * d

    @property
    def bits(self) -> int:
        """Comparison width ℓ: D − r² lies in [−2^(ℓ−1), 2^(ℓ−1))."""
        return bits_needed(max(self.max_distance - self.r2, self.r2))


def parse(params: Mapping[str, Any]) -> ContactParams:
    check_known(params, {"radius", "coord_bits", "window"})
    p = ContactParams(
        radius=param_int(params, "radius", low=1, high=(1 << 31) - 1),
        coord_bits=param_int(params, "coord_bits", low=1, high=30, default=24),
        window=param_int(params, "window", low=0, high=MAX_EPOCHS, default=0),
    )
    if p.radius >= 1 << (p.coord_bits + 2):
        raise MpcValidationError("radius exceeds any possible distance under coord_bits")
    if p.bits > RING_BITS:
        raise MpcValidationError(
            f"coord_bits={p.coord_bits}, radius={p.radius} need a {p.bits}-bit comparison; "
            f"Z_2^64 allows 64 — lower the bounds or the resolution"
        )
    return p


def check_encodings(p: ContactParams, encodings: Mapping[str, Any]) -> None:
    """x and y in one unit and scale, every declared bound below 2^coord_bits."""
    encs: dict[str, FieldEncoding] = encodings_for("contact_tracing", INPUTS, encodings)
    first = encs["user_x"]
    for name, enc in sorted(encs.items()):
        if (enc.unit, enc.frac) != (first.unit, first.frac):
            raise MpcValidationError(
                f"contact_tracing: {name} is in {enc.unit!r} · 2^-{enc.frac}, user_x in "
                f"{first.unit!r} · 2^-{first.frac}; x and y must share unit and scale")
        if enc.bound >= 1 << p.coord_bits:
            raise MpcValidationError(
                f"contact_tracing: {name} may encode up to {enc.bound}, which does not fit "
                f"coord_bits={p.coord_bits} (|encoded| < {1 << p.coord_bits}); raise coord_bits")


# -- the public pair plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class PairPlan:
    """Which reading meets which, and how pairs group into (user row, user epoch)."""

    user: np.ndarray | None  # (pairs,) index of the user reading; None: pair k is reading k
    ref: np.ndarray        # (pairs,) index of the reference reading
    group: np.ndarray      # (pairs,) group of the pair, groups ordered by (row, epoch)
    group_row: np.ndarray  # (groups,) the group's user row
    sizes: np.ndarray      # (groups,) pairs per group
    users: int

    @property
    def pairs(self) -> int:
        return len(self.ref)

    def at_user(self, x: Any) -> Any:
        """x (a user vector or share) at each pair's user reading."""
        return x if self.user is None else x[self.user]

    @property
    def groups(self) -> int:
        return len(self.sizes)

    @property
    def largest(self) -> int:
        return int(self.sizes.max()) if self.sizes.size else 0

    @property
    def multi(self) -> bool:
        """Does any (user, epoch) have more than one pair (→ the extra comparison runs)?"""
        return self.largest > 1

    @property
    def count_bits(self) -> int:
        """ℓ' for [−c < 0] with c ∈ [0, k_max]: k_max ≤ 2^(ℓ'−1)."""
        return max(2, (self.largest - 1).bit_length() + 1)


def pair_plan(window: int, layout: Layout) -> PairPlan:
    """All (user reading, reference reading) pairs with |epoch difference| ≤ window (public;
    built once per layout and window)."""
    return layout.memo(("contact_tracing/pairs", window), lambda: _build_plan(window, layout))


def _build_plan(window: int, layout: Layout) -> PairPlan:
    if layout.rows.get(REFERENCE) != 1:
        raise MpcValidationError(
            f"contact_tracing needs exactly one twin of role {REFERENCE!r}, "
            f"got {layout.rows.get(REFERENCE, 0)}")
    user_epoch, user_row = layout.epoch[USER], layout.row[USER]
    ref_epoch = layout.epoch[REFERENCE]
    order = np.argsort(ref_epoch, kind="stable")
    sorted_epochs = ref_epoch[order]
    lo = np.searchsorted(sorted_epochs, user_epoch - window, "left")
    hi = np.searchsorted(sorted_epochs, user_epoch + window, "right")
    per_reading = hi - lo
    total = int(per_reading.sum())
    if total > MAX_PAIRS:
        raise MpcValidationError(f"contact_tracing: {total} reading pairs exceed {MAX_PAIRS}; "
                                 "use a smaller window or longer epochs")
    if total == len(user_epoch) and total and int(per_reading.max()) == 1:
        user = None  # every user reading meets exactly one reference reading: no gather
        ref = order[lo]
    else:
        user = np.repeat(np.arange(len(user_epoch), dtype=np.int64), per_reading)
        first_pair = np.cumsum(per_reading) - per_reading
        ref = order[np.arange(total, dtype=np.int64) + np.repeat(lo - first_pair, per_reading)]
    key = user_row * layout.epochs + user_epoch
    keys, group = group_ids(key if user is None else key[user])
    sizes = np.bincount(group, minlength=len(keys))
    return PairPlan(user, ref, group, keys // layout.epochs, sizes, layout.rows[USER])


# -- protocol and reference -------------------------------------------------------------------


async def protocol(party: Party, p: ContactParams, inputs: Mapping[str, ArithShare],
                   layout: Layout) -> np.ndarray:
    plan = pair_plan(p.window, layout)
    dx = plan.at_user(inputs["user_x"]) - inputs["ref_x"][plan.ref]
    dy = plan.at_user(inputs["user_y"]) - inputs["ref_y"][plan.ref]
    dist = await inner(party, [(dx, dx), (dy, dy)], bits=p.bits)
    del dx, dy
    dist = dist.add_public(-p.r2)  # rebinding frees D's arrays before the sign circuit
    close = await ltz(party, dist, p.bits)
    del dist
    hits = await b2a_additive(party, close)  # additive share of each pair's bit
    if plan.multi:
        per_group = segment_sums(hits, plan.group, plan.groups)
        several = plan.sizes > 1
        counts = await reshare(party, mask_additive(party, per_group[several]),
                               bits=plan.count_bits)
        positive = await ltz(party, -counts, plan.count_bits)
        per_group[several] = await b2a_additive(party, positive)
        per_row = segment_sums(per_group, plan.group_row, plan.users)
    else:  # one pair per group: the pair's bit is the group's
        per_row = segment_sums(hits, plan.group_row[plan.group], plan.users)
    return mask_additive(party, per_row)


def _bounded(values: np.ndarray, bits: int, name: str) -> np.ndarray:
    signed = to_signed(values)
    if np.any(np.abs(signed) >= 1 << bits):
        raise MpcValidationError(f"{name}: a value exceeds the declared 2^{bits} bound")
    return signed


def reference(p: ContactParams, inputs: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """The same counts in the clear, by the same public plan."""
    plan = pair_plan(p.window, layout)
    ux, uy, rx, ry = (_bounded(inputs[n], p.coord_bits, n)
                      for n in ("user_x", "user_y", "ref_x", "ref_y"))
    d2 = (plan.at_user(ux) - rx[plan.ref]) ** 2 + (plan.at_user(uy) - ry[plan.ref]) ** 2
    close = (d2 < p.r2).astype(np.float64)
    any_close = np.bincount(plan.group, weights=close, minlength=plan.groups) > 0
    return np.bincount(plan.group_row, weights=any_close, minlength=plan.users).astype(DTYPE)


def decode(_p: ContactParams, opened: np.ndarray) -> list[int]:
    return [int(v) for v in to_signed(opened)]


def rounds(p: ContactParams, layout: Layout | None) -> int:
    """Rounds of :func:`protocol`; without a layout an upper bound (k_max ≤ MAX_PAIRS)."""
    base = 1 + ltz_rounds(p.bits) + 1
    if layout is None:
        return base + 1 + ltz_rounds(bits_needed(MAX_PAIRS)) + 1
    plan = pair_plan(p.window, layout)
    return base + (1 + ltz_rounds(plan.count_bits) + 1 if plan.multi else 0)


CONTACT_TRACING = register(
    FunctionSpec(
        name="contact_tracing",
        function_class="proximity",
        inputs=INPUTS,
        parse=parse,
        protocol=protocol,
        reference=reference,
        decode=decode,
        rounds=rounds,
        check_encodings=check_encodings,
        input_bits=lambda p: p.bits,
        doc=__doc__ or "",
    )
)
