"""Worker process pools that start clean and never outlive the service that made them.

Why not the default ``fork``: a forked worker is a copy of a running service — it holds the
service's broker socket (the broker keeps delivering into it after the service dies), the
asyncio signal wakeup fd and its handlers (so it ignores SIGTERM), and it blocks forever on
its task queue once its parent is gone. Workers here come from the ``forkserver`` (``spawn``
where there is none): a fresh interpreter that received no descriptor but its own pipes, with
the modules the work needs imported once (``preload``), so each worker forks from it in a few
milliseconds. Each worker then

* leaves SIGINT to its parent (Ctrl-C reaches the whole process group; the service decides)
  and dies on SIGTERM like any process;
* exits as soon as the service dies, even by SIGKILL: on Linux the kernel kills it when its
  parent (the fork server, which itself exits when the service is gone) dies, and everywhere
  a thread watches the service's process sentinel (a pipe end that reads EOF when it dies).

A worker that dies (the OOM killer, an operator's kill) breaks a ProcessPoolExecutor for
good: every later task fails at once. The pool here then starts new workers (logged), so the
service loses the tasks that were running — their callers retry — not its workers.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1
_PRELOAD: set[str] = {"__main__"}  # multiprocessing's own default, kept


def _context(preload: Iterable[str]) -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # One fork server per process: the union of what every pool asked for (only what was
    # asked before it started counts; later pools' workers import the rest themselves).
    _PRELOAD.update(preload)
    ctx.set_forkserver_preload(sorted(_PRELOAD))  # type: ignore[attr-defined]
    return ctx


class WorkerPool(Executor):
    """``workers`` clean worker processes (see the module docstring), started when made."""

    def __init__(self, workers: int, *, preload: Iterable[str] = ()) -> None:
        self.workers = self._max_workers = max(1, workers)  # the latter as ProcessPool names it
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self.restarts = 0
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=_context(self._preload),
                                   initializer=_init_worker)
        try:
            # with a non-fork context, each submit that finds no idle worker starts one
            for future in [pool.submit(os.getpid) for _ in range(self.workers)]:
                future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return pool

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                self.restarts += 1
                log.error("workers.pool_restarted", workers=self.workers, restarts=self.restarts,
                          reason="a worker process died")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start()
                return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def worker_pool(workers: int, *, preload: Iterable[str] = ()) -> WorkerPool:
    """A started pool of ``workers`` clean worker processes that replaces dead ones.

    ``preload``: modules whose functions the pool will run, imported once in the fork server
    instead of in every worker. All workers are started before this returns, so the first
    real task does not pay for the start-up and a service's workers exist while it runs."""
    return WorkerPool(workers, preload=preload)


def _init_worker() -> None:
    """Runs first in every worker: default signals, and death with the service."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _kill_me_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), daemon=True,
                         name="worker:parent-watch").start()


def _kill_me_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        # the C library already loaded in this process (find_library would run ldconfig)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: the sentinel thread still watches
        pass


def _exit_when_gone(sentinel: int) -> None:
    """Block until the service process is gone, then leave at once (no cleanup to run)."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
