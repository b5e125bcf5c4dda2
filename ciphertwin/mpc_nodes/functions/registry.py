"""Function registry: name → (function class, parameter parser, protocol, reference, decoder).

A process token names *function classes* an owner admits (e.g. "proximity"), never code; the
node looks the job's function up here, parses its parameters strictly, and runs the protocol.
The plaintext ``reference`` is the specification the protocol is held to (and itself tested
against oracles written straight from the definition).

Inputs are *flat per-reading share vectors* plus the public :class:`Layout` (which twin row and
which epoch every reading belongs to) — no padding anywhere. Contract for every function:

* ``inputs``: input name → the role whose readings feed it (e.g. ``user_x`` → ``"user"``);
  every input is a 1-D vector of ``layout.readings(role)`` elements;
* ``parse(params)`` → typed, validated parameters (raises :class:`MpcValidationError`);
* ``check_encodings(p, {input name: FieldEncoding})``: the job's declared encodings fit the
  parameters (comparison widths, units) — raises :class:`MpcValidationError` before any round;
* ``input_bits(p)``: the inputs only matter modulo 2^bits (lets conversion send fewer bytes);
* ``protocol(party, p, inputs, layout)`` → masked 3-out-of-3 additive output share (uint64),
  one row per twin of role ``"user"``;
* ``reference(p, plain_inputs, layout)`` → the same output in the clear (plain, vectorised);
* ``rounds(p, layout)``: rounds of ``protocol`` (inputs not counted); it may depend on the
  public layout, never on secrets. ``layout=None`` gives an upper bound (for parties that
  do not know the layout, e.g. the cloud's progress report);
* ``decode(p, opened)`` → what the receiver reads (ints, floats, ``None``);
* ``defaults(encodings)`` → parameters implied by the declared encodings ({input: encoding}),
  filled in by the submitter where it gave none (e.g. a sum's ``frac_bits`` is its field's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.errors import MpcValidationError, UnknownFunctionError
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.shares import ArithShare
from ciphertwin.protocol.job_epochs import FieldEncoding

Protocol = Callable[[Party, Any, Mapping[str, ArithShare], Layout], Awaitable[np.ndarray]]
Reference = Callable[[Any, Mapping[str, np.ndarray], Layout], np.ndarray]
Rounds = Callable[[Any, "Layout | None"], int]
CheckEncodings = Callable[[Any, Mapping[str, FieldEncoding]], None]

USER = "user"
"""The role whose twins are the output rows of every function."""


@dataclass(frozen=True)
class FunctionSpec:
    """Everything the engine and the receiver need to know about one secure function."""

    name: str
    function_class: str
    inputs: Mapping[str, str]
    parse: Callable[[Mapping[str, Any]], Any]
    protocol: Protocol
    reference: Reference
    decode: Callable[[Any, np.ndarray], Any]
    rounds: Rounds
    check_encodings: CheckEncodings
    input_bits: Callable[[Any], int] = field(default=lambda _p: 64)
    defaults: Callable[[Mapping[str, FieldEncoding]], dict[str, Any]] = field(
        default=lambda _encodings: {})
    doc: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.inputs))


REGISTRY: dict[str, FunctionSpec] = {}


def register(spec: FunctionSpec) -> FunctionSpec:
    """Add a function; names are unique."""
    if spec.name in REGISTRY:
        raise MpcValidationError(f"function {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def get_function(name: str) -> FunctionSpec:
    """Look a function up by name, with a clear error listing what exists."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise UnknownFunctionError(
            f"unknown function {name!r}; registered: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def check_inputs(spec: FunctionSpec, inputs: Mapping[str, Any],
                 layout: Layout | None = None) -> None:
    """Exactly the declared input names; with a layout, each a 1-D vector over its role's
    readings."""
    got, want = set(inputs), set(spec.inputs)
    if got != want:
        raise MpcValidationError(
            f"{spec.name}: inputs {sorted(got)} do not match the declared {sorted(want)}"
        )
    if layout is None:
        return
    for name, role in spec.inputs.items():
        if role not in layout.rows:
            raise MpcValidationError(f"{spec.name}: the layout has no role {role!r} (input {name})")
        shape, n = tuple(inputs[name].shape), layout.readings(role)
        if shape != (n,):
            raise MpcValidationError(
                f"{spec.name}: input {name} has shape {shape}; role {role!r} has {n} readings"
            )
    if USER not in layout.rows:
        raise MpcValidationError(f"{spec.name}: the layout has no role {USER!r} (the output rows)")


def encodings_for(function: str, names: Iterable[str],
                  encodings: Mapping[str, Any]) -> dict[str, FieldEncoding]:
    """Exactly one :class:`FieldEncoding` per input in ``names`` (dicts are parsed strictly)."""
    want = set(names)
    if not isinstance(encodings, Mapping) or set(encodings) != want:
        got = sorted(encodings) if isinstance(encodings, Mapping) else type(encodings).__name__
        raise MpcValidationError(f"{function}: encodings for {got}, expected {sorted(want)}")
    out = {}
    for name, enc in encodings.items():
        try:
            out[name] = enc if isinstance(enc, FieldEncoding) else FieldEncoding.from_dict(enc)
        except ValidationError as exc:
            raise MpcValidationError(f"{function}: encoding of {name}: {exc}") from None
    return out


# -- strict parameter helpers shared by the functions ---------------------------------------


def param_int(params: Mapping[str, Any], key: str, *, low: int, high: int, default: int | None = None) -> int:
    """An integer parameter in [low, high]."""
    if not isinstance(params, Mapping):
        raise MpcValidationError("params must be a mapping")
    value = params.get(key, default)
    if value is None:
        raise MpcValidationError(f"missing parameter {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MpcValidationError(f"parameter {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_known(params: Mapping[str, Any], allowed: set[str]) -> None:
    """Reject unknown parameter names (typos must not silently fall back to defaults)."""
    if not isinstance(params, Mapping):
        raise MpcValidationError("params must be a mapping")
    extra = set(params) - allowed
    if extra:
        raise MpcValidationError(f"unknown parameters {sorted(extra)}; allowed {sorted(allowed)}")
