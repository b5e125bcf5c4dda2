"""AES-256-GCM with domain-separated associated data.

Every AEAD use in ciphertwin prefixes the caller's associated data with a domain label and the
capsule id, so a ciphertext can neither be moved to another capsule nor confused with another
kind of ciphertext under the same key.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ciphertwin.crypto.errors import DecryptionFailed
from ciphertwin.errors import ValidationError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_PLAINTEXT_BYTES = 16 * 1024 * 1024


def _check(key: bytes, nonce: bytes, aad: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValidationError(f"AEAD key must be {KEY_BYTES} bytes")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise ValidationError(f"nonce must be {NONCE_BYTES} bytes")
    if not isinstance(aad, (bytes, bytearray)):
        raise ValidationError(f"associated data must be bytes, got {type(aad).__name__}")


def _full_aad(domain: bytes, binding: bytes, aad: bytes) -> bytes:
    # domain and binding have fixed, known lengths per call site, so the join is unambiguous
    return domain + b"\x00" + binding + bytes(aad)


def aead_seal(key: bytes, nonce: bytes, plaintext: bytes, domain: bytes, binding: bytes,
              aad: bytes = b"") -> bytes:
    """AES-256-GCM encrypt ``plaintext``; returns ciphertext || tag."""
    _check(key, nonce, aad)
    if not isinstance(plaintext, (bytes, bytearray)):
        raise ValidationError(f"plaintext must be bytes, got {type(plaintext).__name__}")
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValidationError(f"plaintext larger than {MAX_PLAINTEXT_BYTES} bytes")
    return AESGCM(bytes(key)).encrypt(bytes(nonce), bytes(plaintext), _full_aad(domain, binding, aad))


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, domain: bytes, binding: bytes,
              aad: bytes = b"") -> bytes:
    """Authenticated decryption; any mismatch raises ``DecryptionFailed``."""
    _check(key, nonce, aad)
    if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) < TAG_BYTES:
        raise ValidationError("ciphertext must be bytes of at least 16 bytes (the GCM tag)")
    try:
        return AESGCM(bytes(key)).decrypt(bytes(nonce), bytes(ciphertext),
                                          _full_aad(domain, binding, aad))
    except InvalidTag:
        raise DecryptionFailed(
            "decryption failed: wrong key, tampered ciphertext or wrong associated data"
        ) from None
