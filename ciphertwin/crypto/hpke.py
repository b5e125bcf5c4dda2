"""Public-key encryption with HPKE (RFC 9180): X25519, HKDF-SHA256, AES-256-GCM.

Used where a message goes to one known key and no re-encryption is needed: MPC output shares
for a receiver, and bootstrap messages on node channels.  ``cryptography``'s public HPKE API
takes no associated data, so ``aad`` is bound through the key schedule's ``info`` (an
unambiguous length-prefixed encoding of both): a wrong ``info`` or ``aad`` fails to open.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import DecryptionFailed
from ciphertwin.errors import ValidationError

__all__ = ["X25519KeyPair", "hpke_seal", "hpke_open", "public_key_from_bytes"]

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
PUBLIC_KEY_BYTES = 32
_ENC_BYTES = 32
_TAG_BYTES = 16
_MAX_PLAINTEXT = 16 * 1024 * 1024
_RAW_PUBLIC = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise ValidationError(f"{what} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _info(info: bytes, aad: bytes) -> bytes:
    return wire.canonical(["ciphertwin/v1/hpke", _bytes(info, "info"), _bytes(aad, "aad")])


def public_key_from_bytes(data: bytes) -> X25519PublicKey:
    data = _bytes(data, "X25519 public key")
    if len(data) != PUBLIC_KEY_BYTES:
        raise ValidationError(f"X25519 public key must be {PUBLIC_KEY_BYTES} bytes")
    return X25519PublicKey.from_public_bytes(data)


class X25519KeyPair:
    """An X25519 key pair for HPKE; ``public_bytes`` is what others encrypt to."""

    TAG = "x25519-sk"
    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes(*_RAW_PUBLIC)

    @classmethod
    def generate(cls) -> X25519KeyPair:
        return cls(X25519PrivateKey.generate())

    @property
    def private_key(self) -> X25519PrivateKey:
        return self._private

    def to_bytes(self) -> bytes:
        """Encoding WITH THE SECRET: store only encrypted (see passwords.py)."""
        raw = self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return wire.encode(self.TAG, {"sk": raw})

    @classmethod
    def from_bytes(cls, data: bytes) -> X25519KeyPair:
        raw = wire.decode(data, cls.TAG, ("sk",), max_bytes=128).bytes("sk", 32)
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={self.public_bytes.hex()[:16]}…)"


def hpke_seal(recipient_public: bytes | X25519PublicKey, plaintext: bytes, info: bytes = b"",
              aad: bytes = b"") -> bytes:
    """Encrypt to an X25519 public key; returns enc ‖ ciphertext ‖ tag."""
    if not isinstance(recipient_public, X25519PublicKey):
        recipient_public = public_key_from_bytes(recipient_public)
    plaintext = _bytes(plaintext, "plaintext")
    if len(plaintext) > _MAX_PLAINTEXT:
        raise ValidationError(f"plaintext larger than {_MAX_PLAINTEXT} bytes")
    try:
        return SUITE.encrypt(plaintext, recipient_public, info=_info(info, aad))
    except ValueError as exc:  # e.g. a low-order public key gives an all-zero shared secret
        raise ValidationError(f"cannot encrypt to this X25519 public key: {exc}") from None


def hpke_open(private: X25519KeyPair | X25519PrivateKey, blob: bytes, info: bytes = b"",
              aad: bytes = b"") -> bytes:
    """Decrypt an ``hpke_seal`` blob; raises DecryptionFailed on any mismatch."""
    key = private.private_key if isinstance(private, X25519KeyPair) else private
    if not isinstance(key, X25519PrivateKey):
        raise ValidationError("private must be an X25519KeyPair or X25519PrivateKey")
    blob = _bytes(blob, "ciphertext")
    if len(blob) < _ENC_BYTES + _TAG_BYTES:
        raise ValidationError("HPKE ciphertext too short")
    try:
        return SUITE.decrypt(blob, key, info=_info(info, aad))
    except (InvalidTag, ValueError):
        raise DecryptionFailed("HPKE decryption failed: wrong key, info, aad or tampering") from None


wire.register(X25519KeyPair.TAG, X25519KeyPair.from_bytes)
