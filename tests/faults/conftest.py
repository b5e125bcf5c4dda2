"""Fixtures of the fault tests: a lab per test, always torn down (every process killed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import MOSQUITTO, Lab


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """``make_lab(broker="embedded", **options)`` → an unbuilt :class:`Lab` in tmp_path;
    every process it started is SIGKILLed at teardown, whatever the test did."""
    labs: list[Lab] = []

    def make(broker: str = "embedded", **options: object) -> Lab:
        if broker == "mosquitto" and MOSQUITTO is None:
            pytest.skip("mosquitto binary is NOT installed: the Mosquitto fault tests need it")
        lab = Lab(tmp_path / f"lab{len(labs)}", broker=broker, **options)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()
