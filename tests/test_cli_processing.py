"""Processing CLI edges: node entry files, times, bad options and timeouts (one line, exit code).

The commands run through ``ciphertwin.cli.main`` as a user runs them; where a bus is needed
it is a real embedded broker started as its own process.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import wait_for_port

from ciphertwin.agents.cli_base import EXIT_TIMEOUT, iso_utc, parse_time
from ciphertwin.broker.embedded import free_port
from ciphertwin.cli import main
from ciphertwin.crypto import wire
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.entry_file import ENTRY_FILE_TAG, read_entry_file, write_entry_file
from ciphertwin.mpc_nodes.roster import NodeIdentity
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A deployment file with a free broker port; keys under tmp_path/home."""
    config = tmp_path / "deployment.toml"
    config.write_text(f'[broker]\nport = {free_port()}\nprefix = "ct/cli{os.urandom(3).hex()}"\n'
                      '[principals]\ncredentials_file = "clients.json"\nhash_iterations = 1000\n'
                      '[processing]\noperator_key = "home/operator/public.key"\n')
    monkeypatch.setenv("CIPHERTWIN_CONFIG", str(config))
    monkeypatch.setenv("CIPHERTWIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CIPHERTWIN_PASSPHRASE", "a passphrase for the cli test")
    monkeypatch.delenv("CIPHERTWIN_PROCESSING__OPERATOR_KEY", raising=False)
    return config


@pytest.fixture
def broker(deployment: Path) -> Iterator[None]:
    port = int(deployment.read_text().split("port = ")[1].split()[0])
    proc = subprocess.Popen([sys.executable, "-m", "ciphertwin.cli", "--log-level", "WARNING",
                             "broker", "--config", str(deployment)])
    try:
        wait_for_port(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("ciphertwin: error: "), err
    return lines[0]


# --- node entry files ------------------------------------------------------------------------


def _node(name: str = "node0", index: int = 0) -> tuple[NodeIdentity, PreKeyPair]:
    return NodeIdentity(index, name, SigningKey.generate(), X25519PrivateKey.generate()), \
        PreKeyPair.generate()


def test_node_entry_is_public_and_publish_roster_reads_it(
        deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "init", "--name", "node1"]) == 0
    init_out = capsys.readouterr().out
    out = tmp_path / "node1.entry"
    assert main(["node", "entry", "--name", "node1", "--index", "1", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # public: anyone may read and compare
    entry = read_entry_file(out)  # what publish-roster reads, at that mode
    assert (entry.entry.index, entry.entry.node_id) == (1, "node1")
    # the fingerprint the operator sees is the one `node init` printed
    assert f"fingerprint {entry.fingerprint}" in init_out
    assert entry.fingerprint in capsys.readouterr().out


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_entry_file_others_could_change_is_refused(tmp_path: Path, mode: int) -> None:
    node, pre = _node()
    path = tmp_path / "n.entry"
    write_entry_file(path, node, pre.public)
    path.chmod(mode)
    with pytest.raises(ValidationError, match="lets other users change it; run: chmod 644"):
        read_entry_file(path)
    path.chmod(0o600)  # private is fine too
    assert read_entry_file(path).entry.node_id == "node0"


def test_entry_file_with_a_swapped_pre_key_or_a_symlink_is_refused(tmp_path: Path) -> None:
    node, pre = _node()
    path = tmp_path / "n.entry"
    write_entry_file(path, node, pre.public)
    f = wire.decode(path.read_bytes(), ENTRY_FILE_TAG, ("entry", "pre", "sig"))
    forged = tmp_path / "forged.entry"  # the self-signed MPC entry kept, the PRE key the attacker's
    forged.write_bytes(wire.encode(ENTRY_FILE_TAG, {
        "entry": f.bytes("entry"), "pre": PreKeyPair.generate().public.to_bytes(),
        "sig": f.bytes("sig")}))
    forged.chmod(0o644)
    with pytest.raises(ValidationError, match="signature over its PRE key does not verify"):
        read_entry_file(forged)
    link = tmp_path / "link.entry"
    link.symlink_to(path)
    with pytest.raises(ValidationError, match="cannot open"):
        read_entry_file(link)
    garbage = tmp_path / "garbage.entry"
    garbage.write_bytes(b"\x81\xa1t\xa3xyz")
    garbage.chmod(0o644)
    with pytest.raises(ValidationError, match="not a valid node entry file|expected"):
        read_entry_file(garbage)


# --- times -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2026-11-22T08:00:00Z", "2026-11-22T08:00:00+00:00",
                                  "2026-11-22T09:00:00+01:00", "2026-11-22T08:00",
                                  "2026-11-22 08:00:00", "1795334400", "1795334400.0"])
def test_times_are_iso_8601_or_unix_seconds_and_no_zone_means_utc(text: str) -> None:
    assert parse_time(text, 0.0) == 1795334400.0
    assert iso_utc(1795334400.0) == "2026-11-22T08:00:00Z"


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "nan", "inf", "-5", "1e20", ""])
def test_bad_times_are_one_clear_error(text: str) -> None:
    with pytest.raises(ValidationError, match="--since"):
        parse_time(text, 0.0, "--since")


# --- job submit: bad options are one line, before anything is sent --------------------------


SUBMIT = ["job", "submit", "--name", "bob", "--function", "contact_tracing", "--points", "5",
          "--params", '{"radius": 80}',
          "--input", "a:t:user", "--input", "b:r:reference", "--receiver-key", "no-such.key"]


@pytest.mark.parametrize(("extra", "says"), [
    (["--params", "{radius: 80}"], "--params: not JSON"),
    (["--params", "[1, 2]"], "--params: want a JSON object"),
    (["--params", '{"radius": "far"}'], "parameter 'radius'"),
    (["--params", '{"radius": 80, "typo": 1}'], "unknown parameters"),
    (["--fields", "{"], "--fields: not JSON"),
    (["--fields", '{"x": {"unit": "m"}}'], "a field encoding is a map"),
    (["--fields", '{"x": {"unit": "m", "frac": 4, "min": 5, "max": -5}}'], "is empty"),
    (["--fields", '{"x": {"unit": "m", "frac": 4, "min": -5, "max": 5}}'], "x and y"),
    (["--since", "tomorrow"], "--since: not an ISO-8601 time"),
    (["--since", "2026-11-22T08:00Z", "--until", "2026-11-22T07:00Z"], "until > since"),
    (["--since", "0", "--until", "1795334400"], "at most"),  # 30 M one-minute epochs
    (["--epoch-s", "0"], "epoch length"),
    (["--fields", "@no-such.json"], "--fields: cannot read 'no-such.json'"),
    (["--fields", "@no-such.toml"], "share-mode file no-such.toml does not exist"),
    # the devices' share-mode file is read (WGS84 frame), so the window is what fails here
    (["--fields", f"@{ROOT / 'config' / 'share-mode.example.toml'}", "--until", "x"],
     "--until: not an ISO-8601 time"),
    (["--function", "sum", "--params", '{"frac_bits": 4}',
      "--fields", f"@{ROOT / 'config' / 'share-mode.example.toml'}"],
     "sum reads exactly one field; 2 declared (x, y)"),
    (["--input", "a:t"], "--input wants owner:twin:role"),
])
def test_job_submit_bad_options_are_one_line_errors(
        deployment: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str) -> None:
    assert main([*SUBMIT, *extra]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert says in line, line


def test_receiver_results_bad_params_json_is_one_line(
        deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "init", "--name", "operator"]) == 0
    assert main(["receiver", "init", "--name", "bob"]) == 0
    capsys.readouterr()
    assert main(["receiver", "results", "--name", "bob", "--job", "j", "--params", "{"]) == 2
    assert "--params: not JSON" in _one_line_error(capsys.readouterr().err)


# --- timeouts: one line, exit 3 --------------------------------------------------------------


def test_timeouts_are_one_line_with_exit_3(deployment: Path, broker: None, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "init", "--name", "operator"]) == 0
    assert main(["receiver", "init", "--name", "bob"]) == 0
    capsys.readouterr()
    key = str(tmp_path / "home" / "bob" / "public.key")
    # no cloud answers: the job never gets a final status
    code = main(["--log-level", "WARNING", "job", "submit", "--name", "bob", "--job", "lost-1", "--function", "sum",
                 "--params", '{"frac_bits": 16}', "--points", "3", "--input", "a:t:user", "--receiver-key", key,
                 "--wait", "--timeout", "1"])
    out = capsys.readouterr()
    assert code == EXIT_TIMEOUT == 3, out.err
    assert out.out.splitlines()[0] == "lost-1"  # the id comes first, for scripts
    first, *rest = out.err.strip().splitlines()
    assert first.startswith("job lost-1: sum over [") and first.endswith("Z) in 60 s epochs for bob")
    line = _one_line_error("\n".join(rest))
    assert "job lost-1: no status for 1 s" in line
    code = main(["--log-level", "WARNING", "receiver", "results", "--name", "bob", "--job",
                 "lost-1", "--timeout", "1"])
    assert code == EXIT_TIMEOUT
    line = _one_line_error(capsys.readouterr().err)
    assert "job lost-1" in line and "nothing heard for 1 s" in line


# --- wiring ----------------------------------------------------------------------------------


def test_processing_commands_do_not_import_agents_cli() -> None:
    """agents.cli → processing_cli only: the command modules share agents.cli_base instead."""
    code = ("import sys, ciphertwin.agents.processing_cli, ciphertwin.agents.operator_cli, "
            "ciphertwin.mpc_nodes.cli; sys.exit('ciphertwin.agents.cli' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from ciphertwin.cli import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    owner = choices["owner"]._subparsers._group_actions[0].choices
    receiver = choices["receiver"]._subparsers._group_actions[0].choices
    assert {"grant-processing", "revoke-processing"} <= set(owner)
    assert "results" in receiver and "submit" in choices["job"]._subparsers._group_actions[0].choices
