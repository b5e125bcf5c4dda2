"""Function registry: name → (function class, parameter parser, protocol, reference, decoder).

A process token names *function classes* an owner admits (e.g. "proximity"), never code; the
node looks the job's function up here, parses its parameters strictly, and runs the protocol.
The plaintext ``reference`` is the specification the tests hold the protocol to.

Contract for every function:
* ``parse(params)`` → typed, validated parameters (raises :class:`MpcValidationError`);
* ``input_shapes(p)`` is not needed: shapes come with the inputs and are checked by the
  protocol; ``input_names`` lists the named inputs it needs;
* ``input_bits(p)``: the inputs only matter modulo 2^bits (lets conversion send fewer bytes);
* ``protocol(party, p, inputs)`` → masked 3-out-of-3 additive output share (uint64 array);
* ``reference(p, plain_inputs)`` → the same output in the clear (uint64 array);
* ``decode(p, opened)`` → what the receiver reads (ints, floats).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.errors import MpcValidationError, UnknownFunctionError
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.shares import ArithShare

Protocol = Callable[[Party, Any, Mapping[str, ArithShare]], Awaitable[np.ndarray]]
Reference = Callable[[Any, Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class FunctionSpec:
    """Everything the engine and the receiver need to know about one secure function."""

    name: str
    function_class: str
    input_names: tuple[str, ...]
    parse: Callable[[Mapping[str, Any]], Any]
    protocol: Protocol
    reference: Reference
    decode: Callable[[Any, np.ndarray], Any]
    input_bits: Callable[[Any], int] = lambda _p: 64
    rounds: Callable[[Any], int] | None = None
    doc: str = ""


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


def check_inputs(spec: FunctionSpec, inputs: Mapping[str, Any]) -> None:
    """Exactly the declared input names, nothing more, nothing less."""
    got, want = set(inputs), set(spec.input_names)
    if got != want:
        raise MpcValidationError(
            f"{spec.name}: inputs {sorted(got)} do not match the declared {sorted(want)}"
        )


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
