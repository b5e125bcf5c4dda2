"""One party of one job: its index, transport, correlated randomness and program counter.

All three parties run the same program, so counting rounds and random draws locally keeps
them in step without extra messages: round r's payloads are tagged r, and draw k of round r
reads PRF counter (r, k). The PRF keys belong to one *run* of the job (``run``: the digest of
the three nodes' fresh nonces, see :mod:`prf`), so a replayed job id never repeats masks.
Every message in these protocols flows from party i to party i-1
(a "reshare"); :meth:`Party.exchange` is that one communication pattern.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from ciphertwin.bus.topics import validate_id
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.prf import CorrelatedRandomness
from ciphertwin.mpc_nodes.shares import PARTIES, check_party
from ciphertwin.mpc_nodes.transport.base import Transport
from ciphertwin.mpc_nodes.wire import pack_words, unpack_words


def check_job_id(job: str) -> str:
    """Job ids become MQTT topic levels and key-derivation labels: the bus's identifier rule."""
    try:
        return validate_id(job, "job id")
    except ValidationError as exc:
        raise MpcValidationError(str(exc)) from None


@dataclass(slots=True)
class RoundLog:
    """What a party did per round (used by the benchmark and the privacy test)."""

    rounds: int = 0
    received: list[bytes] = field(default_factory=list)
    keep_view: bool = False


class Party:
    """The state a protocol step needs: who am I, how do I talk, where is my randomness."""

    def __init__(
        self,
        index: int,
        job: str,
        transport: Transport,
        pair_secret_prev: bytes,
        pair_secret_next: bytes,
        *,
        run: bytes,
        keep_view: bool = False,
    ) -> None:
        self.index = check_party(index)
        self.job = check_job_id(job)
        if transport.party != index:
            raise MpcValidationError("transport belongs to another party")
        self.transport = transport
        self.prev = (index - 1) % PARTIES
        self.next = (index + 1) % PARTIES
        self.rand = CorrelatedRandomness(pair_secret_prev, pair_secret_next, job, run)
        self.round = 0
        self._op = 0
        self.log = RoundLog(keep_view=keep_view)

    def new_op(self) -> tuple[int, int]:
        """Address of the next random draw; every party calls this at the same program points."""
        op = self._op
        self._op += 1
        return self.round, op

    def zero_arith(self, n: int) -> np.ndarray:
        """Fresh additive sharing of zero (this party's part), ``n`` words."""
        return self.rand.zero_arith(*self.new_op(), n)

    def zero_bool(self, n: int) -> np.ndarray:
        """Fresh XOR sharing of zero (this party's part), ``n`` words."""
        return self.rand.zero_bool(*self.new_op(), n)

    async def exchange(
        self,
        send: np.ndarray | None,
        recv_shape: tuple[int, ...] | None,
        *,
        bits: int = 64,
    ) -> np.ndarray | None:
        """One round: send ``send`` (if any) to party i-1, receive ``recv_shape`` from i+1.

        Every party calls this once per round even when it has nothing to send or receive,
        so round numbers — and thereby message tags and PRF counters — stay aligned.
        """
        round_ = self.round
        self.round += 1
        self._op = 0
        self.log.rounds += 1
        # a TaskGroup cancels the other half if sending or receiving fails; callers get the
        # channel's own error (timeout, tampering), not an ExceptionGroup
        try:
            async with asyncio.TaskGroup() as group:
                if send is not None:
                    group.create_task(
                        self.transport.send(self.prev, round_, pack_words(send, bits))
                    )
                received = (
                    group.create_task(self.transport.recv(self.next, round_))
                    if recv_shape is not None
                    else None
                )
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        if received is None or recv_shape is None:
            return None
        payload = received.result()
        if self.log.keep_view:
            self.log.received.append(payload)
        return unpack_words(payload, recv_shape, bits)
