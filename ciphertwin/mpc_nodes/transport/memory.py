"""Three parties in one process: messages are handed over through asyncio futures.

For unit tests and the in-memory benchmark. Payloads are copied as bytes, exactly what a
network transport would carry, so byte counts and party isolation are the real ones.
"""

from __future__ import annotations

import asyncio
import os

from ciphertwin.mpc_nodes.errors import MessageTimeoutError, ProtocolError
from ciphertwin.mpc_nodes.prf import PAIR_SECRET_BYTES
from ciphertwin.mpc_nodes.shares import PARTIES
from ciphertwin.mpc_nodes.transport.base import Transport


class MemoryNetwork:
    """Mailboxes for (from, to, round), plus fresh pair secrets for the three parties."""

    def __init__(self, *, latency_s: float = 0.0, timeout_s: float = 30.0) -> None:
        self.latency_s = latency_s
        self.timeout_s = timeout_s
        self._boxes: dict[tuple[int, int, int], asyncio.Future[bytes]] = {}
        # pair_secrets[i] is shared by parties i and i+1 (from os.urandom, as a stand-in for
        # the X25519 agreement the MQTT transport performs).
        self.pair_secrets = [os.urandom(PAIR_SECRET_BYTES) for _ in range(PARTIES)]

    def _box(self, key: tuple[int, int, int]) -> asyncio.Future[bytes]:
        fut = self._boxes.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._boxes[key] = fut
        return fut

    def transport(self, party: int) -> MemoryTransport:
        return MemoryTransport(self, party)

    def secrets_for(self, party: int) -> tuple[bytes, bytes]:
        """(secret shared with party-1, secret shared with party+1) for ``party``."""
        return self.pair_secrets[(party - 1) % PARTIES], self.pair_secrets[party]


class MemoryTransport(Transport):
    """One party's view of a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, party: int) -> None:
        super().__init__(party, latency_s=network.latency_s)
        self.network = network

    async def _send(self, to: int, round_: int, payload: bytes) -> None:
        fut = self.network._box((self.party, to, round_))
        if fut.done():
            raise ProtocolError(f"party {self.party} sent twice to {to} in round {round_}")
        fut.set_result(payload)
        self.stats.wire_bytes_sent += len(payload)

    async def _recv(self, frm: int, round_: int) -> bytes:
        key = (frm, self.party, round_)
        fut = self.network._box(key)
        try:
            payload = await asyncio.wait_for(asyncio.shield(fut), self.network.timeout_s)
        except TimeoutError:
            raise MessageTimeoutError(
                f"party {self.party}: no message from party {frm} for round {round_} "
                f"within {self.network.timeout_s:.1f} s"
            ) from None
        del self.network._boxes[key]
        return payload
