"""Processing jobs on the bus (processes 2+ and 6+): kinds, signed messages, the node roster.

Who sends what:

* operator → all, retained on ``config/nodes``: ``node_roster`` — the three nodes' self-signed
  MPC entries plus their PRE public keys, signed by the operator key everybody pins;
* owner → cloud on ``control/{owner}``: ``process_token`` (the owner-signed token, whose body
  names the twins it covers, signed as a control message);
* owner → cloud on ``control/{owner}`` and, the same bytes, retained on
  ``revocations/{owner}/{token id}`` for the nodes: ``process_token_revoke`` (a control message
  naming the token id and the owner's key; nodes check it against that key, not the cloud's
  word, and refuse jobs with a revoked token);
* anyone → cloud on ``jobs/submit``: ``job_submit`` (function, parameters, input selectors per
  owner and twin, receiver and its X25519 key);
* cloud → node i on ``nodes/{node}/inputs/{job}``: ``node_inputs`` chunks; chunk 0 carries the
  ``job_spec`` (everything a node checks before it touches an input);
* cloud and nodes → all on ``jobs/{job}/status``: ``job_status`` (the cloud's is retained and
  unsigned; the nodes' are signed, so the cloud and the nodes only believe the job's roster
  nodes; a node's "ready" report — computing, round 0 — carries its fresh per-run ``nonce``);
* node → receiver on ``receivers/{receiver}/results/{job}``: ``job_result`` — the HPKE-sealed
  output share, signed by the node.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ciphertwin.bus.envelope import (
    FLOAT, I64, ID, STORED_INT, TIME, Bytes, Int, ListOf, MapOf, Opt, Str, Struct, Envelope,
    decode, encode, register_kind,
)
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.kpcpre import PrePublicKey
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import roster_digest
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.mpc_nodes.roster import Roster, RosterEntry
from ciphertwin.protocol.control import verify_control
from ciphertwin.protocol.kinds import DIGEST, REASON, SIG

ROLE = Str(32, 1)
PUBKEY = Bytes(32, 32)
PARAMS = Bytes(8192, 1)
MAX_TWINS = 100_000
CHUNK_ITEMS = 2000
MAX_CHUNK_BYTES = 2 * 1024 * 1024
STATES = ("queued", "reencrypting", "sent", "computing", "delivered", "done", "failed")

NODE_ROSTER = register_kind("node_roster", {
    "version": STORED_INT, "entries": ListOf(Bytes(1024, 16), 3, 3), "pre": ListOf(Bytes(1024, 16), 3, 3),
    "operator": PUBKEY, "time": TIME, "sig": SIG,
})
PROCESS_TOKEN = register_kind("process_token", {
    "owner": ID, "request_id": ID, "token": Bytes(64 * 1024, 16), "time": TIME, "sig": SIG,
}, max_size=96 * 1024)
PROCESS_TOKEN_REVOKE = register_kind("process_token_revoke", {
    "owner": ID, "owner_key": PUBKEY, "request_id": ID, "token_id": Bytes(16, 16),
    "time": TIME, "sig": SIG,
})
JOB_SUBMIT = register_kind("job_submit", {
    "job": ID, "function": Str(64, 1), "params": PARAMS,
    "inputs": ListOf(Struct({"owner": ID, "twin": ID, "role": ROLE}), MAX_TWINS, 1),
    "since": TIME, "until": TIME, "points": Int(1, 1_000_000),
    "receiver": ID, "receiver_key": PUBKEY, "time": TIME,
}, max_size=16 * 1024 * 1024)
BINDING = Struct({"role": ROLE, "field": Str(32, 1), "ndim": Int(1, 2), "pad": Opt(I64)})
JOB_SPEC = register_kind("job_spec", {
    "job": ID, "function": Str(64, 1), "params": PARAMS, "receiver": ID, "receiver_key": PUBKEY,
    "roster": DIGEST, "points": Int(1, 1_000_000), "bindings": MapOf(Str(64, 1), BINDING, 64),
    "twins": ListOf(Struct({"twin": ID, "owner_key": PUBKEY, "role": ROLE, "count": STORED_INT}),
                    MAX_TWINS, 1),
    "tokens": ListOf(Bytes(64 * 1024, 16), MAX_TWINS, 1),
}, max_size=64 * 1024 * 1024)
NODE_INPUTS = register_kind("node_inputs", {
    "job": ID, "chunk": Int(0, 1_000_000), "chunks": Int(1, 1_000_000), "spec": Opt(Bytes(64 * 1024 * 1024, 16)),
    "items": ListOf(Struct({"item": Bytes(96 * 1024, 16), "key": Bytes(16 * 1024, 16)}), CHUNK_ITEMS),
}, max_size=80 * 1024 * 1024)
JOB_STATUS = register_kind("job_status", {
    "job": ID, "state": Str(16, 1), "progress": FLOAT, "round": STORED_INT, "rounds": STORED_INT,
    "reason": REASON, "by": ID, "time": TIME, "sig": Opt(SIG), "nonce": Opt(Bytes(32, 32)),
})
JOB_RESULT = register_kind("job_result", {
    "job": ID, "function": Str(64, 1), "party": Int(0, 2), "node": ID,
    "labels": ListOf(ID, MAX_TWINS), "blob": Bytes(64 * 1024 * 1024, 16), "sig": SIG,
}, max_size=80 * 1024 * 1024)

_ROSTER_CTX, _STATUS_CTX, _RESULT_CTX = "node-roster", "job-status", "job-result"


# --- roster ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRoster:
    """The operator-signed node set: MPC identities (index i = share i) and PRE keys."""

    version: int
    roster: Roster
    pre_keys: tuple[PrePublicKey, ...]
    operator: VerifyKey

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(e.node_id for e in self.roster.entries)

    @property
    def node_keys(self) -> tuple[bytes, ...]:
        """What process tokens list: node i's Ed25519 key at index i."""
        return tuple(e.sign_public for e in self.roster.entries)

    @property
    def digest(self) -> bytes:
        return roster_digest(self.node_keys)

    def index_of(self, node_id: str) -> int | None:
        return next((e.index for e in self.roster.entries if e.node_id == node_id), None)


def build_roster(operator: SigningKey, entries: Sequence[RosterEntry],
                 pre_keys: Sequence[PrePublicKey], version: int) -> bytes:
    """Operator-signed ``node_roster`` message (publish retained on ``config/nodes``)."""
    Roster(list(entries))  # refuse a bad roster before signing it
    body: dict[str, Any] = {
        "version": version, "entries": [e.to_bytes() for e in sorted(entries, key=lambda e: e.index)],
        "pre": [k.to_bytes() for k in pre_keys], "operator": operator.verify_key.raw,
        "time": time.time(),
    }
    body["sig"] = operator.sign_object(_ROSTER_CTX, body)
    return encode("node_roster", body)


def parse_roster(payload: bytes, operator: VerifyKey) -> NodeRoster:
    """Check the signature against the pinned operator key (required) and every entry.

    Who follows rosters over time goes through ``roster_trust.RosterHistory`` (versions, share
    indices), not this function alone.
    """
    if not isinstance(operator, VerifyKey):
        raise ValidationError("node roster: no pinned operator key to check it against")
    env = decode(payload, "node_roster")
    signer = VerifyKey(env["operator"])
    if signer != operator:
        raise ValidationError("node roster is signed by another operator key")
    _verify(env, signer, _ROSTER_CTX)
    try:
        roster = Roster([RosterEntry.from_bytes(b) for b in env["entries"]])
        pre = tuple(PrePublicKey.from_bytes(b) for b in env["pre"])
    except CipherTwinError as exc:
        raise ValidationError(f"node roster rejected: {exc}") from None
    return NodeRoster(env["version"], roster, pre, signer)


def _verify(env: Envelope, key: VerifyKey, context: str) -> None:
    unsigned = {k: v for k, v in env.body.items() if k != "sig"}
    try:
        key.verify_object(context, unsigned, env["sig"])
    except SignatureInvalid:
        raise ValidationError(f"{env.kind}: bad signature") from None


def parse_token_revocation(payload: bytes) -> tuple[bytes, bytes]:
    """(owner key, token id) of a ``process_token_revoke`` signed by the key it names.

    Self-certifying: a key can only revoke its own tokens, so a node needs no registry of
    owners (and no word of the cloud) to honour it."""
    env = decode(payload, "process_token_revoke")
    try:
        verify_control(env, VerifyKey(env["owner_key"]))
    except SignatureInvalid:
        raise ValidationError("process_token_revoke: bad signature") from None
    return env["owner_key"], env["token_id"]


# --- job submission and spec --------------------------------------------------------------


def pack_params(params: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(sorted(params.items())), use_bin_type=True)


def unpack_params(data: bytes) -> dict[str, Any]:
    try:
        params = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - attacker-controlled bytes
        raise ValidationError("job parameters are not msgpack") from None
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValidationError("job parameters must be a map with string keys")
    return params


def build_job(job: str, function: str, params: Mapping[str, Any],
              inputs: Sequence[tuple[str, str, str]], receiver: str, receiver_key: bytes,
              points: int, since: float = 0.0, until: float | None = None) -> bytes:
    """``job_submit`` message; ``inputs`` are (owner, twin, role) selectors."""
    return encode("job_submit", {
        "job": job, "function": function, "params": pack_params(params),
        "inputs": [{"owner": o, "twin": t, "role": r} for o, t, r in inputs],
        "since": float(since), "until": float(until if until is not None else time.time() + 86400),
        "points": points, "receiver": receiver, "receiver_key": receiver_key, "time": time.time(),
    })


def default_bindings(function: str, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """How a function's named inputs come from share readings: (role, field, ndim, pad).

    Contact tracing pads missing user points with an epoch no reference point has (and the
    reference with another), so padding never counts as a contact.
    """
    if function == "contact_tracing":
        far = (1 << int(params.get("epoch_bits", 16))) - 1
        out = {f"user_{f}": {"role": "user", "field": f, "ndim": 2, "pad": 0} for f in "xy"}
        out |= {f"ref_{f}": {"role": "reference", "field": f, "ndim": 1, "pad": 0} for f in "xy"}
        out["user_epoch"] = {"role": "user", "field": "epoch", "ndim": 2, "pad": -far}
        out["ref_epoch"] = {"role": "reference", "field": "epoch", "ndim": 1, "pad": far}
        return out
    return {"values": {"role": "user", "field": "v", "ndim": 2, "pad": None}}


# --- status and results -------------------------------------------------------------------


def build_status(job: str, state: str, by: str, *, progress: float = 0.0, round_: int = 0,
                 rounds: int = 0, reason: str = "", signer: SigningKey | None = None,
                 nonce: bytes | None = None) -> bytes:
    """A status report; nodes sign theirs so the cloud believes only roster nodes.

    ``nonce``: a node's fresh per-run key contribution, carried (signed) by its "ready"
    report (computing, round 0) — see :mod:`ciphertwin.mpc_nodes.prf`."""
    if state not in STATES:
        raise ValidationError(f"unknown job state {state!r}")
    body: dict[str, Any] = {"job": job, "state": state, "progress": float(progress),
                            "round": round_, "rounds": rounds, "reason": reason[:256], "by": by,
                            "time": time.time()}
    if nonce is not None:
        body["nonce"] = nonce
    if signer is not None:
        body["sig"] = signer.sign_object(_STATUS_CTX, body)
    return encode("job_status", body)


def verify_status(env: Envelope, key: VerifyKey) -> None:
    if env.get("sig") is None:
        raise ValidationError("node status report is not signed")
    _verify(env, key, _STATUS_CTX)


def build_result(job: str, function: str, party: int, node: str, labels: Sequence[str],
                 blob: bytes, signer: SigningKey) -> bytes:
    """Output share message: the HPKE blob and the row labels, signed by the node."""
    body: dict[str, Any] = {"job": job, "function": function, "party": party, "node": node,
                            "labels": list(labels), "blob": blob}
    body["sig"] = signer.sign_object(_RESULT_CTX, _result_signed(body))
    return encode("job_result", body)


def _result_signed(body: Mapping[str, Any]) -> dict[str, Any]:
    signed = {k: v for k, v in body.items() if k not in ("sig", "blob")}
    signed["blob"] = hashlib.sha256(body["blob"]).digest()
    return signed


def verify_result(env: Envelope, roster: NodeRoster) -> None:
    """The result must be signed by the roster's node at its party index."""
    entry = roster.roster[env["party"]]
    if entry.node_id != env["node"]:
        raise ValidationError(f"result names node {env['node']!r}, roster has {entry.node_id!r}")
    try:
        VerifyKey(entry.sign_public).verify_object(_RESULT_CTX, _result_signed(env.body), env["sig"])
    except SignatureInvalid:
        raise ValidationError("job result: bad node signature") from None
