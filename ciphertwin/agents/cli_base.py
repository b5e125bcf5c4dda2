"""What every principal's sub-commands share: key folder, broker login, options, times, JSON.

Kept apart from the command modules (``agents.cli``, ``agents.processing_cli``,
``agents.operator_cli``, ``mpc_nodes.cli``) so that they import this, never each other in a
circle.

Times on the command line are ISO-8601 (``2026-11-22T08:00``, ``…Z``, ``…+01:00``; no zone
means UTC) or Unix seconds (``1795334400``); times printed are ISO-8601 UTC (``…Z``).

Exit codes of the processing commands (``job submit``, ``receiver results``): 0 done,
:data:`EXIT_FAILED` the job failed, 2 bad input or a refusal (any ``ciphertwin: error``),
:data:`EXIT_TIMEOUT` gave up waiting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ciphertwin.agents.identity import (
    Identity, default_home, load_identity, passphrase_from_env_or_prompt, read_private_file,
    save_identity, write_private_file,
)
from ciphertwin.bus.client import BusClient
from ciphertwin.config.passwords import generate_password
from ciphertwin.config.principals import Principal, add_client
from ciphertwin.config.settings import Deployment, load_deployment
from ciphertwin.errors import ValidationError

BROKER_SECRET = "broker.secret"
EXIT_FAILED = 1
EXIT_TIMEOUT = 3
MAX_JSON_FILE_BYTES = 64 * 1024


def home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home(args.name)


def add_common(p: argparse.ArgumentParser, name_required: bool = True) -> None:
    p.add_argument("--name", required=name_required, help="principal id (broker user)")
    p.add_argument("--home", help="key folder (default ~/.ciphertwin/<name>)")
    p.add_argument("--config", help="deployment TOML (default $CIPHERTWIN_CONFIG)")


def save_broker_login(folder: Path, username: str, password: str) -> None:
    write_private_file(folder / BROKER_SECRET,
                       json.dumps({"username": username, "password": password}).encode())


def bus_for(args: argparse.Namespace, deployment: Deployment) -> BusClient:
    login = json.loads(read_private_file(home(args) / BROKER_SECRET, 4096))
    return BusClient.for_deployment(deployment, username=login["username"],
                                    password=login["password"])


def identity(args: argparse.Namespace) -> Identity:
    return load_identity(home(args), passphrase_from_env_or_prompt())


def init_principal(args: argparse.Namespace, role: str) -> int:
    """Create keys (+ broker login, if this machine holds the deployment's credentials)."""
    folder = home(args)
    me = Identity.generate(args.name, role)
    save_identity(me, folder, passphrase_from_env_or_prompt(confirm=True))
    deployment = load_deployment(args.config)
    if args.broker_password_stdin:
        password = sys.stdin.readline().strip()
    else:
        password = generate_password()
        add_client(deployment.principals.credentials_file,
                   Principal.create(args.name, role, password,
                                    iterations=deployment.principals.hash_iterations))
    save_broker_login(folder, args.name, password)
    print(f"{role} {args.name}: keys in {folder}; public key file {folder / 'public.key'} "
          f"(fingerprint {me.public.fingerprint})")
    return 0


def parse_time(text: str | None, default: float, what: str = "time") -> float:
    """ISO-8601 (no zone: UTC) or Unix seconds → Unix seconds; ``default`` when not given."""
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValidationError(f"{what}: not an ISO-8601 time or Unix seconds: "
                                  f"{text!r:.60}") from None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(value) or not 0 <= value < 253402300800:
        raise ValidationError(f"{what}: Unix seconds must be in 1970..9999, got {text!r:.60}")
    return value


def iso_utc(t: float) -> str:
    """Unix seconds as ISO-8601 UTC to the second, e.g. ``2026-11-22T08:00:00Z``."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_option(text: str, what: str) -> Any:
    """A JSON command-line value (``@file`` reads it from a file), or a one-line
    :class:`ValidationError` saying where it broke."""
    if text.startswith("@"):
        try:
            with open(text[1:], "rb") as fh:
                raw = fh.read(MAX_JSON_FILE_BYTES + 1)
        except OSError as exc:
            raise ValidationError(f"{what}: cannot read {text[1:]!r} ({exc.strerror})") from None
        if len(raw) > MAX_JSON_FILE_BYTES:
            raise ValidationError(f"{what}: {text[1:]!r} is larger than {MAX_JSON_FILE_BYTES} bytes")
        text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{what}: not JSON ({exc.msg} at line {exc.lineno} column "
                              f"{exc.colno})") from None
    except RecursionError:
        raise ValidationError(f"{what}: nests too deeply") from None


def json_object_option(text: str, what: str) -> dict[str, Any]:
    value = json_option(text, what)
    if not isinstance(value, dict):
        raise ValidationError(f"{what}: want a JSON object {{…}}, got {type(value).__name__}")
    return value


def fail(message: str, code: int) -> int:
    """Print a one-line ``ciphertwin: error`` (like the top-level handler) and return ``code``."""
    print(f"ciphertwin: error: {message}", file=sys.stderr)
    return code
