"""The principals of a deployment (who may connect to the broker) and their credentials file.

Owners enroll devices and grant receivers while everything runs, so principals do not live in
the static deployment TOML but in a small JSON credentials file that :func:`add_client` and
:func:`remove_client` rewrite atomically (lock, write a temp file, fsync, rename). The
embedded broker notices the new mtime and reloads, so enrollment needs no broker restart.
Only salted ``$7$`` password hashes are stored, never passwords.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ciphertwin.bus.topics import validate_id
from ciphertwin.config.passwords import DEFAULT_ITERATIONS, hash_password, parse_hash
from ciphertwin.errors import ValidationError

FILE_VERSION = 1
MAX_TWINS_PER_OWNER = 10_000


class Role(StrEnum):
    CLOUD = "cloud"
    OWNER = "owner"
    DEVICE = "device"
    RECEIVER = "receiver"
    NODE = "node"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    """One broker client: its id is both MQTT username and (prefix of the) client id.

    ``twin``/``owner`` are required for devices; ``twins`` lists twins an owner holds before
    any device is enrolled; ``operator`` lets an owner publish the node roster.
    """

    id: str
    role: Role
    password_hash: str
    twin: str | None = None
    owner: str | None = None
    twins: tuple[str, ...] = field(default_factory=tuple)
    operator: bool = False

    def __post_init__(self) -> None:
        validate_id(self.id, "client id")
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise ValidationError(
                f"client {self.id!r}: unknown role {self.role!r}; one of {[r.value for r in Role]}"
            ) from None
        parse_hash(self.password_hash)
        object.__setattr__(self, "twins", tuple(self.twins))
        if self.role is Role.DEVICE:
            if self.twin is None or self.owner is None:
                raise ValidationError(f"device {self.id!r} needs both 'twin' and 'owner'")
            validate_id(self.twin, "twin")
            validate_id(self.owner, "owner")
        elif self.twin is not None or self.owner is not None:
            raise ValidationError(f"{self.role} {self.id!r}: only devices have 'twin'/'owner'")
        if self.role is not Role.OWNER and (self.twins or self.operator):
            raise ValidationError(f"{self.role} {self.id!r}: only owners have 'twins'/'operator'")
        if len(self.twins) > MAX_TWINS_PER_OWNER:
            raise ValidationError(f"owner {self.id!r} lists too many twins")
        for t in self.twins:
            validate_id(t, "twin")
        if not isinstance(self.operator, bool):
            raise ValidationError(f"client {self.id!r}: 'operator' must be true/false")

    @classmethod
    def create(
        cls,
        client_id: str,
        role: Role | str,
        password: str,
        *,
        iterations: int = DEFAULT_ITERATIONS,
        **attrs: Any,
    ) -> Principal:
        """Build a principal from a plain password (hashed here, never stored)."""
        return cls(client_id, role, hash_password(password, iterations=iterations), **attrs)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d["role"] = self.role.value
        d["twins"] = list(self.twins)
        return {k: v for k, v in d.items() if v not in (None, [], False)}

    @classmethod
    def from_json(cls, client_id: str, data: object) -> Principal:
        if not isinstance(data, dict):
            raise ValidationError(f"client {client_id!r}: entry must be an object")
        allowed = {"role", "password_hash", "twin", "owner", "twins", "operator"}
        extra = set(data) - allowed
        if extra:
            raise ValidationError(f"client {client_id!r}: unknown field(s) {sorted(extra)}")
        if "role" not in data or "password_hash" not in data:
            raise ValidationError(f"client {client_id!r}: needs 'role' and 'password_hash'")
        twins = data.get("twins", [])
        if not isinstance(twins, list):
            raise ValidationError(f"client {client_id!r}: 'twins' must be a list")
        for name in ("role", "password_hash", "twin", "owner"):
            if name in data and not isinstance(data[name], str):
                raise ValidationError(f"client {client_id!r}: {name!r} must be a string")
        return cls(
            client_id,
            data["role"],
            data["password_hash"],
            twin=data.get("twin"),
            owner=data.get("owner"),
            twins=tuple(twins),
            operator=data.get("operator", False),
        )


Registry = Mapping[str, Principal]


def check_registry(clients: Registry) -> None:
    """Cross-entry rules: each device's owner exists and is an owner."""
    for p in clients.values():
        if p.role is Role.DEVICE:
            owner = clients.get(p.owner or "")
            if owner is None or owner.role is not Role.OWNER:
                raise ValidationError(f"device {p.id!r}: owner {p.owner!r} is not a known owner")


def twins_of_owner(clients: Registry, owner_id: str) -> list[str]:
    """Twins an owner may address: those listed on the owner plus those of its devices."""
    owner = clients.get(owner_id)
    twins = set(owner.twins) if owner else set()
    twins.update(p.twin for p in clients.values() if p.role is Role.DEVICE and p.owner == owner_id)
    twins.discard(None)
    return sorted(twins)  # type: ignore[arg-type]


def parse_credentials(text: str, source: str = "credentials") -> dict[str, Principal]:
    """Parse and fully validate the JSON text of a credentials file."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValidationError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
        raise ValidationError(f"{source}: expected an object with \"version\": {FILE_VERSION}")
    entries = doc.get("clients", {})
    if not isinstance(entries, dict) or set(doc) - {"version", "clients"}:
        raise ValidationError(f"{source}: expected keys 'version' and 'clients' (an object)")
    clients = {cid: Principal.from_json(cid, data) for cid, data in entries.items()}
    check_registry(clients)
    return clients


class CredentialsFile:
    """The JSON file holding a deployment's principals; safe for concurrent writers."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Principal]:
        """All principals (empty if the file does not exist yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        return parse_credentials(text, str(self.path))

    def stamp(self) -> tuple[int, int, int] | None:
        """(inode, mtime_ns, size) or None: a cheap "did it change" token (writes rename)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, clients: Mapping[str, Principal]) -> None:
        check_registry(clients)
        doc = {
            "version": FILE_VERSION,
            "clients": {cid: clients[cid].to_json() for cid in sorted(clients)},
        }
        fd, tmp = tempfile.mkstemp(prefix=".clients-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def add(self, principal: Principal, *, replace: bool = False) -> None:
        """Add (or with ``replace`` update) one principal atomically."""
        with self._locked():
            clients = self.load()
            if principal.id in clients and not replace:
                raise ValidationError(f"client {principal.id!r} already exists")
            clients[principal.id] = principal
            self._write(clients)

    def remove(self, client_id: str) -> Principal:
        """Remove one principal atomically; refuses to orphan an owner's devices."""
        with self._locked():
            clients = self.load()
            try:
                removed = clients.pop(client_id)
            except KeyError:
                raise ValidationError(f"no client {client_id!r}") from None
            orphans = [p.id for p in clients.values() if p.owner == client_id]
            if orphans:
                raise ValidationError(
                    f"owner {client_id!r} still has devices {orphans[:5]}; remove them first"
                )
            self._write(clients)
            return removed


def add_client(path: str | os.PathLike[str], principal: Principal, *, replace: bool = False) -> None:
    """Add a principal to the credentials file at ``path`` (atomic, locked)."""
    CredentialsFile(path).add(principal, replace=replace)


def remove_client(path: str | os.PathLike[str], client_id: str) -> Principal:
    """Remove a principal from the credentials file at ``path`` (atomic, locked)."""
    return CredentialsFile(path).remove(client_id)
