"""The cloud's job manager (process 6+): validate jobs, re-encrypt share i for node i, track status.

The cloud never opens anything here. For a job it:

0. follows the node roster through a ``RosterHistory`` pinned to the operator key; without
   an operator key it follows none (so runs no job): the cloud must not pick the nodes;
1. checks the request at once (function and parameters, the epoch window, the declared field
   encodings and that they fit the function) and pins it to the current roster; when it runs,
   each owner registered, owns the twin (or the twin has not uploaded yet and the owner's
   token lists it), and holds a stored, unrevoked process token admitting
   the pinned roster (checked first, so a pre-swap token says so), the function class, the
   receiver key and (in its signed body) every requested twin — the nodes check all of it
   again, the cloud only avoids useless work;
2. plans from one grouped query (per twin, capsule and attribute set: count and size) which
   items each node i gets — those node i's grants admit (policy ``share:i AND <subset>``, so
   only share-i items pass), matched once per group — and fixes counts and batches;
3. sends each node chunk 0 with the spec (``nodes/{node}/inputs/{job}``), then streams the
   batches: per batch one query, one :class:`ReencryptionPool` call for the distinct
   (capsule, grant) pairs of all nodes — cached per (capsule, grant) in memory and in the
   store, so a repeated job does no pairing work — and the batch's chunks, re-encrypting
   batch k+1 while the nodes open batch k;
4. keeps a retained status on ``jobs/{job}/status``: queued → reencrypting (progress) → sent →
   computing (round k of n, from the nodes' signed reports) → done, or failed with a reason
   (a node refused, a node reported a failure, a node went silent — counted from the last
   chunk sent or the last signed report of a job node, whichever is later: nodes report
   ``opening`` progress, so a long opening is not silence — or the roster changed).

Hot swap (M4): a job is pinned to the roster current when it was submitted, for its whole
life. A new roster that replaces a node of a queued or running job's roster ends that job at
once with the reason ("node roster changed to version 2 during the job: index 1 node1 ->
node1b; re-grant processing and resubmit"); the nodes do the same on their side.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import structlog

from ciphertwin.bus.envelope import Envelope, decode, encode
from ciphertwin.cloud_twin.grants import ActiveGrant
from ciphertwin.cloud_twin.store import WindowGroup
from ciphertwin.cloud_twin.trust import Rejected
from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import TokenRejected
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.crypto.tokens import ProcessToken, first_admitting, verify_process_token
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.jobs import (
    CHUNK_ITEMS,
    MAX_CHUNK_BYTES,
    JobShape,
    NodeRoster,
    build_status,
    check_job_shape,
    unpack_params,
    verify_status,
)
from ciphertwin.protocol.roster_trust import NO_OPERATOR_KEY, RosterHistory, swap_reason
from ciphertwin.supervise import spawn

if TYPE_CHECKING:
    from ciphertwin.cloud_twin.service import CloudTwin

log = structlog.get_logger(__name__)

TOKENS_NS = "process_tokens"
JOBS_NS = "jobs"
PLAN_TWINS = 500
KEY_ESTIMATE = 1024
"""bytes a re-capsule adds to an entry (≈ 830 with typical attributes), for sizing chunks"""


class JobFailed(CipherTwinError):
    """A job cannot go on; the message is the published reason."""


@dataclass
class _Tracking:
    """Reports from the nodes for the job in flight."""

    roster: NodeRoster
    """the roster the job was sent to: only its nodes' signed reports count, even if the
    operator swaps the roster mid-job"""
    states: dict[int, str] = field(default_factory=dict)
    last_report: float = field(default_factory=time.monotonic)
    """the last sign of life: a chunk sent, or a signed report of one of the job's nodes"""
    failure: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """set with ``failure``: wakes the stream out of a long re-encryption at once"""
    closed: bool = False
    """the final status is being published: a late node report must not overwrite it"""

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.ended.set()
        self.changed.set()


GroupKey = tuple[str, bytes, tuple[str, ...]]  # (twin, capsule id, attributes)


@dataclass
class _Plan:
    """A job's inputs, fixed before any re-encryption so chunk 0 (the spec) can go first."""

    stored_until: float
    grants: dict[GroupKey, tuple[ActiveGrant | None, ...]] = field(default_factory=dict)
    """per admitted group, the grant of node 0, 1, 2 (None: that node gets none of it)"""
    expected: dict[str, dict[GroupKey, int]] = field(default_factory=dict)
    """twin -> admitted group -> items"""
    counts: dict[str, int] = field(default_factory=dict)
    """twin -> items per node (the same at every node)"""
    batches: list[tuple[list[str], int]] = field(default_factory=list)
    """(twins, chunks) in sending order"""

    def add(self, group: WindowGroup, chosen: tuple[ActiveGrant | None, ...]) -> None:
        key = (group.twin, group.capsule_id, group.attributes)
        self.grants[key] = chosen
        self.expected.setdefault(group.twin, {})[key] = group.count

    def expected_for(self, twins: Sequence[str]) -> Counter[GroupKey]:
        return Counter({k: n for t in twins for k, n in self.expected.get(t, {}).items()})

    @property
    def chunks(self) -> int:
        """Per node: chunk 0 (the spec) plus the batches' chunks."""
        return 1 + sum(k for _, k in self.batches)


class JobManager:
    """Attached to a :class:`CloudTwin`; jobs run one at a time, in arrival order."""

    def __init__(self, cloud: CloudTwin, *, operator: VerifyKey | None = None,
                 node_timeout_s: float = 60.0) -> None:
        self.cloud = cloud
        self.operator = operator
        self.rosters = RosterHistory(operator) if operator is not None else None
        self.node_timeout_s = node_timeout_s
        self.roster: NodeRoster | None = None
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue(1000)
        self._tracking: dict[str, _Tracking] = {}
        self._pinned: dict[str, NodeRoster] = {}
        """queued and running job -> the roster it was submitted under, for its whole life"""
        self._ended: dict[str, str] = {}
        """queued job -> why it will not run (its roster was swapped while it waited)"""
        self._task: asyncio.Task[None] | None = None
        self.timings: dict[str, dict[str, float]] = {}
        """job -> phase durations in seconds (reencrypt, publish, compute), for benchmarks."""

    async def start(self) -> None:
        bus, t = self.cloud.bus, self.cloud.topics
        await bus.subscribe(t.config_nodes(), self._on_roster)
        await bus.subscribe(t.job_submit(), self._on_submit)
        await bus.subscribe(t.filter("job_status"), self._on_status)
        self._task = spawn("cloud:jobs", self._worker)  # logged + restarted

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def is_node(self, principal: str) -> bool:
        """Processing nodes get their inputs per job, never as a live stream."""
        return self.roster is not None and principal in self.roster.node_ids

    # -- process tokens (control/{owner}, verified by the service first) -----------------
    async def accept_token(self, owner: str, env: Envelope) -> None:
        """Store an owner's process token after checking it is really theirs (and not revoked)."""
        known = self.cloud.trust.owners[owner]
        try:
            token = ProcessToken.from_bytes(env["token"])
            verify_process_token(token, known.verify_key, leeway_s=60)
        except (ValidationError, TokenRejected) as exc:
            raise Rejected(f"process token refused: {exc}") from None
        key = f"{owner}/{token.token_id.hex()}"
        stored = await self.cloud.store.get_kv(TOKENS_NS, key)
        if stored is not None and "revoked" in _unpack(stored):
            raise Rejected("process token refused: it was revoked")
        await self.cloud.store.put_kv(TOKENS_NS, key, wire.canonical({"token": env["token"]}))

    async def revoke_token(self, owner: str, env: Envelope) -> None:
        """Forget an owner's process token for good: its entry becomes a revocation marker
        (so the token is never accepted again). The nodes learn the revocation from the
        owner's retained copy, not from us."""
        known = self.cloud.trust.owners[owner]
        if env["owner_key"] != known.verify_key.raw:
            raise Rejected("revocation names another key than the owner's")
        await self.cloud.store.put_kv(TOKENS_NS, f"{owner}/{env['token_id'].hex()}",
                                      wire.canonical({"revoked": env["time"]}))

    async def _tokens_by_owner(self, owners: set[str]) -> dict[str, list[ProcessToken]]:
        """Stored, unrevoked tokens of ``owners``, read in one pass (linear in the tokens)."""
        out: dict[str, list[ProcessToken]] = {}
        for key, value in (await self.cloud.store.list_kv(TOKENS_NS)).items():
            owner = key.split("/", 1)[0]
            if owner in owners:
                entry = _unpack(value)
                if "token" in entry:
                    out.setdefault(owner, []).append(ProcessToken.from_bytes(entry["token"]))
        return out

    # -- bus handlers --------------------------------------------------------------------
    async def _on_roster(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            if self.rosters is None:
                raise ValidationError(NO_OPERATOR_KEY)
            roster = self.rosters.accept(payload)
        except CipherTwinError as exc:
            log.warning("jobs.roster_rejected", reason=str(exc))
            return
        self.roster = roster
        log.info("jobs.roster", version=roster.version, nodes=list(roster.node_ids))
        for job, pinned in list(self._pinned.items()):
            reason = swap_reason(pinned, roster)
            if reason is None:
                continue
            log.warning("jobs.roster_swapped", job=job, reason=reason)
            track = self._tracking.get(job)
            if track is not None:
                track.fail(reason)
            elif job not in self._ended:
                self._ended[job] = reason
                await self._status(job, "failed", reason=reason)

    async def _on_submit(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            env = decode(payload, "job_submit")
        except CipherTwinError as exc:
            log.warning("jobs.submit_rejected", reason=str(exc))
            return
        if await self.cloud.store.get_kv(JOBS_NS, env["job"]) is not None:
            log.info("jobs.duplicate_ignored", job=env["job"])
            return
        job = env["job"]
        try:
            _shape(env)
        except CipherTwinError as exc:
            reason = f"job refused: {exc}"[:256]
            log.warning("jobs.submit_refused", job=job, reason=reason)
            await self.cloud.store.put_kv(JOBS_NS, job, b"failed")
            await self._status(job, "failed", reason=reason)
            return
        await self.cloud.store.put_kv(JOBS_NS, job, b"queued")
        await self._status(job, "queued")
        try:
            self._queue.put_nowait(env)
        except asyncio.QueueFull:
            await self._status(job, "failed", reason="job queue is full")
            return
        if self.roster is not None:
            self._pinned[job] = self.roster

    async def _on_status(self, topic: str, payload: bytes, retain: bool) -> None:
        """Believe only signed reports of roster nodes about the job in flight."""
        try:
            env = decode(payload, "job_status")
        except CipherTwinError:
            return
        track = self._tracking.get(env["job"])
        if track is None or track.closed or env["by"] == "cloud":
            return
        index = track.roster.index_of(env["by"])
        if index is None:
            return
        try:
            verify_status(env, VerifyKey(track.roster.roster[index].sign_public))
        except CipherTwinError as exc:
            log.warning("jobs.status_rejected", by=env["by"], reason=str(exc))
            return
        track.states[index] = env["state"]
        track.last_report = time.monotonic()
        if env["state"] == "failed":
            track.fail(env["reason"] or f"node {env['by']} failed")
        elif env["state"] == "computing" and not track.closed:
            await self._status(env["job"], "computing", progress=env["progress"],
                               round_=env["round"], rounds=env["rounds"])
        track.changed.set()

    async def _status(self, job: str, state: str, **kw: Any) -> None:
        try:
            await self.cloud.bus.publish(self.cloud.topics.job_status(job),
                                         build_status(job, state, "cloud", **kw), retain=True)
        except CipherTwinError as exc:
            log.warning("jobs.status_failed", job=job, error=str(exc))

    # -- running jobs --------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            env = await self._queue.get()
            job = env["job"]
            if self._ended.pop(job, None) is not None:
                self._pinned.pop(job, None)
                await self.cloud.store.put_kv(JOBS_NS, job, b"failed")
                continue  # its roster was swapped while it waited: failed already
            try:
                await self._run(env, self._pinned.get(job))
                await self.cloud.store.put_kv(JOBS_NS, job, b"done")
            except (JobFailed, Rejected, CipherTwinError, ValueError) as exc:
                reason = str(exc)[:256]
                log.warning("jobs.failed", job=job, reason=reason)
                self._close(job)
                await self.cloud.store.put_kv(JOBS_NS, job, b"failed")
                await self._status(job, "failed", reason=reason)
            except Exception as exc:
                log.exception("jobs.crashed", job=job)
                self._close(job)
                await self._status(job, "failed", reason=f"internal error: {type(exc).__name__}")
            finally:
                self._tracking.pop(job, None)
                self._pinned.pop(job, None)

    async def _run(self, env: Envelope, roster: NodeRoster | None) -> None:
        job, t0 = env["job"], time.perf_counter()
        if roster is None:
            raise JobFailed("no node roster is known")
        self._tracking[job] = track = _Tracking(roster)  # from here a swap ends it (_on_roster)
        shape = _shape(env)
        tokens = await self._check_owners(env, shape.function.function_class, roster)
        twins = [(s["twin"], s["role"]) for s in env["inputs"]]
        if len({t for t, _ in twins}) != len(twins):
            raise JobFailed("a twin appears twice in the inputs")
        plan = await self._plan(env, roster, [t for t, _ in twins])
        spec = self._spec(env, roster, shape, twins, plan.counts, tokens)
        t1 = time.perf_counter()
        if track.failure is not None:
            raise JobFailed(track.failure)
        waited, published = await self._stream(job, env, roster, plan, spec, track)
        t2 = time.perf_counter()
        await self._status(job, "sent", progress=0.0)
        # streaming may take long, and the nodes may still be opening: silence counts from
        # the last chunk, and every signed report of a job node (opening progress) restarts it
        track.last_report = time.monotonic()
        await self._await_nodes(job, track)
        self.timings[job] = {"plan_s": t1 - t0, "reencrypt_s": t1 - t0 + waited,
                             "publish_s": published, "stream_s": t2 - t1,
                             "compute_s": time.perf_counter() - t2}
        self._close(job)
        await self._status(job, "done", progress=1.0)
        log.info("jobs.done", job=job, **self.timings[job])

    def _close(self, job: str) -> None:
        """From now on only the final status is published for ``job`` (retained: it stays)."""
        track = self._tracking.get(job)
        if track is not None:
            track.closed = True

    def _spec(self, env: Envelope, roster: NodeRoster, shape: JobShape,
              twins: Sequence[tuple[str, str]], counts: dict[str, int],
              tokens: list[bytes]) -> bytes:
        owner_of = {s["twin"]: s["owner"] for s in env["inputs"]}
        return encode("job_spec", {
            "job": env["job"], "function": env["function"], "params": env["params"],
            "receiver": env["receiver"], "receiver_key": env["receiver_key"],
            "roster": roster.digest, "points": env["points"], "bindings": shape.bindings,
            "since": env["since"], "until": env["until"], "epoch_s": env["epoch_s"],
            "fields": {f: e.as_dict() for f, e in shape.encodings.items()},
            "twins": [{"twin": t, "role": r, "count": counts.get(t, 0),
                       "owner_key": self.cloud.trust.owners[owner_of[t]].verify_key.raw}
                      for t, r in twins],
            "tokens": tokens,
        })

    async def _check_owners(self, env: Envelope, function_class: str, roster: NodeRoster) -> list[bytes]:
        chosen: list[bytes] = []
        owners = {s["owner"] for s in env["inputs"]}
        stored = await self._tokens_by_owner(owners)
        twins_of: dict[str, list[str]] = {}
        for s in env["inputs"]:
            twins_of.setdefault(s["owner"], []).append(s["twin"])
        for owner in sorted(owners):
            if owner not in self.cloud.trust.owners:
                raise JobFailed(f"owner {owner} is not registered")
            mine = twins_of[owner]
            for twin in mine:
                # a twin bound to another owner is refused; one that never uploaded is bound to
                # nobody yet and is admitted only if the owner's signed token lists it (below):
                # it contributes no readings (e.g. a user without readings in the window)
                o = self.cloud.trust.owner_of_twin(twin)
                if o is not None and o.name != owner:
                    raise JobFailed(f"twin {twin} is not a twin of {owner}")

            def admits(token: ProcessToken, mine: list[str] = mine) -> None:
                verify_process_token(token, token.issuer, function_class=function_class,
                                     receiver=env["receiver_key"], roster=roster.digest,
                                     leeway_s=60)
                if not set(mine) <= set(token.twins):
                    raise TokenRejected("twin-not-covered",
                                        "token does not cover all requested twins")

            token, reason = first_admitting(stored.get(owner, []), admits)
            if token is None:
                raise JobFailed(f"owner {owner}: {reason}")
            chosen.append(token.to_bytes())
        return chosen

    # -- planning: what each node gets, fixed before any re-encryption -------------------
    async def _plan(self, env: Envelope, roster: NodeRoster, twins: Sequence[str]) -> _Plan:
        """Match grants once per (twin, capsule, attribute set) and fix counts and batches.

        Only rows stored before the plan count, so items arriving during the job do not
        change it (``_prepare`` refuses the job if the stored inputs changed anyway)."""
        plan = _Plan(stored_until=time.time())
        sizes: list[dict[str, list[int]]] = [{} for _ in range(3)]  # node -> twin -> [n, bytes]
        # a twin's groups (one per capsule: per key epoch) share a few attribute sets, so
        # grants are matched once per (twin, attribute set), not once per group and node
        matched: dict[tuple[str, tuple[str, ...]], tuple[ActiveGrant | None, ...]] = {}
        for start in range(0, len(twins), PLAN_TWINS):
            for g in await self.cloud.store.window_groups(
                    twins[start:start + PLAN_TWINS], env["since"], env["until"], plan.stored_until):
                chosen = matched.get((g.twin, g.attributes))
                if chosen is None:
                    chosen = matched[(g.twin, g.attributes)] = tuple(
                        self._grant_for(roster, i, g) for i in range(3))
                if not any(chosen):
                    continue
                plan.add(g, chosen)
                for i, grant in enumerate(chosen):
                    if grant is not None:
                        acc = sizes[i].setdefault(g.twin, [0, 0])
                        acc[0] += g.count
                        acc[1] += g.payload_bytes + g.count * KEY_ESTIMATE
        for twin in twins:
            seen = [s.get(twin, [0, 0])[0] for s in sizes]
            if len(set(seen)) != 1:
                raise JobFailed(f"twin {twin}: share items per node {seen} differ (missing grant?)")
            if seen[0] > env["points"]:
                raise JobFailed(f"twin {twin}: {seen[0]} items > {env['points']} points")
            plan.counts[twin] = seen[0]
        plan.batches = _batches(twins, sizes)
        return plan

    def _grant_for(self, roster: NodeRoster, index: int, group: WindowGroup) -> ActiveGrant | None:
        """Node ``index``'s grant admitting this group; refuse a grant leaking another index."""
        node = roster.node_ids[index]
        grant = _admitting(self.cloud.grants.of_receiver(node, group.twin), group.attributes)
        if grant is not None and f"share:{index}" not in group.attributes:
            raise JobFailed(f"grant {grant.grant_id} of node {node} admits "
                            "another share index — refusing the job")
        return grant

    # -- streaming: re-encrypt batch k+1 while the nodes open batch k --------------------
    async def _stream(self, job: str, env: Envelope, roster: NodeRoster, plan: _Plan,
                      spec: bytes, track: _Tracking) -> tuple[float, float]:
        """Send the spec, then every batch as soon as it is re-encrypted.

        Returns (seconds waiting for re-encryption, seconds publishing)."""
        waited = published = 0.0
        last_report = 0.0
        t = time.perf_counter()
        await self._publish_chunks(job, roster, 0, plan.chunks, [[[]]] * 3, spec)
        published += time.perf_counter() - t
        chunk = 1
        nxt: asyncio.Task[list[list[dict[str, bytes]]]] | None = None
        try:
            for b, (twins, k) in enumerate(plan.batches):
                t = time.perf_counter()
                entries = await _unless_ended(
                    nxt or asyncio.create_task(self._prepare(env, plan, twins)), track)
                waited += time.perf_counter() - t
                nxt = (asyncio.create_task(self._prepare(env, plan, plan.batches[b + 1][0]))
                       if b + 1 < len(plan.batches) else None)
                if track.failure is not None:
                    raise JobFailed(track.failure)
                t = time.perf_counter()
                await self._publish_chunks(job, roster, chunk, plan.chunks,
                                           [_split(e, k) for e in entries])
                published += time.perf_counter() - t
                chunk += k
                now = time.monotonic()
                if now - last_report > 0.3 or b + 1 == len(plan.batches):
                    last_report = now
                    await self._status(job, "reencrypting", progress=(b + 1) / len(plan.batches))
        finally:
            if nxt is not None:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
        return waited, published

    async def _prepare(self, env: Envelope, plan: _Plan, twins: Sequence[str]
                       ) -> list[list[dict[str, bytes]]]:
        """Per node, the batch's {item, key} entries: one query, one pool call for all nodes."""
        rows = await self.cloud.store.window_items(twins, env["since"], env["until"],
                                                   plan.stored_until)
        groups: dict[GroupKey, list[bytes]] = {}
        for r in rows:
            groups.setdefault((r.twin, r.capsule_id, r.attributes), []).append(r.payload)
        admitted = {k: v for k, v in groups.items() if k in plan.grants}
        if Counter({k: len(v) for k, v in admitted.items()}) != plan.expected_for(twins):
            raise JobFailed("stored inputs changed while the job ran; submit it again")
        pairs = {(k[1], g.grant_id): (k[1], g) for k in admitted for g in plan.grants[k] if g}
        keys = await self.cloud._recapsules_for(list(pairs.values()), {})
        out: list[list[dict[str, bytes]]] = [[], [], []]
        for k, payloads in admitted.items():
            for i, g in enumerate(plan.grants[k]):
                if g is None:
                    continue
                key = keys.get((k[1], g.grant_id))
                if key is None:
                    raise JobFailed(f"twin {k[0]}: a capsule could not be re-encrypted "
                                    f"for node {i} (grant {g.grant_id})")
                out[i].extend({"item": p, "key": key} for p in payloads)
        return out

    async def _publish_chunks(self, job: str, roster: NodeRoster, first: int, total: int,
                              per_node: Sequence[Sequence[list[dict[str, bytes]]]],
                              spec: bytes | None = None) -> None:
        """Chunks ``first``… of every node (the three nodes concurrently)."""
        async def one(node: str, chunks: Sequence[list[dict[str, bytes]]]) -> None:
            topic = self.cloud.topics.node_inputs(node, job)
            for n, items in enumerate(chunks):
                body: dict[str, Any] = {"job": job, "chunk": first + n, "chunks": total,
                                        "items": items}
                if spec is not None:
                    body["spec"] = spec
                # a busy broker or host may take long to acknowledge megabytes: as long as a
                # node may stay silent, not the bus client's default of a few seconds
                await self.cloud.bus.publish(topic, encode("node_inputs", body),
                                             timeout=self.node_timeout_s)

        await asyncio.gather(*(one(node, chunks)
                               for node, chunks in zip(roster.node_ids, per_node, strict=True)))

    async def _await_nodes(self, job: str, track: _Tracking) -> None:
        while True:
            if track.failure is not None:
                raise JobFailed(track.failure)
            if len(track.states) == 3 and all(s == "delivered" for s in track.states.values()):
                return
            track.changed.clear()
            try:
                await asyncio.wait_for(track.changed.wait(), timeout=1.0)
            except TimeoutError:
                pass
            if time.monotonic() - track.last_report > self.node_timeout_s:
                silent = sorted(set(range(3)) - {i for i, s in track.states.items()
                                                 if s == "delivered"})
                raise JobFailed(f"node(s) {silent} silent for {self.node_timeout_s:.0f} s")


def _shape(env: Envelope) -> JobShape:
    """The submitted job's function, parameters, window and encodings, checked."""
    return check_job_shape(env["function"], unpack_params(env["params"]), env["fields"],
                           env["since"], env["until"], env["epoch_s"])


async def _unless_ended(task: asyncio.Task[Any], track: _Tracking) -> Any:
    """``task``'s result, or JobFailed as soon as the job is ended (``task`` is cancelled)."""
    ended = asyncio.create_task(track.ended.wait())
    try:
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
    if track.failure is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise JobFailed(track.failure)
    return task.result()


def _batches(twins: Sequence[str], sizes: Sequence[dict[str, list[int]]]
             ) -> list[tuple[list[str], int]]:
    """Twins in order, cut where a node's share would pass one chunk; (twins, chunks) each.

    About one chunk per batch: small enough that nodes start opening early, large enough
    that per-message costs stay small. A twin with more items than a chunk holds gets a batch
    of its own, spread over several chunks."""
    out: list[tuple[list[str], int]] = []
    batch: list[str] = []
    items = size = 0
    for twin in twins:
        n = max(s.get(twin, [0, 0])[0] for s in sizes)
        b = max(s.get(twin, [0, 0])[1] for s in sizes)
        if batch and (items + n > CHUNK_ITEMS or size + b > MAX_CHUNK_BYTES):
            out.append((batch, _chunks_for(items, size)))
            batch, items, size = [], 0, 0
        batch.append(twin)
        items, size = items + n, size + b
    if batch:
        out.append((batch, _chunks_for(items, size)))
    return out


def _chunks_for(items: int, size: int) -> int:
    return max(1, -(-items // CHUNK_ITEMS), -(-size // MAX_CHUNK_BYTES))


def _split(entries: list[dict[str, bytes]], k: int) -> list[list[dict[str, bytes]]]:
    """``entries`` in ``k`` nearly equal consecutive parts (some may be empty)."""
    step = -(-len(entries) // k) if entries else 0
    return [entries[i * step:(i + 1) * step] for i in range(k)]


def _admitting(grants: Sequence[ActiveGrant], attributes: tuple[str, ...]) -> ActiveGrant | None:
    return next((g for g in grants if g.policy.allows(attributes)), None)


def _unpack(value: bytes) -> dict[str, Any]:
    entry = msgpack.unpackb(value, raw=False)
    if not isinstance(entry, dict):
        raise ValidationError("stored process token entry is malformed")
    return entry
