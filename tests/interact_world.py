"""Keys and tokens of one small world for issue-11 protocol tests (no broker, no cloud):
an owner, a twin with one device (write token, PRE keys, the owner's `dev-<device>` re-key), a
reader with a grant, and a requester holding an InteractToken. Other test modules may reuse
it: everything is real crypto, nothing is mocked."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Iterable

from ciphertwin.crypto.kpcpre import PreKeyPair, ReKey, rekey
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import (
    DeviceKeys,
    InteractToken,
    issue_interact_token,
    issue_write_token,
)
from ciphertwin.protocol.items import DeviceCredentials
from ciphertwin.protocol.sealed_docs import Recipient


@dataclass
class Party:
    name: str
    sig: SigningKey = field(default_factory=SigningKey.generate)
    pre: PreKeyPair = field(default_factory=PreKeyPair.generate)


@dataclass
class World:
    twin: str
    owner: Party
    device: Party
    creds: DeviceCredentials
    device_rekey: ReKey  # what the cloud holds for grant dev-<device> (policy "twin:<twin>")
    reader: Party
    reader_rekey: ReKey  # grant of the reader: "twin:<twin>"
    requester: Party

    @property
    def device_keys(self) -> DeviceKeys:
        return DeviceKeys(self.device.name, self.device.pre.public.to_bytes(),
                          self.device.sig.verify_key.raw)

    @property
    def device_recipient(self) -> Recipient:
        return Recipient(self.device.name, self.device.pre.public)

    def permit(self, rights: Iterable[str] = ("desired", "request"), *,
               operations: Iterable[str] = ("*",), twins: Iterable[str] | None = None,
               principal: str | None = None, holder: SigningKey | None = None,
               owner: SigningKey | None = None, valid_for_s: int | None = None,
               not_before: int | None = None) -> InteractToken:
        return issue_interact_token(
            owner or self.owner.sig, principal or self.requester.name,
            (holder or self.requester.sig).verify_key, twins or [self.twin], rights,
            operations=operations, devices=[self.device_keys], valid_for_s=valid_for_s,
            not_before=not_before)


def make_world(twin: str = "t1", device: str = "d1") -> World:
    owner, dev = Party("alice"), Party(device)
    token = issue_write_token(owner.sig, twin, dev.sig.verify_key, ["type:*", "twin:*"],
                              device=device, not_before=int(time.time()) - 60,
                              valid_for_s=86400)
    creds = DeviceCredentials(twin, device, dev.sig, token.to_bytes())
    reader, requester = Party("carol"), Party("bob")
    return World(twin, owner, dev, creds, rekey(owner.pre, f'"twin:{twin}"', dev.pre.public),
                 reader, rekey(owner.pre, f'"twin:{twin}"', reader.pre.public), requester)
