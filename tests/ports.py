"""Waiting for a TCP port, for tests that start services (brokers, clouds) as processes."""

from __future__ import annotations

import socket
import subprocess
import time


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """Does something accept connections on ``host:port`` right now?"""
    try:
        socket.create_connection((host, port), timeout).close()
        return True
    except OSError:
        return False


def wait_for_port(port: int, proc: subprocess.Popen | None = None, *,  # type: ignore[type-arg]
                  timeout: float = 15.0, what: str = "the broker") -> None:
    """Until ``port`` accepts connections; AssertionError if ``proc`` exits or after
    ``timeout`` s (with the end of its output, when captured)."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read()[-800:] if proc.stdout else ""
            raise AssertionError(f"{what} exited (code {proc.returncode}): {out!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not open port {port} within {timeout} s")
        time.sleep(0.05)
