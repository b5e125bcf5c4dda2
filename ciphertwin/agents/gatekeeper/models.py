"""Simulation models for the simulator twin; ``Thermostat`` is the one we ship.

A model is any class (named by an entry point ``"module:Class"``) built with its parameters
as keyword arguments and offering ``predict(state, change, horizon_s) -> Prediction``. It
should be pure and fast: it runs on the device before every change.

The thermostat is a *lumped* (single-node) thermal model of a room heated by an on/off heater
under hysteresis control — the textbook first-order model of a room's air and fabric as one
heat capacity:

    C · dT/dt = (T_out − T) · C/τ + P · on(t)      i.e.   dT/dt = (T_out − T)/τ + P·on/C

* T      room temperature (°C), the state ``room_c``;
* T_out  outside temperature (°C), ``outside_c``;
* τ      time constant of the envelope (s): C times the thermal resistance to the outside
         (``tau_s``; ~3 h for an ordinary room);
* C      heat capacity of the room's air, furniture and inner walls (J/K, ``capacity_j_per_k``);
* P      heater power (W, ``power_w``), ``on`` ∈ {0, 1}.

Control (``mode``): ``auto`` switches the heater on below ``target_c − h/2`` and off above
``target_c + h/2`` (hysteresis h = ``hysteresis_c``; between the two it keeps its state),
``off`` never heats, ``boost`` always heats. With ``on`` constant over a step dt the
equation has the exact solution

    T(t + dt) = T∞ + (T(t) − T∞) · exp(−dt/τ),   T∞ = T_out + P·τ/C · on

which we use (stable for any step, no integration error between switchings); the controller
is evaluated every ``step_s`` seconds, as a real thermostat samples its sensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ciphertwin.errors import ValidationError

__all__ = ["Prediction", "Thermostat", "MODES"]

MODES = ("auto", "off", "boost")
MAX_STEPS = 100_000


@dataclass(frozen=True)
class Prediction:
    """Sampled trajectories: ``series[name][i]`` is the value at ``times[i]`` (s from now)."""

    times: list[float]
    series: dict[str, list[float]] = field(default_factory=dict)


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"{what} must be a finite number")
    return float(value)


@dataclass
class Thermostat:
    """Room + heater + hysteresis thermostat (see the module doc for the physics)."""

    tau_s: float = 3 * 3600.0
    capacity_j_per_k: float = 1.0e6
    power_w: float = 3000.0
    outside_c: float = 5.0
    hysteresis_c: float = 0.5
    step_s: float = 30.0
    initial_c: float = 20.0
    target_c: float = 21.0

    def __post_init__(self) -> None:
        for name in ("tau_s", "capacity_j_per_k", "step_s"):
            if _finite(getattr(self, name), name) <= 0:
                raise ValidationError(f"thermostat {name} must be > 0")
        for name in ("power_w", "hysteresis_c"):
            if _finite(getattr(self, name), name) < 0:
                raise ValidationError(f"thermostat {name} must be >= 0")
        for name in ("outside_c", "initial_c", "target_c"):
            _finite(getattr(self, name), name)

    # -- physics ---------------------------------------------------------------------------
    def settle_c(self, on: bool) -> float:
        """T∞: where the room tends with the heater constantly on (or off)."""
        return self.outside_c + (self.power_w * self.tau_s / self.capacity_j_per_k if on else 0.0)

    def step(self, room_c: float, on: bool, dt: float) -> float:
        """Exact solution over ``dt`` seconds with the heater state held."""
        settle = self.settle_c(on)
        return settle + (room_c - settle) * math.exp(-dt / self.tau_s)

    def control(self, room_c: float, target_c: float, mode: str, on: bool) -> bool:
        """The thermostat's decision for the next step (hysteresis around the target)."""
        if mode == "off":
            return False
        if mode == "boost":
            return True
        if room_c < target_c - self.hysteresis_c / 2:
            return True
        if room_c > target_c + self.hysteresis_c / 2:
            return False
        return on

    # -- the simulator's interface ------------------------------------------------------------
    def setting(self, state: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
        """Current state with the change applied: room_c, target_c, mode, heater, outside_c."""
        merged = {**state, **{k: v for k, v in change.items() if v is not None}}
        mode = merged.get("mode", "auto")
        if mode not in MODES:
            raise ValidationError(f"mode must be one of {', '.join(MODES)}")
        return {
            "room_c": _finite(merged.get("room_c", self.initial_c), "room_c"),
            "target_c": _finite(merged.get("target_c", self.target_c), "target_c"),
            "outside_c": _finite(merged.get("outside_c", self.outside_c), "outside_c"),
            "mode": mode,
            "heater": bool(merged.get("heater", False)),
        }

    def predict(self, state: Mapping[str, Any], change: Mapping[str, Any],
                horizon_s: float) -> Prediction:
        """Room temperature and heater state every ``step_s`` over the horizon, starting from
        ``state`` with ``change`` applied (ValidationError if they make no sense)."""
        s = self.setting(state, change)
        model = self if s["outside_c"] == self.outside_c else _with(self, outside_c=s["outside_c"])
        steps = min(MAX_STEPS, max(1, math.ceil(horizon_s / self.step_s)))
        dt = horizon_s / steps
        room, on = s["room_c"], s["heater"]
        times, rooms, heater = [0.0], [room], [float(on)]
        for i in range(1, steps + 1):
            on = model.control(room, s["target_c"], s["mode"], on)
            room = model.step(room, on, dt)
            times.append(i * dt)
            rooms.append(room)
            heater.append(float(on))
        return Prediction(times, {"room_c": rooms, "heater": heater})


def _with(model: Thermostat, **changes: float) -> Thermostat:
    return Thermostat(**{**model.__dict__, **changes})
