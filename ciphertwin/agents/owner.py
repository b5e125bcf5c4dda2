"""The owner agent: registers the owner's keys, enrolls devices, grants and revokes access.

Everything it sends the cloud is signed with the owner's Ed25519 key; re-encryption keys are
made here (they need the owner's secret PRE key) and only the re-key leaves the machine.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from ciphertwin.agents.bundle import BrokerConnection, EnrollmentBundle
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.reader import TwinReader
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey, rekey
from ciphertwin.crypto.policy import Policy
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.errors import CipherTwinError
from ciphertwin.protocol.control import build_control, control_request_id

DEFAULT_DEVICE_ATTRIBUTES = ("type:*", "year:*", "month:*", "day:*", "hour:*", "share:*")
"""Attribute patterns a device's write token allows besides its exact ``twin:``/``device:``
attributes and those its attribute rules add (never another twin's or device's)."""


class ControlRefused(CipherTwinError):
    """The cloud refused a control message; the reason comes from the cloud."""


class OwnerAgent:
    """One owner's actions on the bus (``identity.name`` is its principal id)."""

    def __init__(self, identity: Identity, bus: BusClient) -> None:
        self.identity, self.bus = identity, bus
        self.reader = TwinReader(bus, identity.name, identity.pre, identity.signing.verify_key)

    @property
    def name(self) -> str:
        return self.identity.name

    async def _send(self, kind: str, body: dict[str, Any], timeout: float = 15.0) -> None:
        payload = build_control(kind, self.identity.signing, {"owner": self.name, **body})
        request_id = control_request_id(decode(payload, kind))
        reply = await self.bus.request(self.bus.topics.control(self.name), payload,
                                       self.bus.topics.replies(self.name, request_id), timeout)
        result = decode(reply, "control_result")
        if not result["ok"]:
            raise ControlRefused(f"cloud refused {kind}: {result['reason']}")

    async def register(self) -> None:
        """Tell the cloud our public keys (first use binds them to this owner id)."""
        await self._send("owner_register", {
            "pre_pk": self.identity.pre.public.to_bytes(),
            "verify_key": self.identity.signing.verify_key.raw,
        })

    def enroll_device(
        self, twin: str, device: str, broker: BrokerConnection, *,
        attributes: Iterable[str] = DEFAULT_DEVICE_ATTRIBUTES, valid_days: int = 365,
        epoch_policy: str = "hour", rules: list[dict[str, Any]] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> EnrollmentBundle:
        """Fresh device keys + a write token for ``twin``, packed for the device (offline)."""
        device_pre, device_sig = PreKeyPair.generate(), SigningKey.generate()
        allowed = [*attributes, f"twin:{twin}", f"device:{device}",
                   *(a for rule in rules or [] for a in rule.get("add", []))]
        token = issue_write_token(self.identity.signing, twin, device_sig.verify_key,
                                  sorted(set(allowed)), device=device,
                                  valid_for_s=valid_days * 86400)
        return EnrollmentBundle(
            twin=twin, device=device, device_pre=device_pre, device_signing=device_sig,
            owner_pre=self.identity.pre.public, owner_verify=self.identity.signing.verify_key,
            write_token=token.to_bytes(), broker=broker, epoch_policy=epoch_policy,
            rules=list(rules or []), source=dict(source or {"kind": "simulated"}),
        )

    async def grant(self, receiver: str, receiver_pk: PrePublicKey, twins: Iterable[str],
                    policy: str, grant_id: str | None = None) -> str:
        """Install a re-encryption key: ``receiver`` reads items of ``twins`` allowed by ``policy``."""
        parsed = Policy.parse(policy)
        grant_id = grant_id or f"g-{secrets.token_hex(6)}"
        rk = rekey(self.identity.pre, parsed, receiver_pk)
        await self._send("grant", {
            "grant_id": grant_id, "receiver": receiver, "twins": sorted(set(twins)),
            "policy": str(parsed), "rekey": rk.to_bytes(),
        })
        return grant_id

    async def grant_own_device(self, twin: str, device: str, device_pk: PrePublicKey) -> str:
        """The grant that lets a device read its own twin back (policy ``twin:<twin>``)."""
        return await self.grant(device, device_pk, [twin], f'"twin:{twin}"',
                                grant_id=f"dev-{device}")

    async def revoke(self, grant_id: str) -> None:
        """Remove a grant: from now on the cloud re-encrypts nothing more with it."""
        await self._send("revoke", {"grant_id": grant_id})
