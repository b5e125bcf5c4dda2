"""P4: desired and reported state as sealed documents (kinds ``desired_set``, ``reported_set``).

Versions are plaintext metadata so that the cloud can do optimistic concurrency without
reading anything: a writer states the ``base_version`` it started from and signs ``version =
base_version + 1``; the cloud accepts iff ``base_version`` is current. Every other field is
signed (outer signature for the cloud, inner one end to end) and bound into the sealed
document's AAD, so the cloud can neither renumber a document nor move it to another twin.

* desired: written by the owner (owner key) or by a holder of an InteractToken with right
  ``desired`` for the twin (holder key, token carried as ``permit``); body ``{"doc": {...}}``;
* reported: written by a device under its write token; body ``{"state": {...}}``, plus the
  desired version it answers and whether ``delta(desired, state)`` is empty.

``key_material`` is the wrap addressed to the reader: the owner's own wrap (a PreCiphertext)
or the cloud's re-encryption of it through the reader's grant (a ReEncryptedCiphertext).
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass
from typing import Any

from ciphertwin.bus.envelope import Envelope
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import InteractToken
from ciphertwin.errors import ValidationError
from ciphertwin.protocol import kinds
from ciphertwin.protocol.items import DeviceCredentials
from ciphertwin.protocol.json_state import check_document
from ciphertwin.protocol.sealed_docs import (
    OWNER_RECIPIENT,
    Recipient,
    author_key_for,
    check_fresh,
    expect_kind,
    meta_of,
    new_request_id,
    open_with_wrap,
    seal_envelope,
    verify_device_envelope,
    verify_envelope,
    wrap_for,
)

_ = kinds  # the kinds must be registered before encode/decode
__all__ = [
    "DesiredDoc",
    "ReportedDoc",
    "build_desired",
    "open_desired",
    "verify_desired_outer",
    "build_reported",
    "open_reported",
    "verify_reported_outer",
    "new_request_id",
]

DESIRED = "desired_set"
REPORTED = "reported_set"


# --- desired -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredDoc:
    """An opened, authenticated desired document."""

    twin: str
    writer: str
    version: int
    doc: dict[str, Any]
    time: float
    permit: InteractToken | None = None  # None: written by the owner itself


def build_desired(signer: SigningKey, twin: str, writer: str, owner_pk: PrePublicKey,
                  doc: dict[str, Any], base_version: int, *, permit: bytes | None = None,
                  request_id: str | None = None) -> bytes:
    """A ``desired_set`` envelope replacing the desired document of ``twin`` (a FULL
    document: merge a partial update first) at ``base_version + 1``."""
    check_document(doc)
    meta: dict[str, Any] = {"request_id": request_id or new_request_id(),
                            "base_version": base_version, "version": base_version + 1,
                            "time": _time.time()}
    if permit is not None:
        meta["permit"] = permit
    return seal_envelope(DESIRED, twin, "writer", writer, signer, meta, {"doc": doc},
                          [Recipient(OWNER_RECIPIENT, owner_pk)])


def verify_desired_outer(env: Envelope, owner_key: VerifyKey, *, now: float) -> str:
    """What the cloud can check of a desired write without reading it; returns the writer.

    The version follows its base, the message is not post-dated, the owner's wrap is there,
    and the outer signature is the owner's or that of the holder of a permit (owner-signed,
    valid at ``now``, for this writer, twin and right ``desired``). Whether ``base_version``
    is current, and whether the permit is revoked, is the caller's state."""
    _desired_key(env, owner_key, now)
    return str(env["writer"])


def _desired_key(env: Envelope, owner_key: VerifyKey,
                 now: float) -> tuple[VerifyKey, InteractToken | None]:
    expect_kind(env, DESIRED)
    if env["version"] != env["base_version"] + 1:
        raise ValidationError("desired version must be base_version + 1")
    check_fresh(env["time"], now, "desired document")
    key, permit = author_key_for(env, env["writer"], owner_key, right="desired", now=now)
    verify_envelope(env, key)
    wrap_for(env, OWNER_RECIPIENT)
    return key, permit


def open_desired(env: Envelope, key_material: bytes, pre: PreKeyPair, owner_key: VerifyKey,
                 *, now: float | None = None) -> DesiredDoc:
    """Open a desired document with the wrap addressed to ``pre``, checking it end to end.

    ``now`` is when the permit must be valid: the current time by default (a device about to
    apply it); a reader looking at stored state passes ``now=env["time"]``."""
    when = _time.time() if now is None else now
    key, permit = _desired_key(env, owner_key, when)
    writer = str(env["writer"])
    body = open_with_wrap(env, DESIRED, writer, meta_of(env, "writer"), key_material, pre, key)
    if set(body) != {"doc"}:
        raise ValidationError("desired document body must be {doc}")
    return DesiredDoc(env["twin"], writer, env["version"], check_document(body["doc"]),
                      float(env["time"]), permit)


# --- reported ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportedDoc:
    """An opened, authenticated reported document."""

    twin: str
    device: str
    version: int
    desired_version: int
    in_sync: bool
    state: dict[str, Any]
    time: float


def build_reported(creds: DeviceCredentials, owner_pk: PrePublicKey, version: int,
                   desired_version: int, state: dict[str, Any], in_sync: bool) -> bytes:
    """A ``reported_set`` envelope: the device's state after answering ``desired_version``
    (``version`` is the device's own strictly increasing counter)."""
    check_document(state)
    meta: dict[str, Any] = {"request_id": new_request_id(), "version": version,
                            "desired_version": desired_version, "in_sync": bool(in_sync),
                            "time": _time.time(), "token": creds.write_token}
    return seal_envelope(REPORTED, creds.twin, "device", creds.device, creds.signing_key, meta,
                          {"state": state}, [Recipient(OWNER_RECIPIENT, owner_pk)])


def _reported_device_key(env: Envelope, owner_key: VerifyKey, now: float) -> VerifyKey:
    expect_kind(env, REPORTED)
    token = verify_device_envelope(env, owner_key, now=now)
    wrap_for(env, OWNER_RECIPIENT)
    return token.device_key


def verify_reported_outer(env: Envelope, owner_key: VerifyKey, *, now: float) -> None:
    """Cloud: signed by the device its write token (owner-signed, this twin and device,
    valid at ``now``) names, not post-dated. Version monotonicity is the caller's state."""
    _reported_device_key(env, owner_key, now)
    check_fresh(env["time"], now, "reported document")


def open_reported(env: Envelope, key_material: bytes, pre: PreKeyPair,
                  owner_key: VerifyKey) -> ReportedDoc:
    """Open a reported document (write token checked at the document's own time)."""
    device_key = _reported_device_key(env, owner_key, float(env["time"]))
    body = open_with_wrap(env, REPORTED, env["device"], meta_of(env, "device"), key_material, pre,
                          device_key)
    if set(body) != {"state"}:
        raise ValidationError("reported document body must be {state}")
    return ReportedDoc(env["twin"], env["device"], env["version"], env["desired_version"],
                       env["in_sync"], check_document(body["state"]), float(env["time"]))
