"""Watching the cloud's store while it runs: a lost store ends the service (non-zero).

Why: a store can fail after it opened — its file deleted or replaced (SQLite then commits to
a file nobody will open again), the database gone. Ingest logs each failed batch and keeps
the items unacknowledged, which is right for a passing failure (a full disk that is freed,
a database restart); a store that stays lost must instead stop the service, so that its
supervisor restarts it and someone notices — never a process that runs on storing nothing.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from ciphertwin.cloud_twin.store import StoreUnavailable, TwinStore

log = structlog.get_logger(__name__)


async def watch_store(store: TwinStore, *, interval_s: float = 2.0, grace_s: float = 60.0,
                      check_timeout_s: float = 10.0) -> None:
    """Never returns; raises StoreUnavailable when the store is lost for good: at once when
    ``store.check()`` says so, or after its checks kept failing for ``grace_s``."""
    failing_since: float | None = None
    while True:
        await asyncio.sleep(interval_s)
        try:
            async with asyncio.timeout(check_timeout_s):
                await store.check()
        except StoreUnavailable as exc:
            log.error("store.lost", reason=str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure counts; only a lasting one ends us
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("store.check_failed", reason=reason,
                        failing_for_s=round(now - failing_since, 1))
            if now - failing_since >= grace_s:
                log.error("store.lost", reason=reason)
                raise StoreUnavailable(
                    f"the store failed every check for {grace_s:g} s: {reason}") from exc
        else:
            if failing_since is not None:
                log.info("store.recovered", after_s=round(time.monotonic() - failing_since, 1))
            failing_since = None
