"""The owner agent: registers the owner's keys, enrolls devices, grants and revokes access,
sets desired state and lets others interact with its twins.

Everything it sends the cloud is signed with the owner's Ed25519 key; re-encryption keys are
made here (they need the owner's secret PRE key) and only the re-key leaves the machine.

With a home folder, the owner keeps the PUBLIC keys of the devices it enrolls
(:class:`DeviceBook`, ``devices.json``): an interact token lists the twins' devices so that a
requester can encrypt to them and check their answers without asking the cloud, which could
otherwise substitute keys of its own.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ciphertwin.agents.bundle import BrokerConnection, EnrollmentBundle
from ciphertwin.agents.identity import Identity
from ciphertwin.agents.reader import TwinReader, TwinState
from ciphertwin.agents.requester import DesiredWriter, Requester
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.bus.topics import validate_id
from ciphertwin.config.files import read_private_file, write_private_file
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey, rekey
from ciphertwin.crypto.policy import Policy
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import (
    TOKEN_ID_BYTES, DeviceKeys, InteractToken, issue_interact_token, issue_write_token,
)
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.control import build_control, control_request_id

DEFAULT_DEVICE_ATTRIBUTES = ("type:*", "year:*", "month:*", "day:*", "hour:*", "share:*")
"""Attribute patterns a device's write token allows besides its exact ``twin:``/``device:``
attributes and those its attribute rules add (never another twin's or device's)."""


DEVICE_BOOK_FILE = "devices.json"
MAX_BOOK_DEVICES = 10_000


class ControlRefused(CipherTwinError):
    """The cloud refused a control message; the reason comes from the cloud."""


class DeviceBook:
    """Public keys of the devices an owner enrolled (twin, device, PRE and verify key),
    kept in ``devices.json`` in the owner's home (in memory only without a path).

    Interact tokens carry them so requesters never take a device key from the cloud.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._rows: dict[str, tuple[str, bytes, bytes]] = {}  # device -> (twin, pre, vk)
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            rows = json.loads(read_private_file(path, 4 * 1024 * 1024))["devices"]
            for row in rows[:MAX_BOOK_DEVICES]:
                pre, vk = bytes.fromhex(row["pre_pk"]), bytes.fromhex(row["verify_key"])
                PrePublicKey.from_bytes(pre), VerifyKey(vk)  # refuse a damaged key now
                self._rows[validate_id(row["device"], "device")] = (
                    validate_id(row["twin"], "twin"), pre, vk)
        except (KeyError, TypeError, ValueError, CipherTwinError) as exc:
            raise ValidationError(f"{path}: not a device book ({type(exc).__name__}: "
                                  f"{str(exc)[:120]})") from None

    def add(self, twin: str, device: str, pre_pk: PrePublicKey, verify_key: VerifyKey) -> None:
        """Record (or replace, on re-enrollment) a device's public keys."""
        self._rows[validate_id(device, "device")] = (validate_id(twin, "twin"),
                                                     pre_pk.to_bytes(), verify_key.raw)
        if self.path is not None:
            rows = [{"twin": t, "device": d, "pre_pk": p.hex(), "verify_key": v.hex()}
                    for d, (t, p, v) in sorted(self._rows.items())]
            write_private_file(self.path, json.dumps({"devices": rows}, indent=1).encode())

    def twins(self) -> set[str]:
        return {twin for twin, _, _ in self._rows.values()}

    def devices_of(self, twins: Iterable[str]) -> list[DeviceKeys]:
        """The devices of ``twins``, as an interact token lists them."""
        wanted = set(twins)
        return [DeviceKeys(device, pre, vk, twin) for device, (twin, pre, vk)
                in sorted(self._rows.items()) if twin in wanted]


class OwnerAgent:
    """One owner's actions on the bus (``identity.name`` is its principal id)."""

    def __init__(self, identity: Identity, bus: BusClient, *, home: Path | None = None) -> None:
        """``home``: the owner's key folder, where the device book is kept (see
        :class:`DeviceBook`); without it the book lives only as long as this agent."""
        self.identity, self.bus = identity, bus
        self.reader = TwinReader(bus, identity.name, identity.pre, identity.signing.verify_key)
        self.devices = DeviceBook(Path(home) / DEVICE_BOOK_FILE if home is not None else None)
        self.writer = DesiredWriter(bus, identity.name, identity.signing, identity.pre.public,
                                    self.reader)

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
        self.devices.add(twin, device, device_pre.public, device_sig.verify_key)
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

    # -- desired state and interaction (P4, P5) -------------------------------------------
    async def set_desired(self, twin: str, doc: Mapping[str, Any], *, merge: bool = False,
                          base_version: int | None = None) -> int:
        """Set (or, with ``merge``, patch) the desired state of ``twin``; the new version.
        See :meth:`~ciphertwin.agents.requester.DesiredWriter.set` for versions and retries."""
        return await self.writer.set(twin, doc, merge=merge, base_version=base_version)

    async def get_state(self, twin: str) -> TwinState:
        """Desired and reported documents, versions and the delta (computed here)."""
        return await self.reader.state(twin)

    async def grant_interact(self, principal: str, holder_key: VerifyKey, twins: Iterable[str],
                             rights: Iterable[str], operations: Iterable[str] = ("*",), *,
                             valid_for_s: int | None = None) -> InteractToken:
        """Issue ``principal`` (holding ``holder_key``) an interact token for ``twins`` and
        install it at the cloud; the token lists the twins' devices from the device book."""
        twins = sorted(set(twins))
        devices = self.devices.devices_of(twins)
        missing = sorted(set(twins) - self.devices.twins())
        if "request" in set(rights) and missing:
            raise ValidationError(
                f"no enrolled device of twin(s) {', '.join(missing)} in this owner's device "
                "book: a request could reach no device (enroll the device from this home)")
        token = issue_interact_token(self.identity.signing, principal, holder_key, twins,
                                     rights, operations=operations, devices=devices,
                                     valid_for_s=valid_for_s)
        await self._send("interact_grant", {"token": token.to_bytes(),
                                            "request_id": f"ig-{token.token_id.hex()}"})
        return token

    async def revoke_interact(self, token_id: bytes) -> None:
        """Revoke an interact token: the cloud refuses it from now on and tells the twins'
        devices (which check this owner-signed revocation themselves)."""
        if len(token_id) != TOKEN_ID_BYTES:
            raise ValidationError(f"a token id is {TOKEN_ID_BYTES} bytes "
                                  f"({2 * TOKEN_ID_BYTES} hex digits)")
        await self._send("interact_revoke", {"token_id": token_id,
                                             "request_id": f"ir-{token_id.hex()}"})

    def requester(self, twin: str) -> Requester:
        """Requests to ``twin`` as the owner itself (no token), sealed for the devices the
        device book lists for it."""
        return Requester(self.identity, self.bus, None, self.identity.pre.public,
                         self.identity.signing.verify_key,
                         devices=self.devices.devices_of([twin]))
