"""Authenticated, encrypted, chunked node-to-node channel over any publish/subscribe bus.

Every round payload from node f to node t in job j travels as one or more frames on topic
``{prefix}/mpc/{j}/{node f}/{node t}``. A frame is a canonical msgpack map
``{"t": "mpc-frame", "v": 1, job, r, f, to, c, n, len, iv, ct}`` where ``ct`` is AES-256-GCM
of chunk c (of n; the whole payload has ``len`` bytes) under the per-(run, direction) key
HKDF(pair secret, "chan", job, run, f→t), with (job, round, from, to, chunk, n, len) as
associated data and a random 96-bit nonce. ``run`` is the digest of the three nodes' fresh
per-run nonces (:func:`ciphertwin.mpc_nodes.prf.run_digest`), so a job id replayed to a
restarted node gets new keys. The transport subscribes before the nonces are known (so no
frame is lost): frames that arrive before :meth:`SecureTransport.set_run` are buffered
(bounded) and opened once the keys exist — never dropped, never tried with a wrong key.
Hence:

* the broker and cloud see only sizes and timing;
* a frame moved to another job, round, direction or position fails authentication;
* duplicates (QoS 1 redelivery) are dropped, reordering is absorbed by the (round, chunk)
  tags, and a missing frame surfaces as :class:`MessageTimeoutError` naming what is missing;
* a peer that used other nonces (a wrong or missing nonce) cannot talk: its frames fail
  authentication;
* a forged or altered frame, or a frame for a round beyond the job's declared range, stops
  the job at once with :class:`TamperedMessageError` / :class:`UnexpectedRoundError` —
  waiting for a timeout would only hide an attack.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ciphertwin.bus.topics import Topics
from ciphertwin.crypto import wire
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.errors import (
    ChannelError,
    MessageTimeoutError,
    MpcValidationError,
    TamperedMessageError,
    UnexpectedRoundError,
    UnknownJobError,
)
from ciphertwin.mpc_nodes.party import check_job_id
from ciphertwin.mpc_nodes.prf import check_run, derive_job_key
from ciphertwin.mpc_nodes.roster import NodeIdentity, Roster
from ciphertwin.mpc_nodes.shares import PARTIES
from ciphertwin.mpc_nodes.transport.base import Transport
from ciphertwin.mpc_nodes.transport.framebus import FrameBus

log = structlog.get_logger(__name__)

FRAME_TAG = "mpc-frame"
FRAME_FIELDS = ("job", "r", "f", "to", "c", "n", "len", "iv", "ct")
DEFAULT_CHUNK_BYTES = 256 * 1024
EARLY_LIMIT_BYTES = 256 * 1024 * 1024
"""frames buffered before the run keys are known; more is a flood and stops the job"""
MAX_PAYLOAD_BYTES = 1 << 30
_FRAME_OVERHEAD = 512
_NONCE = 12


def frame_aad(job: str, round_: int, frm: int, to: int, chunk: int, n: int, total: int) -> bytes:
    return wire.canonical(["ct/mpc/frame/v1", job, round_, frm, to, chunk, n, total])


@dataclass
class _Incoming:
    """Chunks of one (from, round) message collected so far."""

    n: int
    total: int
    chunks: dict[int, bytes] = field(default_factory=dict)


class SecureTransport(Transport):
    """:class:`Transport` over a :class:`FrameBus` with per-direction AES-GCM keys."""

    def __init__(
        self,
        *,
        job: str,
        identity: NodeIdentity,
        roster: Roster,
        bus: FrameBus,
        topics: Topics | None = None,
        timeout_s: float = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_rounds: int = 64,
        latency_s: float = 0.0,
        run: bytes | None = None,
    ) -> None:
        """``run`` (the run digest) may come later through :meth:`set_run`."""
        super().__init__(identity.index, latency_s=latency_s)
        roster.check_identity(identity)
        if not 1024 <= chunk_bytes <= 16 * 1024 * 1024:
            raise ValidationError("chunk_bytes must be within 1 KiB .. 16 MiB")
        if not 1 <= max_rounds <= 1 << 16:
            raise ValidationError("max_rounds must be within 1 .. 65536")
        self.job = check_job_id(job)
        self.identity = identity
        self.roster = roster
        self.bus = bus
        self.topics = topics or Topics()
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_rounds = max_rounds
        me = identity.index
        self.pair_secrets = {p: roster.pair_secret(identity, p) for p in range(PARTIES) if p != me}
        self.run: bytes | None = None
        self._send_keys: dict[int, AESGCM] = {}
        self._recv_keys: dict[int, AESGCM] = {}
        self._early: list[tuple[str, bytes]] = []
        self._early_bytes = 0
        self._incoming: dict[tuple[int, int], _Incoming] = {}
        self._ready: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self._delivered: set[tuple[int, int]] = set()
        self._failure: ChannelError | None = None
        self.duplicates = 0
        self.rejected: list[str] = []
        self._filter = self.topics.filter("mpc", job=job, to=identity.node_id)
        if run is not None:
            self.set_run(run)

    def _channel_key(self, frm: int, to: int, run: bytes) -> AESGCM:
        secret = self.pair_secrets[to if frm == self.party else frm]
        return AESGCM(derive_job_key(secret, self.job, f"chan/{frm}>{to}".encode(), run))

    def set_run(self, run: bytes) -> None:
        """Derive this run's channel keys, then open the frames buffered until now."""
        if self.run is not None:
            raise MpcValidationError(f"job {self.job}: the run keys are already set")
        me = self.party
        self._send_keys = {p: self._channel_key(me, p, check_run(run)) for p in self.pair_secrets}
        self._recv_keys = {p: self._channel_key(p, me, run) for p in self.pair_secrets}
        self.run = run
        early, self._early, self._early_bytes = self._early, [], 0
        for topic, data in early:
            self._file(topic, data)

    def secrets(self) -> tuple[bytes, bytes]:
        """(pair secret with party i-1, with party i+1), for :class:`Party`."""
        return (self.pair_secrets[(self.party - 1) % PARTIES],
                self.pair_secrets[(self.party + 1) % PARTIES])

    async def start(self) -> SecureTransport:
        """Subscribe to this node's inbound topic for the job (call before the first round)."""
        await self.bus.subscribe(self._filter, self._on_frame)
        return self

    async def close(self) -> None:
        await self.bus.unsubscribe(self._filter)

    # -- sending --------------------------------------------------------------------------

    async def _send(self, to: int, round_: int, payload: bytes) -> None:
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValidationError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        topic = self.topics.mpc(self.job, self.identity.node_id, self.roster[to].node_id)
        total = len(payload)
        n = max(1, -(-total // self.chunk_bytes))
        view = memoryview(payload)
        if self.run is None:
            raise MpcValidationError(f"job {self.job}: no run keys yet (call set_run first)")
        key = self._send_keys[to]
        frames = []
        for c in range(n):
            iv = os.urandom(_NONCE)
            chunk = view[c * self.chunk_bytes : (c + 1) * self.chunk_bytes]
            ct = key.encrypt(iv, chunk, frame_aad(self.job, round_, self.party, to, c, n, total))
            frames.append(wire.encode(FRAME_TAG, {"job": self.job, "r": round_, "f": self.party,
                                                  "to": to, "c": c, "n": n, "len": total,
                                                  "iv": iv, "ct": ct}))
        self.stats.wire_bytes_sent += sum(len(f) for f in frames)
        await asyncio.gather(*(self.bus.publish(topic, f) for f in frames))

    # -- receiving ------------------------------------------------------------------------

    def _future(self, key: tuple[int, int]) -> asyncio.Future[bytes]:
        fut = self._ready.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._ready[key] = fut
        return fut

    async def _recv(self, frm: int, round_: int) -> bytes:
        if self._failure is not None:
            raise self._failure
        key = (frm, round_)
        fut = self._future(key)
        try:
            payload = await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            part = self._incoming.get(key)
            have = f"{len(part.chunks)}/{part.n} chunks" if part else "no chunk"
            raise MessageTimeoutError(
                f"job {self.job}: node {self.party} got {have} of node {frm}'s round-{round_} "
                f"message within {self.timeout_s:.1f} s (dropped, or the peer is down)"
            ) from None
        del self._ready[key]
        return payload

    def _fail(self, error: ChannelError) -> None:
        """Stop the job: every pending and future receive raises ``error``."""
        if self._failure is None:
            self._failure = error
            log.warning("mpc.channel_failed", job=self.job, node=self.party, error=str(error))
        for fut in self._ready.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: the waiter may already have given up

    async def _on_frame(self, topic: str, data: bytes) -> None:
        if self.run is not None:
            self._file(topic, data)
            return
        self._early_bytes += len(data)
        if self._early_bytes > EARLY_LIMIT_BYTES:
            self._fail(TamperedMessageError(
                f"job {self.job}: over {EARLY_LIMIT_BYTES} bytes of frames before the run "
                "keys were agreed (flood)"))
            self._early.clear()
            return
        self._early.append((topic, data))

    def _file(self, topic: str, data: bytes) -> None:
        """Open one frame with the run keys; a bad frame stops the job (another job's: logged)."""
        try:
            self.open_frame(topic, data)
        except UnknownJobError as exc:
            # not ours to judge: another job's traffic must not stop this one
            self.rejected.append(str(exc))
            log.warning("mpc.frame_rejected", job=self.job, reason=str(exc))
        except ChannelError as exc:
            self.rejected.append(str(exc))
            self._fail(exc)

    def open_frame(self, topic: str, data: bytes) -> None:
        """Validate, authenticate and file one frame; raise on anything wrong."""
        if not isinstance(data, bytes) or len(data) > self.chunk_bytes + _FRAME_OVERHEAD:
            raise TamperedMessageError(f"job {self.job}: frame on {topic!r} is oversized")
        try:
            f = wire.decode(data, FRAME_TAG, FRAME_FIELDS, max_bytes=self.chunk_bytes + _FRAME_OVERHEAD)
            job = f.str("job", 128)
            if job != self.job:
                raise UnknownJobError(
                    f"node {self.party} serves job {self.job!r}, got a frame for job {job!r}"
                )
            round_ = f.int("r", 0, (1 << 32) - 1)
            frm, to = f.int("f", 0, PARTIES - 1), f.int("to", 0, PARTIES - 1)
            n, total = f.int("n", 1, 1 << 20), f.int("len", 0, MAX_PAYLOAD_BYTES)
            c = f.int("c", 0, n - 1)
            iv, ct = f.bytes("iv", _NONCE), f.bytes("ct", max_len=self.chunk_bytes + 16)
        except ValidationError as exc:
            raise TamperedMessageError(f"job {self.job}: malformed frame on {topic!r}: {exc}") from exc
        if to != self.party or frm == self.party:
            raise TamperedMessageError(f"job {self.job}: frame addressed {frm}→{to} reached node {self.party}")
        expected_topic = self.topics.mpc(self.job, self.roster[frm].node_id, self.identity.node_id)
        if topic != expected_topic:
            raise TamperedMessageError(f"job {self.job}: frame from node {frm} arrived on {topic!r}")
        if round_ >= self.max_rounds:
            raise UnexpectedRoundError(
                f"job {self.job}: node {frm} sent round {round_}, the job has {self.max_rounds}"
            )
        key = (frm, round_)
        if key in self._delivered:
            self.duplicates += 1
            return
        try:
            plain = self._recv_keys[frm].decrypt(iv, ct, frame_aad(self.job, round_, frm, to, c, n, total))
        except InvalidTag:
            raise TamperedMessageError(
                f"job {self.job}: round-{round_} chunk {c}/{n} from node {frm} failed "
                "authentication (forged, altered or replayed from elsewhere)"
            ) from None
        part = self._incoming.setdefault(key, _Incoming(n, total))
        if (part.n, part.total) != (n, total):
            raise TamperedMessageError(f"job {self.job}: chunks of round {round_} from node {frm} disagree")
        if c in part.chunks:
            self.duplicates += 1
            return
        part.chunks[c] = plain
        if len(part.chunks) == n:
            payload = b"".join(part.chunks[i] for i in range(n))
            del self._incoming[key]
            if len(payload) != total:
                raise TamperedMessageError(f"job {self.job}: round {round_} from node {frm} has the wrong length")
            self._delivered.add(key)
            fut = self._future(key)
            if not fut.done():
                fut.set_result(payload)
