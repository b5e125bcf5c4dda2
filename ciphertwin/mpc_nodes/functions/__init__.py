"""Registered secure functions: what a job may compute, with plaintext references."""

from ciphertwin.mpc_nodes.functions.registry import (
    REGISTRY,
    FunctionSpec,
    get_function,
    register,
)

# importing the modules registers their functions
from ciphertwin.mpc_nodes.functions import aggregates as _aggregates  # noqa: E402,F401
from ciphertwin.mpc_nodes.functions import contact_tracing as _contact_tracing  # noqa: E402,F401

__all__ = ["REGISTRY", "FunctionSpec", "get_function", "register"]
