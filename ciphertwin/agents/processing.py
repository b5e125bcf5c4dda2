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
* :class:`ResultReceiver` (receiver): collects the three sealed output shares of a job,
  retained by the nodes on ``receivers/{me}/results/{job}/{node}`` — so it may start before,
  during or after the job — checks each node's signature against the roster the result names
  (the job's roster, pinned for the job's whole life: one its :class:`RosterHistory`, pinned
  to the operator key, accepted — also after a hot swap), opens them with its X25519 key,
  combines and decodes; :func:`write_results` writes JSON or CSV.
* :func:`submit_job` / :func:`follow_status`: publish a job and follow its retained status.

Waiting is by progress, not wall time: ``timeout`` everywhere here is the longest *silence*
tolerated (no status of the job, no share), and running out of it — or of any wait — raises
:class:`ProcessingTimeout`, a one-line :class:`CipherTwinError` the CLI prints as it is.
"""

from __future__ import annotations

import asyncio
import csv
import json
import secrets
import time
from collections import OrderedDict
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
from ciphertwin.protocol.job_epochs import DEFAULT_EPOCH_S, FieldEncoding
from ciphertwin.protocol.jobs import (
    DEFAULT_FIELDS, NodeRoster, build_job, check_job_shape, unpack_params, verify_result,
    with_defaults,
)
from ciphertwin.protocol.roster_trust import NO_OPERATOR_KEY, RosterHistory, ShareIndexBook

log = structlog.get_logger(__name__)


FAILED_GRACE_S = 2.0
"""after the cloud says a job failed: how long the job must be quiet (no node report, no
share) before the receiver believes it"""


class ControlRefused(CipherTwinError):
    """The cloud answered a control message with ok = false."""


class ProcessingTimeout(CipherTwinError):
    """Nothing was heard for too long (the message says what was awaited and for how long)."""


class JobFailedError(CipherTwinError):
    """The job ended without a result for this receiver; the message is the job's reason."""


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
        raise ValidationError(f"no valid node roster on config/nodes within {timeout:.0f} s"
                              ) from None
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
                     points: int, since: float, until: float, *,
                     epoch_s: int = DEFAULT_EPOCH_S,
                     fields: Mapping[str, FieldEncoding | Mapping[str, Any]] | None = None) -> None:
    """Publish a job on ``jobs/submit``; inputs are (owner, twin, role) selectors.

    ``fields``: the declared encoding of every field the function reads (default:
    ``DEFAULT_FIELDS[function]``). The job is checked here first (function, parameters,
    window, encodings), so a mistake fails at once, not in the cloud."""
    if fields is None:
        if function not in DEFAULT_FIELDS:
            raise ValidationError(f"{function}: no default field encodings; declare fields")
        fields = DEFAULT_FIELDS[function]
    declared = {f: e.as_dict() if isinstance(e, FieldEncoding) else dict(e)
                for f, e in fields.items()}
    params = with_defaults(function, params, declared)
    check_job_shape(function, params, declared, since, until, epoch_s)
    await bus.publish(bus.topics.job_submit(), build_job(
        job, function, params, inputs, receiver, receiver_key, points, since, until,
        epoch_s=epoch_s, fields=declared))


async def follow_status(bus: BusClient, job: str, on_update: Callable[[Envelope], None] | None = None,
                        timeout: float = 600.0) -> Envelope:
    """Wait for the cloud's terminal status (done/failed) of ``job``; report every update.

    ``timeout``: the longest silence (no status of the job at all) before giving up with
    :class:`ProcessingTimeout` — a long job that reports progress never runs out."""
    final: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
    heard = asyncio.Event()
    last: list[str] = []

    async def on_status(topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "job_status")
        except CipherTwinError:
            return
        heard.set()
        last[:] = [f"{env['state']} ({env['by']})"]
        if on_update is not None:
            on_update(env)
        if env["by"] == "cloud" and env["state"] in ("done", "failed") and not final.done():
            final.set_result(env)

    topic = bus.topics.job_status(job)
    await bus.subscribe(topic, on_status)
    try:
        while not final.done():
            heard.clear()
            waiter = asyncio.create_task(heard.wait())
            try:
                await asyncio.wait({final, waiter}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not final.done() and not heard.is_set():
                raise ProcessingTimeout(
                    f"job {job}: no status for {timeout:g} s"
                    + (f" (last: {last[0]})" if last else " (is the cloud running, the job id right?)"))
        return final.result()
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
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    last_heard: float = field(default_factory=time.monotonic)
    waiters: int = 0


class ResultReceiver:
    """Collects and opens job outputs addressed to ``name`` (keys: its X25519 pair).

    The nodes keep their shares retained, so :meth:`result` works whenever it is called —
    before the job was submitted, while it runs, or after it finished."""

    def __init__(self, bus: BusClient, name: str, key: X25519KeyPair, *,
                 operator: VerifyKey, roster_state: Path | None = None) -> None:
        self.bus, self.name, self.key, self.operator = bus, name, key, operator
        self.rosters = RosterHistory(operator, roster_state)
        self.roster: NodeRoster | None = None
        self._jobs: dict[str, _Collecting] = {}
        self._statuses: OrderedDict[str, Envelope] = OrderedDict()
        """job -> the cloud's latest status (retained ones arrive as soon as we subscribe)"""
        self.rejected = 0

    async def __aenter__(self) -> ResultReceiver:
        t = self.bus.topics
        await self.bus.subscribe(t.config_nodes(), self._on_roster)
        await self.bus.subscribe(t.filter("job_status"), self._on_status)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def _on_roster(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            self.roster = self.rosters.accept(payload)
        except CipherTwinError as exc:
            log.warning("receiver.roster_rejected", reason=str(exc))

    async def _on_status(self, topic: str, payload: bytes, retain: bool) -> None:
        """Any word about a job we wait for is a sign of life; the cloud's says how it ended."""
        try:
            env = decode(payload, "job_status")
        except CipherTwinError:
            return
        job = env["job"]
        final = self._statuses.get(job)
        if env["by"] == "cloud" and (final is None or final["state"] not in ("done", "failed")):
            self._statuses[job] = env
            self._statuses.move_to_end(job)
            if len(self._statuses) > 10_000:
                self._statuses.popitem(last=False)
        c = self._jobs.get(job)
        if c is not None:
            c.last_heard = time.monotonic()
            c.changed.set()

    async def _on_result(self, topic: str, payload: bytes, retain: bool) -> None:
        if not payload:
            return  # a node cleared its retained share
        try:
            env = decode(payload, "job_result")
            where = self.bus.topics.parse(topic)
            if where["job"] != env["job"] or where["node"] != env["node"]:
                raise ValidationError("result names another job or node than its topic")
            roster = self.rosters.by_digest(env["roster"])
            if roster is None:
                raise ValidationError("result names a node roster this receiver never "
                                      "accepted (the job's roster)")
            verify_result(env, roster)
        except CipherTwinError as exc:
            self.rejected += 1
            log.warning("receiver.result_rejected", topic=topic, reason=str(exc))
            return
        c = self._jobs.get(env["job"])
        if c is None:
            return
        c.shares[env["party"]] = env
        c.last_heard = time.monotonic()
        c.changed.set()

    async def result(self, job: str, params: Mapping[str, Any] | None = None,
                     timeout: float = 600.0) -> JobResult:
        """Wait for all three shares of ``job``, then open, combine and decode them.

        ``timeout``: the longest silence (no status of the job, no share) tolerated; then
        :class:`ProcessingTimeout`. A job the cloud reports failed raises
        :class:`JobFailedError` with its reason."""
        topic = self.bus.topics.filter("results", receiver=self.name, job=job)
        c = self._jobs.get(job)
        if c is None:
            c = self._jobs[job] = _Collecting()
            await self.bus.subscribe(topic, self._on_result)
        c.waiters += 1
        try:
            envs = await self._gather(job, c, timeout)
        finally:
            c.waiters -= 1
            if c.waiters == 0:
                del self._jobs[job]
                await self.bus.unsubscribe(topic)
        return self._open(job, envs, params)

    async def _gather(self, job: str, c: _Collecting, timeout: float) -> list[Envelope]:
        """Wait for the three shares. The cloud's ``failed`` is unsigned (anyone allowed to
        publish statuses could forge it), so it ends the wait only once the job has also gone
        quiet for FAILED_GRACE_S: a job whose nodes still report (or deliver) goes on."""
        while len(c.shares) < 3:
            status = self._statuses.get(job)
            quiet = time.monotonic() - c.last_heard
            failed = status is not None and status["state"] == "failed"
            if failed and quiet >= FAILED_GRACE_S:
                raise JobFailedError(f"job {job} failed: {status['reason'] or 'no reason given'}")
            c.changed.clear()
            wait = (FAILED_GRACE_S if failed else timeout) - quiet
            if wait <= 0:
                missing = sorted({0, 1, 2} - set(c.shares))
                said = f"; last status: {status['state']}" if status is not None else \
                    " and no status: is the job id right?"
                raise ProcessingTimeout(f"job {job}: no result share from node(s) {missing} and "
                                        f"nothing heard for {timeout:g} s{said}")
            try:
                await asyncio.wait_for(c.changed.wait(), wait)
            except TimeoutError:
                pass
        envs = [c.shares[i] for i in range(3)]
        if len({e["roster"] for e in envs}) != 1:
            raise ValidationError("the nodes' results name different node rosters")
        return envs

    def _open(self, job: str, envs: list[Envelope], params: Mapping[str, Any] | None) -> JobResult:
        """Open, combine and decode. The parameters come signed with the shares (all three
        must agree); any parameter the caller names in ``params`` must have its value there."""
        function, labels, packed = envs[0]["function"], envs[0]["labels"], envs[0]["params"]
        if any(e["function"] != function or e["labels"] != labels or e["params"] != packed
               for e in envs):
            raise ValidationError("the nodes' results disagree on function, parameters or rows")
        ran = unpack_params(packed)
        differ = sorted(k for k, v in (params or {}).items() if ran.get(k) != v)
        if differ:
            raise ValidationError(f"job {job} ran with other parameters than expected: {differ}")
        opened = [open_output(e["blob"], self.key, job=job, function=function, party=e["party"])
                  for e in envs]
        values = combine_outputs(opened)
        spec = get_function(function)
        decoded = spec.decode(spec.parse(ran), values)
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
