"""`ciphertwin demo interact`: every check of the issue's demo passes, on the embedded broker
(authenticated, per-client ACLs) and on Mosquitto, and `--json` reports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ciphertwin.demo.interact import run_demo

MOSQUITTO = ("127.0.0.1", 1883)
EXPECTED = {
    "desired_accepted_while_device_offline", "offline_device_wakes_and_converges",
    "reported_state_matches_desired", "stale_write_refused",
    "requests_queued_while_device_sleeps", "requests_over_rate_limit_refused",
    "queued_requests_delivered_in_wake_window_and_answered", "revoked_requester_refused",
    "unsafe_setpoint_clamped", "simulator_refuses_predicted_unsafe_change",
    "firmware_with_1_of_3_approvals_refused", "firmware_with_2_of_3_approvals_installed",
    "decision_log_readable_by_owner", "outgoing_reading_redacted",
    "cloud_store_holds_no_plaintext",
}


def test_demo_json_all_checks_true() -> None:
    run = subprocess.run([sys.executable, "-m", "ciphertwin", "demo", "interact", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["ok"] is True
    assert set(report["checks"]) == EXPECTED and all(report["checks"].values()), report
    assert "Traceback" not in run.stderr


@pytest.mark.mosquitto
async def test_demo_checks_pass_on_mosquitto() -> None:
    report = await run_demo(MOSQUITTO)
    assert set(report.checks) == EXPECTED and report.ok, report.checks
