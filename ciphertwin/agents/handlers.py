"""What a device does with an allowed change: the handler, and a simulated thermostat.

A handler is a Python callable ``handler(op, args) -> result`` (sync or async). ``op`` is
``"desired"`` for a desired-state change (``args`` is the whole desired document, already
clamped by the gatekeeper) — its result, if a dict, is the state the device reports — or a
request's operation. A request's attachment, if any, is in ``args["attachment"]`` (bytes).
A handler may also offer ``state() -> dict``: the current state, which the simulator starts
its predictions from and which is reported after requests change it (``volatile``: names of
state fields that change by themselves, e.g. a measured temperature — a change of only those
after a request is not reported).

:class:`SimulatedThermostat` is the built-in actuator (so a demo needs no hardware): a room
whose temperature follows the gatekeeper's thermal model in real time.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

from ciphertwin.agents.gatekeeper.models import MODES, Thermostat
from ciphertwin.agents.gatekeeper.simulator import load_entry_point
from ciphertwin.errors import CipherTwinError, ValidationError

__all__ = ["Handler", "HandlerError", "SimulatedThermostat", "load_handler", "call_handler",
           "handler_state", "BUILTIN_HANDLERS"]

Handler = Callable[[str, dict[str, Any]], Any]


class HandlerError(CipherTwinError):
    """The handler refused or failed an operation (the reason goes back to the requester)."""


async def call_handler(handler: Handler, op: str, args: dict[str, Any]) -> Any:
    result = handler(op, args)
    return await result if inspect.isawaitable(result) else result


def handler_state(handler: Handler) -> dict[str, Any] | None:
    """The handler's current state, if it can tell."""
    state = getattr(handler, "state", None)
    if callable(state):
        value = state()
        return dict(value) if isinstance(value, Mapping) else None
    return None


class SimulatedThermostat:
    """A simulated room and heater driven by :class:`Thermostat`'s physics in real time.

    Operations: ``desired`` (doc with any of target_c, mode, outside_c), ``set_target``
    {target_c}, ``set_mode`` {mode}, ``boost`` (mode boost), ``get_state``,
    ``firmware_update`` {version, attachment} (records the version and image digest)."""

    SETTINGS = ("target_c", "mode", "outside_c")
    volatile = ("room_c", "heater")
    """State that changes by itself: a change of only these is no reason to report."""

    def __init__(self, model: Thermostat | None = None, *, clock: Callable[[], float] = time.time,
                 room_c: float | None = None) -> None:
        self.model = model or Thermostat()
        self.clock = clock
        self._t = clock()
        self._s: dict[str, Any] = {
            "room_c": self.model.initial_c if room_c is None else float(room_c),
            "target_c": self.model.target_c, "mode": "auto", "heater": False,
            "outside_c": self.model.outside_c, "firmware": "1.0",
        }

    def _advance(self) -> None:
        """Integrate the room from the last call to now, one controller step at a time."""
        now = self.clock()
        elapsed = min(max(0.0, now - self._t), 7 * 24 * 3600.0)
        self._t = now
        s, model = self._s, self.model
        if s["outside_c"] != model.outside_c:
            model = Thermostat(**{**model.__dict__, "outside_c": s["outside_c"]})
        while elapsed > 0:
            dt = min(elapsed, model.step_s)
            s["heater"] = model.control(s["room_c"], s["target_c"], s["mode"], s["heater"])
            s["room_c"] = model.step(s["room_c"], s["heater"], dt)
            elapsed -= dt

    def state(self) -> dict[str, Any]:
        self._advance()
        return {**self._s, "room_c": round(self._s["room_c"], 3)}

    def _set(self, settings: Mapping[str, Any]) -> None:
        checked = self.model.setting(self._s, {k: v for k, v in settings.items()
                                               if k in self.SETTINGS})
        for key in self.SETTINGS:
            if key in settings and settings[key] is not None:
                self._s[key] = checked[key]

    def __call__(self, op: str, args: dict[str, Any]) -> Any:
        self._advance()
        try:
            if op == "desired":
                self._set(args)
            elif op == "set_target":
                if "target_c" not in args:
                    raise HandlerError("set_target needs target_c")
                self._set({"target_c": args["target_c"]})
            elif op == "set_mode":
                if args.get("mode") not in MODES:
                    raise HandlerError(f"mode must be one of {', '.join(MODES)}")
                self._set({"mode": args["mode"]})
            elif op == "boost":
                self._set({"mode": "boost"})
            elif op == "firmware_update":
                image = args.get("attachment")
                version = args.get("version")
                if not isinstance(image, bytes) or not isinstance(version, str):
                    raise HandlerError("firmware_update needs a version and an image")
                self._s["firmware"] = version[:32]
                return {"installed": version[:32], "sha256": hashlib.sha256(image).hexdigest()}
            elif op != "get_state":
                raise HandlerError(f"unknown operation {op[:64]!r}")
        except ValidationError as exc:
            raise HandlerError(str(exc)) from None
        return self.state()


def _thermostat(**params: Any) -> SimulatedThermostat:
    return SimulatedThermostat(Thermostat(**params))


BUILTIN_HANDLERS: Mapping[str, Callable[..., Handler]] = {"thermostat": _thermostat}


def load_handler(spec: object, params: Mapping[str, Any] | None = None) -> Handler:
    """``"thermostat"`` (built in, ``params`` = the model's) or an entry point
    ``"module:name"``: a class (or anything given ``params``) is called with ``params`` to
    make the handler; a plain function is the handler itself."""
    params = dict(params or {})
    builtin = BUILTIN_HANDLERS.get(spec) if isinstance(spec, str) else None
    factory: Any = builtin or load_entry_point(spec, "interaction.handler")
    if builtin is not None or inspect.isclass(factory) or params:
        try:
            factory = factory(**params)
        except (TypeError, CipherTwinError) as exc:
            raise ValidationError(f"interaction.handler_params: {exc}") from None
    if not callable(factory):
        raise ValidationError("interaction.handler is not callable as handler(op, args)")
    return factory
