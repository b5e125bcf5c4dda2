"""Entry points the node service calls: run a registered function on a job's inputs.

    inputs = await load_inputs(party, "contact_tracing", params, additive_shares)  # 1 round
    share  = await run_function(party, "contact_tracing", params, inputs)
    blob   = seal_output(share, receiver_public_key)          # → receivers/{r}/results/{job}

``run_function`` validates the name, parameters and input names before any message is sent,
so a bad job fails identically and immediately on all three nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.functions import get_function
from ciphertwin.mpc_nodes.functions.registry import check_inputs
from ciphertwin.mpc_nodes.output import OutputShare
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import from_additive_many
from ciphertwin.mpc_nodes.shares import ArithShare


async def load_inputs(
    party: Party, name: str, params: Mapping[str, Any], additive: Mapping[str, np.ndarray]
) -> dict[str, ArithShare]:
    """Node i's additive input shares → replicated shares, in one round for all inputs.

    Only the low ``input_bits`` bits the function needs are sent (e.g. 45 of 64 for contact
    tracing with the default bounds).
    """
    spec = get_function(name)
    parsed = spec.parse(params)
    check_inputs(spec, additive)
    return await from_additive_many(party, dict(additive), bits=spec.input_bits(parsed))


async def run_function(
    party: Party, name: str, params: Mapping[str, Any], inputs: Mapping[str, ArithShare]
) -> OutputShare:
    """Run function ``name`` on replicated inputs; returns this node's output share."""
    spec = get_function(name)
    parsed = spec.parse(params)
    check_inputs(spec, inputs)
    values = await spec.protocol(party, parsed, inputs)
    return OutputShare(party.job, name, party.index, np.asarray(values))


def expected_rounds(name: str, params: Mapping[str, Any], *, with_inputs: bool = True) -> int:
    """Rounds a job will take (independent of the number of users and points)."""
    spec = get_function(name)
    parsed = spec.parse(params)
    assert spec.rounds is not None
    return spec.rounds(parsed) + (1 if with_inputs else 0)
