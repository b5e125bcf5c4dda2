"""The cloud (`ciphertwin cloud`) SIGKILLed mid-stream and restarted; a cloud whose store
cannot be opened exits non-zero at once (a supervisor can then act) instead of hanging."""

from __future__ import annotations

import os
import time

import pytest
from fault_checks import check_resumed, finish_and_check

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_cloud_sigkill_mid_stream(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab("embedded")
    lab.build()
    lab.stream(4)
    failures: list[str] = []
    lab.cloud.kill()  # the main process only, as a crash would: its workers must follow
    lab.event("cloud killed")
    # nothing of the dead cloud may keep running (pool workers holding its broker link)
    failures += [f"outlives the SIGKILLed cloud: {o}" for o in lab.wait_no_orphans(3.0)]
    time.sleep(max(0.0, 3.0 - (time.time() - lab.events[-1][0])))
    lab.cloud.start()
    back = lab.event("cloud back")
    try:
        resumed = lab.wait_resumed(back, 20)
    except TimeoutError as exc:
        failures.append(str(exc))
    else:
        check_resumed(lab, resumed, back, failures, "a cloud restart")
    lab.stream(2)
    finish_and_check(lab, failures)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("damage", ["not_a_database", "path_is_a_directory"])
def test_cloud_exits_when_store_cannot_open(make_lab, damage: str) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab("embedded")
    lab.prepare()
    lab.broker.start()
    if damage == "not_a_database":
        lab.store_path.write_bytes(os.urandom(8192))
    else:
        lab.store_path.mkdir(parents=True)
    lab.cloud.ready = None  # it must not become ready
    started = time.monotonic()
    lab.cloud.start()
    assert lab.cloud.proc is not None
    try:
        rc = lab.cloud.proc.wait(10)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: the reported bug
        rc = None
    took = time.monotonic() - started
    output = lab.cloud.output()
    orphans = lab.stop_all()
    assert rc is not None, f"cloud still running 10 s after start with a {damage} store " \
                           f"(it must exit non-zero):\n{output[-2000:]}"
    assert rc != 0, f"cloud exited 0 with a {damage} store:\n{output[-2000:]}"
    assert str(lab.store_path) in output, f"no clear message naming the store:\n{output[-2000:]}"
    assert not orphans, orphans
    print(f"cloud exited {rc} after {took:.1f} s; last output: {output.strip().splitlines()[-1]}")
