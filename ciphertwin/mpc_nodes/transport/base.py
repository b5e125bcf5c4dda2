"""The one interface every transport implements.

A message is addressed by (sender, receiver, round); the job is fixed per transport instance.
Payloads are opaque bytes — shapes are known to both sides from the program. ``latency_s``
imposes a one-way delay on every message (the ``--rtt-ms`` option: latency = rtt / 2), so a
benchmark on one machine shows what a round costs on a real network.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.shares import check_party

MAX_ROUND = 1 << 20


@dataclass(slots=True)
class TransportStats:
    """Counters of what this party put on the wire (payload bytes, before framing)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    wire_bytes_sent: int = 0  # including framing, encryption tags and chunk headers


class Transport(ABC):
    """Send/receive round payloads for one party of one job."""

    def __init__(self, party: int, *, latency_s: float = 0.0) -> None:
        self.party = check_party(party)
        if not latency_s >= 0.0:
            raise MpcValidationError("latency must be a non-negative number of seconds")
        self.latency_s = float(latency_s)
        self.stats = TransportStats()

    def _check_address(self, peer: int, round_: int) -> None:
        check_party(peer)
        if peer == self.party:
            raise MpcValidationError("a party cannot message itself")
        if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ < MAX_ROUND:
            raise MpcValidationError(f"round must be an int in [0, {MAX_ROUND}), got {round_!r}")

    async def send(self, to: int, round_: int, payload: bytes) -> None:
        """Deliver ``payload`` to party ``to`` as its message for ``round_``."""
        self._check_address(to, round_)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise MpcValidationError("payload must be bytes")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(payload)
        await self._send(to, round_, bytes(payload))

    async def recv(self, frm: int, round_: int) -> bytes:
        """Wait for party ``frm``'s message for ``round_``."""
        self._check_address(frm, round_)
        return await self._recv(frm, round_)

    @abstractmethod
    async def _send(self, to: int, round_: int, payload: bytes) -> None: ...

    @abstractmethod
    async def _recv(self, frm: int, round_: int) -> bytes: ...

    async def close(self) -> None:
        """Release network resources (default: nothing to release)."""
