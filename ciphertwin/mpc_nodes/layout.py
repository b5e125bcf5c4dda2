"""The public shape of a job's inputs: which twin and which epoch every reading belongs to.

A node knows, for each reading it opened, the twin (by its position among the job's twins of
that role) and the time the device signed — neither is secret: the cloud stores both in the
clear. So the *layout* is public and identical at the three nodes, and functions work on flat
per-reading share vectors plus this layout instead of padded (twins × points) arrays:

* ``rows[role]``    number of twins with that role (the spec's order), readings or not;
* ``row[role]``     (n,) int64 — reading k's twin row within its role;
* ``epoch[role]``   (n,) int64 — reading k's epoch index in the job window (see
  :mod:`ciphertwin.protocol.job_epochs`);
* ``epochs``        number of epochs in the window.

Readings of a role are ordered by (row, time, device, seq) at every node
(:func:`ciphertwin.mpc_nodes.arrange.arrange`), so the k-th share reading
of node 0, 1 and 2 are shares of the same reading. Nothing is padded: missing readings are
absent, and a function decides from the public layout what they mean (contact tracing: no
contact in that epoch; sum: nothing added; mean: not counted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError


@dataclass(frozen=True)
class Layout:
    rows: Mapping[str, int]
    row: Mapping[str, np.ndarray]
    epoch: Mapping[str, np.ndarray]
    epochs: int
    _memo: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for role, n in self.rows.items():
            r, e = self.row.get(role), self.epoch.get(role)
            if r is None or e is None or r.shape != e.shape or r.ndim != 1:
                raise MpcValidationError(f"layout of role {role!r} is inconsistent")
            if len(r) and (int(r.min()) < 0 or int(r.max()) >= n):
                raise MpcValidationError(f"layout of role {role!r}: a row is out of range")
            if len(e) and (int(e.min()) < 0 or int(e.max()) >= self.epochs):
                raise MpcValidationError(f"layout of role {role!r}: an epoch is out of range")

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """A structure derived from this layout, built once (e.g. contact tracing's pair plan,
        which both ``rounds`` and the protocol need). Layouts are treated as immutable."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def readings(self, role: str) -> int:
        return len(self.row[role])

    def counts(self, role: str) -> np.ndarray:
        """Readings per twin row of ``role`` (public)."""
        return np.bincount(self.row[role], minlength=self.rows[role]).astype(np.int64)

    def digest(self) -> bytes:
        """What the three nodes compare before computing: they must agree on the layout."""
        h = hashlib.sha256(b"ciphertwin/layout/v1")
        h.update(int(self.epochs).to_bytes(8, "little"))
        for role in sorted(self.rows):
            h.update(role.encode() + b"\0" + int(self.rows[role]).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(self.row[role], dtype="<i8").tobytes())
            h.update(np.ascontiguousarray(self.epoch[role], dtype="<i8").tobytes())
        return h.digest()

    @classmethod
    def build(cls, epochs: int, **roles: tuple[int, np.ndarray, np.ndarray]) -> Layout:
        """``Layout.build(epochs, user=(rows, row, epoch), reference=(1, row, epoch))``."""
        return cls({r: int(v[0]) for r, v in roles.items()},
                   {r: np.asarray(v[1], dtype=np.int64) for r, v in roles.items()},
                   {r: np.asarray(v[2], dtype=np.int64) for r, v in roles.items()}, int(epochs))
