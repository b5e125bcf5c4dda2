"""Owner-signed capability tokens.

* ``WriteToken`` — lets one device key upload to one twin, with attributes from an allowed
  list (exact strings, or ``prefix*`` patterns such as ``day:*``), inside a validity window.
  The cloud stores an envelope only if it is signed by a device holding a valid write token.
* ``ProcessToken`` — lets a data selector (a policy over item attributes) of the listed twins
  be processed by given function classes, by a given node roster, for given receivers, within
  limits. Every MPC node verifies the token of every owner involved before touching an input,
  and refuses a job naming a twin of that owner the token does not list.
* ``InteractToken`` — lets one principal (holding one Ed25519 key) set desired state of and/or
  send requests to the listed twins, for the listed operations, inside a validity window. It
  also carries the twins' device keys (PRE public key to encrypt a request to, verify key to
  check the answer): the requester learns them from the owner's signature, never from the
  cloud. The cloud checks it on metadata (holder, twin, right); the device checks it again
  (owner signature, operation), so a lying cloud gains nothing.

Verification returns the token or raises ``TokenRejected`` whose ``reason`` says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import SignatureInvalid, TokenRejected
from ciphertwin.crypto.policy import MAX_ATTRIBUTE_BYTES, Policy, validate_attribute
from ciphertwin.crypto.signing import SIGNATURE_BYTES, SigningKey, VerifyKey
from ciphertwin.errors import ValidationError

__all__ = [
    "WriteToken",
    "ProcessToken",
    "DeviceKeys",
    "InteractToken",
    "INTERACT_RIGHTS",
    "issue_interact_token",
    "verify_interact_token",
    "issue_write_token",
    "verify_write_token",
    "issue_process_token",
    "verify_process_token",
    "roster_digest",
]

TOKEN_ID_BYTES = 16
_MAX_LIST = 256
_MAX_KEY_BYTES = 1024
_MAX_VALIDITY_S = 10 * 366 * 86400


def _seconds(t: datetime | int | float | None, default: float) -> int:
    if t is None:
        return int(default)
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValidationError("datetimes must be timezone-aware")
        return int(t.timestamp())
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValidationError(f"time must be a datetime or unix seconds, got {type(t).__name__}")
    return int(t)


def _window(not_before: datetime | int | None, not_after: datetime | int | None,
            valid_for_s: int | None) -> tuple[int, int]:
    start = _seconds(not_before, time.time())
    if not_after is None and valid_for_s is None:
        raise ValidationError("give not_after or valid_for_s")
    end = _seconds(not_after, 0) if not_after is not None else start + int(valid_for_s or 0)
    if not start < end <= start + _MAX_VALIDITY_S:
        raise ValidationError("validity window must be non-empty and at most 10 years")
    return start, end


def _check_time(not_before: int, not_after: int, now: datetime | int | float | None,
                leeway_s: int) -> None:
    t = _seconds(now, time.time())
    if t + leeway_s < not_before:
        raise TokenRejected("not-yet-valid", f"valid from {not_before}, now {t}")
    if t - leeway_s >= not_after:
        raise TokenRejected("expired", f"expired at {not_after}, now {t}")


def _verify_signature(tag: str, body: Mapping[str, Any], issuer: VerifyKey, signature: bytes,
                      expected_issuer: VerifyKey) -> None:
    if not isinstance(expected_issuer, VerifyKey):
        raise ValidationError("owner_key must be a VerifyKey")
    if issuer != expected_issuer:
        raise TokenRejected("wrong-issuer", "token was issued by another key")
    try:
        issuer.verify(tag, wire.encode(tag, body), signature)
    except SignatureInvalid:
        raise TokenRejected("bad-signature") from None


def _attribute_pattern_matches(pattern: str, attribute: str) -> bool:
    if pattern.endswith("*"):
        return attribute.startswith(pattern[:-1])
    return attribute == pattern


def _clean_bytes_list(values: Iterable[bytes], what: str) -> tuple[bytes, ...]:
    items = tuple(values)
    if len(items) > _MAX_LIST:
        raise ValidationError(f"{what}: more than {_MAX_LIST} entries")
    for v in items:
        wire.check_bytes(v, what, max_len=_MAX_KEY_BYTES)
    return tuple(bytes(v) for v in items)


def _clean_str_list(values: Iterable[str], what: str, min_items: int = 1) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise ValidationError(f"{what} must be a list of strings")
    items = tuple(sorted(set(values)))
    if not min_items <= len(items) <= _MAX_LIST:
        raise ValidationError(f"{what}: need {min_items}..{_MAX_LIST} entries")
    for v in items:
        validate_attribute(v)
    return items


# --- write tokens ------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteToken:
    twin: str
    device: str | None  # the device's name (binds its sequence numbers); None = unnamed
    device_key: VerifyKey
    attributes: tuple[str, ...]  # allowed attributes; "prefix*" matches by prefix
    not_before: int
    not_after: int
    issuer: VerifyKey
    token_id: bytes
    signature: bytes = field(repr=False)

    TAG = "write-token"
    _FIELDS = ("twin", "name", "device", "attrs", "nbf", "exp", "issuer", "id")

    def body(self) -> dict[str, Any]:
        return {
            "twin": self.twin,
            "name": self.device or "",
            "device": self.device_key.raw,
            "attrs": list(self.attributes),
            "nbf": self.not_before,
            "exp": self.not_after,
            "issuer": self.issuer.raw,
            "id": self.token_id,
        }

    def allows_attribute(self, attribute: str) -> bool:
        return any(_attribute_pattern_matches(p, attribute) for p in self.attributes)

    def to_bytes(self) -> bytes:
        return wire.encode(self.TAG, {**self.body(), "sig": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> WriteToken:
        f = wire.decode(data, cls.TAG, (*cls._FIELDS, "sig"), max_bytes=64 * 1024)
        return cls(
            twin=_twin(f.str("twin", 256)),
            device=_device_name(f.str("name", 256)),
            device_key=VerifyKey(f.bytes("device", 32)),
            attributes=_clean_str_list(
                f.str_list("attrs", _MAX_LIST, MAX_ATTRIBUTE_BYTES), "write-token.attrs"
            ),
            not_before=f.int("nbf", 0, 2**40),
            not_after=f.int("exp", 0, 2**40),
            issuer=VerifyKey(f.bytes("issuer", 32)),
            token_id=f.bytes("id", TOKEN_ID_BYTES),
            signature=f.bytes("sig", SIGNATURE_BYTES),
        )


def _twin(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 256 or not name.isprintable():
        raise ValidationError("twin id must be 1..256 printable characters")
    return name


def _device_name(name: str) -> str | None:
    return _twin(name) if name else None


def issue_write_token(
    owner: SigningKey,
    twin: str,
    device_key: VerifyKey,
    attributes: Iterable[str],
    *,
    device: str | None = None,
    not_before: datetime | int | None = None,
    not_after: datetime | int | None = None,
    valid_for_s: int | None = None,
) -> WriteToken:
    """Owner signs: device ``device`` (holding ``device_key``) may write to ``twin`` with these
    attributes in this window."""
    if not isinstance(device_key, VerifyKey):
        raise ValidationError("device_key must be a VerifyKey")
    start, end = _window(not_before, not_after, valid_for_s)
    unsigned = WriteToken(
        _twin(twin), _device_name(device or ""), device_key, _clean_str_list(attributes, "attributes"), start, end,
        owner.verify_key, os.urandom(TOKEN_ID_BYTES), b"",
    )
    signature = owner.sign(WriteToken.TAG, wire.encode(WriteToken.TAG, unsigned.body()))
    return dataclasses.replace(unsigned, signature=signature)


def verify_write_token(
    token: WriteToken,
    owner_key: VerifyKey,
    *,
    twin: str | None = None,
    device_key: VerifyKey | None = None,
    device: str | None = None,
    attributes: Iterable[str] | None = None,
    now: datetime | int | float | None = None,
    leeway_s: int = 0,
) -> WriteToken:
    """Check signature, issuer, validity window, and (if given) twin, device and attributes."""
    if not isinstance(token, WriteToken):
        raise ValidationError("expected a WriteToken")
    _verify_signature(token.TAG, token.body(), token.issuer, token.signature, owner_key)
    _check_time(token.not_before, token.not_after, now, leeway_s)
    if twin is not None and twin != token.twin:
        raise TokenRejected("wrong-twin", f"token is for twin {token.twin!r}")
    if device_key is not None and device_key != token.device_key:
        raise TokenRejected("wrong-device", "token names another device key")
    if device is not None and device != token.device:
        raise TokenRejected("wrong-device", f"token is for device {token.device!r}")
    for attribute in attributes or ():
        if not token.allows_attribute(attribute):
            raise TokenRejected("attribute-not-allowed", repr(attribute))
    return token


# --- process tokens ----------------------------------------------------------------------


ROSTER_MISMATCH = "roster-mismatch"
"""``TokenRejected.reason`` of a token issued for another node set (e.g. before a hot swap)"""


def roster_digest(node_keys: Sequence[bytes]) -> bytes:
    """SHA-256 over the ordered node keys: names the node set (index i = share i)."""
    keys = _clean_bytes_list(node_keys, "node_keys")
    return hashlib.sha256(wire.canonical(["ciphertwin/v1/roster", list(keys)])).digest()


@dataclass(frozen=True)
class ProcessToken:
    selector: str  # canonical policy text over item attributes
    twins: tuple[str, ...]  # the owner's twins it covers (sorted)
    function_classes: tuple[str, ...]
    receivers: tuple[bytes, ...]  # authorised receiver public keys (encodings)
    node_keys: tuple[bytes, ...]  # node i's public key at index i
    roster: bytes  # roster_digest(node_keys)
    not_before: int
    not_after: int
    limits: Mapping[str, int]
    issuer: VerifyKey
    token_id: bytes
    signature: bytes = field(repr=False)

    TAG = "process-token"
    _FIELDS = ("selector", "twins", "functions", "receivers", "nodes", "roster", "nbf", "exp",
               "limits", "issuer", "id")

    @property
    def policy(self) -> Policy:
        return Policy.parse(self.selector)

    def body(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "twins": list(self.twins),
            "functions": list(self.function_classes),
            "receivers": list(self.receivers),
            "nodes": list(self.node_keys),
            "roster": self.roster,
            "nbf": self.not_before,
            "exp": self.not_after,
            "limits": dict(self.limits),
            "issuer": self.issuer.raw,
            "id": self.token_id,
        }

    def to_bytes(self) -> bytes:
        return wire.encode(self.TAG, {**self.body(), "sig": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> ProcessToken:
        f = wire.decode(data, cls.TAG, (*cls._FIELDS, "sig"), max_bytes=256 * 1024)
        nodes = _clean_bytes_list(f.bytes_list("nodes", max_items=_MAX_LIST), "nodes")
        roster = f.bytes("roster", 32)
        if roster != roster_digest(nodes):
            raise ValidationError("process-token.roster does not match its node keys")
        return cls(
            selector=str(Policy.parse(f.str("selector", 8192))),
            twins=_clean_twins(f.str_list("twins", _MAX_LIST, 256)),
            function_classes=_clean_str_list(
                f.str_list("functions", _MAX_LIST, MAX_ATTRIBUTE_BYTES), "functions"
            ),
            receivers=_clean_bytes_list(f.bytes_list("receivers", max_items=_MAX_LIST),
                                        "receivers"),
            node_keys=nodes,
            roster=roster,
            not_before=f.int("nbf", 0, 2**40),
            not_after=f.int("exp", 0, 2**40),
            limits=_clean_limits(f.map("limits")),
            issuer=VerifyKey(f.bytes("issuer", 32)),
            token_id=f.bytes("id", TOKEN_ID_BYTES),
            signature=f.bytes("sig", SIGNATURE_BYTES),
        )


def _clean_twins(twins: Iterable[str]) -> tuple[str, ...]:
    if isinstance(twins, (str, bytes)):
        raise ValidationError("twins must be a list of twin ids")
    items = tuple(sorted({_twin(t) for t in twins}))
    if not 1 <= len(items) <= _MAX_LIST:
        raise ValidationError(f"a process token names 1..{_MAX_LIST} twins")
    return items


def _clean_limits(limits: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(limits, Mapping) or len(limits) > 64:
        raise ValidationError("limits must be a map of at most 64 entries")
    clean = {}
    for k, v in limits.items():
        if not isinstance(k, str) or not 1 <= len(k) <= 64:
            raise ValidationError("limit names must be 1..64 character strings")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise ValidationError(f"limit {k!r} must be a non-negative integer")
        clean[k] = v
    return clean


def issue_process_token(
    owner: SigningKey,
    selector: str | Policy,
    function_classes: Iterable[str],
    receivers: Iterable[bytes],
    node_keys: Sequence[bytes],
    *,
    twins: Iterable[str],
    limits: Mapping[str, int] | None = None,
    not_before: datetime | int | None = None,
    not_after: datetime | int | None = None,
    valid_for_s: int | None = None,
) -> ProcessToken:
    """Owner signs: items of ``twins`` matching ``selector`` may be processed as described."""
    start, end = _window(not_before, not_after, valid_for_s)
    nodes = _clean_bytes_list(node_keys, "node_keys")
    if not nodes:
        raise ValidationError("a process token needs the node roster")
    receiver_keys = _clean_bytes_list(receivers, "receivers")
    if not receiver_keys:
        raise ValidationError("a process token needs at least one receiver")
    unsigned = ProcessToken(
        selector=str(Policy.parse(selector)),
        twins=_clean_twins(twins),
        function_classes=_clean_str_list(function_classes, "function_classes"),
        receivers=receiver_keys,
        node_keys=nodes,
        roster=roster_digest(nodes),
        not_before=start,
        not_after=end,
        limits=_clean_limits(limits or {}),
        issuer=owner.verify_key,
        token_id=os.urandom(TOKEN_ID_BYTES),
        signature=b"",
    )
    signature = owner.sign(ProcessToken.TAG, wire.encode(ProcessToken.TAG, unsigned.body()))
    return dataclasses.replace(unsigned, signature=signature)


def verify_process_token(
    token: ProcessToken,
    owner_key: VerifyKey,
    *,
    function_class: str | None = None,
    receiver: bytes | None = None,
    roster: bytes | None = None,
    node_key: bytes | None = None,
    now: datetime | int | float | None = None,
    leeway_s: int = 0,
) -> ProcessToken:
    """Check signature, issuer, window and (if given) roster, node, function class, receiver.

    The roster comes first: a token issued before a hot swap (M4) fails with a reason that
    says so — whatever else about it would also not fit this job."""
    if not isinstance(token, ProcessToken):
        raise ValidationError("expected a ProcessToken")
    _verify_signature(token.TAG, token.body(), token.issuer, token.signature, owner_key)
    _check_time(token.not_before, token.not_after, now, leeway_s)
    if roster is not None and bytes(roster) != token.roster:
        raise TokenRejected(ROSTER_MISMATCH, (
            f"token was issued for another node roster ({token.roster.hex()[:12]}, the job's "
            f"is {bytes(roster).hex()[:12]}): the nodes changed since processing was granted; "
            "re-grant processing"))
    if node_key is not None and bytes(node_key) not in token.node_keys:
        raise TokenRejected("node-not-in-roster")
    if function_class is not None and function_class not in token.function_classes:
        raise TokenRejected("function-class-not-allowed", repr(function_class))
    if receiver is not None and bytes(receiver) not in token.receivers:
        raise TokenRejected("receiver-not-authorised")
    return token


def first_admitting(tokens: Iterable[ProcessToken], check: Callable[[ProcessToken], object],
                    ) -> tuple[ProcessToken | None, str]:
    """(first token ``check`` accepts, "") or (None, the most telling refusal).

    ``check`` raises :class:`TokenRejected` (or ValidationError). A refusal of a token issued
    for the job's roster says more than "issued for another roster" (an owner may hold both
    a pre-swap token and a current one for other functions); with no token at all the reason
    is "no process token"."""
    reason, roster_reason = "", ""
    for token in tokens:
        try:
            check(token)
            return token, ""
        except TokenRejected as exc:
            if exc.reason == ROSTER_MISMATCH:
                roster_reason = roster_reason or str(exc)
            else:
                reason = str(exc)
        except ValidationError as exc:
            reason = f"process token malformed: {exc}"
    return None, reason or roster_reason or "no process token"


# --- interact tokens ---------------------------------------------------------------------


INTERACT_RIGHTS = frozenset({"desired", "request"})
"""What an interact token can grant: writing desired state, sending requests."""
ANY_OPERATION = "*"
MAX_TOKEN_DEVICES = 64
"""Devices listed in one interact token (each ~250 bytes: the token stays ≤ ~20 KiB)."""
MAX_INTERACT_TOKEN_BYTES = 32 * 1024
_MAX_PRE_PK_BYTES = 1024
_MAX_OPERATION_CHARS = 64


@dataclass(frozen=True)
class DeviceKeys:
    """One device as its owner vouches for it: name, PRE public key (encoding) to encrypt
    requests to, Ed25519 verify key to check its answers, and the twin it serves ("" = not
    said: then it is taken to serve every twin of the token)."""

    device: str
    pre_pk: bytes
    verify_key: bytes
    twin: str = ""

    def serves(self, twin: str) -> bool:
        return self.twin in ("", twin)

    def body(self) -> dict[str, Any]:
        return {"device": self.device, "pre_pk": self.pre_pk, "verify_key": self.verify_key,
                "twin": self.twin}

    @classmethod
    def from_body(cls, value: object) -> DeviceKeys:
        if not isinstance(value, dict) or set(value) != {"device", "pre_pk", "verify_key", "twin"}:
            raise ValidationError(
                "interact-token.devices: entries are {device, pre_pk, verify_key, twin}")
        return _device_keys(value["device"], value["pre_pk"], value["verify_key"], value["twin"])


def _device_keys(device: object, pre_pk: object, verify_key: object, twin: object) -> DeviceKeys:
    if not isinstance(device, str) or not isinstance(twin, str):
        raise ValidationError("interact-token.devices: device and twin names are strings")
    pk = wire.check_bytes(pre_pk, "interact-token.devices.pre_pk", max_len=_MAX_PRE_PK_BYTES)
    vk = VerifyKey(wire.check_bytes(verify_key, "interact-token.devices.verify_key", 32)).raw
    return DeviceKeys(_twin(device), pk, vk, _twin(twin) if twin else "")


def _clean_devices(devices: Iterable[DeviceKeys]) -> tuple[DeviceKeys, ...]:
    items = tuple(devices)
    if len(items) > MAX_TOKEN_DEVICES:
        raise ValidationError(f"an interact token lists at most {MAX_TOKEN_DEVICES} devices")
    clean = tuple(sorted((_device_keys(d.device, d.pre_pk, d.verify_key, d.twin)
                          for d in items), key=lambda d: d.device))
    if len({d.device for d in clean}) != len(clean):
        raise ValidationError("an interact token lists each device once")
    return clean


def _clean_rights(rights: Iterable[str]) -> tuple[str, ...]:
    if isinstance(rights, (str, bytes)):
        raise ValidationError("rights must be a list of strings")
    items = tuple(sorted(set(rights)))
    if not items or not set(items) <= INTERACT_RIGHTS:
        raise ValidationError(f"rights must be a non-empty subset of {sorted(INTERACT_RIGHTS)}")
    return items


def _clean_operations(operations: Iterable[str]) -> tuple[str, ...]:
    if isinstance(operations, (str, bytes)):
        raise ValidationError("operations must be a list of strings")
    items = tuple(sorted(set(operations)))
    if not 1 <= len(items) <= _MAX_LIST:
        raise ValidationError(f"operations: need 1..{_MAX_LIST} entries")
    for op in items:
        if not isinstance(op, str) or not 1 <= len(op) <= _MAX_OPERATION_CHARS \
                or not op.isprintable():
            raise ValidationError(f"operation names are 1..{_MAX_OPERATION_CHARS} printable "
                                  f"characters, got {op!r:.80}")
    return items


@dataclass(frozen=True)
class InteractToken:
    principal: str  # who may interact (the name it writes/requests under)
    holder_key: VerifyKey  # the key its desired writes and requests are signed with
    twins: tuple[str, ...]  # sorted
    rights: tuple[str, ...]  # ⊆ INTERACT_RIGHTS, sorted
    operations: tuple[str, ...]  # request operations allowed; "*" = any
    devices: tuple[DeviceKeys, ...]  # the twins' devices, sorted by name
    not_before: int
    not_after: int
    issuer: VerifyKey
    token_id: bytes
    signature: bytes = field(repr=False)

    TAG = "interact-token"
    _FIELDS = ("principal", "holder", "twins", "rights", "ops", "devices", "nbf", "exp",
               "issuer", "id")

    def body(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "holder": self.holder_key.raw,
            "twins": list(self.twins),
            "rights": list(self.rights),
            "ops": list(self.operations),
            "devices": [d.body() for d in self.devices],
            "nbf": self.not_before,
            "exp": self.not_after,
            "issuer": self.issuer.raw,
            "id": self.token_id,
        }

    def allows_operation(self, op: str) -> bool:
        return ANY_OPERATION in self.operations or op in self.operations

    def device(self, name: str) -> DeviceKeys | None:
        """The listed device called ``name`` (None if the owner did not list it)."""
        return next((d for d in self.devices if d.device == name), None)

    def devices_of(self, twin: str) -> tuple[DeviceKeys, ...]:
        """The listed devices that serve ``twin`` (a request to it is wrapped for these)."""
        return tuple(d for d in self.devices if d.serves(twin))

    def to_bytes(self) -> bytes:
        return wire.encode(self.TAG, {**self.body(), "sig": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> InteractToken:
        f = wire.decode(data, cls.TAG, (*cls._FIELDS, "sig"), max_bytes=MAX_INTERACT_TOKEN_BYTES)
        devices = tuple(DeviceKeys.from_body(d)
                        for d in f.list("devices", max_items=MAX_TOKEN_DEVICES))
        token = cls(
            principal=_twin(f.str("principal", 256)),
            holder_key=VerifyKey(f.bytes("holder", 32)),
            twins=_clean_twins(f.str_list("twins", _MAX_LIST, 256)),
            rights=_clean_rights(f.str_list("rights", 8, 16)),
            operations=_clean_operations(f.str_list("ops", _MAX_LIST, _MAX_OPERATION_CHARS)),
            devices=_clean_devices(devices),
            not_before=f.int("nbf", 0, 2**40),
            not_after=f.int("exp", 0, 2**40),
            issuer=VerifyKey(f.bytes("issuer", 32)),
            token_id=f.bytes("id", TOKEN_ID_BYTES),
            signature=f.bytes("sig", SIGNATURE_BYTES),
        )
        if token.to_bytes() != bytes(data):  # lists must come sorted and without duplicates
            raise ValidationError("interact-token: lists not sorted or with duplicates")
        return token


def issue_interact_token(
    owner: SigningKey,
    principal: str,
    holder_key: VerifyKey,
    twins: Iterable[str],
    rights: Iterable[str],
    *,
    operations: Iterable[str] = (ANY_OPERATION,),
    devices: Iterable[DeviceKeys] = (),
    not_before: datetime | int | None = None,
    valid_for_s: int | None = None,
) -> InteractToken:
    """Owner signs: ``principal`` (holding ``holder_key``) may exercise ``rights`` on
    ``twins`` (requests only for ``operations``). Valid for ``valid_for_s`` (default 1 year)."""
    if not isinstance(holder_key, VerifyKey):
        raise ValidationError("holder_key must be a VerifyKey")
    start, end = _window(not_before, None, valid_for_s if valid_for_s is not None else 366 * 86400)
    unsigned = InteractToken(
        principal=_twin(principal), holder_key=holder_key, twins=_clean_twins(twins),
        rights=_clean_rights(rights), operations=_clean_operations(operations),
        devices=_clean_devices(devices), not_before=start, not_after=end,
        issuer=owner.verify_key, token_id=os.urandom(TOKEN_ID_BYTES), signature=b"",
    )
    signature = owner.sign(InteractToken.TAG, wire.encode(InteractToken.TAG, unsigned.body()))
    token = dataclasses.replace(unsigned, signature=signature)
    if len(token.to_bytes()) > MAX_INTERACT_TOKEN_BYTES:
        raise ValidationError(f"interact token larger than {MAX_INTERACT_TOKEN_BYTES} bytes")
    return token


def verify_interact_token(
    token: InteractToken,
    owner_key: VerifyKey,
    *,
    principal: str | None = None,
    holder_key: VerifyKey | None = None,
    twin: str | None = None,
    right: str | None = None,
    operation: str | None = None,
    now: datetime | int | float | None = None,
    leeway_s: int = 0,
) -> InteractToken:
    """Check signature, issuer, window and (if given) principal, holder key, twin, right and
    operation. Revocation is the caller's list (cloud store, device replay cache)."""
    if not isinstance(token, InteractToken):
        raise ValidationError("expected an InteractToken")
    _verify_signature(token.TAG, token.body(), token.issuer, token.signature, owner_key)
    _check_time(token.not_before, token.not_after, now, leeway_s)
    if principal is not None and principal != token.principal:
        raise TokenRejected("wrong-principal", f"token is for {token.principal!r}")
    if holder_key is not None and holder_key != token.holder_key:
        raise TokenRejected("wrong-holder", "token names another holder key")
    if twin is not None and twin not in token.twins:
        raise TokenRejected("wrong-twin", f"token does not cover twin {twin!r}")
    if right is not None and right not in token.rights:
        raise TokenRejected("right-not-granted", repr(right))
    if operation is not None and not token.allows_operation(operation):
        raise TokenRejected("operation-not-allowed", repr(operation))
    return token


wire.register(WriteToken.TAG, WriteToken.from_bytes)
wire.register(ProcessToken.TAG, ProcessToken.from_bytes)
wire.register(InteractToken.TAG, InteractToken.from_bytes)
