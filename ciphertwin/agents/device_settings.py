"""The device's own settings file: ``[gatekeeper]`` and ``[interaction]`` (TOML).

Why a separate file and not the enrollment bundle: the bundle is what the owner signs off at
enrolment (keys, token, broker); the gatekeeper is the local operator's safety configuration
of the physical object (ranges, models, who may do what when), edited on the device and
re-read at start. ``ciphertwin device run`` reads ``device.toml`` from the device's home (or
``--device-config FILE``); a missing file means no gatekeeper rules and the simulated
thermostat, always awake. Every key is checked at load time, with the key's name in the error.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciphertwin.agents.gatekeeper import Gatekeeper
from ciphertwin.agents.handlers import Handler, load_handler
from ciphertwin.errors import ValidationError

__all__ = ["DEVICE_SETTINGS_FILE", "DeviceSettings", "WakeSchedule", "load_device_settings",
           "parse_device_settings"]

DEVICE_SETTINGS_FILE = "device.toml"
MAX_FILE_BYTES = 256 * 1024
_DAY = 24 * 3600.0


def _seconds(raw: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or not lo <= value <= hi:
        raise ValidationError(f"interaction.{key} must be a number of seconds in [{lo:g}, {hi:g}]")
    return float(value)


@dataclass(frozen=True)
class WakeSchedule:
    """When the device listens: ``sleep_s = 0`` means always awake (presence is then renewed
    every ``window_s / 2`` with ``until = now + window_s``); otherwise awake ``window_s``,
    asleep ``sleep_s``, repeat. ``wakeable``: an ``inbox_wake`` ends a sleep early (the radio
    keeps listening for it, as a low-power wake-up receiver would)."""

    window_s: float = 60.0
    sleep_s: float = 0.0
    wakeable: bool = True
    max_wakes_per_hour: int = 6
    """The device's own cap on early wake-ups (the cloud has one too; this one holds even
    against a cloud that floods the inbox with wake messages)."""

    @property
    def always_awake(self) -> bool:
        return self.sleep_s == 0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> WakeSchedule:
        wakeable = raw.get("wakeable", True)
        if not isinstance(wakeable, bool):
            raise ValidationError("interaction.wakeable must be true or false")
        cap = raw.get("max_wakes_per_hour", 6)
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= 3600:
            raise ValidationError("interaction.max_wakes_per_hour must be 0..3600")
        return cls(_seconds(raw, "window_s", 60.0, 1.0, _DAY),
                   _seconds(raw, "sleep_s", 0.0, 0.0, 7 * _DAY), wakeable, cap)


@dataclass(frozen=True)
class DeviceSettings:
    gatekeeper: Gatekeeper = field(default_factory=Gatekeeper.permissive)
    handler_spec: str = "thermostat"
    handler_params: Mapping[str, Any] = field(default_factory=dict)
    wake: WakeSchedule = field(default_factory=WakeSchedule)

    def handler(self) -> Handler:
        """A fresh handler (imports the entry point: done at start, not at parse time)."""
        return load_handler(self.handler_spec, self.handler_params)


def parse_device_settings(raw: Mapping[str, Any]) -> DeviceSettings:
    unknown = set(raw) - {"gatekeeper", "interaction"}
    if unknown:
        raise ValidationError(f"device settings: unknown section(s) {sorted(unknown)}")
    inter = raw.get("interaction", {})
    if not isinstance(inter, Mapping):
        raise ValidationError("[interaction] must be a table")
    unknown = set(inter) - {"handler", "handler_params", "window_s", "sleep_s", "wakeable",
                            "max_wakes_per_hour"}
    if unknown:
        raise ValidationError(f"interaction: unknown key(s) {sorted(unknown)}")
    spec = inter.get("handler", "thermostat")
    params = inter.get("handler_params", {})
    if not isinstance(spec, str) or not isinstance(params, Mapping):
        raise ValidationError("interaction.handler must be a name, handler_params a table")
    gatekeeper = raw.get("gatekeeper")
    return DeviceSettings(Gatekeeper.from_config(gatekeeper), spec, dict(params),
                          WakeSchedule.from_config(inter))


def load_device_settings(path: str | Path, *, required: bool = False) -> DeviceSettings:
    """Settings from ``path``; defaults if it does not exist (unless ``required``)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if required:
            raise ValidationError(f"device settings file {p} does not exist") from None
        return DeviceSettings()
    if len(data) > MAX_FILE_BYTES:
        raise ValidationError(f"device settings file {p} is larger than {MAX_FILE_BYTES} bytes")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValidationError(f"device settings file {p}: invalid TOML ({exc})") from None
    try:
        return parse_device_settings(raw)
    except ValidationError as exc:
        raise ValidationError(f"{p}: {exc}") from None
