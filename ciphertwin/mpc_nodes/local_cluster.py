"""Run the three parties of a job as asyncio tasks in one process (tests, benchmark, demo)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.prf import new_run_nonce, run_digest
from ciphertwin.mpc_nodes.shares import PARTIES
from ciphertwin.mpc_nodes.transport.memory import MemoryNetwork

In = TypeVar("In")
Out = TypeVar("Out")


def memory_parties(
    job: str = "job-local", *, latency_s: float = 0.0, timeout_s: float = 30.0, keep_view: bool = False
) -> list[Party]:
    """Three parties wired through a fresh :class:`MemoryNetwork`."""
    net = MemoryNetwork(latency_s=latency_s, timeout_s=timeout_s)
    run = run_digest([new_run_nonce() for _ in range(PARTIES)])
    return [
        Party(i, job, net.transport(i), *net.secrets_for(i), run=run, keep_view=keep_view)
        for i in range(PARTIES)
    ]


async def run_parties(
    parties: Sequence[Party],
    program: Callable[[Party, In], Awaitable[Out]],
    inputs: Sequence[In],
) -> list[Out]:
    """Run ``program(party_i, inputs[i])`` for the three parties concurrently.

    If one party fails, the others are cancelled and the first error is raised, so a test
    never hangs on a peer that already gave up.
    """
    tasks = [asyncio.create_task(program(p, x)) for p, x in zip(parties, inputs, strict=True)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def simulate(
    program: Callable[[Party, In], Awaitable[Out]],
    inputs: Sequence[In],
    *,
    job: str = "job-local",
    keep_view: bool = False,
) -> tuple[list[Out], list[Party]]:
    """Synchronous wrapper: fresh parties, run ``program`` on each, return outputs and parties."""

    async def main() -> tuple[list[Out], list[Party]]:
        parties = memory_parties(job, keep_view=keep_view)
        return await run_parties(parties, program, inputs), parties

    return asyncio.run(main())
