"""Node identities and the roster: who the three processing nodes are and how they agree keys.

Each node has an Ed25519 signing key and an X25519 key-agreement key. Its roster entry binds
(node id, index, X25519 public key) under its Ed25519 signature, so a broker or cloud that
swaps the X25519 key in a published roster is caught. (Who vouches for the Ed25519 key itself
— the operator's signature on the whole roster — is the node service's business.)

Pair secrets: X25519 between the two nodes' static keys, HKDF-SHA256 with both entries in the
info, so the secret is bound to exactly this pair of identities. Per job it is stretched
into PRF keys (``prf``) and per-direction channel keys (``chan``) — see :mod:`prf`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ciphertwin.bus.topics import validate_id
from ciphertwin.crypto import wire
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.mpc_nodes.errors import RosterError
from ciphertwin.mpc_nodes.shares import PARTIES, check_party

ENTRY_TAG = "mpc-roster-entry"
SIGN_CONTEXT = "mpc/roster-entry"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


@dataclass(frozen=True)
class RosterEntry:
    """Public identity of node ``index``: its signing key, its X25519 key and the binding."""

    index: int
    node_id: str
    sign_public: bytes
    kx_public: bytes
    signature: bytes

    def signed_body(self) -> dict[str, object]:
        return {"index": self.index, "node": self.node_id, "sign": self.sign_public,
                "kx": self.kx_public}

    def verify(self) -> None:
        """Raise :class:`RosterError` unless the entry is well formed and self-signed."""
        try:
            check_party(self.index)
            validate_id(self.node_id, "node id")
            X25519PublicKey.from_public_bytes(self.kx_public)
            VerifyKey(self.sign_public).verify_object(SIGN_CONTEXT, self.signed_body(), self.signature)
        except (CipherTwinError, ValueError, TypeError) as exc:
            raise RosterError(f"roster entry {self.index}/{self.node_id!r} rejected: {exc}") from exc

    def to_bytes(self) -> bytes:
        return wire.encode(ENTRY_TAG, {**self.signed_body(), "sig": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> RosterEntry:
        try:
            f = wire.decode(data, ENTRY_TAG, ("index", "node", "sign", "kx", "sig"), max_bytes=1024)
            entry = cls(f.int("index", 0, PARTIES - 1), f.str("node", 64), f.bytes("sign", 32),
                        f.bytes("kx", 32), f.bytes("sig", 64))
        except ValidationError as exc:
            raise RosterError(f"malformed roster entry: {exc}") from exc
        entry.verify()
        return entry


class NodeIdentity:
    """A node's private keys (never logged, never serialised here)."""

    def __init__(self, index: int, node_id: str, signing: SigningKey, kx: X25519PrivateKey) -> None:
        self.index = check_party(index)
        self.node_id = validate_id(node_id, "node id")
        self.signing = signing
        self.kx = kx

    @classmethod
    def generate(cls, index: int, node_id: str) -> NodeIdentity:
        return cls(index, node_id, SigningKey.generate(), X25519PrivateKey.generate())

    def entry(self) -> RosterEntry:
        """This node's signed roster entry."""
        kx_public = self.kx.public_key().public_bytes(*_RAW)
        unsigned = RosterEntry(self.index, self.node_id, self.signing.verify_key.raw, kx_public, b"")
        sig = self.signing.sign_object(SIGN_CONTEXT, unsigned.signed_body())
        return RosterEntry(self.index, self.node_id, unsigned.sign_public, kx_public, sig)

    def __repr__(self) -> str:
        return f"NodeIdentity({self.index}, {self.node_id!r})"


class Roster:
    """Exactly three verified entries with indices 0, 1, 2 and distinct ids and keys."""

    def __init__(self, entries: list[RosterEntry]) -> None:
        if len(entries) != PARTIES:
            raise RosterError(f"a roster has exactly {PARTIES} nodes, got {len(entries)}")
        by_index = sorted(entries, key=lambda e: e.index)
        if [e.index for e in by_index] != list(range(PARTIES)):
            raise RosterError("roster indices must be 0, 1 and 2")
        for e in by_index:
            e.verify()
        for field in ("node_id", "sign_public", "kx_public"):
            if len({getattr(e, field) for e in by_index}) != PARTIES:
                raise RosterError(f"roster entries share a {field}")
        self.entries = tuple(by_index)

    def __getitem__(self, index: int) -> RosterEntry:
        return self.entries[check_party(index)]

    def check_identity(self, me: NodeIdentity) -> None:
        """The identity must be the one the roster lists at its index."""
        mine = me.entry()
        listed = self[me.index]
        if (listed.node_id, listed.sign_public, listed.kx_public) != (
            mine.node_id, mine.sign_public, mine.kx_public
        ):
            raise RosterError(f"node {me.node_id!r} is not the roster's node {me.index}")

    def pair_secret(self, me: NodeIdentity, peer: int) -> bytes:
        """32-byte secret shared by ``me`` and node ``peer`` (same value on both sides)."""
        self.check_identity(me)
        if check_party(peer) == me.index:
            raise RosterError("no pair secret with oneself")
        other = self[peer]
        shared = me.kx.exchange(X25519PublicKey.from_public_bytes(other.kx_public))
        low, high = sorted((self[me.index], other), key=lambda e: e.index)
        info = wire.canonical(["ct/mpc/pair/v1", low.node_id, low.kx_public, high.node_id,
                               high.kx_public])
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)

    def secrets_for(self, me: NodeIdentity) -> tuple[bytes, bytes]:
        """(secret with node i-1, secret with node i+1) — what :class:`Party` takes."""
        return (self.pair_secret(me, (me.index - 1) % PARTIES),
                self.pair_secret(me, (me.index + 1) % PARTIES))
