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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

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


def worker_pool(workers: int, *, preload: Iterable[str] = ()) -> ProcessPoolExecutor:
    """A started pool of ``workers`` clean worker processes (see the module docstring).

    ``preload``: modules whose functions the pool will run, imported once in the fork server
    instead of in every worker. All workers are started before this returns, so the first
    real task does not pay for the start-up and a service's workers exist while it runs."""
    pool = ProcessPoolExecutor(max(1, workers), mp_context=_context(preload),
                               initializer=_init_worker)
    try:
        # with a non-fork context, each submit that finds no idle worker starts one
        for future in [pool.submit(os.getpid) for _ in range(max(1, workers))]:
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


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
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: the sentinel thread still watches
        pass


def _exit_when_gone(sentinel: int) -> None:
    """Block until the service process is gone, then leave at once (no cleanup to run)."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
