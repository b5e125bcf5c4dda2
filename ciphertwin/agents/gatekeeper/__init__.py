"""The device as gatekeeper: access, manipulator and simulator twins on every incoming change.

Every desired-state change and every request passes, in this order, the *access twin* (may
this principal do this operation now, with these approvals?), the *manipulator twin* (clamp
set-points into their safe ranges) and the *simulator twin* (does the predicted effect stay
in the safe envelope?) before it reaches the actuator. The order matters: access is checked
on what the principal actually sent (approvals sign those arguments), and the simulator
judges the clamped value, the one that would really be applied.

Configured from the device's TOML ``[gatekeeper]`` table (``Gatekeeper.from_config``); with
no table every change is allowed unchanged (``Gatekeeper.permissive()``), as before the
gatekeeper existed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ciphertwin.agents.gatekeeper.access import (
    DESIRED_OP, OWNER, AccessPolicy, Change, sign_image_hex,
)
from ciphertwin.agents.gatekeeper.decisions import Decision, DecisionLog
from ciphertwin.agents.gatekeeper.manipulator import Manipulator
from ciphertwin.agents.gatekeeper.simulator import Simulator
from ciphertwin.errors import ValidationError

__all__ = ["Gatekeeper", "Change", "Decision", "DecisionLog", "DESIRED_OP", "OWNER",
           "sign_image_hex"]


@dataclass(frozen=True)
class Gatekeeper:
    access: AccessPolicy
    manipulator: Manipulator
    simulator: Simulator | None = None

    @classmethod
    def permissive(cls) -> Gatekeeper:
        return cls(AccessPolicy(), Manipulator.from_config(None), None)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None) -> Gatekeeper:
        """From the ``[gatekeeper]`` table (``access``, ``simulator``, ``manipulator``)."""
        if raw is None:
            return cls.permissive()
        if not isinstance(raw, Mapping):
            raise ValidationError("[gatekeeper] must be a table")
        unknown = set(raw) - {"access", "simulator", "manipulator"}
        if unknown:
            raise ValidationError(f"gatekeeper: unknown section(s) {sorted(unknown)}")
        return cls(AccessPolicy.from_config(raw.get("access")),
                   Manipulator.from_config(raw.get("manipulator")),
                   Simulator.from_config(raw.get("simulator")))

    def check(self, change: Change, *, state: Mapping[str, Any] | None = None,
              now: float | None = None) -> Decision:
        """Access → clamp → simulator; ``state`` is the device's current state (for the
        simulator), ``now`` the time the access windows are judged at."""
        now = time.time() if now is None else now

        def decision(allowed: bool, rule: str, code: str, reason: str, **kw: Any) -> Decision:
            return Decision(allowed, change.twin, change.principal, change.op, change.ref,
                            rule, code, reason, time=now, **kw)

        access = self.access.decide(change, now)
        if not access.allowed:
            return decision(False, access.rule, access.code, access.reason, silent=access.silent)
        clamped = self.manipulator.clamp_args(change.args)
        if clamped.problems:
            return decision(False, "manipulator", "invalid", "; ".join(clamped.problems))
        reason = access.reason
        if clamped.changed:
            reason += f"; clamped {', '.join(clamped.changed)}"
        if self.simulator is not None and self.simulator.judges(change.op):
            sim = self.simulator.check(state or {}, clamped.args)
            if not sim.ok:
                return decision(False, "simulator", "unsafe", sim.reason,
                                clamped=clamped.changed)
            reason += f"; {sim.reason}"
        return decision(True, access.rule, "clamped" if clamped.changed else "allowed", reason,
                        args=clamped.args, clamped=clamped.changed)
