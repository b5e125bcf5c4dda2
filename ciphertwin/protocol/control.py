"""Owner control messages (register, grant, revoke): signed by the owner, checked by the cloud.

The broker ACL already lets only owner X publish on ``control/X``; the signature additionally
binds each message to the owner's registered key, and a strictly increasing ``time`` per
owner stops a replayed old grant from undoing a later revocation.
"""

from __future__ import annotations

import time as _time
from typing import Any

from ciphertwin.bus.envelope import Envelope, encode
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.protocol import kinds

_ = kinds
CONTROL_CONTEXT = "control"


def build_control(kind: str, signer: SigningKey, body: dict[str, Any]) -> bytes:
    """Sign ``body`` (plus a fresh timestamp) as control message ``kind``."""
    full = {**body, "time": body.get("time", _time.time())}
    full["sig"] = signer.sign_object(CONTROL_CONTEXT, {"kind": kind, **full})
    return encode(kind, full)


def verify_control(env: Envelope, key: VerifyKey) -> None:
    """Raise SignatureInvalid unless ``env`` was signed by ``key``."""
    unsigned = {k: v for k, v in env.body.items() if k != "sig"}
    key.verify_object(CONTROL_CONTEXT, {"kind": env.kind, **unsigned}, env["sig"])


def control_request_id(env: Envelope) -> str:
    """Where the cloud answers a control message: ``replies/{owner}/{this id}``.

    Grants and revokes are answered under their grant id, process tokens under their request
    id, and a registration (which has neither) under its timestamp in milliseconds.
    """
    return env.get("grant_id") or env.get("request_id") or f"register-{int(env['time'] * 1000)}"
