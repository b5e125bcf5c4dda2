"""Decision records: what the gatekeeper did with each incoming change, and why.

Why the decision log is an ordinary data item (type ``decision``) sent through the device's
outbox: it is then signed by the device, encrypted for the owner, stored durably by the cloud
and readable with ``owner history`` / ``TwinReader`` — an audit trail the cloud cannot read or
forge, with no new machinery. The reason may contain plaintext (a clamped set-point, a
prediction), so it is sealed like any reading and never written to the device's log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ciphertwin.agents.sources import MAX_STRING_CHARS, Reading
from ciphertwin.errors import CipherTwinError

__all__ = ["Decision", "DecisionLog", "DECISION_TYPE", "ALLOW", "CLAMP", "REFUSE"]

log = structlog.get_logger(__name__)

DECISION_TYPE = "decision"
ALLOW, CLAMP, REFUSE = "allow", "clamp", "refuse"


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_STRING_CHARS else text[:MAX_STRING_CHARS - 1] + "…"


@dataclass(frozen=True)
class Decision:
    """The gatekeeper's verdict on one change. ``args`` is what may reach the actuator (the
    clamped copy); ``silent`` refusals get no answer."""

    allowed: bool
    twin: str
    principal: str
    op: str
    ref: str
    rule: str
    code: str
    reason: str
    args: Mapping[str, Any] = field(default_factory=dict)
    clamped: tuple[str, ...] = ()
    silent: bool = False
    time: float = field(default_factory=time.time)

    @property
    def action(self) -> str:
        if not self.allowed:
            return REFUSE
        return CLAMP if self.clamped else ALLOW

    def as_reading(self) -> Reading:
        """The decision as a reading of type ``decision`` (flat, bounded text values)."""
        values: dict[str, Any] = {
            "action": self.action, "allowed": self.allowed, "principal": _text(self.principal),
            "op": _text(self.op), "ref": _text(self.ref), "rule": _text(self.rule),
            "code": _text(self.code), "reason": _text(self.reason), "silent": self.silent,
        }
        if self.clamped:
            values["clamped"] = _text(",".join(self.clamped))
        return Reading(DECISION_TYPE, values, self.time)

    def log_fields(self) -> dict[str, Any]:
        """What the device's own log may say: no reason text, no arguments."""
        return {"action": self.action, "rule": self.rule, "code": self.code, "op": self.op,
                "principal": self.principal, "ref": self.ref}


Record = Callable[[Reading], Awaitable[Any]]


class DecisionLog:
    """Appends decisions through ``record`` (normally ``DeviceAgent.record``)."""

    def __init__(self, record: Record) -> None:
        self._record = record

    async def append(self, decision: Decision) -> None:
        log.info("gatekeeper.decision", **decision.log_fields())
        try:
            await self._record(decision.as_reading())
        except CipherTwinError as exc:  # outbox full, say: the change itself is not undone
            log.error("gatekeeper.decision_not_recorded", ref=decision.ref,
                      error=f"{type(exc).__name__}: {exc}")
