"""Device agents (`ciphertwin device run`) SIGKILLed mid-stream and restarted: what was in
their outbox is resent, nothing committed is lost, nothing is stored twice."""

from __future__ import annotations

import time

import pytest
from fault_checks import finish_and_check

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KILLS = 2  # per device


@pytest.mark.timeout(180)
def test_device_sigkill_and_restart(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab("embedded")
    lab.build()
    lab.stream(3)
    failures: list[str] = []
    for round_ in range(KILLS):
        for dev in lab.devices.values():  # staggered: never all at the same moment
            dev.kill()
            time.sleep(0.4)
        lab.event(f"devices killed ({round_ + 1})")
        # the killed agents' sensor commands must not outlive them
        failures += [f"outlives its SIGKILLed device: {o}" for o in lab.wait_no_orphans(3.0)]
        lab.start_devices(lab.devices.values())
        back = lab.event("devices back")
        try:
            lab.wait_resumed(back, 15)
        except TimeoutError as exc:
            failures.append(str(exc))
        lab.stream(2)
    # A reading in the pipe between the sensor command and the agent (or read, not yet
    # committed) when the agent died never reaches the outbox: a pipe has no acknowledgement.
    # At most one per kill at this rate; every committed item must arrive.
    finish_and_check(lab, failures, max_dropped_at_source=KILLS * len(lab.devices))
