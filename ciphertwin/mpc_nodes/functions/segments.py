"""Grouping readings by public keys: segment sums on ring vectors, group ids.

Sums are linear, so a party sums its two share halves (or its additive share) per group
locally — no round. Done with one prefix sum (uint64 wraps modulo 2^64, exactly the ring) and
a difference at the group boundaries: no Python loop and no ``np.add.at``. Keys come in
sorted order from the layout (readings are ordered by (row, time, …)); unsorted keys are
sorted first, so the result never depends on that promise.
"""

from __future__ import annotations

import numpy as np

from ciphertwin.mpc_nodes.ring import DTYPE
from ciphertwin.mpc_nodes.shares import ArithShare


def is_sorted(keys: np.ndarray) -> bool:
    return bool(keys.size < 2 or np.all(keys[1:] >= keys[:-1]))


def segment_sums(values: np.ndarray, keys: np.ndarray, groups: int) -> np.ndarray:
    """out[..., g] = Σ values[..., k] over k with keys[k] == g (mod 2^64), g < ``groups``.

    ``values`` is (..., n) uint64, ``keys`` (n,) int64 in [0, groups); empty groups give 0.
    """
    if not is_sorted(keys):
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[..., order]
    counts = np.bincount(keys, minlength=groups)
    ends = np.cumsum(counts)
    prefix = np.zeros((*values.shape[:-1], values.shape[-1] + 1), dtype=DTYPE)
    np.cumsum(values, axis=-1, dtype=DTYPE, out=prefix[..., 1:])
    return prefix[..., ends] - prefix[..., ends - counts]


def share_segment_sums(x: ArithShare, keys: np.ndarray, groups: int) -> ArithShare:
    """:func:`segment_sums` on both halves of a replicated share (local)."""
    return ArithShare(x.party, segment_sums(x.own, keys, groups), segment_sums(x.nxt, keys, groups))


def group_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys in increasing order, each element's group index into them)."""
    if is_sorted(keys):
        if keys.size == 0:
            return keys.copy(), np.zeros(0, dtype=np.int64)
        starts = np.concatenate(([True], keys[1:] != keys[:-1]))
        return keys[starts], np.cumsum(starts, dtype=np.int64) - 1
    distinct, inverse = np.unique(keys, return_inverse=True)
    return distinct, inverse.astype(np.int64).reshape(-1)
