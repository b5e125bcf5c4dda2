"""Entry points the node service calls: run a registered function on a job's inputs.

    inputs, layout, labels = arrange(job_spec, opened)                   # mpc_nodes.arrange
    check_encodings(name, params, {input: job_fields[binding field]})    # before any round
    shared = await load_inputs(party, name, params, inputs)              # 1 round
    share  = await run_function(party, name, params, shared, layout)
    blob   = seal_output(share, receiver_public_key)       # → receivers/{r}/results/{job}

Functions work on flat per-reading share vectors and the public :class:`Layout`; both calls
validate the name, the parameters, the input names and their lengths against the layout before
any message is sent, so a bad job fails identically and immediately on all three nodes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from ciphertwin.mpc_nodes.functions import get_function
from ciphertwin.mpc_nodes.functions.registry import check_inputs
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.output import OutputShare
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import from_additive_many
from ciphertwin.mpc_nodes.shares import ArithShare


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
HEAP_ARRAY_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
KEEP_FREE_BYTES = (1 << 31) - 1  # the largest trim threshold mallopt takes (2 GiB)


@functools.cache
def reuse_freed_memory() -> bool:
    """Let this process reuse freed memory for the next array (glibc; once per process).

    Every protocol step makes arrays of MBs to tens of MBs. By default glibc maps most of
    them fresh and unmaps or trims them when freed, so the next one page-faults in newly
    zeroed pages again — at 5 M pairs that churn was more than half of the CPU time. Here
    arrays up to 32 MiB come from the heap and up to 2 GiB of freed heap is kept, so they are
    reused (a 500 k-pair job entirely; bit planes and most temporaries at 5 M); larger arrays
    stay fresh mappings, whose transparent huge pages make a first touch cheaper than a
    grown heap does (disabling mmap entirely made the first 5 M-pair job slower here).
    Memory stays flat at the largest job. A no-op (False) where mallopt is unavailable.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, HEAP_ARRAY_BYTES))
            and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES)))


def check_encodings(name: str, params: Mapping[str, Any], encodings: Mapping[str, Any]) -> None:
    """The job's declared field encodings, by input name, fit function ``name``'s parameters."""
    spec = get_function(name)
    spec.check_encodings(spec.parse(params), encodings)


async def load_inputs(
    party: Party, name: str, params: Mapping[str, Any], additive: Mapping[str, np.ndarray],
    layout: Layout | None = None,
) -> dict[str, ArithShare]:
    """Node i's additive input shares → replicated shares, in one round for all inputs.

    Only the low ``input_bits`` bits the function needs are sent (e.g. 44 of 64 for contact
    tracing with 20-bit coordinates). With a layout the vectors' lengths are checked first.
    """
    spec = get_function(name)
    parsed = spec.parse(params)
    check_inputs(spec, additive, layout)
    reuse_freed_memory()
    return await from_additive_many(party, dict(additive), bits=spec.input_bits(parsed))


async def run_function(
    party: Party, name: str, params: Mapping[str, Any], inputs: Mapping[str, ArithShare],
    layout: Layout,
) -> OutputShare:
    """Run function ``name`` on replicated inputs; returns this node's output share."""
    spec = get_function(name)
    parsed = spec.parse(params)
    check_inputs(spec, inputs, layout)
    values = await spec.protocol(party, parsed, inputs, layout)
    return OutputShare(party.job, name, party.index, np.asarray(values))


def expected_rounds(name: str, params: Mapping[str, Any], layout: Layout | None = None, *,
                    with_inputs: bool = True) -> int:
    """Rounds a job will take; never grows with the number of users or points.

    It may depend on the public layout (contact tracing adds a small comparison when some
    user has several reading pairs in one epoch); without a layout it is an upper bound.
    """
    spec = get_function(name)
    return spec.rounds(spec.parse(params), layout) + (1 if with_inputs else 0)
