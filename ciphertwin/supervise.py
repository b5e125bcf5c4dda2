"""Long-running tasks that never die silently.

Why: an exception in a task nobody awaits vanishes (at best a "Task exception was never
retrieved" line when the task is garbage-collected). A device whose send task had died kept
running, reconnecting and filling its outbox for hours without a word. Every long-running
task of a service therefore runs under :func:`supervised`: a failure is logged
(``task.failed``, with the traceback) and the task is started again after a back-off, or —
with ``restart=False`` — the failure is logged and re-raised so that whoever awaits the task
(a service's main coroutine) ends with it and the process exits non-zero.

A task that returns normally has finished its work (a source that ran out of readings): it is
logged (``task.finished``) and not restarted. Cancellation is never a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

Factory = Callable[[], Awaitable[None]]
"""Makes a fresh coroutine for each (re)start; its state of a failed run is not reused."""


async def supervised(name: str, factory: Factory, *, restart: bool = True,
                     backoff_initial: float = 0.1, backoff_max: float = 5.0,
                     healthy_after: float = 30.0) -> None:
    """Run ``factory()`` until it returns; on an exception log it and start it again.

    The delay before a restart doubles from ``backoff_initial`` up to ``backoff_max`` while
    failures follow each other, and starts over once a run lasted ``healthy_after`` seconds
    (a task that fails at once every time must not spin the CPU or flood the log).
    """
    if not 0 < backoff_initial <= backoff_max:
        raise ValueError("need 0 < backoff_initial <= backoff_max")
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if loop.time() - started >= healthy_after:
                failures = 0
            delay = min(backoff_max, backoff_initial * 2**failures)
            log.error("task.failed", task=name, error=f"{type(exc).__name__}: {exc}",
                      restarting=restart, restart_in=round(delay, 3) if restart else None,
                      exc_info=True)
            if not restart:
                raise
            failures += 1
            await asyncio.sleep(delay)
            log.info("task.restarted", task=name, failures=failures)
            continue
        log.info("task.finished", task=name)
        return


def spawn(name: str, factory: Factory, *, restart: bool = True,
          **backoff: float) -> asyncio.Task[None]:
    """``asyncio.create_task`` of :func:`supervised` (the task carries ``name`` too)."""
    return asyncio.create_task(supervised(name, factory, restart=restart, **backoff), name=name)


__all__ = ["Factory", "spawn", "supervised"]
