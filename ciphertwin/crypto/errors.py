"""Errors raised by ``ciphertwin.crypto``.

Each refusal has its own class so callers (cloud, nodes, agents) can log *why* something was
rejected without parsing messages, and so tests can assert the exact refusal.
"""

from __future__ import annotations

from ciphertwin.errors import CipherTwinError, ValidationError


class PolicySyntaxError(ValidationError):
    """A policy text could not be parsed; ``position`` is the 0-based offending offset."""

    def __init__(self, message: str, position: int, text: str = "") -> None:
        self.position = position
        self.text = text
        pointer = ""
        if text:
            pointer = f"\n  {text}\n  {' ' * position}^"
        super().__init__(f"{message} at position {position}{pointer}")


class PolicyNotSatisfied(CipherTwinError):
    """Re-encryption refused: the capsule's attributes do not satisfy the re-key's policy."""


class KeyMismatch(ValidationError):
    """An object was presented to the wrong key (other owner, other receiver)."""


class DecryptionFailed(CipherTwinError):
    """Authenticated decryption failed: wrong key, tampered ciphertext or wrong associated data."""


class SignatureInvalid(CipherTwinError):
    """An Ed25519 signature did not verify for the given key, context and message."""


class TokenRejected(CipherTwinError):
    """A write or process token was refused; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"token rejected: {reason}" + (f" ({detail})" if detail else ""))
