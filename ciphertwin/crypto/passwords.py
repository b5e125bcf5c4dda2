"""Passphrase-derived keys (Argon2id) and passphrase-encrypted blobs for secret-key files.

The Argon2id parameters and salt are stored with the ciphertext so a file stays readable when
the defaults are raised later; parameters read from a file are bounded so a crafted file cannot
make us allocate gigabytes or spin for minutes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ciphertwin.crypto import wire
from ciphertwin.crypto.aead import KEY_BYTES, NONCE_BYTES, aead_open, aead_seal
from ciphertwin.errors import ValidationError

__all__ = ["Argon2Params", "derive_key", "encrypt_with_passphrase", "decrypt_with_passphrase"]

SALT_BYTES = 16
_DOMAIN = b"ciphertwin/v1/passphrase"
_MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
_MAX_ITERATIONS = 16
_MAX_LANES = 16


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost: memory in KiB, passes, lanes (RFC 9106 second recommendation by default)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        for name, value, lo, hi in (
            ("lanes", self.lanes, 1, _MAX_LANES),
            ("iterations", self.iterations, 1, _MAX_ITERATIONS),
            ("memory_kib", self.memory_kib, 8 * self.lanes if isinstance(self.lanes, int) else 8,
             _MAX_MEMORY_KIB),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValidationError(f"Argon2id {name} must be an integer in [{lo}, {hi}]")


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if not isinstance(passphrase, (bytes, bytearray)) or not passphrase:
        raise ValidationError("passphrase must be a non-empty str or bytes")
    if len(passphrase) > 4096:
        raise ValidationError("passphrase longer than 4096 bytes")
    return bytes(passphrase)


def derive_key(passphrase: str | bytes, salt: bytes, params: Argon2Params = Argon2Params(),
               length: int = KEY_BYTES) -> bytes:
    """Argon2id(passphrase, salt) with ``params``."""
    salt = wire.check_bytes(salt, "salt")
    if len(salt) < 8:
        raise ValidationError("salt must be at least 8 bytes")
    return Argon2id(
        salt=salt, length=length, iterations=params.iterations, lanes=params.lanes,
        memory_cost=params.memory_kib,
    ).derive(_passphrase_bytes(passphrase))


def encrypt_with_passphrase(passphrase: str | bytes, plaintext: bytes, aad: bytes = b"",
                            params: Argon2Params = Argon2Params()) -> bytes:
    """Seal ``plaintext`` (e.g. a secret-key encoding) under a passphrase; self-describing."""
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    key = derive_key(passphrase, salt, params)
    header = {"m": params.memory_kib, "i": params.iterations, "p": params.lanes, "salt": salt}
    ct = aead_seal(key, nonce, plaintext, _DOMAIN, wire.canonical(header), aad)
    return wire.encode("passphrase-box", {**header, "nonce": nonce, "ct": ct})


def decrypt_with_passphrase(passphrase: str | bytes, blob: bytes, aad: bytes = b"") -> bytes:
    """Open a passphrase box; a wrong passphrase raises ``DecryptionFailed``."""
    f = wire.decode(blob, "passphrase-box", ("m", "i", "p", "salt", "nonce", "ct"),
                    max_bytes=17 * 1024 * 1024)
    params = Argon2Params(
        memory_kib=f.int("m", 8, _MAX_MEMORY_KIB),
        iterations=f.int("i", 1, _MAX_ITERATIONS),
        lanes=f.int("p", 1, _MAX_LANES),
    )
    salt = f.bytes("salt", SALT_BYTES)
    header = {"m": params.memory_kib, "i": params.iterations, "p": params.lanes, "salt": salt}
    key = derive_key(passphrase, salt, params)
    return aead_open(key, f.bytes("nonce", NONCE_BYTES), f.bytes("ct"), _DOMAIN,
                     wire.canonical(header), aad)
