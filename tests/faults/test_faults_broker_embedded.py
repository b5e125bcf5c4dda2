"""SIGKILL of the embedded broker (`ciphertwin broker`), restarted after 3 s and after 30 s."""

from __future__ import annotations

import pytest
from fault_checks import check_broker_outage

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seconds", [3, 30])
def test_embedded_broker_sigkill(make_lab, seconds: int) -> None:  # type: ignore[no-untyped-def]
    check_broker_outage(make_lab("embedded"), seconds)
