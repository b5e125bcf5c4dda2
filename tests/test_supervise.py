"""The supervision helper: a failing task is logged and restarted (or, if asked, ends the
service), a task that finishes is not restarted, cancellation is not a failure."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from ciphertwin.supervise import spawn, supervised


async def test_failing_task_is_logged_and_restarted() -> None:
    runs: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        done.set()
        await asyncio.Event().wait()  # third run stays up

    with capture_logs() as logs:
        task = spawn("test:flaky", flaky, backoff_initial=0.01, backoff_max=0.02)
        await asyncio.wait_for(done.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert [e["error"] for e in failed] == ["RuntimeError: boom 1", "RuntimeError: boom 2"]
    assert all(e["task"] == "test:flaky" and e["exc_info"] and e["restarting"] for e in failed)
    assert [e["failures"] for e in logs if e["event"] == "task.restarted"] == [1, 2]
    assert len(runs) == 3 and task.cancelled()


async def test_without_restart_the_failure_is_logged_and_propagates() -> None:
    async def broken() -> None:
        raise KeyError("bug")

    with capture_logs() as logs, pytest.raises(KeyError):
        await supervised("test:broken", broken, restart=False)
    assert [(e["event"], e["restarting"]) for e in logs] == [("task.failed", False)]


async def test_a_task_that_finishes_is_not_restarted() -> None:
    runs = 0

    async def short() -> None:
        nonlocal runs
        runs += 1

    with capture_logs() as logs:
        await supervised("test:short", short)
    assert runs == 1
    assert [e["event"] for e in logs] == ["task.finished"]


async def test_backoff_grows_and_is_capped() -> None:
    stamps: list[float] = []
    loop = asyncio.get_running_loop()

    async def always_fails() -> None:
        stamps.append(loop.time())
        raise OSError("down")

    with capture_logs() as logs:
        task = spawn("test:down", always_fails, backoff_initial=0.02, backoff_max=0.08)
        while len(stamps) < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    delays = [e["restart_in"] for e in logs if e["event"] == "task.failed"][:5]
    assert delays == [0.02, 0.04, 0.08, 0.08, 0.08]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(g >= d * 0.9 for g, d in zip(gaps, delays, strict=False))
