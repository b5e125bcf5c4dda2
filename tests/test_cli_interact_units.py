"""Interaction CLI pieces that need no services: lazy registration, the owner's device book,
approval and image-signature files, and bad input refused in one line before anything is
sent (the end-to-end runs are in test_cli_interact.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ciphertwin.agents.bundle import BrokerConnection
from ciphertwin.agents.identity import Identity, load_public
from ciphertwin.agents.interact_cli import read_approval
from ciphertwin.agents.owner import DEVICE_BOOK_FILE, DeviceBook, OwnerAgent
from ciphertwin.agents.requester import Requester
from ciphertwin.cli import build_parser, main
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import issue_interact_token
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.twin_requests import verify_approval, verify_image

RID = "0123456789abcdef"


def _choices(parser, *path: str) -> set[str]:  # type: ignore[no-untyped-def]
    for name in path:
        parser = parser._subparsers._group_actions[0].choices[name]
    return set(parser._subparsers._group_actions[0].choices)


def test_commands_are_registered_and_their_modules_imported_only_when_run() -> None:
    owner = _choices(build_parser(), "owner")
    assert {"set-desired", "get-state", "grant-interact", "revoke-interact"} <= owner
    assert {"send", "approve", "new-id", "sign-image", "set-desired", "get-state"} <= \
        _choices(build_parser(), "request")
    assert "interact" in _choices(build_parser(), "demo")
    code = ("import sys; from ciphertwin.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('ciphertwin.agents.requester', 'ciphertwin.agents.owner', "
            "'ciphertwin.protocol.twin_requests', 'ciphertwin.agents.interaction', "
            "'ciphertwin.demo.interact') if m in sys.modules]; "
            "sys.exit(str(heavy) if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# --- the owner's device book ------------------------------------------------------------------


def _owner(home: Path | None) -> OwnerAgent:
    no_bus: Any = None  # the book is offline: nothing here touches the bus
    return OwnerAgent(Identity.generate("alice", "owner"), no_bus, home=home)


def _enroll(owner: OwnerAgent, twin: str, device: str) -> None:
    owner.enroll_device(twin, device, BrokerConnection("127.0.0.1", 1883, device, "pw"))


def test_device_book_keeps_public_keys_of_enrolled_devices(tmp_path: Path) -> None:
    owner = _owner(tmp_path)
    _enroll(owner, "home", "thermo")
    _enroll(owner, "home", "valve")
    _enroll(owner, "car", "tracker")
    path = tmp_path / DEVICE_BOOK_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    book = DeviceBook(path)  # what the next `ciphertwin owner …` reads
    assert [(d.device, d.twin) for d in book.devices_of(["home"])] == [("thermo", "home"),
                                                                      ("valve", "home")]
    assert book.twins() == {"home", "car"}
    assert book.devices_of(["home"]) == owner.devices.devices_of(["home"])
    text = path.read_text()
    assert "secret" not in text and "password" not in text and "pw" not in json.loads(text)


def test_damaged_device_book_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / DEVICE_BOOK_FILE
    for content in ('{"devices": [{"twin": "t", "device": "d", "pre_pk": "00", '
                    '"verify_key": "00"}]}', "[1]", "not json"):
        path.write_text(content)
        path.chmod(0o600)
        with pytest.raises(ValidationError, match="not a device book"):
            DeviceBook(path)


async def test_grant_interact_refuses_a_twin_without_enrolled_devices(tmp_path: Path) -> None:
    owner = _owner(tmp_path)
    _enroll(owner, "home", "thermo")
    bob = Identity.generate("bob", "receiver")
    with pytest.raises(ValidationError, match="no enrolled device of twin"):
        await owner.grant_interact("bob", bob.signing.verify_key, ["home", "garage"],
                                   ["request"])


def test_requester_refuses_locally_what_its_token_does_not_allow() -> None:
    alice, bob = Identity.generate("alice", "owner"), Identity.generate("bob", "receiver")
    token = issue_interact_token(alice.signing, "bob", bob.signing.verify_key, ["home"],
                                 ["request"], operations=["get_state"])
    no_bus: Any = None
    r = Requester(bob, no_bus, token, alice.pre.public, alice.signing.verify_key)
    r._check_allowed("home", "request", "get_state")
    for twin, right, op, why in (("car", "request", "get_state", "does not name twin"),
                                 ("home", "desired", None, "no 'desired' right"),
                                 ("home", "request", "reboot", "does not allow operation")):
        with pytest.raises(ValidationError, match=why):
            r._check_allowed(twin, right, op)


# --- approval and image files through the CLI -------------------------------------------------


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "deployment.toml"
    config.write_text('[broker]\nport = 1\n[principals]\ncredentials_file = "clients.json"\n'
                      "hash_iterations = 1000\n")
    monkeypatch.setenv("CIPHERTWIN_CONFIG", str(config))
    monkeypatch.setenv("CIPHERTWIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CIPHERTWIN_PASSPHRASE", "a passphrase for the unit test")
    for name in ("carol", "vendor", "bob"):
        assert main(["receiver", "init", "--name", name]) == 0
    return tmp_path / "home"


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("ciphertwin: error: ")
    return lines[0]


def test_approval_file_signs_exactly_one_request(homes: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(4096))
    args = '{"version": "2.0"}'
    out = tmp_path / "carol.approval"
    assert main(["request", "approve", "--name", "carol", "--twin", "home", "--op",
                 "firmware_update", "--args", args, "--attachment", str(image),
                 "--request-id", RID, "--out", str(out)]) == 0
    approval = read_approval(str(out), "home", RID, "firmware_update")
    carol = load_public(homes / "carol")
    verify_approval(approval, carol.verify_key, "home", RID, "firmware_update",
                    json.loads(args), image.read_bytes())
    with pytest.raises(ValidationError, match="approves firmware_update on home as request "
                                              f"{RID}, not firmware_update on home as request"):
        read_approval(str(out), "home", "fedcba9876543210", "firmware_update")
    capsys.readouterr()
    # sending with an approval of another request stops before any connection is made
    assert main(["request", "send", "--name", "bob", "--owner-key", str(homes / "carol"),
                 "--twin", "home", "--op", "firmware_update", "--args", args,
                 "--approval", str(out), "--request-id", "fedcba9876543210"]) == 2
    assert "--approval" in _error(capsys)
    for bad in ("xyz", "0123456789ABCDEF", "0123"):
        assert main(["request", "approve", "--name", "carol", "--twin", "home", "--op", "x",
                     "--request-id", bad]) == 2
        assert "--request-id must be 16 lower-case hex digits" in _error(capsys)


def test_sign_image_prints_the_signature_the_firmware_rule_checks(
        homes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware " * 100)
    assert main(["request", "sign-image", "--name", "vendor", "--attachment", str(image)]) == 0
    sig = bytes.fromhex(capsys.readouterr().out.strip())
    verify_image(load_public(homes / "vendor").verify_key, image.read_bytes(), sig)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (256 * 1024 + 1))
    assert main(["request", "sign-image", "--name", "vendor", "--attachment", str(big)]) == 2
    assert "larger than 262144 bytes" in _error(capsys)


def test_bad_input_is_one_line_before_any_connection(homes: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    owner_key = str(homes / "carol" / "public.key")
    cases = [
        (["owner", "grant-interact", "--name", "bob", "--to", "dave", "--holder-key", owner_key,
          "--twin", "home", "--rights", "request"], "public key of 'carol', not of 'dave'"),
        (["owner", "grant-interact", "--name", "bob", "--to", "carol", "--holder-key",
          owner_key, "--twin", "home", "--rights", "request,admin"], "unknown admin"),
        (["request", "send", "--name", "bob", "--owner-key", owner_key, "--twin", "home",
          "--op", "x", "--args", "[1]"], "--args: want a JSON object"),
        (["request", "send", "--name", "bob", "--owner-key", owner_key, "--twin", "home",
          "--op", "x", "--deadline", "tomorrow"], "--deadline: not an ISO-8601 time"),
        (["request", "send", "--name", "bob", "--twin", "home", "--op", "x"],
         "give --owner-key"),
        (["owner", "revoke-interact", "--name", "bob", "zz"], "token id must be hex"),
    ]
    for argv, why in cases:
        assert main(argv) == 2, argv
        assert why in _error(capsys), argv


def test_token_file_of_someone_else_is_refused(homes: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    alice = Identity.generate("alice", "owner")
    other = issue_interact_token(alice.signing, "carol",
                                 VerifyKey(load_public(homes / "carol").verify_key.raw),
                                 ["home"], ["request"])
    token = tmp_path / "carol.token"
    token.write_bytes(other.to_bytes())
    assert main(["request", "send", "--name", "bob", "--owner-key",
                 str(homes / "carol" / "public.key"), "--token", str(token), "--twin", "home",
                 "--op", "x", "--wait", "--timeout", "1", "--config",
                 os.environ["CIPHERTWIN_CONFIG"]]) == 2
    assert "was issued to 'carol' with another key, not to 'bob'" in _error(capsys)
