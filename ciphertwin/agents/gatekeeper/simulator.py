"""The simulator twin: predict a change's effect, refuse it if the prediction leaves the
safe envelope.

Why predict instead of only clamping: a set-point can be inside its own range and still be
unsafe given the current state (a low target on a cold day lets the room freeze before
anyone notices). The model is pluggable — an entry point ``"module:Class"`` built with the
``params`` table — so a device ships the model of its own physical object; we ship
:class:`~ciphertwin.agents.gatekeeper.models.Thermostat`.

A refusal's reason carries the prediction (where and when it leaves the envelope, and the
trajectory's extremes): it goes, sealed, to the requester and to the owner's decision log,
never to the device's own log.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ciphertwin.agents.gatekeeper.access import ANY
from ciphertwin.agents.gatekeeper.models import Prediction
from ciphertwin.errors import CipherTwinError, ValidationError

__all__ = ["Model", "Simulator", "SimulationResult", "load_entry_point"]

DEFAULT_MODEL = "ciphertwin.agents.gatekeeper.models:Thermostat"
MAX_HORIZON_S = 7 * 24 * 3600.0
_ENTRY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@runtime_checkable
class Model(Protocol):
    def predict(self, state: Mapping[str, Any], change: Mapping[str, Any],
                horizon_s: float) -> Prediction: ...


def load_entry_point(spec: object, what: str) -> Any:
    """The object named by ``"package.module:name"`` (a ValidationError names what failed)."""
    if not isinstance(spec, str) or not _ENTRY.fullmatch(spec):
        raise ValidationError(f"{what} must be an entry point 'package.module:Name'")
    module_name, attr = spec.split(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValidationError(f"{what}: cannot load {spec!r} ({type(exc).__name__})") from None


@dataclass(frozen=True)
class SimulationResult:
    ok: bool
    reason: str
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per envelope variable: min, max and final predicted value."""


def _range(value: object, what: str) -> tuple[float, float]:
    if (not isinstance(value, list) or len(value) != 2 or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            for v in value) or value[0] > value[1]):
        raise ValidationError(f"{what} must be [low, high] with low <= high")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Simulator:
    model: Model
    horizon_s: float
    envelope: Mapping[str, tuple[float, float]]
    operations: tuple[str, ...] = (ANY,)

    @classmethod
    def from_config(cls, raw: object) -> Simulator | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise ValidationError("[gatekeeper.simulator] must be a table")
        unknown = set(raw) - {"model", "horizon_s", "envelope", "params", "operations"}
        if unknown:
            raise ValidationError(f"gatekeeper.simulator: unknown key(s) {sorted(unknown)}")
        factory = load_entry_point(raw.get("model", DEFAULT_MODEL), "gatekeeper.simulator.model")
        params = raw.get("params", {})
        if not isinstance(params, Mapping):
            raise ValidationError("gatekeeper.simulator.params must be a table")
        try:
            model = factory(**params)
        except (TypeError, CipherTwinError) as exc:
            raise ValidationError(f"gatekeeper.simulator.params: {exc}") from None
        if not isinstance(model, Model):
            raise ValidationError("gatekeeper.simulator.model has no predict(state, change, "
                                  "horizon_s) method")
        horizon = raw.get("horizon_s", 3600)
        if (isinstance(horizon, bool) or not isinstance(horizon, (int, float))
                or not 0 < horizon <= MAX_HORIZON_S):
            raise ValidationError(f"gatekeeper.simulator.horizon_s must be in (0, "
                                  f"{MAX_HORIZON_S:g}]")
        envelope_raw = raw.get("envelope")
        if not isinstance(envelope_raw, Mapping) or not 1 <= len(envelope_raw) <= 64:
            raise ValidationError("gatekeeper.simulator.envelope must be { name = [low, high] }")
        envelope = {str(k): _range(v, f"gatekeeper.simulator.envelope.{k}")
                    for k, v in envelope_raw.items()}
        ops = raw.get("operations", [ANY])
        if not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops):
            raise ValidationError("gatekeeper.simulator.operations must be a list of names")
        return cls(model, float(horizon), envelope, tuple(ops))

    def judges(self, op: str) -> bool:
        return ANY in self.operations or op in self.operations

    def check(self, state: Mapping[str, Any], change: Mapping[str, Any]) -> SimulationResult:
        """Predict ``change`` applied to ``state``; refuse if it leaves the envelope. A model
        that fails (nonsense input, a bug) refuses too: an unpredictable change is unsafe."""
        try:
            prediction = self.model.predict(state, change, self.horizon_s)
            summary, breach = _summarise(prediction, self.envelope)
        except CipherTwinError as exc:
            return SimulationResult(False, f"simulator cannot predict it: {exc}")
        except Exception as exc:  # noqa: BLE001 - a plug-in model's bug must not crash us
            return SimulationResult(False, f"simulator model failed ({type(exc).__name__})")
        if breach:
            return SimulationResult(False, breach, summary)
        extremes = "; ".join(f"{k} {v['min']:.2f}..{v['max']:.2f}" for k, v in summary.items())
        return SimulationResult(True, f"predicted within the envelope over {self.horizon_s:g} s "
                                      f"({extremes})", summary)


def _summarise(prediction: Prediction, envelope: Mapping[str, tuple[float, float]]
               ) -> tuple[dict[str, dict[str, float]], str]:
    """(min/max/final per envelope variable, reason of the first breach or "")."""
    if not isinstance(prediction, Prediction):
        raise ValidationError("model.predict must return a Prediction")
    summary: dict[str, dict[str, float]] = {}
    breach = ""
    for name, (low, high) in envelope.items():
        series = prediction.series.get(name)
        if not series or len(series) != len(prediction.times):
            raise ValidationError(f"the model predicts no {name}")
        if not all(math.isfinite(v) for v in series):
            raise ValidationError(f"the model's {name} is not finite")
        summary[name] = {"min": min(series), "max": max(series), "final": series[-1]}
        if breach:
            continue
        for t, v in zip(prediction.times, series, strict=True):
            if not low <= v <= high:
                breach = (f"predicted {name} leaves the safe envelope [{low:g}, {high:g}]: "
                          f"{v:.2f} after {t:.0f} s (over {prediction.times[-1]:.0f} s: min "
                          f"{summary[name]['min']:.2f}, max {summary[name]['max']:.2f}, final "
                          f"{series[-1]:.2f})")
                break
    return summary, breach
