"""Who the cloud believes: registered owner keys, twin and device bindings, verified tokens.

Bindings are trust-on-first-use, backed by the broker's authentication: only owner X can
publish on ``control/X`` (first registration of X's keys), and only a twin's devices can
publish on its data topic. Once bound, a twin stays with its owner's key and a device name
with its device key, so nobody can later write into a twin or take over a device's
sequence numbers with a token of their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ciphertwin.cloud_twin.store import TwinStore
from ciphertwin.crypto.errors import TokenRejected
from ciphertwin.crypto.kpcpre import PrePublicKey
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import WriteToken, verify_write_token
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.items import token_digest


class Rejected(CipherTwinError):
    """An input the cloud refuses; ``reason`` is short and safe to log and to send back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Owner:
    name: str
    verify_key: VerifyKey
    pre_pk: PrePublicKey


class TrustRegistry:
    """In-memory view of the registry tables, written through to the store."""

    def __init__(self, store: TwinStore) -> None:
        self.store = store
        self.owners: dict[str, Owner] = {}
        self._owner_by_key: dict[bytes, Owner] = {}
        self._pre_key_ids: set[bytes] = set()
        self._twin_owner: dict[str, bytes] = {}
        self._device_key: dict[str, bytes] = {}
        self._tokens: dict[bytes, WriteToken] = {}
        self._pending_twin: dict[str, bytes] = {}
        self._pending_device: dict[str, bytes] = {}
        self._last_control: dict[str, float] = {}

    async def load(self) -> None:
        for name, raw in (await self.store.list_kv("owner_vk")).items():
            pre = await self.store.get_kv("owner_pre", name)
            if pre is not None:
                self._remember_owner(Owner(name, VerifyKey(raw), PrePublicKey.from_bytes(pre)))
        self._twin_owner = await self.store.list_kv("twin_owner")
        self._device_key = await self.store.list_kv("device_key")
        for name, raw in (await self.store.list_kv("control_time")).items():
            self._last_control[name] = float(raw.decode())

    def _remember_owner(self, owner: Owner) -> None:
        self.owners[owner.name] = owner
        self._owner_by_key[owner.verify_key.raw] = owner
        self._pre_key_ids.add(owner.pre_pk.key_id)

    async def register_owner(self, name: str, verify_key: VerifyKey, pre_pk: PrePublicKey) -> bool:
        """Bind an owner's keys on first use; True if new, False if already identical."""
        known = self.owners.get(name)
        if known is not None:
            if known.verify_key == verify_key and known.pre_pk.to_bytes() == pre_pk.to_bytes():
                return False
            raise Rejected("owner already registered with other keys")
        if verify_key.raw in self._owner_by_key:
            raise Rejected("signing key already belongs to another owner")
        if pre_pk.key_id in self._pre_key_ids:
            raise Rejected("PRE key already belongs to another owner")
        await self.store.put_kv("owner_pre", name, pre_pk.to_bytes())
        await self.store.put_kv("owner_vk", name, verify_key.raw)
        self._remember_owner(Owner(name, verify_key, pre_pk))
        return True

    async def accept_control_time(self, owner: str, at: float) -> None:
        """Replay guard: control messages of an owner must carry increasing times."""
        if at <= self._last_control.get(owner, 0.0):
            raise Rejected("stale or replayed control message")
        if at > time.time() + 300:
            raise Rejected("control message time is in the future")
        self._last_control[owner] = at
        await self.store.put_kv("control_time", owner, repr(at).encode())

    def write_token(self, token_bytes: bytes, twin: str, device: str,
                    now: float) -> tuple[WriteToken, Owner]:
        """Parse (once), verify (once) and check a device's write token against the registry."""
        digest = token_digest(token_bytes)
        token = self._tokens.get(digest)  # signature already verified once
        if token is None:
            try:
                token = WriteToken.from_bytes(token_bytes)
            except ValidationError as exc:
                raise Rejected(f"malformed write token: {exc}") from None
        owner = self._owner_by_key.get(token.issuer.raw)
        if owner is None:
            raise Rejected("write token issued by an unregistered owner key")
        if digest not in self._tokens:
            try:
                verify_write_token(token, owner.verify_key, twin=twin, now=now)
            except TokenRejected as exc:
                raise Rejected(f"write token refused: {exc}") from None
            if len(self._tokens) > 100_000:
                self._tokens.clear()
            self._tokens[digest] = token
        elif token.twin != twin:
            raise Rejected("write token refused: token is for another twin")
        elif not token.not_before <= now <= token.not_after:
            raise Rejected("write token refused: outside its validity window")
        if token.device != device:
            raise Rejected("write token refused: it names another device (or none)")
        bound = self._twin_owner.get(twin) or self._pending_twin.get(twin)
        if bound is not None and bound != owner.verify_key.raw:
            raise Rejected("twin belongs to another owner")
        return token, owner

    def known_signer(self, token_bytes: bytes) -> tuple[bytes, bytes] | None:
        """(device key, owner's PRE key id) of a write token verified before, else None:
        lets signatures be checked ahead of ``write_token``, which still decides."""
        token = self._tokens.get(token_digest(token_bytes))
        owner = self._owner_by_key.get(token.issuer.raw) if token is not None else None
        if token is None or owner is None:
            return None
        return token.device_key.raw, owner.pre_pk.key_id

    def check_device(self, twin: str, device: str, device_key: VerifyKey) -> None:
        """Raise unless the twin's ``device`` is unbound or bound (or being bound) to this key."""
        name = _device_slot(twin, device)
        bound = self._device_key.get(name) or self._pending_device.get(name)
        if bound is not None and bound != device_key.raw:
            raise Rejected("device name is bound to another device key")

    def begin_batch(self) -> None:
        """Forget the previous batch's tentative bindings."""
        self._pending_twin.clear()
        self._pending_device.clear()

    def reserve(self, twin: str, owner: Owner, device: str, device_key: VerifyKey) -> None:
        """Tentatively bind, so a second key for the same new name in one batch is refused."""
        self._pending_twin.setdefault(twin, owner.verify_key.raw)
        self._pending_device.setdefault(_device_slot(twin, device), device_key.raw)

    async def bind(self, twin: str, owner: Owner, device: str, device_key: VerifyKey) -> None:
        """Record first-use bindings after an item from them was committed."""
        if twin not in self._twin_owner:
            self._twin_owner[twin] = owner.verify_key.raw
            await self.store.put_kv("twin_owner", twin, owner.verify_key.raw)
        name = _device_slot(twin, device)
        if name not in self._device_key:
            self._device_key[name] = device_key.raw
            await self.store.put_kv("device_key", name, device_key.raw)

    def device_key_of(self, twin: str, device: str) -> bytes | None:
        """The key a device name of ``twin`` is bound to (None: it has sent nothing yet)."""
        return self._device_key.get(_device_slot(twin, device))

    def owner_of_twin(self, twin: str) -> Owner | None:
        raw = self._twin_owner.get(twin)
        return self._owner_by_key.get(raw) if raw is not None else None


def _device_slot(twin: str, device: str) -> str:
    """Device names are unique within a twin ('/' never occurs in an id)."""
    return f"{twin}/{device}"
