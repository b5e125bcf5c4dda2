"""Checks shared by the fault tests: each collects every failure before asserting, so one
run shows all that is wrong (lost items, a slow resume, orphans) at once."""

from __future__ import annotations

import json

from harness import (
    RESUME_TARGET_S, Lab, problems, reconnect_delays, service_outage, still_sending,
)


def finish_and_check(lab: Lab, failures: list[str], *, max_dropped_at_source: int = 0,
                     drain_timeout: float = 60.0) -> None:
    """Stop the sensors, wait until everything is stored, count exactly, stop every
    service gracefully; adds to ``failures`` and asserts that there are none."""
    try:
        lab.finish(drain_timeout)
    except TimeoutError as exc:
        failures.append(str(exc))
    counts = lab.counts()
    failures += problems(counts, max_dropped_at_source=max_dropped_at_source)
    orphans = lab.stop_all()
    failures += [f"outlives its service: {o}" for o in orphans]
    summary = json.dumps(counts.as_dict()["per_device"])
    assert not failures, "\n".join(failures) + f"\ncounts: {summary}\nlogs: {lab.logs}"


def check_resumed(lab: Lab, resumed: dict[str, float], back: float, failures: list[str],
                  what: str) -> None:
    slow = {d: round(v, 2) for d, v in resumed.items() if v > RESUME_TARGET_S}
    if slow:
        failures.append(f"after {what}: devices resumed later than {RESUME_TARGET_S} s: {slow} "
                        f"(bus.reconnected after: {reconnect_delays(lab, back)})")


def check_broker_outages(lab: Lab, outages: list[float]) -> None:
    """Broker SIGKILLed mid-stream and restarted after each of ``outages`` seconds in turn:
    after each, every device sends again within the target and keeps sending; at the end
    nothing is lost or stored twice, and no process outlives its service."""
    lab.build()
    lab.stream(3)
    failures: list[str] = []
    for seconds in outages:
        what = f"a {seconds:g} s broker outage"
        try:
            back, resumed = service_outage(lab, lab.broker, seconds)
        except TimeoutError as exc:
            failures.append(f"after {what}: {exc} (bus.reconnected after: "
                            f"{reconnect_delays(lab, lab.events[-1][0])})")
            continue
        check_resumed(lab, resumed, back, failures, what)
        print(f"{what}: stored again after {resumed}, bus.reconnected after "
              f"{reconnect_delays(lab, back)}")
        lab.stream(3)
        if stalled := still_sending(lab):
            failures.append(f"after {what}: devices stopped sending: {stalled}")
    finish_and_check(lab, failures, drain_timeout=30.0)
