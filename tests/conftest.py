"""Shared fixtures: detection of the real services tests may need."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from ports import port_open



MOSQUITTO = ("127.0.0.1", 1883)
POSTGRES = ("127.0.0.1", 5432)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with a loud reason, tests whose external service is not running."""
    have_mosquitto = port_open(MOSQUITTO[1], MOSQUITTO[0], 0.5)
    have_postgres = port_open(POSTGRES[1], POSTGRES[0], 0.5)
    for item in items:
        if "mosquitto" in item.keywords and not have_mosquitto:
            item.add_marker(pytest.mark.skip(reason="Mosquitto is NOT running on 127.0.0.1:1883"))
        if "postgres" in item.keywords and not have_postgres:
            item.add_marker(pytest.mark.skip(reason="PostgreSQL is NOT running on 127.0.0.1:5432"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"mosquitto 127.0.0.1:1883: {'up' if port_open(MOSQUITTO[1], MOSQUITTO[0], 0.5) else 'ABSENT - tests skipped'}",
        f"postgres 127.0.0.1:5432: {'up' if port_open(POSTGRES[1], POSTGRES[0], 0.5) else 'ABSENT - tests skipped'}",
    ]


_PRISTINE_LOGGING = structlog.get_config()
"""structlog's configuration before any test ran (conftest is imported first)."""


@pytest.fixture(autouse=True)
def _logging_config_stays_with_its_test() -> Iterator[None]:
    """A test that runs a CLI in-process configures structlog (level WARNING, say); without
    this the next test in the same worker would inherit it — and `capture_logs` would see no
    info events, depending on which files a worker happened to run first."""
    structlog.configure(**_PRISTINE_LOGGING)  # also undoes what a leftover of an earlier
    yield                                      # test (a thread, a task) configured late
    structlog.configure(**_PRISTINE_LOGGING)
