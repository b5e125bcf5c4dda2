"""A byte budget for a queue.

Counting messages does not bound memory when one message may hold 96 KiB and another 80 MiB,
so the bus client's per-subscription queues and the cloud's ingest queue also hold at most so
many bytes: the bus client drops what does not fit (:meth:`ByteBudget.try_take`, from paho's
callback, which must not block), the ingest waits for room (:meth:`ByteBudget.take`,
backpressure).
"""

from __future__ import annotations

import asyncio

from ciphertwin.errors import ValidationError


class ByteBudget:
    """``used`` bytes of ``limit``; one message always fits into an empty budget (else a
    message larger than the budget could never pass), so at most ``limit`` plus one message
    is ever held."""

    __slots__ = ("limit", "used", "_freed")

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError(f"byte budget must be a positive int, got {limit!r}")
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    def try_take(self, size: int) -> bool:
        """Take ``size`` bytes if they fit; False (and nothing taken) if they do not."""
        if self.used and self.used + size > self.limit:
            return False
        self.used += size
        return True

    async def take(self, size: int) -> None:
        """Wait until ``size`` bytes fit, then take them."""
        while not self.try_take(size):
            self._freed.clear()
            await self._freed.wait()

    def release(self, size: int) -> None:
        """Give back what a taken message held (once it left the queue)."""
        self.used = max(0, self.used - size)
        self._freed.set()


__all__ = ["ByteBudget"]
