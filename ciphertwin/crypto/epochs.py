"""Key epochs: one PRE capsule per (attribute set, epoch), items sealed under its key.

A device encapsulates once per key epoch and seals every item of that epoch with AES-256-GCM
under the capsule's key K, so the expensive pairing work is amortised over the epoch while the
cloud can still re-encrypt (one capsule) for everybody whose policy admits the attributes.
Nonces are a per-key counter, so they are unique by construction; a key is never persisted
or reused by another manager.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from ciphertwin.crypto import wire
from ciphertwin.crypto.aead import NONCE_BYTES, aead_open, aead_seal
from ciphertwin.crypto.kpcpre import DIGEST_BYTES, Capsule, PrePublicKey, encapsulate
from ciphertwin.crypto.policy import validate_attributes
from ciphertwin.errors import ValidationError

__all__ = ["KeyEpochPolicy", "DataKeyManager", "SealedItem", "open_sealed", "seal_with_key"]

_SEALED_DOMAIN = b"ciphertwin/v1/sealed"
_MAX_ITEMS_PER_KEY = 2**32
_UNITS = {"item": 0, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class KeyEpochPolicy:
    """How long one data key lives: per ``item``, ``hour``, ``day`` or ``seconds`` (custom)."""

    kind: str = "hour"
    seconds: int = 0

    def __post_init__(self) -> None:
        if self.kind in _UNITS:
            object.__setattr__(self, "seconds", _UNITS[self.kind])
        elif self.kind == "seconds":
            if isinstance(self.seconds, bool) or not isinstance(self.seconds, int) or not (
                1 <= self.seconds <= 366 * 86400
            ):
                raise ValidationError("custom key epoch must be 1 s .. 366 days")
        else:
            raise ValidationError(f"unknown key epoch kind {self.kind!r} (item/hour/day/seconds)")

    @classmethod
    def parse(cls, text: str) -> KeyEpochPolicy:
        """``item`` | ``hour`` | ``day`` | ``<n>s`` (e.g. ``900s``) — for configuration files."""
        if isinstance(text, str) and text.endswith("s") and text[:-1].isdigit():
            return cls("seconds", int(text[:-1]))
        return cls(str(text))

    def epoch_of(self, at: datetime) -> int | None:
        """Epoch number of ``at`` (UTC-aligned), or None for per-item keys."""
        if self.seconds == 0:
            return None
        return int(at.timestamp()) // self.seconds


@dataclass(frozen=True, eq=False)
class SealedItem:
    """An item sealed under the data key of capsule ``capsule_id``."""

    capsule_id: bytes
    nonce: bytes
    ciphertext: bytes

    TAG = "sealed"

    def to_bytes(self) -> bytes:
        return wire.encode(
            self.TAG, {"capsule": self.capsule_id, "nonce": self.nonce, "ct": self.ciphertext}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedItem:
        f = wire.decode(data, cls.TAG, ("capsule", "nonce", "ct"), max_bytes=17 * 1024 * 1024)
        return cls(f.bytes("capsule", DIGEST_BYTES), f.bytes("nonce", NONCE_BYTES), f.bytes("ct"))


def seal_with_key(key32: bytes, capsule_id: bytes, nonce: bytes, plaintext: bytes,
                  aad: bytes = b"") -> SealedItem:
    """AES-256-GCM under a capsule's key; AAD binds the capsule id and the caller's ``aad``."""
    ct = aead_seal(key32, nonce, plaintext, _SEALED_DOMAIN, capsule_id, aad)
    return SealedItem(capsule_id, nonce, ct)


def open_sealed(sealed: SealedItem, key32: bytes, aad: bytes = b"") -> bytes:
    """Decrypt a sealed item with the key from ``decapsulate_owner/receiver`` of its capsule."""
    if not isinstance(sealed, SealedItem):
        raise ValidationError(f"expected a SealedItem, got {type(sealed).__name__}")
    return aead_open(key32, sealed.nonce, sealed.ciphertext, _SEALED_DOMAIN, sealed.capsule_id, aad)


class _EpochKey:
    __slots__ = ("capsule", "key", "counter")

    def __init__(self, capsule: Capsule, key: bytes) -> None:
        self.capsule, self.key, self.counter = capsule, key, 0

    def next_nonce(self) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(NONCE_BYTES, "big")


class DataKeyManager:
    """Issues capsules and seals items; one capsule per (attribute set, key epoch)."""

    def __init__(self, owner_pk: PrePublicKey, epoch_policy: KeyEpochPolicy | None = None,
                 max_open_epochs: int = 64) -> None:
        if not isinstance(owner_pk, PrePublicKey):
            raise ValidationError("owner_pk must be a PrePublicKey")
        self.owner_pk = owner_pk
        self.epoch_policy = epoch_policy or KeyEpochPolicy()
        self._keys: OrderedDict[tuple[tuple[str, ...], int], _EpochKey] = OrderedDict()
        self._max_open = max_open_epochs

    def seal(self, plaintext: bytes, attributes: Iterable[str], aad: bytes = b"",
             at: datetime | None = None) -> tuple[Capsule | None, SealedItem]:
        """Seal ``plaintext``; returns the epoch's capsule the first time it is used, else None.

        The caller must upload the capsule before (or with) the first sealed item of its epoch.
        """
        attrs = validate_attributes(attributes)
        epoch = self.epoch_policy.epoch_of(self._when(at))
        if epoch is None:  # per-item keys
            capsule, key = encapsulate(self.owner_pk, attrs)
            return capsule, seal_with_key(key, capsule.capsule_id, bytes(NONCE_BYTES - 1) + b"\x01",
                                          plaintext, aad)
        slot = (attrs, epoch)
        entry = self._keys.get(slot)
        new_capsule: Capsule | None = None
        if entry is None or entry.counter >= _MAX_ITEMS_PER_KEY - 1:
            capsule, key = encapsulate(self.owner_pk, attrs)
            entry = self._keys[slot] = _EpochKey(capsule, key)
            new_capsule = capsule
            self._evict(attrs, epoch)
        self._keys.move_to_end(slot)
        sealed = seal_with_key(entry.key, entry.capsule.capsule_id, entry.next_nonce(),
                               plaintext, aad)
        return new_capsule, sealed

    def current_capsule(self, attributes: Iterable[str], at: datetime | None = None) -> Capsule | None:
        """The capsule now in use for ``attributes`` (None if none was issued yet)."""
        epoch = self.epoch_policy.epoch_of(self._when(at))
        entry = self._keys.get((validate_attributes(attributes), epoch)) if epoch is not None else None
        return entry.capsule if entry else None

    def _evict(self, attrs: tuple[str, ...], epoch: int) -> None:
        """Forget keys of epochs that are over for this attribute set, and cap the total."""
        for old in [s for s in self._keys if s[0] == attrs and s[1] < epoch - 1]:
            del self._keys[old]
        while len(self._keys) > self._max_open:
            self._keys.popitem(last=False)

    @staticmethod
    def _when(at: datetime | None) -> datetime:
        if at is None:
            return datetime.fromtimestamp(time.time()).astimezone()
        if not isinstance(at, datetime):
            raise ValidationError("at must be a datetime")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValidationError("at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return at


wire.register(SealedItem.TAG, SealedItem.from_bytes)
