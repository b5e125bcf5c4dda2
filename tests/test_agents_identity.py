"""Identity key files: round trips, modes, passphrases, tampering, public key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ciphertwin.agents import identity as ident
from ciphertwin.agents.identity import (
    Identity,
    PublicIdentity,
    default_home,
    is_encrypted,
    load_identity,
    load_public,
    passphrase_from_env_or_prompt,
    read_private_file,
    save_identity,
    write_private_file,
)
from ciphertwin.crypto import decrypt_owner, encrypt, hpke_open, hpke_seal, wire
from ciphertwin.crypto.passwords import Argon2Params
from ciphertwin.errors import ValidationError

FAST = Argon2Params(memory_kib=8, iterations=1, lanes=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate("alice", "receiver", {"org": "clinic", "n": 3, "blob": b"\x00\x01"})


def test_round_trip_with_passphrase_keeps_every_key_working(tmp_path: Path,
                                                            alice: Identity) -> None:
    home = tmp_path / "alice"
    save_identity(alice, home, "correct horse", FAST)
    loaded = load_identity(home, "correct horse")
    assert (loaded.name, loaded.role, loaded.extra) == ("alice", "receiver", alice.extra)
    assert loaded.public == alice.public
    # each secret actually works, not just the public halves
    alice.signing.verify_key.verify("test", b"m", loaded.signing.sign("test", b"m"))
    ct = encrypt(alice.pre.public, {"type:x"}, b"secret reading", aad=b"t")
    assert decrypt_owner(loaded.pre, ct, aad=b"t") == b"secret reading"
    assert hpke_open(loaded.hpke, hpke_seal(alice.hpke.public_bytes, b"share")) == b"share"
    assert is_encrypted(home)


def test_modes_even_with_permissive_umask(tmp_path: Path, alice: Identity) -> None:
    old = os.umask(0)
    try:
        home = tmp_path / "deep" / "alice"
        save_identity(alice, home, "pw", FAST)
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / "secret.key") == 0o600
    assert mode(home / "public.key") == 0o644
    assert sorted(p.name for p in home.iterdir()) == ["public.key", "secret.key"]  # no temp left


def test_encrypted_file_does_not_contain_secrets(tmp_path: Path, alice: Identity) -> None:
    save_identity(alice, tmp_path / "a", "pw", FAST)
    data = (tmp_path / "a" / "secret.key").read_bytes()
    assert alice.signing.to_bytes()[-32:] not in data
    assert alice.pre.to_bytes()[-32:] not in data
    assert alice.hpke.to_bytes()[-32:] not in data


def test_plaintext_needs_explicit_permission_and_says_so(tmp_path: Path, alice: Identity) -> None:
    with pytest.raises(ValidationError, match="allow_plaintext"):
        save_identity(alice, tmp_path / "a", None)
    assert not (tmp_path / "a" / "secret.key").exists()
    save_identity(alice, tmp_path / "a", None, allow_plaintext=True)
    data = (tmp_path / "a" / "secret.key").read_bytes()
    assert b"UNENCRYPTED" in data and b"plaintext" in data
    assert not is_encrypted(tmp_path / "a")
    assert mode(tmp_path / "a" / "secret.key") == 0o600
    assert load_identity(tmp_path / "a", None).public == alice.public


def test_wrong_or_missing_passphrase(tmp_path: Path, alice: Identity) -> None:
    save_identity(alice, tmp_path / "a", "right", FAST)
    with pytest.raises(ValidationError, match="^wrong passphrase or corrupted key file$"):
        load_identity(tmp_path / "a", "wrong")
    with pytest.raises(ValidationError, match="passphrase-protected"):
        load_identity(tmp_path / "a", None)
    with pytest.raises(ValidationError):
        load_identity(tmp_path / "a", "")


def test_wide_mode_is_refused_with_chmod_hint(tmp_path: Path, alice: Identity) -> None:
    save_identity(alice, tmp_path / "a", "pw", FAST)
    secret = tmp_path / "a" / "secret.key"
    for wide in (0o640, 0o604, 0o660):
        os.chmod(secret, wide)
        with pytest.raises(ValidationError, match=f"chmod 600 {secret}"):
            load_identity(tmp_path / "a", "pw")
    os.chmod(secret, 0o600)
    load_identity(tmp_path / "a", "pw")


def test_symlinked_secret_file_is_refused(tmp_path: Path, alice: Identity) -> None:
    save_identity(alice, tmp_path / "a", "pw", FAST)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "secret.key").symlink_to(tmp_path / "a" / "secret.key")
    with pytest.raises(ValidationError, match="cannot open"):
        load_identity(tmp_path / "b", "pw")


def test_tampered_truncated_and_garbage_files(tmp_path: Path, alice: Identity) -> None:
    save_identity(alice, tmp_path / "a", "pw", FAST)
    secret = tmp_path / "a" / "secret.key"
    good = secret.read_bytes()
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[: len(good) // 2], b"", b"\xc1garbage",
                wire.encode("secret-key-file", {"x": 1})):
        write_private_file(secret, bad)
        with pytest.raises(ValidationError):
            load_identity(tmp_path / "a", "pw")
    # renaming the identity in the header breaks the AEAD binding
    f = wire.decode(good, "secret-key-file", ("name", "protection", "note", "body"), 10**6)
    renamed = wire.encode("secret-key-file", {"name": "mallory", "protection": f.raw("protection"),
                                              "note": "", "body": f.raw("body")})
    write_private_file(secret, renamed)
    with pytest.raises(ValidationError, match="wrong passphrase or corrupted"):
        load_identity(tmp_path / "a", "pw")


def test_refuses_to_overwrite_and_detects_foreign_public_file(tmp_path: Path,
                                                             alice: Identity) -> None:
    save_identity(alice, tmp_path / "a", "pw", FAST)
    bob = Identity.generate("alice", "receiver")
    with pytest.raises(ValidationError, match="already exists"):
        save_identity(bob, tmp_path / "a", "pw", FAST)
    save_identity(bob, tmp_path / "b", "pw", FAST)
    (tmp_path / "a" / "public.key").write_bytes((tmp_path / "b" / "public.key").read_bytes())
    with pytest.raises(ValidationError, match="does not match"):
        load_identity(tmp_path / "a", "pw")
    save_identity(bob, tmp_path / "a", "pw2", FAST, overwrite=True)
    assert load_identity(tmp_path / "a", "pw2").public == bob.public


def test_public_identity_round_trip_and_import(tmp_path: Path, alice: Identity) -> None:
    pub = alice.public
    assert PublicIdentity.from_bytes(pub.to_bytes()) == pub
    save_identity(alice, tmp_path / "a", "pw", FAST)
    assert load_public(tmp_path / "a") == pub
    assert load_public(tmp_path / "a" / "public.key").fingerprint == pub.fingerprint
    other = Identity.generate("bob", "receiver").public
    assert other.fingerprint != pub.fingerprint


def test_public_identity_rejects_inconsistent_or_garbage_keys(alice: Identity) -> None:
    other = Identity.generate("bob", "node").public
    mine = wire.decode(alice.public.pre.to_bytes(), "pre-pk", ("g1", "g2"), 256)
    theirs = wire.decode(other.pre.to_bytes(), "pre-pk", ("g1", "g2"), 256)
    mixed_pre = wire.encode("pre-pk", {"g1": mine.raw("g1"), "g2": theirs.raw("g2")})
    fields = {"name": "alice", "role": "receiver", "pre": mixed_pre,
              "vk": alice.signing.verify_key.raw, "hpke": alice.hpke.public_bytes, "extra": {}}
    with pytest.raises(ValidationError, match="share one secret exponent"):
        PublicIdentity.from_bytes(wire.encode("identity-public", fields))
    for bad in (b"", b"\x00" * 10, wire.encode("identity-public", {**fields, "more": 1}),
                wire.encode("identity-public", {**fields, "role": "king",
                                                "pre": alice.public.pre.to_bytes()}),
                wire.encode("identity-public", {**fields, "hpke": b"short",
                                                "pre": alice.public.pre.to_bytes()})):
        with pytest.raises(ValidationError):
            PublicIdentity.from_bytes(bad)


def test_constructor_validation() -> None:
    with pytest.raises(ValidationError, match="role"):
        Identity.generate("x", "admin")
    with pytest.raises(ValidationError, match="identity name"):
        Identity.generate("bad/name", "owner")
    with pytest.raises(ValidationError, match="extra"):
        Identity.generate("x", "owner", {"k": 1.5})  # type: ignore[dict-item]
    with pytest.raises(ValidationError, match="extra"):
        Identity.generate("x", "owner", {"k": True})
    with pytest.raises(ValidationError, match="extra"):
        Identity.generate("x", "owner", {"k": "v" * 5000})


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CIPHERTWIN_HOME", raising=False)
    assert default_home("alice") == Path.home() / ".ciphertwin" / "alice"
    monkeypatch.setenv("CIPHERTWIN_HOME", str(tmp_path))
    assert default_home("alice") == tmp_path / "alice"
    assert default_home("alice", base="/srv/ct") == Path("/srv/ct/alice")
    with pytest.raises(ValidationError):
        default_home("../etc")


def test_read_private_file_limits(tmp_path: Path) -> None:
    p = write_private_file(tmp_path / "f", b"x" * 100)
    assert read_private_file(p) == b"x" * 100
    with pytest.raises(ValidationError, match="limit"):
        read_private_file(p, max_bytes=10)
    with pytest.raises(ValidationError, match="no such file"):
        read_private_file(tmp_path / "missing")
    with pytest.raises(ValidationError, match="regular file"):
        read_private_file(tmp_path)
    os.mkfifo(tmp_path / "fifo", 0o600)  # must be refused, not block forever
    with pytest.raises(ValidationError, match="regular file"):
        read_private_file(tmp_path / "fifo")


def test_passphrase_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_TEST_PW", "from-env")
    assert passphrase_from_env_or_prompt("CT_TEST_PW") == "from-env"
    monkeypatch.delenv("CT_TEST_PW")
    monkeypatch.setattr(ident.sys.stdin, "isatty", lambda: False, raising=False)
    with pytest.raises(ValidationError, match="CT_TEST_PW"):
        passphrase_from_env_or_prompt("CT_TEST_PW")

    answers: list[str] = []
    monkeypatch.setattr(ident.sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setattr(ident.getpass, "getpass", lambda prompt="": answers.pop(0))
    answers[:] = ["typed"]
    assert passphrase_from_env_or_prompt("CT_TEST_PW") == "typed"
    answers[:] = ["one", "two"]
    with pytest.raises(ValidationError, match="do not match"):
        passphrase_from_env_or_prompt("CT_TEST_PW", confirm=True)
    answers[:] = ["same", "same"]
    assert passphrase_from_env_or_prompt("CT_TEST_PW", confirm=True) == "same"
    answers[:] = [""]
    with pytest.raises(ValidationError, match="empty"):
        passphrase_from_env_or_prompt("CT_TEST_PW")
