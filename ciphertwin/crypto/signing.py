"""Ed25519 signatures with domain separation, over canonical msgpack bytes.

A signature is always made over ``"ciphertwin/v1/sig" ‖ 0 ‖ context ‖ 0 ‖ message``, so a
signature produced for one purpose (say a write token) can never be replayed as another (say
an envelope or a data signature).

Signing uses ``cryptography`` (OpenSSL); verifying uses libsodium through PyNaCl: the cloud
checks every stored item and every node checks every input item, and libsodium verifies in
about half of OpenSSL's time here (≈ 68 vs 125 µs; ``benchmarks/crypto_ops.py``). It is also
the stricter verifier (it refuses small-order keys and non-canonical ``S``), so one signature
never verifies at one party and fails at another through leniency.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.wire import canonical
from ciphertwin.errors import ValidationError

__all__ = ["SigningKey", "VerifyKey", "canonical", "SIGNATURE_BYTES"]

SIGNATURE_BYTES = 64
KEY_BYTES = 32
_PREFIX = b"ciphertwin/v1/sig\x00"
_CONTEXT = re.compile(r"[a-z0-9][a-z0-9._/-]{0,63}")
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _signed_bytes(context: str, message: bytes) -> bytes:
    if not isinstance(context, str) or not _CONTEXT.fullmatch(context):
        raise ValidationError(f"bad signature context {context!r} (lowercase, [a-z0-9._/-])")
    if not isinstance(message, (bytes, bytearray)):
        raise ValidationError(f"signed message must be bytes, got {type(message).__name__}")
    return _PREFIX + context.encode() + b"\x00" + bytes(message)


class VerifyKey:
    """An Ed25519 public key."""

    TAG = "sig-vk"
    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_BYTES:
            raise ValidationError(f"Ed25519 public key must be {KEY_BYTES} bytes")
        try:
            Ed25519PublicKey.from_public_bytes(bytes(raw))
        except ValueError as exc:
            raise ValidationError("not a valid Ed25519 public key") from exc
        self.raw = bytes(raw)

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(self.raw).digest()[:16]

    def verify(self, context: str, message: bytes, signature: bytes) -> None:
        """Raise ``SignatureInvalid`` unless ``signature`` is ours over (context, message)."""
        data = _signed_bytes(context, message)
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
            raise SignatureInvalid(f"signature must be {SIGNATURE_BYTES} bytes")
        try:
            crypto_sign_open(bytes(signature) + data, self.raw)
        except (CryptoError, ValueError):
            raise SignatureInvalid(f"signature does not verify ({context})") from None

    def verify_object(self, context: str, obj: Any, signature: bytes) -> None:
        self.verify(context, canonical(obj), signature)

    def to_bytes(self) -> bytes:
        return wire.encode(self.TAG, {"key": self.raw})

    @classmethod
    def from_bytes(cls, data: bytes) -> VerifyKey:
        return cls(wire.decode(data, cls.TAG, ("key",), max_bytes=128).bytes("key", KEY_BYTES))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.raw.hex()[:16]}…)"


class SigningKey:
    """An Ed25519 private key."""

    TAG = "sig-sk"
    __slots__ = ("_key", "verify_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.verify_key = VerifyKey(key.public_key().public_bytes(*_RAW))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, context: str, message: bytes) -> bytes:
        return self._key.sign(_signed_bytes(context, message))

    def sign_object(self, context: str, obj: Any) -> bytes:
        """Sign the canonical msgpack encoding of ``obj``."""
        return self.sign(context, canonical(obj))

    def to_bytes(self) -> bytes:
        """Encoding WITH THE SECRET seed: store only encrypted (see passwords.py)."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return wire.encode(self.TAG, {"seed": seed})

    @classmethod
    def from_bytes(cls, data: bytes) -> SigningKey:
        seed = wire.decode(data, cls.TAG, ("seed",), max_bytes=128).bytes("seed", KEY_BYTES)
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def __repr__(self) -> str:
        return f"SigningKey(public={self.verify_key.raw.hex()[:16]}…)"


wire.register(VerifyKey.TAG, VerifyKey.from_bytes)
wire.register(SigningKey.TAG, SigningKey.from_bytes)
