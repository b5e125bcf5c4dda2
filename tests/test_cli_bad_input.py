"""Garbage on the command line or in files gives a one-line error and exit code 2 — never a
traceback, never a changed file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciphertwin.cli import main


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    path = tmp_path / "deployment.toml"
    path.write_text('[principals]\ncredentials_file = "clients.json"\n')
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ciphertwin: error:") and "Traceback" not in err
    return err


def test_garbage_bundle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "x.bundle"
    bundle.write_bytes(b"\x93\x01not a bundle")
    _run(capsys, "device", "enroll", str(bundle), "--home", str(tmp_path / "home"))
    assert not (tmp_path / "home").exists()


def test_garbage_deployment_file_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nport = 'many'\n")
    assert "broker" in _run(capsys, "clients", "--config", str(bad), "list")
    bad.write_text("this is = = not toml")
    assert "TOML" in _run(capsys, "clients", "--config", str(bad), "list")


def test_bad_client_id_leaves_the_credentials_file_alone(
        deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clients", "--config", str(deployment), "add", "alice", "--role", "owner"]) == 0
    before = (deployment.parent / "clients.json").read_bytes()
    capsys.readouterr()
    _run(capsys, "clients", "--config", str(deployment), "add", "bad/id#", "--role", "owner")
    assert (deployment.parent / "clients.json").read_bytes() == before


def test_missing_keys_are_reported_not_crashed_on(tmp_path: Path, deployment: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _run(capsys, "owner", "history", "--name", "alice", "--home", str(tmp_path / "none"),
         "--config", str(deployment), "kitchen")


@pytest.mark.parametrize("token_id", ["zz", "ab", "00" * 17, ""])
def test_garbage_token_id_is_refused_before_anything_is_sent(
        tmp_path: Path, deployment: Path, capsys: pytest.CaptureFixture[str],
        token_id: str) -> None:
    err = _run(capsys, "owner", "revoke-processing", "--name", "alice", "--home",
               str(tmp_path / "none"), "--config", str(deployment), "--token-id", token_id)
    assert "--token-id wants 32 hex digits" in err
