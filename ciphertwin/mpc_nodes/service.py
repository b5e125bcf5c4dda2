"""Processing node service (process 6+, ``ciphertwin node --index i``).

A node trusts neither the broker nor the cloud. For every job it:

1. follows the roster on ``config/nodes`` signed by the pinned operator key, through a
   ``RosterHistory`` (newer, bounded versions; no node ever moves to another share index;
   kept in ``roster_state`` across restarts) — hot swap: a new version replaces the old at
   once; a node not listed at its index takes no jobs; a job already checked stays pinned to
   the roster it was checked against, and a new roster that replaces one of *that* roster's
   nodes ends the job at once with the reason (M4) — and the owners' signed
   process-token revocations retained on ``revocations/+/+`` (checked against the key they
   name — the cloud cannot forge them; kept in the ledger, so clearing the retained message
   does not undo them);
2. receives the job's input chunks from ``nodes/{me}/inputs/{job}`` (chunk 0 carries the spec);
3. refuses a job id it has run before — also across restarts (the :class:`NodeLedger` in its
   home folder) — and verifies every involved owner's process token (signature, not revoked,
   validity, function class, receiver key, roster digest, this node's key, every twin of that
   owner in the job listed in the token, limits — ``min_owners`` counts distinct *other*
   owners — and the token's job budget ``max_jobs`` per ``window_s``, counted in the ledger)
   and refuses with a reason otherwise;
4. opens each chunk as soon as it arrives (the cloud is still re-encrypting later ones),
   reporting ``opening`` with progress = items opened / items of the job (a few per second
   at most, so the cloud and the peers see it alive however long opening takes; a missing
   chunk fails the job ``input_timeout_s`` after the *last* chunk arrived):
   checks the item's write token against the owner key named by the token and the device's
   signature over the item (always: the cloud could otherwise seal made-up readings under a
   capsule of its own), that the item's attributes satisfy the token's selector and carry
   ``share:i`` for its own index i, decapsulates the re-encrypted capsule with its PRE key
   and decrypts, and that every field the job reads was encoded as the job declares — in an
   executor (worker processes if given);
5. arranges the readings into flat per-input share vectors and the public :class:`Layout`
   (``mpc_nodes.arrange``: counts, replays and the window checked);
6. subscribes to the job's MPC topics, draws a fresh 32-byte run nonce and announces it with
   the layout's digest in its signed "ready" status (computing, round 0); once both peers'
   ready statuses (signed by the job's roster nodes) are in, it refuses to compute unless all
   three layouts agree, then keys the PRF streams and the channel with the digest of the
   three nonces, so a replayed job id never reuses masks (frames arriving earlier wait in the
   channel's buffer). Waiting for a peer that is still opening counts from its last report;
7. runs the function with the other two nodes over MQTT and publishes the HPKE-sealed,
   node-signed output share (naming the job's roster digest) *retained* on
   ``receivers/{receiver}/results/{job}/{node}``, so the receiver may come later; the
   retained copy is cleared ``result_ttl_s`` after delivery (ledger: survives restarts).

Every step reports a signed status on ``jobs/{job}/status``; a failure anywhere (including a
peer that goes silent) ends in ``failed`` with the reason and no output from this node.

Whose ``failed`` a node believes: a running job is aborted only by a ``failed`` status signed
by a node of *that job's* roster (the one the node checked the spec against). The cloud has
no pinned signing key, so its (unsigned) ``failed`` is believed only for a job whose spec has
not arrived yet — dropping such a job costs nothing. A running job whose cloud gives up ends
on its own: the node times out waiting for the missing inputs or a silent peer. Anybody on
the bus (a broker, another node principal) can therefore no longer abort running jobs.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import Envelope, decode
from ciphertwin.crypto.errors import TokenRejected
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import ProcessToken, first_admitting, verify_process_token
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.mpc_nodes.arrange import arrange
from ciphertwin.mpc_nodes.engine import expected_rounds, load_inputs, run_function
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.ledger import NodeLedger, token_budget
from ciphertwin.mpc_nodes.output import seal_output
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.prf import new_run_nonce, run_digest
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.mpc_nodes.transport.mqtt import mqtt_transport
from ciphertwin.protocol.jobs import (
    JobShape,
    NodeRoster,
    build_result,
    build_status,
    check_job_shape,
    parse_token_revocation,
    unpack_params,
    verify_status,
)
from ciphertwin.protocol.roster_trust import RosterHistory, swap_reason
from ciphertwin.protocol.share_open import OpenedColumns, job_context, open_shares
from ciphertwin.supervise import spawn

log = structlog.get_logger(__name__)

PROGRESS_EVERY_S = 0.3
"""at most this often a node reports opening progress (a few statuses per second)"""
RESULT_TTL_S = 7 * 86400.0
"""how long a delivered output share stays retained for the receiver to fetch"""
SWEEP_EVERY_S = 3600.0


class JobRefused(CipherTwinError):
    """The node will not process this job; the message is the reason it publishes."""


@dataclass
class _Pending:
    """Input chunks of a job in arrival order; opening starts as soon as the spec is checked."""

    chunks: int
    started: float
    spec: bytes | None = None
    seen: set[int] = field(default_factory=set)
    arrived: asyncio.Queue[list[dict[str, bytes]]] = field(default_factory=asyncio.Queue)
    last_arrival: float = field(default_factory=time.monotonic)
    """when the latest chunk came: a missing chunk is timed from here, not from the start"""


@dataclass(frozen=True)
class _Checked:
    """A job spec that passed every check: what opening and arranging need."""

    env: Envelope
    params: dict[str, Any]
    shape: JobShape
    selectors: dict[bytes, str]  # owner key -> token selector text
    roster: NodeRoster  # the roster the spec was checked against: the job's roster, pinned

    @property
    def encodings(self) -> dict[str, dict[str, Any]]:
        """field -> declared encoding (as a dict) of every field the job reads."""
        used = {b["field"] for b in self.shape.bindings.values()}
        return {f: self.shape.encodings[f].as_dict() for f in sorted(used)}

    @property
    def items(self) -> int:
        return sum(t["count"] for t in self.env["twins"])


@dataclass
class _Peers:
    """What the job's peers said: ready reports (key, nonce, layout digest), last word."""

    ready: dict[int, tuple[bytes, bytes, bytes | None]] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)


class ProcessingNode:
    """One MPC node. ``async with ProcessingNode(...) as node: await node.wait_closed()``."""

    def __init__(self, bus: BusClient, identity: NodeIdentity, pre: PreKeyPair, *,
                 operator: VerifyKey, roster_state: Path | None = None,
                 executor: Executor | None = None,
                 latency_s: float = 0.0, mpc_timeout_s: float = 30.0,
                 input_timeout_s: float = 300.0, qos: int = 0,
                 ledger: NodeLedger | None = None, result_ttl_s: float = RESULT_TTL_S) -> None:
        self.bus, self.identity, self.pre = bus, identity, pre
        self.operator, self.executor = operator, executor
        self.rosters = RosterHistory(operator, roster_state)
        self.latency_s, self.mpc_timeout_s, self.qos = latency_s, mpc_timeout_s, qos
        self.input_timeout_s, self.result_ttl_s = input_timeout_s, result_ttl_s
        self.name = identity.node_id
        self.roster: NodeRoster | None = None
        self._pending: dict[str, _Pending] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()
        self.ledger = ledger or NodeLedger()
        """job ids run, token uses and retained results, durable across restarts (in memory if
        none given)"""
        self.refused: dict[str, str] = {}
        """job -> reason, for jobs this node refused or failed (tests and the CLI read it)."""
        self._job_rosters: dict[str, NodeRoster] = {}
        self._aborts: dict[str, str] = {}
        """job -> the reason this node ends it with (a hot swap), set before cancelling it"""
        self._peers: dict[str, _Peers] = {}
        """job -> what its peers reported, from statuses signed by the job's roster nodes"""
        self._peers_changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ProcessingNode:
        t = self.bus.topics
        await self.bus.subscribe(t.config_nodes(), self._on_roster)
        await self.bus.subscribe(t.filter("token_revoked"), self._on_revoked)
        await self.bus.subscribe(t.filter("node_inputs", node=self.name), self._on_inputs)
        await self.bus.subscribe(t.filter("job_status"), self._on_status, concurrency=1)
        self._sweeper = spawn(f"node:{self.name}:results", self._sweep_results)
        log.info("node.started", node=self.name, index=self.identity.index)
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = list(self._running.values())
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def active(self) -> bool:
        """Listed in the current roster at its own index with its own keys."""
        if self.roster is None:
            return False
        try:
            self.roster.roster.check_identity(self.identity)
        except CipherTwinError:
            return False
        return True

    # -- roster --------------------------------------------------------------------------
    async def _on_roster(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            roster = self.rosters.accept(payload)
        except CipherTwinError as exc:
            log.warning("node.roster_rejected", node=self.name, reason=str(exc))
            return
        self.roster = roster
        log.info("node.roster", node=self.name, version=roster.version, active=self.active)
        for job, pinned in list(self._job_rosters.items()):
            reason = swap_reason(pinned, roster)
            if reason is not None:
                self._abort(job, reason)

    def _abort(self, job: str, reason: str) -> None:
        """End a running job at once; it reports ``failed`` with ``reason`` (signed)."""
        task = self._running.get(job)
        if task is None or job in self._aborts:
            return
        self._aborts[job] = reason
        log.warning("node.job_ended", node=self.name, job=job, reason=reason)
        task.cancel()

    async def _on_revoked(self, topic: str, payload: bytes, retain: bool) -> None:
        """Remember a revocation signed by the key it names (a forged one is dropped)."""
        try:
            owner_key, token_id = parse_token_revocation(payload)
            if self.bus.topics.parse(topic)["token"] != token_id.hex():
                raise ValidationError("revocation names another token than its topic")
        except CipherTwinError as exc:
            log.warning("node.revocation_rejected", node=self.name, reason=str(exc))
            return
        self.ledger.revoke(owner_key, token_id)
        log.info("node.token_revoked", node=self.name, token=token_id.hex())

    # -- inputs --------------------------------------------------------------------------
    async def _on_inputs(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "node_inputs")
            job = env["job"]
            if self.bus.topics.parse(topic)["job"] != job:
                raise ValidationError("inputs name another job than their topic")
        except CipherTwinError as exc:
            log.warning("node.inputs_rejected", node=self.name, reason=str(exc))
            return
        if job in self._finished:
            return  # a redelivered chunk of a job we are done with
        if job not in self._pending:
            self._expire_pending()
        pending = self._pending.setdefault(job, _Pending(env["chunks"], time.monotonic()))
        if env["chunks"] != pending.chunks or env["chunk"] >= pending.chunks:
            log.warning("node.inputs_rejected", node=self.name, job=job, reason="bad chunk numbering")
            return
        if env["chunk"] in pending.seen:
            return  # redelivered
        pending.seen.add(env["chunk"])
        pending.last_arrival = time.monotonic()
        pending.arrived.put_nowait(env["items"])
        if env["chunk"] == 0 and env.get("spec") is not None:
            pending.spec = env["spec"]
            self._running[job] = asyncio.create_task(self._run(job, pending))

    def _expire_pending(self) -> None:
        """Forget jobs whose spec never came (a started job times out in ``_collect``)."""
        now = time.monotonic()
        for job in [j for j, p in self._pending.items()
                    if p.spec is None and now - p.started > self.input_timeout_s]:
            del self._pending[job]
            log.warning("node.inputs_incomplete", node=self.name, job=job)

    # -- statuses of the peers -----------------------------------------------------------
    async def _on_status(self, topic: str, payload: bytes, retain: bool) -> None:
        """Peers' ready reports and liveness; stop a job its roster (or, if not started, the
        cloud) failed."""
        try:
            env = decode(payload, "job_status")
        except CipherTwinError:
            return
        job = env["job"]
        if env["by"] == self.name:
            return
        if env["state"] == "computing" and env["round"] == 0:
            self._note_ready(env)
            return
        roster = self._job_rosters.get(job)
        if roster is None:
            if env["state"] == "failed" and job not in self._running \
                    and self._pending.pop(job, None) is not None:
                self._finished.add(job)  # never started: drop what came, ignore the rest
            return
        if self._verified_signer(env, roster) is None:
            if env["state"] == "failed":
                log.warning("node.status_ignored", node=self.name, job=job, by=env["by"],
                            reason="failed status not signed by a node of the job's roster")
            return
        self._peer(job).last_seen = time.monotonic()
        self._peers_changed.set()
        if env["state"] == "failed" and (task := self._running.get(job)) is not None:
            log.info("node.job_aborted", node=self.name, job=job, by=env["by"])
            self.refused.setdefault(job, f"aborted: {env['reason']}")
            task.cancel()

    def _peer(self, job: str) -> _Peers:
        if len(self._peers) > 10_000:
            self._peers.clear()
        return self._peers.setdefault(job, _Peers())

    @staticmethod
    def _verified_signer(env: Envelope, roster: NodeRoster) -> int | None:
        """Index of the roster node that signed the status as ``by``, or None."""
        index = roster.index_of(env["by"])
        if index is None:
            return None
        try:
            verify_status(env, VerifyKey(roster.roster[index].sign_public))
        except CipherTwinError:
            return None
        return index

    def _note_ready(self, env: Envelope) -> None:
        """A peer subscribed to the job's MPC topics (signed report), so frames will not be lost.

        Its first verified nonce for the job counts; a different later one (a replay of an
        older run's report) is ignored — it could only make the nodes' keys disagree."""
        roster = self._job_rosters.get(env["job"]) or self.roster
        nonce = env.get("nonce")
        index = self._verified_signer(env, roster) if roster and nonce else None
        if index is None or roster is None:
            return
        peers = self._peer(env["job"])
        peers.last_seen = time.monotonic()
        if index in peers.ready:
            if peers.ready[index][1] != nonce:
                log.warning("node.ready_conflict", node=self.name, job=env["job"], peer=index)
            return
        peers.ready[index] = (roster.roster[index].sign_public, nonce, env.get("layout"))
        self._peers_changed.set()

    def _peer_reports(self, job: str, roster: NodeRoster) -> dict[int, tuple[bytes, bytes | None]]:
        """Peers' (nonce, layout digest) whose ready report the job roster's node signed."""
        return {i: (nonce, layout) for i, (key, nonce, layout)
                in self._peers.get(job, _Peers()).ready.items()
                if i != self.identity.index and roster.roster[i].sign_public == key}

    async def _wait_peers(self, job: str, roster: NodeRoster, nonce: bytes, layout: bytes) -> bytes:
        """Wait for both peers' ready reports; refuse unless all three layouts agree.

        A peer still opening its inputs reports progress, so the wait runs out only
        ``mpc_timeout_s`` after a peer's *last* report. Returns the run digest of the nonces."""
        began = time.monotonic()
        while len(reports := self._peer_reports(job, roster)) < 2:
            self._peers_changed.clear()
            last = max(began, self._peers.get(job, _Peers(last_seen=began)).last_seen)
            left = last + self.mpc_timeout_s - time.monotonic()
            if left <= 0:
                missing = sorted({0, 1, 2} - set(reports) - {self.identity.index})
                raise JobRefused(f"peer node(s) {missing} not ready and silent for "
                                 f"{self.mpc_timeout_s:.0f} s")
            try:
                await asyncio.wait_for(self._peers_changed.wait(), left)
            except TimeoutError:
                pass
        differ = sorted(i for i, (_, theirs) in reports.items() if theirs != layout)
        if differ:
            raise JobRefused(f"nodes disagree on the input layout (node(s) {differ} arranged "
                             "other inputs): refusing to compute")
        nonces = {i: n for i, (n, _) in reports.items()} | {self.identity.index: nonce}
        return run_digest([nonces[i] for i in range(3)])

    # -- one job -------------------------------------------------------------------------
    async def _status(self, job: str, state: str, **kw: Any) -> None:
        try:
            await self.bus.publish(self.bus.topics.job_status(job), build_status(
                job, state, self.name, signer=self.identity.signing, **kw))
        except CipherTwinError as exc:
            log.warning("node.status_failed", node=self.name, job=job, error=str(exc))

    async def _run(self, job: str, pending: _Pending) -> None:
        began, state = False, "failed"
        try:
            assert pending.spec is not None
            checked = self._check(job, pending.spec)
            began = True
            opened = await self._collect(job, checked, pending)
            inputs, layout, labels = arrange(checked.env.body, opened)
            await self._compute(job, checked, inputs, layout, labels)
            state = "delivered"
        except asyncio.CancelledError:
            reason = self._aborts.get(job)
            if reason is None:
                state = "cancelled"
                log.info("node.job_cancelled", node=self.name, job=job)
            else:  # ended on purpose (hot swap): say why, signed
                reason = f"node {self.name}: {reason}"[:256]
                self.refused[job] = reason
                await self._status(job, "failed", reason=reason)
        except (CipherTwinError, ValueError) as exc:
            reason = f"node {self.name}: {exc}"[:256]
            self.refused[job] = reason
            log.warning("node.job_failed", node=self.name, job=job, reason=reason)
            await self._status(job, "failed", reason=reason)
        except Exception as exc:  # a bug: logged, and the peers and the cloud told
            reason = f"node {self.name}: internal error ({type(exc).__name__})"
            self.refused[job] = reason
            log.exception("node.job_crashed", node=self.name, job=job)
            await self._status(job, "failed", reason=reason)
        finally:
            if began:
                self.ledger.end(job, state)
            self._running.pop(job, None)
            self._pending.pop(job, None)
            self._job_rosters.pop(job, None)
            self._peers.pop(job, None)
            self._aborts.pop(job, None)
            self._finished.add(job)

    def _check(self, job: str, spec_bytes: bytes) -> _Checked:
        if not self.active or self.roster is None:
            raise JobRefused("not in the current node roster")
        roster = self.roster  # the job's roster from here on, whatever comes later
        env = decode(spec_bytes, "job_spec")
        if env["job"] != job:
            raise JobRefused("spec names another job")
        if env["roster"] != roster.digest:
            raise JobRefused("job was prepared for another node roster (the current one is "
                             f"version {roster.version})")
        params = unpack_params(env["params"])
        shape = check_job_shape(env["function"], params, env["fields"], env["since"],
                                env["until"], env["epoch_s"])
        if env["bindings"] != shape.bindings:
            raise JobRefused(f"spec binds other inputs than {env['function']} reads")
        owners = {t["owner_key"] for t in env["twins"]}
        # parse every token once and index it by issuer: linear in the number of owners
        by_issuer: dict[bytes, list[ProcessToken]] = {}
        for raw in env["tokens"]:
            try:
                token = ProcessToken.from_bytes(raw)
            except ValidationError as exc:
                log.warning("node.token_malformed", node=self.name, job=job, reason=str(exc))
                continue
            by_issuer.setdefault(token.issuer.raw, []).append(token)
        twins_of = _twins_by_owner(env)  # once, not once per owner: linear in the job's twins
        selectors: dict[bytes, str] = {}
        used: list[ProcessToken] = []
        for owner in owners:
            used.append(self._token_for(env, roster, owner, by_issuer.get(owner, []),
                                        shape.function.function_class, twins_of))
            selectors[owner] = used[-1].selector
        roles = {t["role"] for t in env["twins"]}
        for name, b in env["bindings"].items():
            if b["role"] not in roles:
                raise JobRefused(f"input {name}: no twins with role {b['role']!r}")
        # accepted: a job id runs once per node, ever; spend one job of every token's budget
        if not self.ledger.begin(job):
            raise JobRefused("this node already ran this job id (a replayed job)")
        self.ledger.charge(job, [(t.token_id, t.not_after + 60.0) for t in used])
        self._job_rosters[job] = roster
        return _Checked(env, params, shape, selectors, roster)

    def _token_for(self, env: Envelope, roster: NodeRoster, owner: bytes,
                   candidates: Sequence[ProcessToken], function_class: str,
                   twins_of: Mapping[bytes, Sequence[Mapping[str, Any]]]) -> ProcessToken:
        """The owner's token that admits this job, or refuse with the most telling reason."""
        owner_key = VerifyKey(owner)

        def admits(token: ProcessToken) -> None:
            if self.ledger.is_revoked(owner, token.token_id):
                raise TokenRejected("revoked", f"token {token.token_id.hex()} was revoked")
            verify_process_token(
                token, owner_key, function_class=function_class, receiver=env["receiver_key"],
                roster=roster.digest, node_key=self.identity.signing.verify_key.raw, leeway_s=60,
            )
            self._check_limits(env, owner, token, twins_of)
            self._check_budget(token)

        issued = [t for t in candidates if t.issuer == owner_key]
        token, reason = first_admitting(issued, admits)
        if token is None:
            raise JobRefused(f"owner {owner.hex()[:16]}: "
                             f"{reason if issued else 'no process token from this owner'}")
        return token

    @staticmethod
    def _check_limits(env: Envelope | Mapping[str, Any], owner: bytes, token: ProcessToken,
                      twins_of: Mapping[bytes, Sequence[Mapping[str, Any]]] | None = None) -> None:
        """The token's twin scope and limits for this owner's part of the job.

        ``min_owners`` (``min_twins`` is the same limit under its old name) counts the distinct
        owners *other than the issuer*: many twins of one owner — the receiver's own, say —
        count once, so a receiver cannot pad a job with its twins around a single victim.
        ``twins_of`` (:func:`_twins_by_owner` of ``env``, computed once per job) keeps the
        checks of all owners linear in the job's twins instead of quadratic."""
        if twins_of is None:
            twins_of = _twins_by_owner(env)
        mine = twins_of.get(owner, ())
        others = len(twins_of) - (owner in twins_of)
        outside = sorted({t["twin"] for t in mine} - set(token.twins))
        if outside:
            raise TokenRejected("twin-not-covered", f"token does not cover twin {outside[0]}")
        max_items = token.limits.get("max_items")
        if max_items is not None and sum(t["count"] for t in mine) > max_items:
            raise TokenRejected("limit", f"more than max_items={max_items} inputs")
        for name in ("min_owners", "min_twins"):
            least = token.limits.get(name)
            if least is not None and others < least:
                raise TokenRejected("limit", f"fewer than {name}={least} other owners "
                                             f"({others} besides the token's issuer)")
        max_points = token.limits.get("max_points")
        if max_points is not None and env["points"] > max_points:
            raise TokenRejected("limit", f"more than max_points={max_points} per twin")

    def _check_budget(self, token: ProcessToken) -> None:
        """At most ``max_jobs`` accepted jobs per ``window_s`` per token (ledger: durable).

        Bounds differencing: every extra job over overlapping twins can reveal more."""
        max_jobs, window_s = token_budget(token.limits)
        if self.ledger.uses(token.token_id, window_s) >= max_jobs:
            raise TokenRejected("budget", f"job budget exhausted: max_jobs={max_jobs} per "
                                          f"window_s={window_s}")

    async def _collect(self, job: str, checked: _Checked, pending: _Pending) -> OpenedColumns:
        """Open every chunk as it arrives (the cloud is still re-encrypting later ones),
        reporting progress; a chunk missing ``input_timeout_s`` after the last one fails."""
        fields = list(checked.encodings)
        context = job_context(
            self.pre.to_bytes(), self.identity.index,
            {t["twin"]: t["owner_key"] for t in checked.env["twins"]}, checked.selectors,
            checked.encodings)  # packed once: every batch of every chunk shares it
        opening: list[asyncio.Task[OpenedColumns]] = []
        opened = [0]
        reporter = spawn(f"node:{job}:opening",
                         functools.partial(self._report_opening, job, opened, checked.items),
                         restart=False)
        try:
            for _ in range(pending.chunks):
                while True:
                    left = pending.last_arrival + self.input_timeout_s - time.monotonic()
                    try:
                        items = await asyncio.wait_for(pending.arrived.get(), max(left, 0.0))
                        break
                    except TimeoutError:
                        if pending.last_arrival + self.input_timeout_s <= time.monotonic():
                            raise JobRefused(
                                f"inputs incomplete: {len(pending.seen)} of {pending.chunks} "
                                f"chunks, none for {self.input_timeout_s:.0f} s") from None
                if items:
                    opening.append(asyncio.create_task(
                        self._open(context, fields, items, opened)))
            parts = await asyncio.gather(*opening)
            reporter.cancel()
            await self._status(job, "opening", progress=1.0)
            return OpenedColumns.concat(parts, fields)
        finally:
            reporter.cancel()
            for task in opening:
                task.cancel()

    async def _report_opening(self, job: str, opened: list[int], total: int) -> None:
        """``opening`` statuses while items get opened (at most every PROGRESS_EVERY_S)."""
        last = -1
        while True:
            if opened[0] != last:
                last = opened[0]
                await self._status(job, "opening", progress=last / max(total, 1))
            await asyncio.sleep(PROGRESS_EVERY_S)

    async def _open(self, context: bytes, fields: list[str], items: Sequence[dict[str, bytes]],
                    opened: list[int]) -> OpenedColumns:
        """One chunk, cut into a batch per worker (``context``: :func:`job_context`)."""
        loop = asyncio.get_running_loop()
        workers = getattr(self.executor, "_max_workers", 1) or 1
        size = max(256, -(-len(items) // workers))
        batches = [items[i:i + size] for i in range(0, len(items), size)]

        async def one(batch: Sequence[dict[str, bytes]]) -> OpenedColumns | str:
            part = await loop.run_in_executor(self.executor, open_shares, context, batch)
            opened[0] += len(batch)
            return part

        parts = await asyncio.gather(*(one(b) for b in batches))
        for part in parts:
            if isinstance(part, str):
                raise JobRefused(part)
        return OpenedColumns.concat(parts, fields)  # type: ignore[arg-type]

    async def _compute(self, job: str, checked: _Checked, inputs: Mapping[str, np.ndarray],
                       layout: Layout, labels: list[str]) -> None:
        env, params = checked.env, checked.params
        rounds = expected_rounds(env["function"], params, layout)
        nonce, digest = new_run_nonce(), layout.digest()
        async with mqtt_transport(job, self.identity, checked.roster.roster, bus=self.bus,
                                  latency_s=self.latency_s, timeout_s=self.mpc_timeout_s,
                                  qos=self.qos) as transport:
            # = subscribed (early frames wait in the transport until the keys exist)
            await self._status(job, "computing", round_=0, rounds=rounds, nonce=nonce,
                               layout=digest)
            run = await self._wait_peers(job, checked.roster, nonce, digest)
            transport.set_run(run)
            party = Party(self.identity.index, job, transport, *transport.secrets(), run=run)
            watcher = spawn(f"node:{job}:progress",
                            functools.partial(self._watch_rounds, job, party, rounds))
            try:
                shared = await load_inputs(party, env["function"], params, inputs, layout)
                share = await run_function(party, env["function"], params, shared, layout)
            finally:
                watcher.cancel()
        blob = seal_output(share, env["receiver_key"])
        topic = self.bus.topics.results(env["receiver"], job, self.name)
        self.ledger.record_result(job, topic)  # first: a crash in between still gets it cleared
        await self.bus.publish(topic, build_result(
            job, env["function"], self.identity.index, self.name, labels, blob,
            self.identity.signing, roster=checked.roster.digest, params=env["params"]),
            retain=True)
        await self._status(job, "delivered", progress=1.0, round_=rounds, rounds=rounds)
        log.info("node.job_done", node=self.name, job=job, rounds=rounds, rows=len(labels))

    async def _watch_rounds(self, job: str, party: Any, rounds: int) -> None:
        last = 0
        while True:
            await asyncio.sleep(0.25)
            if party.round != last:
                last = party.round
                await self._status(job, "computing", round_=last, rounds=rounds,
                                   progress=last / max(rounds, 1))

    # -- retained results ----------------------------------------------------------------
    async def _sweep_results(self) -> None:
        """Clear retained output shares older than ``result_ttl_s`` (at start, then hourly)."""
        while True:
            await self.clear_results(time.time() - self.result_ttl_s)
            await asyncio.sleep(min(SWEEP_EVERY_S, max(self.result_ttl_s / 4, 1.0)))

    async def clear_results(self, before: float) -> int:
        """Clear this node's retained results delivered before ``before``; how many."""
        done = 0
        for job, topic in self.ledger.results_before(before):
            try:
                await self.bus.publish(topic, b"", retain=True)
            except CipherTwinError as exc:
                log.warning("node.result_clear_failed", node=self.name, job=job, error=str(exc))
                continue
            self.ledger.forget_result(job)
            done += 1
        if done:
            log.info("node.results_cleared", node=self.name, count=done)
        return done


def _twins_by_owner(env: Envelope | Mapping[str, Any]) -> dict[bytes, list[Mapping[str, Any]]]:
    """owner key -> that owner's twins in the job spec (in spec order)."""
    out: dict[bytes, list[Mapping[str, Any]]] = {}
    for t in env["twins"]:
        out.setdefault(t["owner_key"], []).append(t)
    return out
