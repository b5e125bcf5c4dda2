"""Key-policy conditional proxy re-encryption (KP-CPRE) on BLS12-381.

Notation as in docs/crypto.md: owner A has secret a and public (g1^a, g2^a); Z = e(g1, g2);
H hashes attributes to G2.

* encapsulate:  s ←$ Zr;  C1 = (g1^a)^s,  E_w = H(w)^s (w ∈ S);  K = HKDF(Z^s, id, S)
* owner:        Z^s = e(C1, g2^{1/a})
* rekey:        y ←$ Zr, λ = LSSS(P, y);  D_j = g2^{λ_j} · H(ρ(j))^{r_j},  R_j = (g1^a)^{r_j},
                W = (g2^b)^{1/a} · g2^{-y}
* reencrypt:    T = e(C1, W · Π D_j^{ω_j}) · Π e(R_j^{-ω_j}, E_{ρ(j)}) = Z^{bs}
* receiver:     Z^s = T^{1/b}

The key K is bound to the capsule id (a hash of the capsule's canonical bytes) and the
attribute set, so tampering with any capsule field changes K and the AES-GCM payload fails.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import overload

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ciphertwin.crypto import wire
from ciphertwin.crypto.aead import NONCE_BYTES, aead_open, aead_seal
from ciphertwin.crypto.errors import KeyMismatch, PolicyNotSatisfied
from ciphertwin.crypto.pairing import (
    G1,
    G1_BYTES,
    G2,
    G2_BYTES,
    GT,
    GT_BYTES,
    SCALAR_BYTES,
    Z,
    Fr,
    g1,
    g1_from_bytes,
    g1_to_bytes,
    g2,
    g2_from_bytes,
    g2_to_bytes,
    gt_from_bytes,
    gt_to_bytes,
    hash_to_g2,
    pair,
    pair_product,
    random_scalar,
    random_scalar_int,
    scalar,
    scalar_from_bytes,
    scalar_to_bytes,
)
from ciphertwin.crypto.policy import (
    MAX_ATTRIBUTE_BYTES,
    MAX_ATTRIBUTES,
    MAX_LEAVES,
    Policy,
    validate_attributes,
)
from ciphertwin.errors import ValidationError

__all__ = [
    "Capsule",
    "PreCiphertext",
    "PreKeyPair",
    "PrePublicKey",
    "ReCapsule",
    "ReEncryptedCiphertext",
    "ReKey",
    "decapsulate_owner",
    "decapsulate_receiver",
    "decrypt_owner",
    "decrypt_receiver",
    "encapsulate",
    "encrypt",
    "reencrypt",
    "reencrypt_capsule",
    "reencrypt_encoded",
    "rekey",
]

KEY_ID_BYTES = 16
DIGEST_BYTES = 32
KEY_BYTES = 32
_KEM_INFO = b"ciphertwin/v1/kem\x00"
_PRE_CT_DOMAIN = b"ciphertwin/v1/pre-ct"
_MAX_ATTR_CHARS = MAX_ATTRIBUTE_BYTES


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _kem_key(z_s: GT, capsule_id: bytes, attributes: tuple[str, ...]) -> bytes:
    """K = HKDF-SHA256(Z^s; info = tag ‖ capsule id ‖ attribute set)."""
    info = _KEM_INFO + capsule_id + wire.canonical(list(attributes))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
        gt_to_bytes(z_s)
    )


def _attributes_field(fields: wire.Fields) -> tuple[str, ...]:
    attrs = fields.str_list("attrs", max_items=MAX_ATTRIBUTES, max_len=_MAX_ATTR_CHARS, min_items=1)
    canonical_attrs = validate_attributes(attrs)
    if list(canonical_attrs) != attrs:
        raise ValidationError(f"{fields.tag}.attrs must be sorted and free of duplicates")
    return canonical_attrs


# --- keys --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PrePublicKey:
    """A principal's PRE public key (g1^x, g2^x)."""

    g1x: G1
    g2x: G2

    TAG = "pre-pk"

    @cached_property
    def encoded(self) -> bytes:
        return wire.encode(self.TAG, {"g1": g1_to_bytes(self.g1x), "g2": g2_to_bytes(self.g2x)})

    def to_bytes(self) -> bytes:
        return self.encoded

    @cached_property
    def key_id(self) -> bytes:
        """16-byte fingerprint (SHA-256 of the encoding) used to address keys."""
        return _digest(self.encoded)[:KEY_ID_BYTES]

    @classmethod
    def from_bytes(cls, data: bytes) -> PrePublicKey:
        """Parse and check e(g1^x, g2) = e(g1, g2^x), i.e. both halves share one exponent."""
        f = wire.decode(data, cls.TAG, ("g1", "g2"), max_bytes=256)
        g1x = g1_from_bytes(f.bytes("g1", G1_BYTES), "pre-pk.g1")
        g2x = g2_from_bytes(f.bytes("g2", G2_BYTES), "pre-pk.g2")
        if not pair_product([(g1x, -g2), (g1, g2x)]).is_one():  # e(g1^x,g2) = e(g1,g2^x)
            raise ValidationError("pre-pk: g1 and g2 halves do not share one secret exponent")
        return cls(g1x, g2x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrePublicKey) and self.encoded == other.encoded

    def __hash__(self) -> int:
        return hash(self.encoded)

    def __repr__(self) -> str:
        return f"PrePublicKey(id={self.key_id.hex()})"


class PreKeyPair:
    """A PRE secret x with its public key; 1/x and g2^{1/x} are precomputed for decryption."""

    TAG = "pre-sk"
    __slots__ = ("_x", "_x_inv", "_g2_inv", "public")

    def __init__(self, secret: Fr) -> None:
        if secret.is_zero():
            raise ValidationError("PRE secret must be non-zero")
        self._x = secret
        self._x_inv = ~secret
        self._g2_inv = g2 * self._x_inv
        self.public = PrePublicKey(g1 * secret, g2 * secret)

    @classmethod
    def generate(cls) -> PreKeyPair:
        return cls(random_scalar())

    def to_bytes(self) -> bytes:
        """Encoding WITH THE SECRET: store only encrypted (see passwords.py)."""
        return wire.encode(self.TAG, {"sk": scalar_to_bytes(self._x)})

    @classmethod
    def from_bytes(cls, data: bytes) -> PreKeyPair:
        f = wire.decode(data, cls.TAG, ("sk",), max_bytes=128)
        return cls(scalar_from_bytes(f.bytes("sk", SCALAR_BYTES), "pre-sk.sk"))

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    def __repr__(self) -> str:
        return f"PreKeyPair(id={self.key_id.hex()})"


# --- capsules ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Capsule:
    """Second-level KEM capsule (C1, {E_w}) for attribute set S under owner ``owner_id``."""

    owner_id: bytes
    attributes: tuple[str, ...]
    c1: G1
    e: tuple[G2, ...]  # E_w, aligned with ``attributes``

    TAG = "capsule"

    @cached_property
    def encoded(self) -> bytes:
        return wire.encode(
            self.TAG,
            {
                "owner": self.owner_id,
                "attrs": list(self.attributes),
                "c1": g1_to_bytes(self.c1),
                "e": [g2_to_bytes(p) for p in self.e],
            },
        )

    def to_bytes(self) -> bytes:
        return self.encoded

    @cached_property
    def capsule_id(self) -> bytes:
        """SHA-256 of the canonical encoding: stable reference for sealed items and caches."""
        return _digest(self.encoded)

    @classmethod
    def from_bytes(cls, data: bytes) -> Capsule:
        f = wire.decode(data, cls.TAG, ("owner", "attrs", "c1", "e"), max_bytes=16 * 1024)
        attrs = _attributes_field(f)
        points = f.bytes_list("e", G2_BYTES, max_items=MAX_ATTRIBUTES)
        if len(points) != len(attrs):
            raise ValidationError("capsule: one E_w per attribute is required")
        return cls(
            owner_id=f.bytes("owner", KEY_ID_BYTES),
            attributes=attrs,
            c1=g1_from_bytes(f.bytes("c1", G1_BYTES), "capsule.c1"),
            e=tuple(g2_from_bytes(p, f"capsule.e[{i}]") for i, p in enumerate(points)),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Capsule) and self.encoded == other.encoded

    def __hash__(self) -> int:
        return hash(self.encoded)


@dataclass(frozen=True, eq=False)
class ReCapsule:
    """First-level capsule T = Z^{bs} for receiver ``receiver_id``, output by the proxy."""

    capsule_id: bytes
    attributes: tuple[str, ...]
    owner_id: bytes
    receiver_id: bytes
    rekey_id: bytes
    t: GT

    TAG = "recapsule"

    @cached_property
    def encoded(self) -> bytes:
        return wire.encode(
            self.TAG,
            {
                "capsule": self.capsule_id,
                "attrs": list(self.attributes),
                "owner": self.owner_id,
                "receiver": self.receiver_id,
                "rekey": self.rekey_id,
                "gt": gt_to_bytes(self.t),
            },
        )

    def to_bytes(self) -> bytes:
        return self.encoded

    @classmethod
    def from_bytes(cls, data: bytes) -> ReCapsule:
        """Parse; T is checked to lie in GT (a 0.8 ms test that blocks small-subgroup attacks)."""
        f = wire.decode(
            data, cls.TAG, ("capsule", "attrs", "owner", "receiver", "rekey", "gt"), 16 * 1024
        )
        return cls(
            capsule_id=f.bytes("capsule", DIGEST_BYTES),
            attributes=_attributes_field(f),
            owner_id=f.bytes("owner", KEY_ID_BYTES),
            receiver_id=f.bytes("receiver", KEY_ID_BYTES),
            rekey_id=f.bytes("rekey", DIGEST_BYTES),
            t=gt_from_bytes(f.bytes("gt", GT_BYTES), "recapsule.gt"),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReCapsule) and self.encoded == other.encoded

    def __hash__(self) -> int:
        return hash(self.encoded)


# --- re-encryption keys ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ReKey:
    """Re-encryption key (P, {D_j, R_j}, W) from owner ``owner_id`` to ``receiver_id``."""

    policy: Policy
    owner_id: bytes
    receiver_id: bytes
    d: tuple[G2, ...]
    r: tuple[G1, ...]
    w: G2

    TAG = "rekey"

    @cached_property
    def encoded(self) -> bytes:
        return wire.encode(
            self.TAG,
            {
                "policy": str(self.policy),
                "owner": self.owner_id,
                "receiver": self.receiver_id,
                "d": [g2_to_bytes(p) for p in self.d],
                "r": [g1_to_bytes(p) for p in self.r],
                "w": g2_to_bytes(self.w),
            },
        )

    def to_bytes(self) -> bytes:
        return self.encoded

    @cached_property
    def rekey_id(self) -> bytes:
        return _digest(self.encoded)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReKey:
        f = wire.decode(
            data, cls.TAG, ("policy", "owner", "receiver", "d", "r", "w"), max_bytes=256 * 1024
        )
        policy = Policy.parse(f.str("policy", max_len=8192))
        d = f.bytes_list("d", G2_BYTES, max_items=MAX_LEAVES)
        r = f.bytes_list("r", G1_BYTES, max_items=MAX_LEAVES)
        if not len(d) == len(r) == len(policy.rows):
            raise ValidationError("rekey: need exactly one (D_j, R_j) per policy leaf")
        return cls(
            policy=policy,
            owner_id=f.bytes("owner", KEY_ID_BYTES),
            receiver_id=f.bytes("receiver", KEY_ID_BYTES),
            d=tuple(g2_from_bytes(p, f"rekey.d[{j}]") for j, p in enumerate(d)),
            r=tuple(g1_from_bytes(p, f"rekey.r[{j}]") for j, p in enumerate(r)),
            w=g2_from_bytes(f.bytes("w", G2_BYTES), "rekey.w"),
        )

    def __repr__(self) -> str:
        return f"ReKey(id={self.rekey_id.hex()[:16]}, policy={str(self.policy)!r})"


# --- the scheme --------------------------------------------------------------------------


def _require(obj: object, cls: type, name: str) -> None:
    if not isinstance(obj, cls):
        raise ValidationError(f"{name} must be a {cls.__name__}, got {type(obj).__name__}")


def encapsulate(owner_pk: PrePublicKey, attributes: Iterable[str]) -> tuple[Capsule, bytes]:
    """Fresh capsule for ``attributes`` under the owner's key, and its 32-byte key K."""
    _require(owner_pk, PrePublicKey, "owner_pk")
    attrs = validate_attributes(attributes)
    s = random_scalar()
    capsule = Capsule(
        owner_id=owner_pk.key_id,
        attributes=attrs,
        c1=owner_pk.g1x * s,
        e=tuple(hash_to_g2(w) * s for w in attrs),
    )
    return capsule, _kem_key(Z**s, capsule.capsule_id, attrs)


def decapsulate_owner(owner: PreKeyPair, capsule: Capsule) -> bytes:
    """K from Z^s = e(C1, g2^{1/a})."""
    _require(owner, PreKeyPair, "owner")
    _require(capsule, Capsule, "capsule")
    if capsule.owner_id != owner.key_id:
        raise KeyMismatch("capsule was made for another owner key")
    z_s = pair(capsule.c1, owner._g2_inv)
    return _kem_key(z_s, capsule.capsule_id, capsule.attributes)


def rekey(owner: PreKeyPair, policy: Policy | str, receiver_pk: PrePublicKey) -> ReKey:
    """Re-encryption key that lets a proxy turn capsules satisfying ``policy`` into ones for B."""
    _require(owner, PreKeyPair, "owner")
    _require(receiver_pk, PrePublicKey, "receiver_pk")
    policy = Policy.parse(policy)
    y = random_scalar_int()
    d: list[G2] = []
    r: list[G1] = []
    for attribute, lam in zip(policy.rows, policy.share(y), strict=True):
        r_j = random_scalar()
        d.append(g2 * scalar(lam) + hash_to_g2(attribute) * r_j)
        r.append(owner.public.g1x * r_j)
    w = receiver_pk.g2x * owner._x_inv - g2 * scalar(y)
    return ReKey(policy, owner.key_id, receiver_pk.key_id, tuple(d), tuple(r), w)


def reencrypt_capsule(rk: ReKey, capsule: Capsule) -> ReCapsule:
    """Proxy transform; raises PolicyNotSatisfied (and computes nothing) if S does not satisfy P."""
    _require(rk, ReKey, "rekey")
    _require(capsule, Capsule, "capsule")
    e_of = dict(zip(capsule.attributes, capsule.e, strict=True))
    return _transform(rk, capsule.capsule_id, capsule.owner_id, capsule.attributes,
                      lambda: capsule.c1, e_of.__getitem__)


class EncodedCapsule:
    """A stored capsule's bytes, decoded lazily: C1 and each E_w are parsed (and validated)
    at most once, however many re-keys transform it.

    A processing job re-encrypts every capsule for three nodes whose policies share all rows
    but ``share:i``, so parsing the capsule once saves two thirds of the point decoding (each
    G1/G2 decompression with its subgroup check costs about as much as a pairing)."""

    __slots__ = ("attributes", "capsule_id", "owner_id", "_raw_c1", "_raw_e", "_c1", "_e")

    def __init__(self, capsule_bytes: bytes) -> None:
        f = wire.decode(capsule_bytes, Capsule.TAG, ("owner", "attrs", "c1", "e"),
                        max_bytes=16 * 1024)
        attrs = _attributes_field(f)
        points = f.bytes_list("e", G2_BYTES, max_items=MAX_ATTRIBUTES)
        if len(points) != len(attrs):
            raise ValidationError("capsule: one E_w per attribute is required")
        self.owner_id, self._raw_c1 = f.bytes("owner", KEY_ID_BYTES), f.bytes("c1", G1_BYTES)
        canonical = wire.encode(Capsule.TAG, {"owner": self.owner_id, "attrs": list(attrs),
                                              "c1": self._raw_c1, "e": points})
        self.attributes, self.capsule_id = attrs, _digest(canonical)
        self._raw_e = dict(zip(attrs, points, strict=True))
        self._c1: G1 | None = None
        self._e: dict[str, G2] = {}

    @property
    def c1(self) -> G1:
        if self._c1 is None:
            self._c1 = g1_from_bytes(self._raw_c1, "capsule.c1")
        return self._c1

    def e(self, attribute: str) -> G2:
        point = self._e.get(attribute)
        if point is None:
            point = self._e[attribute] = g2_from_bytes(self._raw_e[attribute],
                                                       f"capsule.e[{attribute}]")
        return point


def reencrypt_encoded(rk: ReKey, capsule: bytes | EncodedCapsule) -> ReCapsule:
    """``reencrypt_capsule`` straight from a capsule's bytes, parsing (and validating) only C1
    and the E_w of the attributes the policy's satisfying rows use — a proxy that stores
    capsules with many attributes skips most of the point decoding. Pass one
    :class:`EncodedCapsule` for several re-keys to parse its points once."""
    _require(rk, ReKey, "rekey")
    enc = capsule if isinstance(capsule, EncodedCapsule) else EncodedCapsule(capsule)
    if enc.owner_id != rk.owner_id:  # before any point is parsed
        raise KeyMismatch("capsule and re-encryption key belong to different owners")
    return _transform(rk, enc.capsule_id, enc.owner_id, enc.attributes, lambda: enc.c1, enc.e)


def _transform(rk: ReKey, capsule_id: bytes, owner_id: bytes, attributes: tuple[str, ...],
               c1: Callable[[], G1], e_of: Callable[[str], G2]) -> ReCapsule:
    """T = e(C1, W · Π D_j^{ω_j}) · Π e(R_j, E_ρ(j))^{-ω_j} = Z^{bs} over a satisfying row set."""
    if owner_id != rk.owner_id:
        raise KeyMismatch("capsule and re-encryption key belong to different owners")
    rows = rk.policy.satisfying_rows(attributes)
    if rows is None:
        raise PolicyNotSatisfied(
            f"attributes {list(attributes)} do not satisfy policy {str(rk.policy)!r}"
        )
    x = rk.w  # accumulates W · Π D_j^{ω_j} so all pairings with C1 become one
    pairs: list[tuple[G1, G2]] = []
    for j, omega in rows:
        d_j, r_j = rk.d[j], rk.r[j]
        if omega != 1:  # AND/OR policies always have ω = 1; only k-of-n gates pay this
            w_j = scalar(omega)
            d_j, r_j = d_j * w_j, r_j * w_j
        x = x + d_j
        pairs.append((-r_j, e_of(rk.policy.rows[j])))
    pairs.append((c1(), x))
    t = pair_product(pairs)  # one shared final exponentiation
    return ReCapsule(capsule_id, attributes, owner_id, rk.receiver_id, rk.rekey_id, t)


def decapsulate_receiver(receiver: PreKeyPair, recapsule: ReCapsule) -> bytes:
    """K from Z^s = T^{1/b}."""
    _require(receiver, PreKeyPair, "receiver")
    _require(recapsule, ReCapsule, "recapsule")
    if recapsule.receiver_id != receiver.key_id:
        raise KeyMismatch("re-encrypted capsule is for another receiver key")
    z_s = recapsule.t**receiver._x_inv
    return _kem_key(z_s, recapsule.capsule_id, recapsule.attributes)


# --- hybrid encryption (one capsule per message) -------------------------------------------


@dataclass(frozen=True, eq=False)
class PreCiphertext:
    """A capsule plus an AES-256-GCM payload under its key."""

    capsule: Capsule
    nonce: bytes
    ciphertext: bytes

    TAG = "pre-ct"

    def to_bytes(self) -> bytes:
        return wire.encode(
            self.TAG, {"capsule": self.capsule.to_bytes(), "nonce": self.nonce, "ct": self.ciphertext}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PreCiphertext:
        f = wire.decode(data, cls.TAG, ("capsule", "nonce", "ct"), max_bytes=17 * 1024 * 1024)
        return cls(
            Capsule.from_bytes(f.bytes("capsule", max_len=16 * 1024)),
            f.bytes("nonce", NONCE_BYTES),
            f.bytes("ct"),
        )


@dataclass(frozen=True, eq=False)
class ReEncryptedCiphertext:
    """A re-encrypted capsule plus the unchanged AES-256-GCM payload."""

    recapsule: ReCapsule
    nonce: bytes
    ciphertext: bytes

    TAG = "pre-rct"

    def to_bytes(self) -> bytes:
        return wire.encode(
            self.TAG,
            {"recapsule": self.recapsule.to_bytes(), "nonce": self.nonce, "ct": self.ciphertext},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ReEncryptedCiphertext:
        f = wire.decode(data, cls.TAG, ("recapsule", "nonce", "ct"), max_bytes=17 * 1024 * 1024)
        return cls(
            ReCapsule.from_bytes(f.bytes("recapsule", max_len=16 * 1024)),
            f.bytes("nonce", NONCE_BYTES),
            f.bytes("ct"),
        )


def encrypt(
    owner_pk: PrePublicKey, attributes: Iterable[str], plaintext: bytes, aad: bytes = b""
) -> PreCiphertext:
    """Encrypt ``plaintext`` for the owner (and, via re-keys, for whoever the policy admits)."""
    capsule, key = encapsulate(owner_pk, attributes)
    nonce = os.urandom(NONCE_BYTES)
    ct = aead_seal(key, nonce, plaintext, _PRE_CT_DOMAIN, capsule.capsule_id, aad)
    return PreCiphertext(capsule, nonce, ct)


def decrypt_owner(owner: PreKeyPair, ciphertext: PreCiphertext, aad: bytes = b"") -> bytes:
    _require(ciphertext, PreCiphertext, "ciphertext")
    key = decapsulate_owner(owner, ciphertext.capsule)
    return aead_open(
        key, ciphertext.nonce, ciphertext.ciphertext, _PRE_CT_DOMAIN,
        ciphertext.capsule.capsule_id, aad,
    )


@overload
def reencrypt(rk: ReKey, item: Capsule) -> ReCapsule: ...
@overload
def reencrypt(rk: ReKey, item: PreCiphertext) -> ReEncryptedCiphertext: ...


def reencrypt(rk: ReKey, item: Capsule | PreCiphertext) -> ReCapsule | ReEncryptedCiphertext:
    """Proxy re-encryption of a capsule, or of a whole ciphertext (payload passes unchanged)."""
    if isinstance(item, PreCiphertext):
        return ReEncryptedCiphertext(reencrypt_capsule(rk, item.capsule), item.nonce, item.ciphertext)
    return reencrypt_capsule(rk, item)


def decrypt_receiver(
    receiver: PreKeyPair, ciphertext: ReEncryptedCiphertext, aad: bytes = b""
) -> bytes:
    _require(ciphertext, ReEncryptedCiphertext, "ciphertext")
    key = decapsulate_receiver(receiver, ciphertext.recapsule)
    return aead_open(
        key, ciphertext.nonce, ciphertext.ciphertext, _PRE_CT_DOMAIN,
        ciphertext.recapsule.capsule_id, aad,
    )


for _cls in (PrePublicKey, PreKeyPair, Capsule, ReCapsule, ReKey, PreCiphertext,
             ReEncryptedCiphertext):
    wire.register(_cls.TAG, _cls.from_bytes)
