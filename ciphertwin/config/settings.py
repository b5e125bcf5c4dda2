"""Typed deployment settings: TOML file, then ``CIPHERTWIN_<SECTION>__<KEY>`` env overrides.

Why typed dataclasses and not a dict: every service reads the same file, and a typo'd key or
a port of "18830" must fail at start-up with a message naming the key, not minutes later deep
inside a connect call. Unknown keys are errors for the same reason.

Environment overrides (for containers and tests) use the section and key joined by a double
underscore, e.g. ``CIPHERTWIN_BROKER__HOST=10.0.0.5``, ``CIPHERTWIN_BROKER__PORT=1884``,
``CIPHERTWIN_BROKER__TLS__ENABLED=true``, ``CIPHERTWIN_LOGGING__LEVEL=DEBUG``,
``CIPHERTWIN_PROCESSING__OPERATOR_KEY=/etc/ciphertwin/operator.key``. Values are
converted to the field's type (int, float, bool: 1/0/true/false/yes/no/on/off, str, path).
``CIPHERTWIN_CONFIG`` names the deployment file when no path is given.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciphertwin.bus.topics import DEFAULT_PREFIX, validate_prefix
from ciphertwin.config.passwords import DEFAULT_ITERATIONS, MAX_ITERATIONS
from ciphertwin.config.principals import CredentialsFile
from ciphertwin.errors import ValidationError

ENV_PREFIX = "CIPHERTWIN_"
CONFIG_ENV = "CIPHERTWIN_CONFIG"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _port(value: int, what: str) -> None:
    if not 0 <= value < 65536:
        raise ValidationError(f"{what}: port {value} out of range 0..65535 (0 = any free port)")


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker (client side) and for the embedded broker's listener."""

    enabled: bool = False
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValidationError("broker.tls: give both certfile and keyfile, or neither")


@dataclass(frozen=True)
class BrokerSettings:
    """Where clients connect, and how ``ciphertwin broker`` serves.

    ``mode = "embedded"`` runs amqtt in-process with the deployment's ACLs; ``"external"``
    means an operator runs Mosquitto/EMQX (use ``--emit-mosquitto``). ``open = true`` turns
    authentication and ACLs off (benchmarks only).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    mode: str = "embedded"
    bind: str = "127.0.0.1"
    open: bool = False
    keepalive: int = 30
    tls: TlsSettings = field(default_factory=TlsSettings)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValidationError("broker.host must not be empty")
        _port(self.port, "broker.port")
        validate_prefix(self.prefix)
        if self.mode not in ("embedded", "external"):
            raise ValidationError(f"broker.mode must be 'embedded' or 'external', got {self.mode!r}")
        if not 5 <= self.keepalive <= 3600:
            raise ValidationError("broker.keepalive must be within 5..3600 s")


@dataclass(frozen=True)
class StorageSettings:
    """Cloud-twin store: SQLite file by default, PostgreSQL DSN for several workers."""

    backend: str = "sqlite"
    sqlite_path: Path = Path("var/cloud.sqlite")
    postgres_dsn: str = ""

    def __post_init__(self) -> None:
        if self.backend not in ("sqlite", "postgres"):
            raise ValidationError(f"storage.backend must be 'sqlite' or 'postgres', got {self.backend!r}")
        if self.backend == "postgres" and not self.postgres_dsn.startswith(("postgres://", "postgresql://")):
            raise ValidationError("storage.postgres_dsn must be a postgres:// URL")


@dataclass(frozen=True)
class LoggingSettings:
    json: bool = False
    level: str = "INFO"

    def __post_init__(self) -> None:
        if self.level.upper() not in _LEVELS:
            raise ValidationError(f"logging.level must be one of {_LEVELS}, got {self.level!r}")


@dataclass(frozen=True)
class PrincipalSettings:
    """Where the principals (broker clients) live and how new passwords are hashed."""

    credentials_file: Path = Path("var/clients.json")
    hash_iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self) -> None:
        if not 1000 <= self.hash_iterations <= MAX_ITERATIONS:
            raise ValidationError(f"principals.hash_iterations must be within 1000..{MAX_ITERATIONS}")


@dataclass(frozen=True)
class ProcessingSettings:
    """Processing (6+): the operator public key every node roster must be signed with.

    ``operator_key`` is the operator's ``public.key`` file (``ciphertwin operator init``);
    owners, nodes, the cloud and receivers refuse to follow rosters without it.
    """

    operator_key: Path | None = None


@dataclass(frozen=True)
class Deployment:
    """Everything a ciphertwin process needs to know about its deployment."""

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    principals: PrincipalSettings = field(default_factory=PrincipalSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    source: Path | None = None
    """The file this was loaded from (relative paths in it are resolved against its folder)."""

    def credentials(self) -> CredentialsFile:
        return CredentialsFile(self.principals.credentials_file)


_SECTIONS = {
    "broker": BrokerSettings,
    "storage": StorageSettings,
    "logging": LoggingSettings,
    "principals": PrincipalSettings,
    "processing": ProcessingSettings,
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> Any:
    """``Path | None`` -> Path; plain types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _coerce(value: Any, tp: Any, where: str, base_dir: Path) -> Any:
    """Check/convert one TOML (or env string) value to the field type ``tp``."""
    optional = isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)
    base = _base_type(tp)
    if optional and value in ("", None):
        return None
    from_env = isinstance(value, str) and base is not str
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and value.lower() in ("0", "false", "no", "off"):
            return False
    elif base is int:
        if type(value) is int:
            return value
        if from_env:
            try:
                return int(value, 10)
            except ValueError:
                pass
    elif base is float:
        if type(value) in (int, float):
            return float(value)
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is Path:
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return p if p.is_absolute() else base_dir / p
    elif dataclasses.is_dataclass(base):
        if isinstance(value, dict):
            return _build(base, value, where, base_dir)
    raise ValidationError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r:.60}")


def _build(cls: type, raw: Mapping[str, Any], where: str, base_dir: Path) -> Any:
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValidationError(f"{where}: unknown setting(s) {sorted(unknown)}; known {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}", base_dir) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValidationError(f"{where}: {exc}") from None


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Merge ``CIPHERTWIN_A__B__C=value`` into ``raw['a']['b']['c']`` (strings, typed later)."""
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == CONFIG_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if path[0] not in _SECTIONS or not all(path):
            raise ValidationError(f"environment {name}: unknown section {path[0]!r}")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValidationError(f"environment {name}: {part!r} is not a section")
            node = child
        node[path[-1]] = value


def load_deployment(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Deployment:
    """Load a deployment file (or defaults), apply env overrides, validate everything.

    ``path`` None uses ``$CIPHERTWIN_CONFIG`` if set, else pure defaults. Relative paths in
    the file are resolved against the file's folder (against the cwd for defaults).
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    raw: dict[str, Any] = {}
    source: Path | None = None
    base_dir = Path.cwd()
    if path is not None:
        source = Path(path).resolve()
        try:
            with source.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ValidationError(f"deployment file {source} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValidationError(f"deployment file {source}: invalid TOML ({exc})") from None
        base_dir = source.parent
    _apply_env(raw, env)
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ValidationError(f"deployment: unknown section(s) {sorted(unknown)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ValidationError(f"deployment: [{name}] must be a table")
        sections[name] = _build(cls, section, name, base_dir)
    # default relative paths are relative to the deployment folder too
    storage = sections["storage"]
    if not storage.sqlite_path.is_absolute():
        storage = dataclasses.replace(storage, sqlite_path=base_dir / storage.sqlite_path)
    principals = sections["principals"]
    if not principals.credentials_file.is_absolute():
        principals = dataclasses.replace(
            principals, credentials_file=base_dir / principals.credentials_file
        )
    return Deployment(
        broker=sections["broker"],
        storage=storage,
        logging=sections["logging"],
        principals=principals,
        processing=sections["processing"],
        source=source,
    )
