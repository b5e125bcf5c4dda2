"""Logging must follow sys.stderr and never raise: a service cannot die of a log line."""

from __future__ import annotations

import io
import sys

import pytest
import structlog

from ciphertwin.log import configure_logging


def test_logger_follows_current_stderr_after_old_stream_is_closed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = io.StringIO()
    monkeypatch.setattr(sys, "stderr", old)
    configure_logging()
    log = structlog.get_logger("t").bind(component="x")
    monkeypatch.undo()
    old.close()  # what pytest does to a test's captured stream once the test is over
    log.info("still.alive", n=1)
    structlog.get_logger("t").warning("also.alive")
    err = capsys.readouterr().err
    assert "still.alive" in err and "also.alive" in err


def test_logging_to_a_closed_stream_is_dropped_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging()
    dead = io.StringIO()
    dead.close()
    monkeypatch.setattr(sys, "stderr", dead)
    structlog.get_logger("t").error("nobody.listens")  # must not raise
