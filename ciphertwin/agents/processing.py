"""Owner and receiver sides of privacy-preserving processing (processes 2+ and 6+).

* :func:`fetch_roster` (owner): the retained roster, accepted only through the owner's
  :class:`RosterHistory` (pinned operator key, versions, share indices).
* :func:`grant_processing` (owner): for node i a re-encryption key with policy
  ``share:i AND (<subset>)`` installed through the ordinary ``grant`` control message, then
  an owner-signed process token (twins, subset, function classes, receiver keys, node roster,
  validity, limits) handed to the cloud on ``control/{owner}``. It refuses to give share i to
  a node (id, signing or PRE key) it once gave share j ≠ i (its :class:`ShareIndexBook`).
* :func:`revoke_processing` (owner): withdraws a process token — a signed
  ``process_token_revoke`` retained on ``revocations/{owner}/{token id}`` (the nodes follow
  it, whatever the cloud does) and sent to the cloud, which deletes the token; then the
  token's node grants are revoked.
* :class:`ResultReceiver` (receiver): collects the three sealed output shares of a job from
  ``receivers/{me}/results/{job}``, checks each node's signature against the roster its
  :class:`RosterHistory` (pinned operator key) accepted, opens them with its X25519 key,
  combines and decodes; :func:`write_results` writes JSON or CSV.
* :func:`submit_job` / :func:`follow_status`: publish a job and follow its retained status.
"""

from __future__ import annotations

import asyncio
import csv
import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import Envelope, decode
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.kpcpre import PreKeyPair, rekey
from ciphertwin.crypto.policy import Policy
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.crypto.tokens import ProcessToken, issue_process_token
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.mpc_nodes.functions import get_function
from ciphertwin.mpc_nodes.output import combine_outputs, open_output
from ciphertwin.protocol.control import build_control
from ciphertwin.protocol.jobs import NodeRoster, build_job, verify_result
from ciphertwin.protocol.roster_trust import NO_OPERATOR_KEY, RosterHistory, ShareIndexBook

log = structlog.get_logger(__name__)


class ControlRefused(CipherTwinError):
    """The cloud answered a control message with ok = false."""


async def fetch_roster(bus: BusClient, rosters: RosterHistory,
                       timeout: float = 10.0) -> NodeRoster:
    """The retained node roster from ``config/nodes``, if ``rosters`` accepts it."""
    if not isinstance(rosters, RosterHistory):
        raise ValidationError(NO_OPERATOR_KEY)
    got: asyncio.Future[NodeRoster] = asyncio.get_running_loop().create_future()

    async def on_roster(topic: str, payload: bytes, retain: bool) -> None:
        try:
            roster = rosters.accept(payload)
        except CipherTwinError as exc:
            log.warning("processing.roster_rejected", reason=str(exc))
            return
        if not got.done():
            got.set_result(roster)

    topic = bus.topics.config_nodes()
    await bus.subscribe(topic, on_roster)
    try:
        return await asyncio.wait_for(got, timeout)
    except TimeoutError:
        raise ValidationError("no valid node roster on config/nodes") from None
    finally:
        await bus.unsubscribe(topic)


async def _control(bus: BusClient, owner: str, signer: SigningKey, kind: str,
                   body: dict[str, Any], request_id: str, timeout: float) -> None:
    payload = build_control(kind, signer, {"owner": owner, **body})
    reply = await bus.request(bus.topics.control(owner), payload,
                              bus.topics.replies(owner, request_id), timeout=timeout)
    result = decode(reply, "control_result")
    if not result["ok"]:
        raise ControlRefused(f"{kind} {request_id} refused by the cloud: {result['reason']}")


async def grant_processing(
    bus: BusClient, owner: str, owner_pre: PreKeyPair, owner_sig: SigningKey,
    roster: NodeRoster, twins: Sequence[str], subset: str, *, granted: ShareIndexBook,
    function_classes: Iterable[str], receiver_keys: Iterable[bytes],
    valid_for_s: int = 86400, limits: Mapping[str, int] | None = None, timeout: float = 15.0,
) -> ProcessToken:
    """Install node grants ``share:i AND (subset)`` over ``twins`` and the process token.

    ``granted`` (the owner's record of which node got which share) refuses, before any re-key
    exists, a roster that would give a node a second share index; it is updated first.
    """
    subset_policy = Policy.parse(subset)
    granted.record(roster)
    token = issue_process_token(owner_sig, subset_policy, function_classes, receiver_keys,
                                roster.node_keys, twins=twins, limits=limits,
                                valid_for_s=valid_for_s)
    tag = token.token_id.hex()[:12]
    for i, node in enumerate(roster.node_ids):
        policy = f"share:{i} AND ({subset_policy})"
        rk = rekey(owner_pre, policy, roster.pre_keys[i])
        grant_id = _node_grant_id(token.token_id, i)
        await _control(bus, owner, owner_sig, "grant", {
            "grant_id": grant_id, "receiver": node, "twins": list(twins),
            "policy": str(rk.policy), "rekey": rk.to_bytes()}, grant_id, timeout)
        await asyncio.sleep(0.002)  # control times must strictly increase
    await _control(bus, owner, owner_sig, "process_token", {
        "request_id": f"ptok-{tag}", "token": token.to_bytes()}, f"ptok-{tag}", timeout)
    log.info("processing.granted", owner=owner, twins=len(twins), token=token.token_id.hex())
    return token


def _node_grant_id(token_id: bytes, index: int) -> str:
    return f"proc-{token_id.hex()[:12]}-{index}"


async def revoke_processing(bus: BusClient, owner: str, owner_sig: SigningKey, token_id: bytes,
                            *, timeout: float = 15.0) -> None:
    """Withdraw process token ``token_id``: nodes refuse jobs with it from now on.

    The signed revocation goes retained to the nodes first (they must not depend on the
    cloud forwarding it), then to the cloud; the token's node grants are revoked last (best
    effort: they may already be gone)."""
    if len(token_id) != 16:
        raise ValidationError("a process token id is 16 bytes (32 hex digits)")
    tag = token_id.hex()
    payload = build_control("process_token_revoke", owner_sig, {
        "owner": owner, "owner_key": owner_sig.verify_key.raw, "request_id": f"prev-{tag[:12]}",
        "token_id": token_id})
    await bus.publish(bus.topics.token_revoked(owner, tag), payload, retain=True)
    reply = await bus.request(bus.topics.control(owner), payload,
                              bus.topics.replies(owner, f"prev-{tag[:12]}"), timeout=timeout)
    result = decode(reply, "control_result")
    if not result["ok"]:
        raise ControlRefused(f"revocation of token {tag} refused by the cloud: {result['reason']}")
    for i in range(3):
        await asyncio.sleep(0.002)  # control times must strictly increase
        try:
            await _control(bus, owner, owner_sig, "revoke",
                           {"grant_id": _node_grant_id(token_id, i)}, _node_grant_id(token_id, i),
                           timeout)
        except ControlRefused as exc:
            log.info("processing.grant_already_gone", reason=str(exc))
    log.info("processing.revoked", owner=owner, token=tag)


# --- jobs -----------------------------------------------------------------------------------


def new_job_id(prefix: str = "job") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def submit_job(bus: BusClient, job: str, function: str, params: Mapping[str, Any],
                     inputs: Sequence[tuple[str, str, str]], receiver: str, receiver_key: bytes,
                     points: int, since: float = 0.0, until: float | None = None) -> None:
    """Publish a job on ``jobs/submit``; inputs are (owner, twin, role) selectors."""
    get_function(function).parse(params)  # fail here, not in the cloud
    await bus.publish(bus.topics.job_submit(), build_job(
        job, function, params, inputs, receiver, receiver_key, points, since, until))


async def follow_status(bus: BusClient, job: str, on_update: Callable[[Envelope], None] | None = None,
                        timeout: float = 600.0) -> Envelope:
    """Wait for the cloud's terminal status (done/failed) of ``job``; report every update."""
    final: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

    async def on_status(topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "job_status")
        except CipherTwinError:
            return
        if on_update is not None:
            on_update(env)
        if env["by"] == "cloud" and env["state"] in ("done", "failed") and not final.done():
            final.set_result(env)

    topic = bus.topics.job_status(job)
    await bus.subscribe(topic, on_status)
    try:
        return await asyncio.wait_for(final, timeout)
    finally:
        await bus.unsubscribe(topic)


# --- receiver -------------------------------------------------------------------------------


@dataclass
class JobResult:
    job: str
    function: str
    labels: list[str]
    values: list[Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self.labels, self.values, strict=True))


@dataclass
class _Collecting:
    shares: dict[int, Envelope] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ResultReceiver:
    """Collects and opens job outputs addressed to ``name`` (keys: its X25519 pair)."""

    def __init__(self, bus: BusClient, name: str, key: X25519KeyPair, *,
                 operator: VerifyKey, roster_state: Path | None = None) -> None:
        self.bus, self.name, self.key, self.operator = bus, name, key, operator
        self.rosters = RosterHistory(operator, roster_state)
        self.roster: NodeRoster | None = None
        self._jobs: dict[str, _Collecting] = {}
        self.rejected = 0

    async def __aenter__(self) -> ResultReceiver:
        t = self.bus.topics
        await self.bus.subscribe(t.config_nodes(), self._on_roster)
        await self.bus.subscribe(t.filter("results", receiver=self.name), self._on_result)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def _on_roster(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            self.roster = self.rosters.accept(payload)
        except CipherTwinError as exc:
            log.warning("receiver.roster_rejected", reason=str(exc))

    async def _on_result(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "job_result")
            if self.bus.topics.parse(topic)["job"] != env["job"]:
                raise ValidationError("result names another job than its topic")
            if self.roster is None:
                raise ValidationError("no node roster yet")
            verify_result(env, self.roster)
        except CipherTwinError as exc:
            self.rejected += 1
            log.warning("receiver.result_rejected", reason=str(exc))
            return
        c = self._jobs.setdefault(env["job"], _Collecting())
        c.shares[env["party"]] = env
        if len(c.shares) == 3:
            c.done.set()

    async def result(self, job: str, params: Mapping[str, Any] | None = None,
                     timeout: float = 600.0) -> JobResult:
        """Wait for all three shares of ``job``, then open, combine and decode them."""
        c = self._jobs.setdefault(job, _Collecting())
        await asyncio.wait_for(c.done.wait(), timeout)
        envs = [c.shares[i] for i in range(3)]
        function = envs[0]["function"]
        labels = envs[0]["labels"]
        if any(e["function"] != function or e["labels"] != labels for e in envs):
            raise ValidationError("the nodes' results disagree on function or row labels")
        opened = [open_output(e["blob"], self.key, job=job, function=function, party=e["party"])
                  for e in envs]
        values = combine_outputs(opened)
        spec = get_function(function)
        decoded = spec.decode(spec.parse(params) if params is not None else None, values)
        if len(decoded) != len(labels):
            raise ValidationError("result rows do not match the labels")
        return JobResult(job, function, list(labels), list(decoded))


def write_results(result: JobResult, path: Path, fmt: str | None = None) -> None:
    """JSON ({label: value}) or CSV (label,value), by ``fmt`` or the file suffix."""
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "json")
    if fmt == "csv":
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["twin", "value"])
            for label, value in zip(result.labels, result.values, strict=True):
                w.writerow([label, value])
    else:
        path.write_text(json.dumps({"job": result.job, "function": result.function,
                                    "results": result.as_dict()}, indent=2))
