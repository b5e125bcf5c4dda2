"""Broker password hashes in Mosquitto's ``$7$`` format (PBKDF2-HMAC-SHA512).

One format for both brokers: the embedded amqtt broker verifies it with :func:`verify_password`
and ``mosquitto_passwd``-compatible files can be emitted verbatim, so a deployment moves
between brokers without re-issuing passwords. Format (mosquitto 2.x ``password_mosq.c``)::

    $7$<iterations>$<base64 12-byte salt>$<base64 64-byte PBKDF2-SHA512 digest>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets

from ciphertwin.errors import ValidationError

SALT_LEN = 12  # what mosquitto_passwd uses
HASH_LEN = 64  # SHA-512 digest size, what mosquitto expects
DEFAULT_ITERATIONS = 20_000
"""Broker passwords are random tokens (see :func:`generate_password`), so the work factor only
guards against weak user-chosen ones; 20k keeps a connect at ~13 ms of CPU on either broker."""
MAX_ITERATIONS = 5_000_000
_FORMAT = re.compile(r"\$7\$([0-9]{1,7})\$([A-Za-z0-9+/=]{4,64})\$([A-Za-z0-9+/=]{4,128})")


def generate_password() -> str:
    """A fresh 192-bit random password, URL-safe so it survives config files and shells."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return the ``$7$`` hash of ``password`` with a fresh random salt."""
    if not isinstance(password, str) or not password:
        raise ValidationError("password must be a non-empty string")
    if not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise ValidationError(f"iterations must be within 1..{MAX_ITERATIONS}")
    salt = os.urandom(SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_LEN)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def parse_hash(password_hash: object) -> tuple[int, bytes, bytes]:
    """Split a ``$7$`` hash into (iterations, salt, digest); ValidationError if malformed."""
    m = _FORMAT.fullmatch(password_hash) if isinstance(password_hash, str) else None
    if m is None:
        raise ValidationError("password hash is not in Mosquitto $7$ (PBKDF2-SHA512) format")
    iterations = int(m.group(1))
    try:
        salt = base64.b64decode(m.group(2), validate=True)
        digest = base64.b64decode(m.group(3), validate=True)
    except binascii.Error:
        raise ValidationError("password hash has invalid base64") from None
    if not 1 <= iterations <= MAX_ITERATIONS or len(digest) != HASH_LEN or not salt:
        raise ValidationError("password hash has bad iterations, salt or digest length")
    return iterations, salt, digest


def verify_password(password: str | None, password_hash: str) -> bool:
    """Constant-time check of ``password`` against a ``$7$`` hash (False on any mismatch)."""
    if not isinstance(password, str) or not password:
        return False
    iterations, salt, digest = parse_hash(password_hash)
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_LEN)
    return hmac.compare_digest(candidate, digest)
