"""Deployment settings: example file loads, env overrides are typed, garbage is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciphertwin.config import load_deployment
from ciphertwin.errors import ValidationError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "deployment.example.toml"


def test_example_file_loads_with_resolved_paths() -> None:
    d = load_deployment(EXAMPLE, env={})
    assert d.broker.port == 1883 and d.broker.prefix == "ct/v1" and d.broker.mode == "embedded"
    assert d.storage.sqlite_path.is_absolute()
    assert d.principals.credentials_file == (EXAMPLE.parent / "../var/clients.json")
    assert d.source == EXAMPLE


def test_defaults_without_file() -> None:
    d = load_deployment(None, env={})
    assert d.source is None and d.broker.host == "127.0.0.1" and not d.broker.open


def test_env_overrides_are_typed(tmp_path: Path) -> None:
    env = {
        "CIPHERTWIN_BROKER__HOST": "10.0.0.5",
        "CIPHERTWIN_BROKER__PORT": "1884",
        "CIPHERTWIN_BROKER__OPEN": "yes",
        "CIPHERTWIN_BROKER__TLS__ENABLED": "true",
        "CIPHERTWIN_LOGGING__JSON": "1",
        "CIPHERTWIN_LOGGING__LEVEL": "debug",
        "CIPHERTWIN_PRINCIPALS__CREDENTIALS_FILE": str(tmp_path / "c.json"),
        "CIPHERTWIN_UNRELATED": "ignored",
        "HOME": "/root",
    }
    d = load_deployment(EXAMPLE, env=env)
    assert (d.broker.host, d.broker.port, d.broker.open) == ("10.0.0.5", 1884, True)
    assert d.broker.tls.enabled and d.logging.json and d.logging.level == "debug"
    assert d.principals.credentials_file == tmp_path / "c.json"


def test_config_env_names_the_file() -> None:
    d = load_deployment(None, env={"CIPHERTWIN_CONFIG": str(EXAMPLE)})
    assert d.source == EXAMPLE


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"CIPHERTWIN_BROKER__PORT": "18a"}, "broker.port: expected int"),
        ({"CIPHERTWIN_BROKER__PORT": "70000"}, "out of range"),
        ({"CIPHERTWIN_BROKER__OPEN": "maybe"}, "expected bool"),
        ({"CIPHERTWIN_BROKER__PREFIX": "ct/#"}, "prefix"),
        ({"CIPHERTWIN_BROKER__MODE": "cloudy"}, "broker.mode"),
        ({"CIPHERTWIN_BROKER__COLOUR": "red"}, "unknown setting"),
        ({"CIPHERTWIN_NOPE__X": "1"}, "unknown section"),
        ({"CIPHERTWIN_LOGGING__LEVEL": "LOUD"}, "logging.level"),
        ({"CIPHERTWIN_STORAGE__BACKEND": "postgres"}, "postgres_dsn"),
        ({"CIPHERTWIN_PRINCIPALS__HASH_ITERATIONS": "10"}, "hash_iterations"),
    ],
)
def test_bad_values_are_refused_with_the_key(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        load_deployment(EXAMPLE, env=env)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[broker]\nport = 'x'\n", "broker.port: expected int"),
        ("[broker]\nport = true\n", "broker.port: expected int"),
        ("[broker]\ntls = 3\n", "broker.tls"),
        ("[broker.tls]\ncertfile = 'a.pem'\n", "both certfile and keyfile"),
        ("broker = 1\n", r"\[broker\] must be a table"),
        ("[storage]\nsqlite_path = ''\n", "storage.sqlite_path"),
        ("[extra]\n", "unknown section"),
        ("[broker\n", "invalid TOML"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "d.toml"
    f.write_text(text)
    with pytest.raises(ValidationError, match=match):
        load_deployment(f, env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        load_deployment(tmp_path / "nope.toml", env={})
