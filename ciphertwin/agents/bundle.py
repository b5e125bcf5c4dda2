"""The device enrollment bundle: everything an owner hands a new device, in one file.

The owner generates the device's keys, signs its write token and packs them with the owner's
public keys, the broker connection, the key-epoch policy, the attribute rules and the source
spec. The bundle carries secrets (device keys, broker password), so it is always sealed with a
passphrase (Argon2id + AES-GCM) and written 0600, fit for a USB stick or a QR code. The
passphrase also authenticates the bundle: the device refuses a plaintext one, which anyone
who handled the file could have read or replaced (``allow_plaintext`` exists for tests).
The CLI takes the passphrase from ``$CIPHERTWIN_BUNDLE_PASSPHRASE``, stdin or a prompt.

On the device, ``enroll_from_bundle`` turns it into a local identity (plaintext key file,
since a Pi runs unattended, mode 0600) plus ``device.msgpack`` with the rest, and
``load_enrolled_device`` gives the run loop a checked ``DeviceConfig``. Every decode is strict
(exact field sets, types, sizes) and re-checks that the write token is signed by the owner
key in the bundle, names this twin and this device's signing key.
"""

from __future__ import annotations

import importlib
import io
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciphertwin.agents.attribute_rules import MAX_RULES, AttributeRules
from ciphertwin.agents.identity import (
    Identity,
    load_identity,
    read_private_file,
    save_identity,
    write_private_file,
)
from ciphertwin.bus.topics import DEFAULT_PREFIX, validate_id, validate_prefix
from ciphertwin.crypto import wire
from ciphertwin.crypto.epochs import KeyEpochPolicy
from ciphertwin.crypto.errors import DecryptionFailed, SignatureInvalid, TokenRejected
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey
from ciphertwin.crypto.passwords import (
    Argon2Params,
    decrypt_with_passphrase,
    encrypt_with_passphrase,
)
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import WriteToken, verify_write_token
from ciphertwin.errors import CipherTwinError, ValidationError

__all__ = [
    "BrokerConnection",
    "EnrollmentBundle",
    "DeviceConfig",
    "QrUnavailable",
    "DEVICE_CONFIG_FILE",
    "PASSPHRASE_ENV",
    "seal_bundle",
    "open_bundle",
    "write_bundle",
    "read_bundle",
    "bundle_qr_png",
    "enroll_from_bundle",
    "load_enrolled_device",
]

DEVICE_CONFIG_FILE = "device.msgpack"
PASSPHRASE_ENV = "CIPHERTWIN_BUNDLE_PASSPHRASE"  # not the owner's key passphrase: it travels
SOURCE_KINDS = ("simulated", "command", "stdin", "plugin")
MAX_BUNDLE_BYTES = 256 * 1024
QR_MAX_BYTES = 2953  # binary capacity of a version-40 QR code at error level L

_BUNDLE_TAG = "enrollment-bundle"
_SEALED_TAG = "sealed-bundle"
_CONFIG_TAG = "device-config"
_BROKER_TAG = "broker-connection"
_AAD = b"ciphertwin/v1/enrollment-bundle"
_PUBLIC_FIELDS = ("twin", "device", "owner_pre", "owner_vk", "token", "broker", "epoch",
                  "rules", "source")
_BROKER_FIELDS = ("host", "port", "prefix", "username", "password", "tls", "ca")
_MAX_PASSWORD = 1024
_MAX_CA_BYTES = 64 * 1024


class QrUnavailable(CipherTwinError):
    """QR output needs the optional ``segno`` package."""


# --- broker connection ---------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerConnection:
    """How the device reaches the broker; ``ca_pem`` pins a private CA when ``tls`` is on."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    prefix: str = DEFAULT_PREFIX
    tls: bool = False
    ca_pem: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not 1 <= len(self.host) <= 253 or any(
            c.isspace() or c in "/#+" for c in self.host
        ):
            raise ValidationError(f"broker host {self.host!r} is not a host name or address")
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValidationError(f"broker port must be 1..65535, got {self.port!r}")
        validate_id(self.username, "broker username")
        if not isinstance(self.password, str) or not 1 <= len(self.password) <= _MAX_PASSWORD:
            raise ValidationError(f"broker password must be 1..{_MAX_PASSWORD} characters")
        validate_prefix(self.prefix)
        if not isinstance(self.tls, bool):
            raise ValidationError("broker tls must be true or false")
        if self.ca_pem is not None:
            ca = wire.check_bytes(self.ca_pem, "broker CA", max_len=_MAX_CA_BYTES)
            if b"-----BEGIN CERTIFICATE-----" not in ca:
                raise ValidationError("broker CA must be PEM certificate(s)")
            if not self.tls:
                raise ValidationError("a broker CA certificate only makes sense with tls on")
            object.__setattr__(self, "ca_pem", ca)

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS context for the bus client (system trust store, or only ``ca_pem`` if given)."""
        if not self.tls:
            return None
        if self.ca_pem is None:
            return ssl.create_default_context()
        try:
            return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ValidationError(f"broker CA certificate is unusable: {exc}") from None

    def to_map(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "prefix": self.prefix,
                "username": self.username, "password": self.password, "tls": self.tls,
                "ca": self.ca_pem}

    @classmethod
    def from_map(cls, obj: object) -> BrokerConnection:
        if not isinstance(obj, dict) or set(obj) != set(_BROKER_FIELDS):
            raise ValidationError(
                f"broker: expected a map with exactly {', '.join(_BROKER_FIELDS)}"
            )
        f = wire.Fields("broker", obj)
        ca = f.raw("ca")
        return cls(host=f.str("host", 253), port=f.int("port", 1, 65535),
                   username=f.str("username", 64), password=f.str("password", _MAX_PASSWORD),
                   prefix=f.str("prefix", 1024), tls=f.raw("tls"),
                   ca_pem=None if ca is None else f.bytes("ca", max_len=_MAX_CA_BYTES))


# --- shared checks -------------------------------------------------------------------------


def _rules(rules: object, twin: str, device: str) -> list[dict[str, Any]]:
    if not isinstance(rules, list) or not all(isinstance(r, Mapping) for r in rules):
        raise ValidationError("attribute rules must be a list of maps")
    if len(rules) > MAX_RULES:
        raise ValidationError(f"at most {MAX_RULES} attribute rules")
    AttributeRules.from_config([dict(r) for r in rules], twin, device)  # validates every rule
    return [dict(r) for r in rules]


def _source(source: object) -> dict[str, Any]:
    """Shape check only: building a plugin source would import code, so the run loop does it."""
    if not isinstance(source, Mapping) or source.get("kind") not in SOURCE_KINDS:
        raise ValidationError(
            f"source must be a map whose 'kind' is one of {', '.join(SOURCE_KINDS)}"
        )
    if len(source) > 64 or not all(isinstance(k, str) for k in source):
        raise ValidationError("source must be a map of at most 64 string keys")
    wire.canonical(source)  # refuses values without a msgpack encoding
    return dict(source)


def _epoch(text: object) -> str:
    if not isinstance(text, str) or len(text) > 32:
        raise ValidationError("key-epoch policy must be text like 'hour', 'day', 'item' or '900s'")
    KeyEpochPolicy.parse(text)
    return text


def _check_token(token_bytes: object, twin: str, device_key: VerifyKey,
                 owner_verify: VerifyKey) -> WriteToken:
    """Signature by the owner, twin and device key; the time window is checked at enrolment."""
    token = WriteToken.from_bytes(wire.check_bytes(token_bytes, "write token", max_len=64 * 1024))
    try:
        verify_write_token(token, owner_verify, twin=twin, device_key=device_key,
                           now=token.not_before)
    except (TokenRejected, SignatureInvalid) as exc:
        raise ValidationError(f"write token in bundle does not fit it: {exc}") from None
    return token


def _public_map(twin: str, device: str, owner_pre: PrePublicKey, owner_verify: VerifyKey,
                write_token: bytes, broker: BrokerConnection, epoch_policy: str,
                rules: list[dict[str, Any]], source: dict[str, Any]) -> dict[str, Any]:
    return {"twin": twin, "device": device, "owner_pre": owner_pre.to_bytes(),
            "owner_vk": owner_verify.raw, "token": write_token, "broker": broker.to_map(),
            "epoch": epoch_policy, "rules": rules, "source": source}


def _parse_public(f: wire.Fields) -> dict[str, Any]:
    twin = validate_id(f.str("twin", 64), "twin")
    device = validate_id(f.str("device", 64), "device")
    return {
        "twin": twin,
        "device": device,
        "owner_pre": PrePublicKey.from_bytes(f.bytes("owner_pre", max_len=256)),
        "owner_verify": VerifyKey(f.bytes("owner_vk", 32)),
        "write_token": f.bytes("token", max_len=64 * 1024),
        "broker": BrokerConnection.from_map(f.map("broker", 16)),
        "epoch_policy": f.str("epoch", 32),
        "rules": f.list("rules", MAX_RULES),
        "source": f.map("source", 64),
    }


# --- the bundle ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EnrollmentBundle:
    """Owner → device hand-over; construction validates it (token fits twin/device/owner)."""

    twin: str
    device: str
    device_pre: PreKeyPair = field(repr=False)
    device_signing: SigningKey = field(repr=False)
    owner_pre: PrePublicKey
    owner_verify: VerifyKey
    write_token: bytes = field(repr=False)
    broker: BrokerConnection
    epoch_policy: str = "hour"
    rules: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "simulated"})

    def __post_init__(self) -> None:
        validate_id(self.twin, "twin")
        validate_id(self.device, "device")
        if not isinstance(self.device_pre, PreKeyPair) or not isinstance(self.device_signing,
                                                                         SigningKey):
            raise ValidationError("device keys must be a PreKeyPair and a SigningKey")
        if not isinstance(self.owner_pre, PrePublicKey) or not isinstance(self.owner_verify,
                                                                          VerifyKey):
            raise ValidationError("owner keys must be a PrePublicKey and a VerifyKey")
        if not isinstance(self.broker, BrokerConnection):
            raise ValidationError("broker must be a BrokerConnection")
        if isinstance(self.write_token, WriteToken):
            object.__setattr__(self, "write_token", self.write_token.to_bytes())
        _check_token(self.write_token, self.twin, self.device_signing.verify_key,
                     self.owner_verify)
        object.__setattr__(self, "epoch_policy", _epoch(self.epoch_policy))
        object.__setattr__(self, "rules", _rules(self.rules, self.twin, self.device))
        object.__setattr__(self, "source", _source(self.source))

    @property
    def token(self) -> WriteToken:
        return WriteToken.from_bytes(self.write_token)

    def to_bytes(self) -> bytes:
        """Canonical versioned msgpack WITH THE DEVICE SECRETS: seal or keep 0600."""
        public = _public_map(self.twin, self.device, self.owner_pre, self.owner_verify,
                             self.write_token, self.broker, self.epoch_policy, self.rules,
                             self.source)
        return wire.encode(_BUNDLE_TAG, {**public, "device_pre": self.device_pre.to_bytes(),
                                         "device_sig": self.device_signing.to_bytes()})

    @classmethod
    def from_bytes(cls, data: bytes) -> EnrollmentBundle:
        f = wire.decode(data, _BUNDLE_TAG, (*_PUBLIC_FIELDS, "device_pre", "device_sig"),
                        max_bytes=MAX_BUNDLE_BYTES)
        return cls(device_pre=PreKeyPair.from_bytes(f.bytes("device_pre", max_len=128)),
                   device_signing=SigningKey.from_bytes(f.bytes("device_sig", max_len=128)),
                   **_parse_public(f))


Passphrase = str | Callable[[], str] | None
"""A passphrase, or a function asked for it only once the bundle turns out to be sealed."""


def seal_bundle(bundle: EnrollmentBundle, passphrase: str | None,
                params: Argon2Params = Argon2Params(), *, allow_plaintext: bool = False) -> bytes:
    """The bundle as bytes, encrypted under ``passphrase`` (None only with ``allow_plaintext``)."""
    if not isinstance(bundle, EnrollmentBundle):
        raise ValidationError("expected an EnrollmentBundle")
    raw = bundle.to_bytes()
    if passphrase is None:
        if not allow_plaintext:
            raise ValidationError(
                "refusing to write an enrollment bundle without a passphrase: it holds the "
                "device's secret keys and broker password"
            )
        return wire.encode(_SEALED_TAG, {"protected": False, "body": raw})
    body = encrypt_with_passphrase(passphrase, raw, _AAD, params)
    return wire.encode(_SEALED_TAG, {"protected": True, "body": body})


def open_bundle(data: bytes, passphrase: Passphrase, *,
                allow_plaintext: bool = False) -> EnrollmentBundle:
    """Inverse of ``seal_bundle``; a plaintext bundle is refused unless ``allow_plaintext``,
    a wrong passphrase or any tampering raises a clear ``ValidationError``."""
    f = wire.decode(data, _SEALED_TAG, ("protected", "body"), max_bytes=MAX_BUNDLE_BYTES + 1024)
    protected, body = f.raw("protected"), f.bytes("body", max_len=MAX_BUNDLE_BYTES + 512)
    if not isinstance(protected, bool):
        raise ValidationError("sealed-bundle.protected must be true or false")
    if not protected and not allow_plaintext:
        raise ValidationError(
            "refusing a plaintext enrollment bundle: anyone who handled it could have read or "
            "replaced its keys; ask the owner for a passphrase-protected one"
        )
    if protected:
        if callable(passphrase):
            passphrase = passphrase()
        if passphrase is None:
            raise ValidationError(
                "the enrollment bundle is passphrase-protected: give the passphrase"
            )
        try:
            body = decrypt_with_passphrase(passphrase, body, _AAD)
        except DecryptionFailed:
            raise ValidationError("wrong passphrase or corrupted bundle") from None
    return EnrollmentBundle.from_bytes(body)


def write_bundle(path: str | os.PathLike[str], bundle: EnrollmentBundle, passphrase: str | None,
                 params: Argon2Params = Argon2Params(), *,
                 allow_plaintext: bool = False) -> Path:
    """Write the sealed bundle to ``path`` with mode 0600 (atomically)."""
    sealed = seal_bundle(bundle, passphrase, params, allow_plaintext=allow_plaintext)
    return write_private_file(path, sealed, 0o600)


def read_bundle(path: str | os.PathLike[str], passphrase: Passphrase, *,
                allow_plaintext: bool = False) -> EnrollmentBundle:
    """Read a bundle file (its mode is not enforced: it may come from removable media)."""
    data = read_private_file(path, MAX_BUNDLE_BYTES + 1024, require_private=False)
    return open_bundle(data, passphrase, allow_plaintext=allow_plaintext)


def bundle_qr_png(bundle_bytes: bytes, path: str | os.PathLike[str], scale: int = 4) -> Path:
    """Write ``bundle_bytes`` (a sealed bundle) as a QR code PNG, mode 0600 (it holds secrets)."""
    data = wire.check_bytes(bundle_bytes, "bundle bytes", max_len=MAX_BUNDLE_BYTES + 1024)
    if len(data) > QR_MAX_BYTES:
        raise ValidationError(
            f"bundle is {len(data)} bytes, a QR code holds at most {QR_MAX_BYTES}; "
            "use the bundle file (fewer rules, shorter source spec) instead"
        )
    try:
        segno = importlib.import_module("segno")
    except ImportError:
        raise QrUnavailable(
            "QR codes need the optional 'segno' package: pip install 'ciphertwin[qr]'"
        ) from None
    qr = segno.make(data, error="l", micro=False)
    buf = io.BytesIO()
    qr.save(buf, kind="png", scale=scale)
    return write_private_file(path, buf.getvalue(), 0o600)


# --- the device side -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DeviceConfig:
    """Everything ``ciphertwin device run`` needs, loaded and cross-checked."""

    identity: Identity = field(repr=False)
    twin: str
    device: str
    owner_pre: PrePublicKey
    owner_verify: VerifyKey
    write_token: WriteToken = field(repr=False)
    broker: BrokerConnection
    epoch_policy: KeyEpochPolicy
    rules: list[dict[str, Any]]
    source: dict[str, Any]

    def attribute_rules(self) -> AttributeRules:
        return AttributeRules.from_config(self.rules, self.twin, self.device)


def enroll_from_bundle(bundle: EnrollmentBundle, home_dir: str | os.PathLike[str], *,
                       overwrite: bool = False) -> Identity:
    """Install the bundle as this device's identity and config in ``home_dir`` (all 0600)."""
    if not isinstance(bundle, EnrollmentBundle):
        raise ValidationError("expected an EnrollmentBundle")
    token = bundle.token  # signature, twin and device key were checked when it was built
    if token.not_after <= time.time():
        raise ValidationError(
            f"cannot enroll: the write token expired at {token.not_after} (unix time); "
            "ask the owner for a new bundle"
        )
    identity = Identity(bundle.device, "device", bundle.device_pre, bundle.device_signing,
                        X25519KeyPair.generate(), {"twin": bundle.twin})
    home = Path(home_dir)
    config = wire.encode(_CONFIG_TAG, _public_map(
        bundle.twin, bundle.device, bundle.owner_pre, bundle.owner_verify, bundle.write_token,
        bundle.broker, bundle.epoch_policy, bundle.rules, bundle.source))
    save_identity(identity, home, None, allow_plaintext=True, overwrite=overwrite)
    write_private_file(home / DEVICE_CONFIG_FILE, config, 0o600)
    return identity


def load_enrolled_device(home_dir: str | os.PathLike[str],
                         passphrase: str | None = None) -> DeviceConfig:
    """Load identity + ``device.msgpack`` and check they belong together."""
    home = Path(home_dir)
    identity = load_identity(home, passphrase)
    data = read_private_file(home / DEVICE_CONFIG_FILE, MAX_BUNDLE_BYTES)
    p = _parse_public(wire.decode(data, _CONFIG_TAG, _PUBLIC_FIELDS, max_bytes=MAX_BUNDLE_BYTES))
    if identity.role != "device" or identity.name != p["device"]:
        raise ValidationError(f"{home}: identity {identity.name!r} is not device {p['device']!r}")
    token = _check_token(p["write_token"], p["twin"], identity.signing.verify_key,
                         p["owner_verify"])
    return DeviceConfig(
        identity=identity, twin=p["twin"], device=p["device"], owner_pre=p["owner_pre"],
        owner_verify=p["owner_verify"], write_token=token, broker=p["broker"],
        epoch_policy=KeyEpochPolicy.parse(_epoch(p["epoch_policy"])),
        rules=_rules(p["rules"], p["twin"], p["device"]), source=_source(p["source"]),
    )
