"""Local identities of principals: key files in a private home directory.

A principal (owner, device, receiver, MPC node, or the operator who signs node rosters)
keeps all its secret keys in one file, ``secret.key`` (mode 0600, directory 0700), encrypted
with a passphrase through Argon2id and AES-256-GCM (``ciphertwin.crypto.passwords``).
Unattended devices may store it in plaintext, but only when asked explicitly, and the file
then records that it is unprotected.
``public.key`` holds only public keys so it can be handed to others (an owner imports a
receiver's public key file to grant it).

Private files are written to a fresh temporary file created with ``O_CREAT|O_EXCL`` and mode
0600, fsynced, then renamed over the target, so a key file is never world-readable, not even
briefly, and never half-written.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ciphertwin.bus.topics import validate_id
from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import DecryptionFailed
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey
from ciphertwin.crypto.passwords import (
    Argon2Params,
    decrypt_with_passphrase,
    encrypt_with_passphrase,
)
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.config.files import MAX_FILE_BYTES, read_private_file, write_private_file
from ciphertwin.errors import ValidationError

__all__ = [
    "ROLES",
    "SECRET_FILE",
    "PUBLIC_FILE",
    "ExtraValue",
    "Identity",
    "PublicIdentity",
    "default_home",
    "save_identity",
    "load_identity",
    "load_public",
    "is_encrypted",
    "passphrase_from_env_or_prompt",
    "write_private_file",
    "read_private_file",
]

ROLES = ("owner", "device", "receiver", "node", "operator")
SECRET_FILE = "secret.key"
PUBLIC_FILE = "public.key"
HOME_ENV = "CIPHERTWIN_HOME"
PASSPHRASE_ENV = "CIPHERTWIN_PASSPHRASE"

_SECRET_TAG = "identity-secret"
_FILE_TAG = "secret-key-file"
_PUBLIC_TAG = "identity-public"
_AAD = b"ciphertwin/v1/identity\x00"
_ENCRYPTED = "argon2id-aes256gcm"
_PLAINTEXT = "plaintext"
_PLAINTEXT_NOTE = "UNENCRYPTED secret keys (allow_plaintext): anyone who reads this file owns them"
_MAX_EXTRA = 64
_MAX_EXTRA_KEY = 64
_MAX_EXTRA_STR = 1024
_MAX_EXTRA_BYTES = 4096

ExtraValue = str | int | bytes


# --- private files -----------------------------------------------------------------------


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not directory.is_dir():
        raise ValidationError(f"{directory} is not a directory")
    os.chmod(directory, 0o700)


def default_home(name: str, base: str | os.PathLike[str] | None = None) -> Path:
    """``$CIPHERTWIN_HOME/<name>`` or ``~/.ciphertwin/<name>`` unless ``base`` is given."""
    validate_id(name, "identity name")
    root = base if base is not None else os.environ.get(HOME_ENV) or "~/.ciphertwin"
    return Path(root).expanduser() / name


# --- validation helpers --------------------------------------------------------------------


def _role(role: object) -> str:
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return str(role)


def _extra(extra: object) -> dict[str, ExtraValue]:
    if not isinstance(extra, Mapping):
        raise ValidationError("extra must be a map of str to str/int/bytes")
    if len(extra) > _MAX_EXTRA:
        raise ValidationError(f"extra has {len(extra)} entries, limit is {_MAX_EXTRA}")
    clean: dict[str, ExtraValue] = {}
    for key, value in extra.items():
        if not isinstance(key, str) or not 1 <= len(key) <= _MAX_EXTRA_KEY:
            raise ValidationError(f"extra keys must be 1..{_MAX_EXTRA_KEY} character strings")
        if isinstance(value, bool) or not isinstance(value, (str, int, bytes, bytearray)):
            raise ValidationError(f"extra[{key!r}] must be str, int or bytes")
        if isinstance(value, str) and len(value) > _MAX_EXTRA_STR:
            raise ValidationError(f"extra[{key!r}] longer than {_MAX_EXTRA_STR} characters")
        if isinstance(value, (bytes, bytearray)) and len(value) > _MAX_EXTRA_BYTES:
            raise ValidationError(f"extra[{key!r}] longer than {_MAX_EXTRA_BYTES} bytes")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValidationError(f"extra[{key!r}] out of the 64-bit integer range")
        clean[key] = bytes(value) if isinstance(value, bytearray) else value
    return clean


# --- public identity -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PublicIdentity:
    """What others may know of a principal: its name, role and public keys."""

    name: str
    role: str
    pre: PrePublicKey
    verify_key: VerifyKey
    hpke_public: bytes
    extra: dict[str, ExtraValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id(self.name, "identity name")
        _role(self.role)
        if not isinstance(self.pre, PrePublicKey) or not isinstance(self.verify_key, VerifyKey):
            raise ValidationError("pre must be a PrePublicKey and verify_key a VerifyKey")
        wire.check_bytes(self.hpke_public, "hpke_public", 32)
        object.__setattr__(self, "extra", _extra(self.extra))

    def to_bytes(self) -> bytes:
        return wire.encode(_PUBLIC_TAG, {
            "name": self.name, "role": self.role, "pre": self.pre.to_bytes(),
            "vk": self.verify_key.raw, "hpke": self.hpke_public, "extra": self.extra,
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        """Strict parse; the PRE key's two halves are checked to share one exponent."""
        f = wire.decode(data, _PUBLIC_TAG, ("name", "role", "pre", "vk", "hpke", "extra"),
                        max_bytes=512 * 1024)
        return cls(
            name=f.str("name", 64),
            role=f.str("role", 16),
            pre=PrePublicKey.from_bytes(f.bytes("pre", max_len=256)),
            verify_key=VerifyKey(f.bytes("vk", 32)),
            hpke_public=f.bytes("hpke", 32),
            extra=_extra(f.map("extra", _MAX_EXTRA)),
        )

    @property
    def fingerprint(self) -> str:
        """Short hex digest of the public keys, to compare out of band before trusting."""
        keys = wire.canonical([self.name, self.role, self.pre.to_bytes(), self.verify_key.raw,
                               self.hpke_public])
        return hashlib.sha256(keys).hexdigest()[:32]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicIdentity) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())


def load_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """Read a ``public.key`` file, or the one inside an identity directory."""
    path = Path(path)
    if path.is_dir():
        path = path / PUBLIC_FILE
    return PublicIdentity.from_bytes(read_private_file(path, 512 * 1024, require_private=False))


# --- identity ------------------------------------------------------------------------------


@dataclass(eq=False)
class Identity:
    """A principal's secret keys: PRE (data access), Ed25519 (signing), X25519 (HPKE)."""

    name: str
    role: str
    pre: PreKeyPair
    signing: SigningKey
    hpke: X25519KeyPair
    extra: dict[str, ExtraValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id(self.name, "identity name")
        _role(self.role)
        if not (isinstance(self.pre, PreKeyPair) and isinstance(self.signing, SigningKey)
                and isinstance(self.hpke, X25519KeyPair)):
            raise ValidationError("identity keys must be PreKeyPair, SigningKey, X25519KeyPair")
        self.extra = _extra(self.extra)

    @classmethod
    def generate(cls, name: str, role: str,
                 extra: Mapping[str, ExtraValue] | None = None) -> Identity:
        return cls(name, role, PreKeyPair.generate(), SigningKey.generate(),
                   X25519KeyPair.generate(), dict(extra or {}))

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.role, self.pre.public, self.signing.verify_key,
                              self.hpke.public_bytes, dict(self.extra))

    def secret_bytes(self) -> bytes:
        """All secrets in one wire blob: store only through ``save_identity``."""
        return wire.encode(_SECRET_TAG, {
            "name": self.name, "role": self.role, "pre": self.pre.to_bytes(),
            "sig": self.signing.to_bytes(), "hpke": self.hpke.to_bytes(), "extra": self.extra,
        })

    @classmethod
    def from_secret_bytes(cls, data: bytes) -> Identity:
        f = wire.decode(data, _SECRET_TAG, ("name", "role", "pre", "sig", "hpke", "extra"),
                        max_bytes=512 * 1024)
        return cls(
            name=f.str("name", 64),
            role=f.str("role", 16),
            pre=PreKeyPair.from_bytes(f.bytes("pre", max_len=128)),
            signing=SigningKey.from_bytes(f.bytes("sig", max_len=128)),
            hpke=X25519KeyPair.from_bytes(f.bytes("hpke", max_len=128)),
            extra=_extra(f.map("extra", _MAX_EXTRA)),
        )

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, role={self.role!r}, pre={self.pre.key_id.hex()})"


def save_identity(
    identity: Identity,
    directory: str | os.PathLike[str],
    passphrase: str | None,
    params: Argon2Params = Argon2Params(),
    *,
    allow_plaintext: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``secret.key`` (0600, encrypted unless ``allow_plaintext``) and ``public.key``."""
    if not isinstance(identity, Identity):
        raise ValidationError("expected an Identity")
    directory = Path(directory)
    secret_path = directory / SECRET_FILE
    if passphrase is None and not allow_plaintext:
        raise ValidationError(
            "refusing to store secret keys without a passphrase; pass allow_plaintext=True "
            "only for unattended devices"
        )
    if secret_path.exists() and not overwrite:
        raise ValidationError(f"{secret_path} already exists; refusing to overwrite keys")
    aad = _AAD + identity.name.encode()
    if passphrase is not None:
        protection, note = _ENCRYPTED, ""
        body = encrypt_with_passphrase(passphrase, identity.secret_bytes(), aad, params)
    else:
        protection, note, body = _PLAINTEXT, _PLAINTEXT_NOTE, identity.secret_bytes()
    blob = wire.encode(_FILE_TAG, {"name": identity.name, "protection": protection,
                                   "note": note, "body": body})
    _private_dir(directory)
    write_private_file(secret_path, blob, 0o600)
    write_private_file(directory / PUBLIC_FILE, identity.public.to_bytes(), 0o644)
    return directory


def is_encrypted(directory: str | os.PathLike[str]) -> bool:
    """Whether the identity in ``directory`` needs a passphrase (so callers know to ask)."""
    f = _read_secret_file(Path(directory) / SECRET_FILE)
    return f.str("protection", 32) == _ENCRYPTED


def _read_secret_file(path: Path) -> wire.Fields:
    data = read_private_file(path)
    return wire.decode(data, _FILE_TAG, ("name", "protection", "note", "body"),
                       max_bytes=MAX_FILE_BYTES)


def load_identity(directory: str | os.PathLike[str], passphrase: str | None) -> Identity:
    """Read and decrypt ``secret.key``; refuses wide file modes and a mismatching public.key."""
    directory = Path(directory)
    secret_path = directory / SECRET_FILE
    f = _read_secret_file(secret_path)
    name, protection = f.str("name", 64), f.str("protection", 32)
    body = f.bytes("body", max_len=MAX_FILE_BYTES)
    if protection == _ENCRYPTED:
        if passphrase is None:
            raise ValidationError(f"{secret_path} is passphrase-protected: a passphrase is needed")
        try:
            plain = decrypt_with_passphrase(passphrase, body, _AAD + name.encode())
        except DecryptionFailed:
            raise ValidationError("wrong passphrase or corrupted key file") from None
    elif protection == _PLAINTEXT:
        plain = body
    else:
        raise ValidationError(f"{secret_path}: unknown protection {protection!r}")
    identity = Identity.from_secret_bytes(plain)
    if identity.name != name:
        raise ValidationError(
            f"{secret_path}: header names {name!r} but keys are {identity.name!r}"
        )
    public_path = directory / PUBLIC_FILE
    if public_path.exists() and load_public(public_path) != identity.public:
        raise ValidationError(f"{public_path} does not match {secret_path}; re-export it")
    return identity


def passphrase_from_env_or_prompt(env_var: str = PASSPHRASE_ENV, confirm: bool = False,
                                  prompt: str = "Passphrase: ") -> str:
    """The passphrase from ``env_var`` if set, else asked on the terminal (twice if ``confirm``)."""
    value = os.environ.get(env_var)
    if value:
        return value
    if not sys.stdin.isatty():
        raise ValidationError(f"no passphrase: set {env_var} or run in an interactive terminal")
    first = getpass.getpass(prompt)
    if not first:
        raise ValidationError("empty passphrase")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise ValidationError("passphrases do not match")
    return first
