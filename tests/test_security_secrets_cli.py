"""Secrets never cross the command line, and enrollment bundles are always sealed (issue 8.10).

Attackers: a local user reading ``ps`` or shell history (secrets on argv); whoever copies the
bundle off the USB stick (plaintext device keys and broker password); whoever edits or swaps
the bundle on its way to the device (tampered or attacker-made plaintext bundle). The owner
side runs the real ``ciphertwin owner …`` commands against an embedded broker and a cloud
running in a background thread, as on a real machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from ciphertwin.agents.bundle import (
    PASSPHRASE_ENV as BUNDLE_ENV,
    DEVICE_CONFIG_FILE,
    BrokerConnection,
    EnrollmentBundle,
    load_enrolled_device,
    open_bundle,
    read_bundle,
    seal_bundle,
    write_bundle,
)
from ciphertwin.agents.identity import PASSPHRASE_ENV as KEY_ENV
from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.cli import build_parser, main
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.config.passwords import generate_password
from ciphertwin.config.principals import Principal, add_client, parse_credentials
from ciphertwin.config.settings import Deployment, load_deployment
from ciphertwin.crypto import PreKeyPair, SigningKey, issue_write_token, wire
from ciphertwin.crypto.passwords import Argon2Params
from ciphertwin.errors import ValidationError

OWNER_PASSPHRASE = "owner key passphrase"
BUNDLE_PASSPHRASE = "bundle passphrase for the installer"
FAST = Argon2Params(memory_kib=8, iterations=1, lanes=1)
SECRET_NAME = re.compile(r"pass(word|phrase)?|secret|credential|\bpin\b|psk", re.I)
SAFE_SUFFIXES = ("-stdin", "-file", "-env")  # read the secret elsewhere / name a variable


class _Services(threading.Thread):
    """Embedded broker + cloud on their own event loop, so the test thread can call main()."""

    def __init__(self, deployment: Deployment, cloud_password: str) -> None:
        super().__init__(daemon=True)
        self.deployment, self.cloud_password = deployment, cloud_password
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the fixture, which fails loudly
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        d = self.deployment
        async with EmbeddedBroker(d), \
                BusClient.for_deployment(d, client_id="cloud", username="cloud",
                                         password=self.cloud_password) as bus, \
                CloudTwin(bus, SqliteTwinStore(d.storage.sqlite_path),
                          pool=ReencryptionPool(1, processes=False)):
            self.ready.set()
            await self.stop.wait()

    def shutdown(self) -> None:
        if self.is_alive() and hasattr(self, "loop"):
            self.loop.call_soon_threadsafe(self.stop.set)
        self.join(timeout=15)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A deployment with broker, cloud and a registered owner ``alice`` (created by the CLI)."""
    root = tmp_path_factory.mktemp("secrets-cli")
    toml = root / "deployment.toml"
    toml.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {free_port()}\nprefix = "ct-sec-cli/v1"\n'
        '[storage]\nsqlite_path = "cloud.sqlite"\n'
        '[principals]\ncredentials_file = "clients.json"\nhash_iterations = 1000\n'
    )
    deployment = load_deployment(toml, env={})
    cloud_password = generate_password()
    add_client(deployment.principals.credentials_file,
               Principal.create("cloud", "cloud", cloud_password, iterations=1000))
    services = _Services(deployment, cloud_password)
    services.start()
    assert services.ready.wait(20) and services.error is None, services.error
    owner = ["--name", "alice", "--home", str(root / "alice"), "--config", str(toml)]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, OWNER_PASSPHRASE)
            assert main(["owner", "init", *owner]) == 0
            assert main(["owner", "register", *owner]) == 0
        yield {"root": root, "toml": toml, "clients": deployment.principals.credentials_file}
    finally:
        services.shutdown()


def _owner_enroll(site: dict[str, Path], device: str, *extra: str) -> int:
    return main(["owner", "enroll-device", "--name", "alice", "--home", str(site["root"] / "alice"),
                 "--config", str(site["toml"]), "--twin", "kitchen", "--device", device,
                 "--out", str(site["root"] / f"{device}.bundle"), *extra])


def _env(mp: pytest.MonkeyPatch, bundle: str | None, stdin: str = "") -> None:
    """The owner's key passphrase from the environment; the bundle's from env/stdin or none."""
    mp.setenv(KEY_ENV, OWNER_PASSPHRASE)
    if bundle is None:
        mp.delenv(BUNDLE_ENV, raising=False)
    else:
        mp.setenv(BUNDLE_ENV, bundle)
    mp.setattr("sys.stdin", io.StringIO(stdin))  # not a terminal: no prompt possible


def _clean_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ciphertwin: error:") and "Traceback" not in err, err
    return err


def _secret(encoding: bytes, tag: str, name: str) -> bytes:
    return wire.decode(encoding, tag, (name,), max_bytes=1024).bytes(name, max_len=64)


@pytest.fixture(scope="module")
def sealed(site: dict[str, Path]) -> tuple[Path, EnrollmentBundle]:
    """One bundle made by `owner enroll-device` with no passphrase option (env var only)."""
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, BUNDLE_PASSPHRASE)
        old = os.umask(0)  # a careless umask must not widen the file
        try:
            assert _owner_enroll(site, "thermo1") == 0
        finally:
            os.umask(old)
    path = site["root"] / "thermo1.bundle"
    return path, read_bundle(path, BUNDLE_PASSPHRASE)


# --- argv carries no secret ----------------------------------------------------------------


def _options(parser: argparse.ArgumentParser, path: str = "ciphertwin") -> Iterator[
        tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        else:
            for opt in action.option_strings or [action.dest]:
                yield f"{path} {opt}", action


def test_no_command_takes_a_passphrase_or_password_on_argv() -> None:
    """A local user running `ps` (or reading shell history) must not see any secret."""
    checked = 0
    for where, action in _options(build_parser()):
        name = where.rsplit(" ", 1)[1]
        if not SECRET_NAME.search(name):
            continue
        checked += 1
        assert name.endswith(SAFE_SUFFIXES), f"{where} takes a secret on the command line"
        if name.endswith("-stdin"):
            assert action.nargs == 0, f"{where} must be a flag, not carry a value"
        if name.endswith("-env"):
            assert "environment variable" in (action.help or ""), where
    assert checked >= 5  # the *-stdin / *-env options were actually seen


# --- the owner side writes only sealed, private bundles -------------------------------------


def test_bundle_written_without_passphrase_option_holds_no_plaintext_secret(
        site: dict[str, Path], sealed: tuple[Path, EnrollmentBundle]) -> None:
    """Whoever copies the bundle file learns no device key and no broker password."""
    path, bundle = sealed
    data = path.read_bytes()
    secrets_in_bundle = {
        "device signing seed": _secret(bundle.device_signing.to_bytes(), "sig-sk", "seed"),
        "device PRE secret": _secret(bundle.device_pre.to_bytes(), "pre-sk", "sk"),
        "broker password": bundle.broker.password.encode(),
        "write token": bundle.write_token,  # not secret: shows no part is left in clear
    }
    for what, value in secrets_in_bundle.items():
        assert value not in data, f"{what} is readable in the bundle file"
    assert msgpack.unpackb(data)["protected"] is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # written under umask 0


def test_enroll_device_with_no_passphrase_source_refuses_and_changes_nothing(
        site: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No env, no stdin, no terminal: no plaintext fallback, no half-enrolled device."""
    _env(monkeypatch, None)
    err = _clean_error(capsys, _owner_enroll(site, "nopass1"))
    assert BUNDLE_ENV in err
    assert not (site["root"] / "nopass1.bundle").exists()
    assert "nopass1" not in parse_credentials(site["clients"].read_text())


def test_bundle_passphrase_equal_to_the_owner_key_passphrase_is_refused(
        site: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The bundle passphrase goes to the installer: it must not unlock the owner's keys too."""
    _env(monkeypatch, OWNER_PASSPHRASE)
    assert "owner's key passphrase" in _clean_error(capsys, _owner_enroll(site, "reuse1"))
    assert not (site["root"] / "reuse1.bundle").exists()


def test_passphrase_from_stdin_and_from_env_enrol_the_device(
        site: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Owner gives it on stdin, the device installer through the environment (and stdin)."""
    typed = secrets.token_urlsafe(12)
    _env(monkeypatch, None, stdin=typed + "\n")
    assert _owner_enroll(site, "stdin1", "--passphrase-stdin") == 0
    bundle_path = site["root"] / "stdin1.bundle"
    assert msgpack.unpackb(bundle_path.read_bytes())["protected"] is True
    for how, home in (("env", "dev-env"), ("stdin", "dev-stdin")):
        if how == "env":
            _env(monkeypatch, typed)
            argv = []
        else:
            _env(monkeypatch, None, stdin=typed + "\n")
            argv = ["--passphrase-stdin"]
        assert main(["device", "enroll", str(bundle_path), "--home",
                     str(site["root"] / home), *argv]) == 0
        config = load_enrolled_device(site["root"] / home)
        assert (config.device, config.twin) == ("stdin1", "kitchen")
    assert "enrolled" in capsys.readouterr().out


# --- the device side refuses what it cannot trust -------------------------------------------


def test_wrong_bundle_passphrase_is_a_clean_refusal(
        site: dict[str, Path], sealed: tuple[Path, EnrollmentBundle],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = sealed
    home = site["root"] / "wrong-pw"
    _env(monkeypatch, "not the bundle passphrase")
    err = _clean_error(capsys, main(["device", "enroll", str(path), "--home", str(home)]))
    assert "wrong passphrase or corrupted bundle" in err
    assert not home.exists()


def _tampered(data: bytes) -> Iterator[tuple[str, bytes]]:
    outer = msgpack.unpackb(data)
    box = msgpack.unpackb(outer["body"])
    for field in ("salt", "nonce", "ct"):
        for index in (0, len(box[field]) // 2, -1):
            flipped = bytearray(box[field])
            flipped[index] ^= 0x01
            body = msgpack.packb({**box, field: bytes(flipped)}, use_bin_type=True)
            yield f"{field}[{index}]", msgpack.packb({**outer, "body": body}, use_bin_type=True)
    cheaper = msgpack.packb({**box, "i": 1, "m": 8 * box["p"]}, use_bin_type=True)
    yield "argon2 params", msgpack.packb({**outer, "body": cheaper}, use_bin_type=True)
    truncated = msgpack.packb({**box, "ct": box["ct"][:-16]}, use_bin_type=True)
    yield "truncated", msgpack.packb({**outer, "body": truncated}, use_bin_type=True)


def test_tampered_sealed_bundle_is_refused(
        site: dict[str, Path], sealed: tuple[Path, EnrollmentBundle],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Any edit of the sealed bundle in transit (salt, nonce, ciphertext, KDF cost) fails."""
    path, _ = sealed
    _env(monkeypatch, BUNDLE_PASSPHRASE)
    for what, data in _tampered(path.read_bytes()):
        bad, home = site["root"] / "tampered.bundle", site["root"] / "tampered-home"
        bad.write_bytes(data)
        err = _clean_error(capsys, main(["device", "enroll", str(bad), "--home", str(home)]))
        assert "wrong passphrase or corrupted bundle" in err, what
        assert not home.exists(), what


def _attacker_bundle(victim: EnrollmentBundle) -> EnrollmentBundle:
    """A well-formed bundle for the victim's twin/device, but the attacker's keys and broker."""
    owner_pre, owner_sig, device_sig = PreKeyPair.generate(), SigningKey.generate(), \
        SigningKey.generate()
    token = issue_write_token(owner_sig, victim.twin, device_sig.verify_key,
                              ["twin:" + victim.twin], device=victim.device, valid_for_s=86400)
    return EnrollmentBundle(
        twin=victim.twin, device=victim.device, device_pre=PreKeyPair.generate(),
        device_signing=device_sig, owner_pre=owner_pre.public,
        owner_verify=owner_sig.verify_key, write_token=token.to_bytes(),
        broker=BrokerConnection("evil.example", 1883, victim.device, "attacker-pw"))


def test_plaintext_bundle_is_refused_by_device_enroll(
        site: dict[str, Path], sealed: tuple[Path, EnrollmentBundle],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Swapping the sealed bundle for a plaintext one (attacker's keys and broker) fails —
    also when the passphrase is at hand, and before any passphrase is asked for."""
    _, victim = sealed
    swapped = site["root"] / "swapped.bundle"
    write_bundle(swapped, _attacker_bundle(victim), None, allow_plaintext=True)
    downgraded = site["root"] / "downgraded.bundle"  # the sealed body, flagged "plaintext"
    outer = msgpack.unpackb(sealed[0].read_bytes())
    downgraded.write_bytes(msgpack.packb({**outer, "protected": False}, use_bin_type=True))
    for path in (swapped, downgraded):
        for bundle_pw in (BUNDLE_PASSPHRASE, None):
            home = site["root"] / "swapped-home"
            _env(monkeypatch, bundle_pw)
            err = _clean_error(capsys, main(["device", "enroll", str(path), "--home", str(home)]))
            assert "refusing a plaintext enrollment bundle" in err
            assert not home.exists() and not (home / DEVICE_CONFIG_FILE).exists()


def test_library_refuses_to_seal_or_open_plaintext_by_default(
        sealed: tuple[Path, EnrollmentBundle]) -> None:
    """The API mirrors the CLI: plaintext only with an explicit allow_plaintext=True."""
    _, bundle = sealed
    with pytest.raises(ValidationError, match="without a passphrase"):
        seal_bundle(bundle, None)
    plain = seal_bundle(bundle, None, allow_plaintext=True)
    with pytest.raises(ValidationError, match="refusing a plaintext enrollment bundle"):
        open_bundle(plain, BUNDLE_PASSPHRASE)
    asked: list[bool] = []
    with pytest.raises(ValidationError, match="refusing a plaintext"):
        open_bundle(plain, lambda: asked.append(True) or "x")  # type: ignore[func-returns-value]
    assert not asked  # refused before the passphrase is even asked for
    assert open_bundle(seal_bundle(bundle, "pw", FAST), lambda: "pw").device == bundle.device
