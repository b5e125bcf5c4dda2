"""Running a long-lived service until SIGINT or SIGTERM, with a clean shutdown.

Why cancel rather than set an event: a signal may arrive while the service is still starting
(connecting to the broker, opening its store, starting workers). Cancelling the service's
task unwinds whatever ``async with`` blocks it has entered so far — worker pools shut down,
stores closed — wherever it is, and the process exits 0 as a supervisor expects.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def run_until_signalled(service: Coroutine[Any, Any, int | None], *, name: str) -> int:
    """Run ``service``; on SIGINT/SIGTERM cancel it, let it clean up, and return 0.

    A service that ends by itself returns its own exit code; one that raises propagates
    the error (the CLI turns it into a non-zero exit)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(service)
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()  # a second signal cancels the clean-up too

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return int(await task or 0)
    except asyncio.CancelledError:
        if not received or not task.cancelled():
            raise  # we were cancelled from outside, not by a signal
        log.info(f"{name}.stopped", signal=received[0].name)
        return 0
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
