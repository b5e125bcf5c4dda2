"""Principals, $7$ password hashes (Mosquitto-compatible) and the credentials file."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ciphertwin.config import (
    CredentialsFile,
    Principal,
    Role,
    add_client,
    hash_password,
    remove_client,
    twins_of_owner,
    verify_password,
)
from ciphertwin.config.passwords import parse_hash
from ciphertwin.errors import ValidationError

FAST = 1000  # iterations: tests need no work factor


def test_hash_format_and_verify() -> None:
    h = hash_password("s3cret", iterations=FAST)
    iterations, salt, digest = parse_hash(h)
    assert h.startswith("$7$1000$") and len(salt) == 12 and len(digest) == 64
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret!", h)
    assert not verify_password("", h) and not verify_password(None, h)
    assert hash_password("s3cret", iterations=FAST) != h  # fresh salt


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd absent")
def test_hash_made_by_mosquitto_passwd_verifies(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "dev1", "pa ss"], check=True)
    user, h = f.read_text().strip().split(":", 1)
    assert user == "dev1" and verify_password("pa ss", h) and not verify_password("pass", h)


@pytest.mark.parametrize(
    "bad",
    ["", "$6$abc$def", "$7$$c2FsdA==$aGFzaA==", "$7$10$!!$aGFzaA==", "$7$10$c2FsdA==$aGFzaA==",
     "$7$99999999$c2FsdA==$" + "A" * 88, None],
)
def test_malformed_hash_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        parse_hash(bad)


def _owner(cid: str = "alice", **kw: object) -> Principal:
    return Principal.create(cid, Role.OWNER, "pw-" + cid, iterations=FAST, **kw)


def _device(cid: str, twin: str, owner: str = "alice") -> Principal:
    return Principal.create(cid, "device", "pw-" + cid, iterations=FAST, twin=twin, owner=owner)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"client_id": "a/b", "role": "owner"}, "client id"),
        ({"client_id": "x", "role": "king"}, "unknown role"),
        ({"client_id": "d", "role": "device"}, "needs both"),
        ({"client_id": "d", "role": "device", "twin": "t/1", "owner": "o"}, "twin"),
        ({"client_id": "r", "role": "receiver", "twin": "t"}, "only devices"),
        ({"client_id": "r", "role": "receiver", "operator": True}, "only owners"),
        ({"client_id": "o", "role": "owner", "twins": ("ok", "#")}, "twin"),
    ],
)
def test_principal_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Principal.create(password="pw", iterations=FAST, **kwargs)  # type: ignore[arg-type]


def test_add_remove_reload_and_file_hygiene(tmp_path: Path) -> None:
    path = tmp_path / "var" / "clients.json"
    cf = CredentialsFile(path)
    assert cf.load() == {} and cf.stamp() is None
    add_client(path, _owner(twins=("t0",)))
    stamp = cf.stamp()
    add_client(path, _device("d1", "t1"))
    assert cf.stamp() != stamp
    clients = cf.load()
    assert set(clients) == {"alice", "d1"} and clients["d1"].twin == "t1"
    assert twins_of_owner(clients, "alice") == ["t0", "t1"]
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert "pw-alice" not in text and "$7$" in text  # only hashes on disk
    with pytest.raises(ValidationError, match="already exists"):
        add_client(path, _device("d1", "t9"))
    add_client(path, _device("d1", "t9"), replace=True)
    assert cf.load()["d1"].twin == "t9"
    with pytest.raises(ValidationError, match="still has devices"):
        remove_client(path, "alice")
    assert remove_client(path, "d1").id == "d1"
    with pytest.raises(ValidationError, match="no client"):
        remove_client(path, "d1")
    assert list(path.parent.glob(".clients-*")) == []  # no temp files left


def test_device_needs_known_owner(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a known owner"):
        add_client(tmp_path / "c.json", _device("d1", "t1", owner="ghost"))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    add_client(path, _owner())
    devices = [_device(f"d{i}", f"t{i}") for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: add_client(path, p), devices))
    assert len(CredentialsFile(path).load()) == 25


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("not json", "not valid JSON"),
        ("[]", "version"),
        ('{"version": 2, "clients": {}}', "version"),
        ('{"version": 1, "clients": [], "x": 1}', "expected keys"),
        ('{"version": 1, "clients": {"a": 5}}', "must be an object"),
        ('{"version": 1, "clients": {"a": {"role": "owner"}}}', "needs 'role' and 'password_hash'"),
        ('{"version": 1, "clients": {"a": {"role": "owner", "password_hash": "x"}}}', "\\$7\\$"),
        ('{"version": 1, "clients": {"a": {"role": 1, "password_hash": "x"}}}', "must be a string"),
        ('{"version": 1, "clients": {"a": {"role": "owner", "password_hash": "x", "y": 1}}}',
         "unknown field"),
    ],
)
def test_corrupt_file_is_a_validation_error(tmp_path: Path, doc: str, match: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(doc)
    with pytest.raises(ValidationError, match=match):
        CredentialsFile(path).load()


def test_json_round_trip(tmp_path: Path) -> None:
    p = _owner(twins=("a", "b"), operator=True)
    again = Principal.from_json(p.id, json.loads(json.dumps(p.to_json())))
    assert again == p
