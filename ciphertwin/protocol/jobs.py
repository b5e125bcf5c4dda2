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
  owner and twin, the window [since, until) cut into clock-aligned epochs of ``epoch_s``, the
  declared encoding of every field the function reads, receiver and its X25519 key);
* cloud → node i on ``nodes/{node}/inputs/{job}``: ``node_inputs`` chunks; chunk 0 carries the
  ``job_spec`` (everything a node checks before it touches an input);
* cloud and nodes → all on ``jobs/{job}/status``: ``job_status`` (the cloud's is retained and
  unsigned; the nodes' are signed, so the cloud and the nodes only believe the job's roster
  nodes; a node's "ready" report — computing, round 0 — carries its fresh per-run ``nonce``
  and the digest of the public input ``layout`` it arranged; while opening inputs a node
  reports ``opening`` with progress = items opened / items of the job);
* node → receiver, retained on ``receivers/{receiver}/results/{job}/{node}``: ``job_result`` —
  the HPKE-sealed output share and the digest of the roster the job ran on, signed by the
  node (retained so a receiver may ask for it whenever it starts; the node clears it later).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from ciphertwin.bus.envelope import (
    FLOAT, ID, STORED_INT, TIME, Bytes, Int, ListOf, MapOf, Opt, Str, Struct, Envelope,
    decode, encode, register_kind,
)
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.kpcpre import PrePublicKey
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import roster_digest
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.control import verify_control
from ciphertwin.protocol.job_epochs import (
    DEFAULT_EPOCH_S, MAX_EPOCH_S, FieldEncoding, epoch_window, parse_encodings,
)
from ciphertwin.protocol.kinds import DIGEST, REASON, SIG

if TYPE_CHECKING:  # numpy comes with the MPC side: a device's CLI must not import it
    from ciphertwin.mpc_nodes.roster import Roster, RosterEntry

ROLE = Str(32, 1)
PUBKEY = Bytes(32, 32)
PARAMS = Bytes(8192, 1)
MAX_TWINS = 100_000
CHUNK_ITEMS = 2000
MAX_CHUNK_BYTES = 2 * 1024 * 1024
STATES = ("queued", "reencrypting", "sent", "opening", "computing", "delivered", "done", "failed")
FIELD = Str(32, 1)
ENCODING = Struct({"unit": Str(64, 1), "frac": Int(0, 40), "min": FLOAT, "max": FLOAT})
"""a declared field encoding (:class:`FieldEncoding` ``as_dict``); checked again by from_dict"""
FIELDS = MapOf(FIELD, ENCODING, 64)

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
    "since": TIME, "until": TIME, "epoch_s": Int(1, MAX_EPOCH_S), "fields": FIELDS,
    "points": Int(1, 1_000_000), "receiver": ID, "receiver_key": PUBKEY, "time": TIME,
}, max_size=16 * 1024 * 1024)
BINDING = Struct({"role": ROLE, "field": FIELD})
JOB_SPEC = register_kind("job_spec", {
    "job": ID, "function": Str(64, 1), "params": PARAMS, "receiver": ID, "receiver_key": PUBKEY,
    "roster": DIGEST, "points": Int(1, 1_000_000), "bindings": MapOf(Str(64, 1), BINDING, 64),
    "since": TIME, "until": TIME, "epoch_s": Int(1, MAX_EPOCH_S), "fields": FIELDS,
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
    "layout": Opt(DIGEST),
})
JOB_RESULT = register_kind("job_result", {
    "job": ID, "function": Str(64, 1), "params": PARAMS, "party": Int(0, 2), "node": ID,
    "roster": DIGEST, "labels": ListOf(ID, MAX_TWINS), "blob": Bytes(64 * 1024 * 1024, 16),
    "sig": SIG,
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
    from ciphertwin.mpc_nodes.roster import Roster

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
    from ciphertwin.mpc_nodes.roster import Roster, RosterEntry

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


DEFAULT_FIELDS: dict[str, dict[str, FieldEncoding]] = {
    "contact_tracing": {f: FieldEncoding("m", 4, -50_000.0, 50_000.0) for f in ("x", "y")},
    **{fn: {"v": FieldEncoding("1", 16, -float(1 << 30), float(1 << 30))}
       for fn in ("sum", "mean", "count_above", "histogram")},
}
"""What the CLI declares when the user names no encodings: metres in 1/16 m within ±50 km
for contact tracing; a plain number with 16 fractional bits within ±2^30 for aggregates."""


def build_job(job: str, function: str, params: Mapping[str, Any],
              inputs: Sequence[tuple[str, str, str]], receiver: str, receiver_key: bytes,
              points: int, since: float, until: float, *, epoch_s: int = DEFAULT_EPOCH_S,
              fields: Mapping[str, FieldEncoding | Mapping[str, Any]]) -> bytes:
    """``job_submit`` message; ``inputs`` are (owner, twin, role) selectors.

    ``fields`` declares the encoding of every field the function reads (devices must have
    encoded exactly so; nodes refuse readings that say otherwise)."""
    return encode("job_submit", {
        "job": job, "function": function, "params": pack_params(params),
        "inputs": [{"owner": o, "twin": t, "role": r} for o, t, r in inputs],
        "since": float(since), "until": float(until), "epoch_s": epoch_s,
        "fields": _fields_dict(fields), "points": points, "receiver": receiver,
        "receiver_key": receiver_key, "time": time.time(),
    })


def _fields_dict(fields: Mapping[str, FieldEncoding | Mapping[str, Any]]) -> dict[str, Any]:
    return {name: (enc if isinstance(enc, FieldEncoding) else FieldEncoding.from_dict(enc)).as_dict()
            for name, enc in fields.items()}


def default_bindings(function: str, fields: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Which role and field feeds each named input of ``function``.

    Contact tracing: ``user_x``/``user_y`` from role "user", ``ref_x``/``ref_y`` from role
    "reference", fields x and y. The aggregates: ``values`` from role "user", the job's single
    declared field."""
    if function == "contact_tracing":
        missing = sorted({"x", "y"} - set(fields))
        if missing:
            raise ValidationError(f"contact_tracing reads fields x and y; {missing} not declared")
        return {f"{prefix}_{f}": {"role": role, "field": f}
                for prefix, role in (("user", "user"), ("ref", "reference")) for f in "xy"}
    if len(fields) != 1:
        raise ValidationError(f"{function} reads exactly one field; {len(fields)} declared "
                              f"({', '.join(sorted(fields))})")
    return {"values": {"role": "user", "field": next(iter(fields))}}


@dataclass(frozen=True)
class JobShape:
    """A job's function, parameters, window and field encodings, all checked."""

    function: Any  # FunctionSpec
    params: Any  # the function's parsed parameters
    encodings: dict[str, FieldEncoding]  # field -> declared encoding
    bindings: dict[str, dict[str, str]]  # input name -> {role, field}
    first_epoch: int
    epochs: int


def with_defaults(function: str, params: Mapping[str, Any],
                  fields: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` plus what the declared encodings imply where the submitter gave nothing
    (``FunctionSpec.defaults``: a sum's frac_bits, a comparison's value_bits). The job then
    names every parameter explicitly, so cloud and nodes check exactly what runs."""
    from ciphertwin.mpc_nodes.functions import get_function  # the MPC side, only when checking

    fn = get_function(function)
    encodings = parse_encodings(fields)
    bindings = default_bindings(function, encodings)
    implied = fn.defaults({name: encodings[b["field"]] for name, b in bindings.items()})
    return {**implied, **params}


def check_job_shape(function: str, params: Mapping[str, Any], fields: Mapping[str, Any],
                    since: float, until: float, epoch_s: int) -> JobShape:
    """What submitter, cloud and nodes each check before anything else (one piece of code):
    the function and its parameters, the epoch window, the declared encodings and that they
    fit the function (``check_encodings``: e.g. a comparison width covering the ranges)."""
    from ciphertwin.mpc_nodes.functions import get_function  # the MPC side, only when checking

    fn = get_function(function)
    parsed = fn.parse(params)
    first, count = epoch_window(since, until, epoch_s)
    encodings = parse_encodings(fields)
    bindings = default_bindings(function, encodings)
    if {n: b["role"] for n, b in bindings.items()} != dict(fn.inputs):
        raise ValidationError(f"{function}: the default bindings do not match its inputs")
    fn.check_encodings(parsed, {name: encodings[b["field"]] for name, b in bindings.items()})
    return JobShape(fn, parsed, encodings, bindings, first, count)


# --- status and results -------------------------------------------------------------------


def build_status(job: str, state: str, by: str, *, progress: float = 0.0, round_: int = 0,
                 rounds: int = 0, reason: str = "", signer: SigningKey | None = None,
                 nonce: bytes | None = None, layout: bytes | None = None) -> bytes:
    """A status report; nodes sign theirs so the cloud believes only roster nodes.

    ``nonce``: a node's fresh per-run key contribution, and ``layout``: the digest of the
    public input layout it arranged — both carried (signed) by its "ready" report (computing,
    round 0); see :mod:`ciphertwin.mpc_nodes.prf` and :meth:`Layout.digest`."""
    if state not in STATES:
        raise ValidationError(f"unknown job state {state!r}")
    body: dict[str, Any] = {"job": job, "state": state, "progress": float(progress),
                            "round": round_, "rounds": rounds, "reason": reason[:256], "by": by,
                            "time": time.time()}
    if nonce is not None:
        body["nonce"] = nonce
    if layout is not None:
        body["layout"] = layout
    if signer is not None:
        body["sig"] = signer.sign_object(_STATUS_CTX, body)
    return encode("job_status", body)


def verify_status(env: Envelope, key: VerifyKey) -> None:
    if env.get("sig") is None:
        raise ValidationError("node status report is not signed")
    _verify(env, key, _STATUS_CTX)


def build_result(job: str, function: str, party: int, node: str, labels: Sequence[str],
                 blob: bytes, signer: SigningKey, *, roster: bytes, params: bytes) -> bytes:
    """Output share message: the HPKE blob, the row labels, the job's packed parameters (the
    receiver decodes with them, whoever submitted the job) and the digest of the roster the
    job ran on (the receiver checks the signature against that roster), signed by the node."""
    body: dict[str, Any] = {"job": job, "function": function, "params": params, "party": party,
                            "node": node, "roster": roster, "labels": list(labels), "blob": blob}
    body["sig"] = signer.sign_object(_RESULT_CTX, _result_signed(body))
    return encode("job_result", body)


def _result_signed(body: Mapping[str, Any]) -> dict[str, Any]:
    signed = {k: v for k, v in body.items() if k not in ("sig", "blob")}
    signed["blob"] = hashlib.sha256(body["blob"]).digest()
    return signed


def verify_result(env: Envelope, roster: NodeRoster) -> None:
    """The result must name ``roster`` (the job's) and be signed by its node at the party index."""
    if env["roster"] != roster.digest:
        raise ValidationError("job result names another node roster than the one checked")
    entry = roster.roster[env["party"]]
    if entry.node_id != env["node"]:
        raise ValidationError(f"result names node {env['node']!r}, roster has {entry.node_id!r}")
    try:
        VerifyKey(entry.sign_public).verify_object(_RESULT_CTX, _result_signed(env.body), env["sig"])
    except SignatureInvalid:
        raise ValidationError("job result: bad node signature") from None
