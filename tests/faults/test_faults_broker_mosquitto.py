"""SIGKILL of Mosquitto (run on the files `ciphertwin broker --emit-mosquitto` writes),
restarted after 3 s and after 30 s."""

from __future__ import annotations

import pytest
from fault_checks import check_broker_outages

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_mosquitto_sigkill_3s_then_30s(make_lab) -> None:  # type: ignore[no-untyped-def]
    # one deployment, two outages: a short one, then one far beyond every back-off
    check_broker_outages(make_lab("mosquitto"), [3, 30])
