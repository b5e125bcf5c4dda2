"""Logging set-up: structlog, console output for people, JSON lines for machines."""

from __future__ import annotations

import logging
import sys

import structlog


class StderrLogger:
    """A structlog logger that writes to whatever ``sys.stderr`` is at the time of the call.

    Why: binding the stream at configuration time breaks as soon as it is swapped (pytest's
    capture, a daemon redirecting its streams) and the old one is closed; a service must
    never die because a log line could not be written, so write errors are dropped.
    """

    def msg(self, message: str) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
        except (ValueError, OSError):  # closed or broken stream: losing a log line is fine
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _stderr_logger_factory(*_args: object) -> StderrLogger:
    return StderrLogger()


def configure_logging(json: bool = False, level: str = "INFO") -> None:
    """Configure structlog and stdlib logging once per process."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
