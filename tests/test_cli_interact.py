"""The state and interaction commands as users run them, against real services.

A broker (`ciphertwin broker`), the cloud (`ciphertwin cloud`) and a thermostat (`ciphertwin
device run`, its gatekeeper in ``device.toml``) run as their own processes; owner and
requester commands go through ``ciphertwin.cli.main`` in this process, and some as separate
``python -m ciphertwin`` processes. Errors: one ``ciphertwin: error`` line and the documented
exit code — stale version and cloud refusals 2, a device's "no" 1, no answer in time 3.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ports import wait_for_port

from ciphertwin.agents.cli_base import EXIT_FAILED, EXIT_TIMEOUT
from ciphertwin.agents.identity import Identity, save_identity
from ciphertwin.broker.embedded import free_port
from ciphertwin.cli import main
from ciphertwin.config.principals import Principal, add_client

TWIN, DEVICE = "kitchen", "thermo1"
CLOUD_PASSWORD = "pw-cloud-cli-interact-0123456789"
DEVICE_TOML = """
[interaction]
handler = "thermostat"
window_s = 30

[gatekeeper.access]
default = "deny"
[[gatekeeper.access.rule]]
name = "quiet"
effect = "deny"
principals = ["*"]
operations = ["reboot"]
silent = true
[[gatekeeper.access.rule]]
name = "owner"
principals = ["owner"]
operations = ["*"]
[[gatekeeper.access.rule]]
name = "bob"
principals = ["bob"]
operations = ["set_target", "get_state", "desired"]

[gatekeeper.manipulator]
clamp = { target_c = [15.0, 25.0] }
"""


@dataclass
class World:
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[Any]]

    def home(self, name: str) -> Path:
        return self.root / "home" / name

    def cli(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``python -m ciphertwin …`` as its own process."""
        return subprocess.run([sys.executable, "-m", "ciphertwin", "--log-level", "ERROR",
                               *argv], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *argv: str) -> subprocess.Popen[str]:
        """A service or watcher as its own process (its log in ``<root>/<command>.log``)."""
        with (self.root / f"{argv[0]}.log").open("a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ciphertwin", "--log-level",
                                     "WARNING", *argv], env=self.env, stdout=subprocess.PIPE,
                                    stderr=log, text=True)
        self.procs.append(proc)
        return proc

    def started(self, proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
        """Until ``proc`` prints a line containing ``text`` (services say when they run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                assert line, f"exited: {proc.args}"
                if text in line:
                    return
        raise AssertionError(f"{text!r} not printed within {timeout} s by {proc.args}")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "ERROR", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("ciphertwin: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("interact")
    port = free_port()
    operator = Identity.generate("operator", "operator")
    save_identity(operator, root / "operator", None, allow_plaintext=True)
    config = root / "deployment.toml"
    config.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nprefix = "ct/cli{os.urandom(3).hex()}"\n'
        f'[storage]\nsqlite_path = "{root / "cloud.sqlite"}"\n'
        f'[principals]\ncredentials_file = "{root / "clients.json"}"\nhash_iterations = 1000\n'
        f'[processing]\noperator_key = "{root / "operator" / "public.key"}"\n')
    add_client(root / "clients.json",
               Principal.create("cloud", "cloud", CLOUD_PASSWORD, iterations=1000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIPHERTWIN_")}
    env.update(CIPHERTWIN_CONFIG=str(config), CIPHERTWIN_HOME=str(root / "home"),
               CIPHERTWIN_PASSPHRASE="passphrase of the cli interact test",
               CIPHERTWIN_BUNDLE_PASSPHRASE="bundle passphrase, for the installer",
               CIPHERTWIN_CLOUD_PASSWORD=CLOUD_PASSWORD)
    w = World(root, env, [])
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("CIPHERTWIN_")]:
            mp.delenv(key)
        for key, value in env.items():
            if key.startswith("CIPHERTWIN_"):
                mp.setenv(key, value)
        try:
            broker = w.start("broker")
            wait_for_port(port, broker)
            w.started(w.start("cloud", "--workers", "1"), "cloud twin running")
            for argv in (["owner", "init", "--name", "alice"],
                         ["receiver", "init", "--name", "bob"]):
                assert main(["--log-level", "ERROR", *argv]) == 0
            time.sleep(0.6)  # the broker rereads the credentials file at most every 0.5 s
            assert main(["--log-level", "ERROR", "owner", "register", "--name", "alice"]) == 0
            bundle = root / f"{DEVICE}.bundle"
            assert main(["--log-level", "ERROR", "owner", "enroll-device", "--name", "alice",
                         "--twin", TWIN, "--device", DEVICE, "--out", str(bundle)]) == 0
            assert main(["--log-level", "ERROR", "device", "enroll", str(bundle)]) == 0
            (w.home(DEVICE) / "device.toml").write_text(DEVICE_TOML)
            time.sleep(0.6)
            w.started(w.start("device", "run", "--name", DEVICE, "--source",
                              '{"kind": "simulated", "sensor": "temperature", '
                              '"interval_s": 600, "count": 1}'), "Ctrl-C stops")
            yield w
        finally:
            for proc in reversed(w.procs):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def _state(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = _run(capsys, "owner", "get-state", "--name", "alice", "--twin", TWIN,
                          "--json")
    assert code == 0, err
    return json.loads(out)


def _until_state(capsys: pytest.CaptureFixture[str], check: Any, timeout: float = 20
                 ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = _state(capsys)
        if check(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_set_desired_is_applied_reported_and_merged(world: World,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin", TWIN,
                          "--doc", '{"target_c": 30, "mode": "auto"}')
    assert code == 0, err
    version = int(out.split("version ")[1])
    state = _until_state(capsys, lambda s: s["reported"] is not None
                         and s["reported"]["desired_version"] == version)
    # the manipulator clamped 30 to 25: the device reports what it did, the delta shows it
    assert state["reported"]["state"]["target_c"] == 25.0
    assert state["delta"] == {"target_c": 30} and state["in_sync"] is False
    assert state["desired"] == {"doc": {"target_c": 30, "mode": "auto"}, "writer": "alice",
                                "version": version, "time": state["desired"]["time"]}

    # a partial update: merged here on the plaintext, the cloud sees a full new version
    code, out, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin", TWIN,
                          "--merge", '{"target_c": 21.5}')
    assert code == 0, err
    merged = int(out.split("version ")[1])
    assert merged == version + 1
    state = _until_state(capsys, lambda s: s["in_sync"] and s["reported_version"] > 0
                         and s["reported"]["desired_version"] == merged)
    assert state["desired"]["doc"] == {"target_c": 21.5, "mode": "auto"}
    assert state["delta"] == {} and state["reported"]["state"]["target_c"] == 21.5

    # the human view says the same
    code, out, err = _run(capsys, "owner", "get-state", "--name", "alice", "--twin", TWIN)
    assert code == 0, err
    assert f"desired version {merged}" in out and "in sync" in out and "delta: {}" in out


def test_stale_version_and_bad_documents_are_one_line_errors(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin", TWIN,
                          "--doc", '{"target_c": 20}')
    assert code == 0, err
    code, _, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin", TWIN,
                        "--doc", '{"target_c": 19}', "--base-version", "0")
    assert code == 2
    assert "stale: current desired_version is" in _one_line_error(err)
    for doc, why in (('[1, 2]', "want a JSON object"), ('{"a": ', "not JSON"),
                     (json.dumps({"k": "x" * 20_000}), "16384")):
        code, _, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin", TWIN,
                            "--doc", doc)
        assert code == 2 and why in _one_line_error(err), err
    code, _, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin", TWIN,
                        "--doc", "{}", "--base-version", "-1")
    assert code == 2 and "--base-version" in _one_line_error(err)


def test_grant_request_in_separate_processes_then_revoke(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = world.home("bob") / "interact.token"
    code, out, err = _run(capsys, "owner", "grant-interact", "--name", "alice", "--to", "bob",
                          "--holder-key", str(world.home("bob") / "public.key"),
                          "--twin", TWIN, "--rights", "request,desired",
                          "--ops", "set_target,get_state", "--out", str(token_file))
    assert code == 0, err
    token_id = out.strip()
    assert len(token_id) == 32 and "1 device(s)" in err
    owner_key = str(world.home("alice") / "public.key")

    run = world.cli("request", "send", "--name", "bob", "--owner-key", owner_key,
                    "--twin", TWIN, "--op", "set_target", "--args", '{"target_c": 22}',
                    "--wait", "--json")
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    assert outcome["state"] == "answered" and outcome["answer"]["ok"] is True
    assert outcome["answer"]["device"] == DEVICE
    assert outcome["answer"]["result"]["target_c"] == 22

    # desired state through the token's "desired" right: the device checks bob's permit
    code, out, err = _run(capsys, "request", "set-desired", "--name", "bob", "--owner-key",
                          owner_key, "--twin", TWIN, "--doc", '{"target_c": 19.5}')
    assert code == 0, err
    version = int(out.split("version ")[1])
    state = _until_state(capsys, lambda s: s["reported"] is not None
                         and s["reported"]["desired_version"] == version)
    assert state["desired"]["writer"] == "bob" and state["in_sync"] is True
    assert state["reported"]["state"]["target_c"] == 19.5

    # what the token does not allow is refused before anything is sent
    code, _, err = _run(capsys, "request", "send", "--name", "bob", "--owner-key", owner_key,
                        "--twin", TWIN, "--op", "boost", "--wait")
    assert code == 2 and "does not allow operation 'boost'" in _one_line_error(err)

    code, out, err = _run(capsys, "owner", "revoke-interact", "--name", "alice", token_id)
    assert code == 0, err
    run = world.cli("request", "send", "--name", "bob", "--owner-key", owner_key,
                    "--twin", TWIN, "--op", "get_state", "--wait")
    assert run.returncode == 2
    assert "the cloud refused it" in _one_line_error(run.stderr)
    assert "revoked" in run.stderr


def test_device_refusal_exit_1_and_silence_exit_3(world: World,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "request", "send", "--name", "alice", "--twin", TWIN,
                          "--op", "get_state", "--wait")
    assert code == 0, err
    assert "room_c" in json.loads(out)
    code, out, err = _run(capsys, "request", "send", "--name", "alice", "--twin", TWIN,
                          "--op", "warp_drive", "--args", '{"factor": 9}', "--wait")
    assert code == EXIT_FAILED
    line = _one_line_error(err)
    assert f"{DEVICE} refused warp_drive" in line and "unknown operation" in line
    code, _, err = _run(capsys, "request", "send", "--name", "alice", "--twin", TWIN,
                        "--op", "reboot", "--wait", "--timeout", "2")
    assert code == EXIT_TIMEOUT
    assert "no answer within 2 s (last state: delivered)" in _one_line_error(err)


def _rows(proc: subprocess.Popen[str], seconds: float) -> Iterator[dict[str, Any]]:
    """JSON lines ``proc`` prints within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "watch ended"
            yield json.loads(line)


def test_watch_shows_state_changes(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    watch = world.start("watch", "--name", "alice", TWIN, "--json")
    try:
        seen: dict[str, dict[str, Any]] = {}
        for attempt in range(8):  # until the watcher has subscribed (a process starting up)
            target = 18.0 + attempt / 10
            code, out, err = _run(capsys, "owner", "set-desired", "--name", "alice", "--twin",
                                  TWIN, "--doc", json.dumps({"target_c": target, "mode": "auto"}))
            assert code == 0, err
            version = int(out.split("version ")[1])
            for row in _rows(watch, 3.0):
                if row.get("state") in ("desired", "reported") and \
                        row["desired_version"] == version:
                    seen[row["state"]] = row
                if len(seen) == 2:
                    break
            if "desired" in seen:
                break
        if "reported" not in seen:
            seen.update((r["state"], r) for r in _rows(watch, 10.0)
                        if r.get("state") == "reported" and r["answers_desired"] == version)
        assert seen["desired"]["doc"] == {"target_c": target, "mode": "auto"}
        assert seen["desired"]["writer"] == "alice"
        assert seen["reported"]["state_doc"]["target_c"] == target
        assert seen["reported"]["answers_desired"] == version
    finally:
        watch.terminate()
        watch.wait(10)
