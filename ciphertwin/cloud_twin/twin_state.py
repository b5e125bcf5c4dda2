"""Desired and reported state (P4) at the cloud: versions, fan-out, queries — no plaintext.

The cloud holds each twin's latest ``desired_set`` envelope and each device's latest
``reported_set`` envelope, opaque, and decides on their plaintext metadata only:

* desired — accepted iff its ``base_version`` is the stored version (compare-and-set in one
  store transaction: of two concurrent writers exactly one wins; the other is told
  ``stale: current desired_version is N``). Then the owner's wrap is re-encrypted through each
  device's ``dev-<device>`` grant and sent as ``inbox_desired`` to the device's inbox; a
  device whose report says it has not seen the latest version gets it again at its next
  awake presence (an offline device converges on reconnect);
* reported — accepted iff its version is above the device's stored one;
* both — fanned out as ``state_update`` to the owner (its own wrap) and to each grantee whose
  grant admits ``type:desired`` / ``type:reported`` (re-encrypted wrap), like items are;
* ``state_query`` — versions and ``in_sync`` for anyone with a stake in the twin, plus the
  documents with key material for those who can open them.

The owner's wrap is checked before anything is stored (a PRE ciphertext under the twin
owner's key with the document's attributes), so a stored version always reaches devices.
Re-encryption runs on the worker pool; the cloud never holds a document key.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from ciphertwin.bus.envelope import Envelope, decode, encode
from ciphertwin.bus.topics import Topics
from ciphertwin.cloud_twin.grants import ActiveGrant, GrantBook
from ciphertwin.cloud_twin.reencryption import ReencryptionPool, _rekey
from ciphertwin.cloud_twin.store import (
    DesiredRecord,
    ReportedRecord,
    TwinStore,
    VersionOutcome,
)
from ciphertwin.cloud_twin.trust import Owner, Rejected
from ciphertwin.crypto import kpcpre
from ciphertwin.crypto.errors import KeyMismatch, PolicyNotSatisfied
from ciphertwin.crypto.kpcpre import PreCiphertext
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.sealed_docs import OWNER_RECIPIENT, doc_attributes, wrap_for

log = structlog.get_logger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]
"""(topic, payload, qos)"""


def device_grant_id(device: str) -> str:
    """The grant id an owner gives its own device (``OwnerAgent.grant_own_device``)."""
    return f"dev-{device}"


def check_and_rewrap(owner_wrap: bytes, owner_key_id: bytes, attributes: tuple[str, ...],
                     rekeys: Sequence[bytes]) -> tuple[str | None, list[bytes | str]]:
    """Worker: (why the owner's wrap is unusable, or None; per re-key the re-encrypted wrap
    or why it failed). The wrap must be a PRE ciphertext under the owner's key with exactly
    the document's attributes — else devices and readers would get nothing they can open."""
    try:
        ct = PreCiphertext.from_bytes(owner_wrap)
    except ValidationError as exc:
        return f"malformed owner wrap: {exc}", []
    if ct.capsule.owner_id != owner_key_id:
        return "the owner's wrap is not under the twin owner's key", []
    if sorted(ct.capsule.attributes) != sorted(attributes):
        return "the owner's wrap does not carry the document's attributes", []
    out: list[bytes | str] = []
    for rk in rekeys:
        try:
            out.append(kpcpre.reencrypt(_rekey(rk), ct).to_bytes())
        except (PolicyNotSatisfied, KeyMismatch, ValidationError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return None, out


@dataclass(frozen=True, slots=True)
class Summary:
    """What the cloud shows of a twin's state: versions and whether they match."""

    desired_version: int
    reported_version: int
    in_sync: bool

    @classmethod
    def of(cls, desired: DesiredRecord | None, reported: Sequence[ReportedRecord]) -> Summary:
        """``reported`` newest first; in sync when nothing is desired, or the newest report
        answers the current desired version and says it matches."""
        dv = desired.version if desired is not None else 0
        latest = reported[0] if reported else None
        rv = latest.version if latest is not None else 0
        in_sync = dv == 0 or (latest is not None and latest.in_sync
                              and latest.desired_version == dv)
        return cls(dv, rv, in_sync)


class StateBook:
    """Desired/reported state of every twin: checks on metadata, store, fan-out, queries.

    The service decodes and authenticates envelopes (it knows owners, permits, devices);
    this class decides on versions and moves ciphertexts."""

    def __init__(self, store: TwinStore, grants: GrantBook, pool: ReencryptionPool,
                 topics: Topics, publish: Publish, *,
                 excluded_reader: Callable[[str], bool] = lambda _: False) -> None:
        self.store, self.grants, self.pool, self.topics = store, grants, pool, topics
        self._publish = publish
        self._excluded = excluded_reader
        self._rewraps: OrderedDict[tuple[bytes, str], bytes] = OrderedDict()
        """(digest of the owner's wrap, grant id) -> re-encrypted wrap: queries and
        redeliveries of one version cost one pairing per reader, not one per ask."""
        self._locks: dict[str, asyncio.Lock] = {}

    # -- key material ---------------------------------------------------------------------
    async def _rewrap(self, owner: Owner, kind: str, twin: str, owner_wrap: bytes,
                      grants: Sequence[ActiveGrant]) -> dict[str, bytes]:
        """grant id -> the owner's wrap re-encrypted through it (failures logged, left out).
        Raises Rejected if the owner's wrap itself is unusable."""
        digest = hashlib.sha256(owner_wrap).digest()
        found = {g.grant_id: v for g in grants
                 if (v := self._rewraps.get((digest, g.grant_id))) is not None}
        todo = [g for g in grants if g.grant_id not in found]
        if not todo and found:
            return found
        loop = asyncio.get_running_loop()
        error, results = await loop.run_in_executor(
            self.pool.executor, check_and_rewrap, owner_wrap, owner.pre_pk.key_id,
            doc_attributes(kind, twin), [g.grant.rekey for g in todo])
        if error is not None:
            raise Rejected(error)
        for grant, result in zip(todo, results, strict=True):
            if isinstance(result, str):
                log.warning("state.reencrypt_refused", twin=twin, grant=grant.grant_id,
                            reason=result)
                continue
            found[grant.grant_id] = result
            self._rewraps[(digest, grant.grant_id)] = result
            if len(self._rewraps) > 20_000:
                self._rewraps.popitem(last=False)
        return found

    def device_grants(self, twin: str) -> list[ActiveGrant]:
        """The twin's devices, as the ``dev-<device>`` grants their owner gave them."""
        return [g for g in self.grants.of_twin(twin)
                if g.grant_id == device_grant_id(g.grant.receiver)]

    def reader_grants(self, twin: str, kind: str) -> list[ActiveGrant]:
        """Grantees (not the twin's own devices, not processing nodes) whose grant admits
        this kind of document."""
        return [g for g in self.grants.matching(twin, doc_attributes(kind, twin))
                if g.grant_id != device_grant_id(g.grant.receiver)
                and not self._excluded(g.grant.receiver)]

    def _lock(self, twin: str) -> asyncio.Lock:
        lock = self._locks.get(twin)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {t: lk for t, lk in self._locks.items() if lk.locked()}
            lock = self._locks[twin] = asyncio.Lock()
        return lock

    async def summary(self, twin: str) -> Summary:
        return Summary.of(await self.store.get_desired(twin), await self.store.get_reported(twin))

    # -- desired --------------------------------------------------------------------------
    async def accept_desired(self, owner: Owner, env: Envelope, payload: bytes,
                             writer: str) -> tuple[VersionOutcome, Summary]:
        """Compare-and-set an authenticated ``desired_set``; on success send it to the
        twin's devices and readers. (outcome, summary after it)."""
        twin = env["twin"]
        owner_wrap = wrap_for(env, OWNER_RECIPIENT)
        devices = self.device_grants(twin)
        keys = await self._rewrap(owner, "desired_set", twin, owner_wrap, devices)
        async with self._lock(twin):  # updates of one twin leave in version order
            outcome = await self.store.set_desired(
                DesiredRecord(twin, env["version"], writer, payload, float(env["time"])),
                env["base_version"])
            summary = await self.summary(twin)
            if outcome.accepted and not outcome.duplicate:
                log.info("state.desired_accepted", twin=twin, writer=writer,
                         version=outcome.current)
                await asyncio.gather(*(
                    self._send_desired(g.grant.receiver, twin, env["version"], payload, key)
                    for g in devices if (key := keys.get(g.grant_id)) is not None))
                await self._update(owner, "desired_set", twin, owner_wrap, payload, summary)
        if not outcome.accepted:
            log.warning("state.desired_stale", twin=twin, writer=writer,
                        base=env["base_version"], current=outcome.current)
        return outcome, summary

    async def _send_desired(self, device: str, twin: str, version: int, doc: bytes,
                            key: bytes) -> None:
        body = {"twin": twin, "version": version, "doc": doc, "key": key}
        try:
            await self._publish(self.topics.inbox(device), encode("inbox_desired", body), 1)
        except Exception as exc:  # noqa: BLE001 - the device gets it at its next presence
            log.warning("state.inbox_failed", twin=twin, device=device, error=str(exc))

    async def redeliver_desired(self, owner: Owner, twin: str, device: str) -> bool:
        """At a device's awake presence: send the latest desired unless the device reported
        having answered it. True if sent."""
        desired = await self.store.get_desired(twin)
        if desired is None:
            return False
        seen = max((r.desired_version for r in await self.store.get_reported(twin)
                    if r.device == device), default=0)
        if seen >= desired.version:
            return False
        grant = self.grants.get(device_grant_id(device))
        if grant is None or twin not in grant.grant.twins:
            log.info("state.no_device_grant", twin=twin, device=device)
            return False
        env = decode(desired.envelope, "desired_set")  # stored bytes passed decode before
        keys = await self._rewrap(owner, "desired_set", twin, wrap_for(env, OWNER_RECIPIENT),
                                  [grant])
        key = keys.get(grant.grant_id)
        if key is None:
            return False
        await self._send_desired(device, twin, desired.version, desired.envelope, key)
        log.info("state.desired_redelivered", twin=twin, device=device, version=desired.version,
                 device_saw=seen)
        return True

    # -- reported -------------------------------------------------------------------------
    async def accept_reported(self, owner: Owner, env: Envelope,
                              payload: bytes) -> tuple[VersionOutcome, Summary]:
        """Store an authenticated ``reported_set`` iff its version increases; on success
        send it to the owner and readers."""
        twin, device = env["twin"], env["device"]
        owner_wrap = wrap_for(env, OWNER_RECIPIENT)
        await self._rewrap(owner, "reported_set", twin, owner_wrap, [])  # checks the wrap
        async with self._lock(twin):
            outcome = await self.store.put_reported(ReportedRecord(
                twin, device, env["version"], env["desired_version"], env["in_sync"], payload,
                float(env["time"])))
            summary = await self.summary(twin)
            if outcome.accepted and not outcome.duplicate:
                log.info("state.reported_accepted", twin=twin, device=device,
                         version=outcome.current, desired_version=env["desired_version"],
                         in_sync=env["in_sync"])
                await self._update(owner, "reported_set", twin, owner_wrap, payload, summary)
        if not outcome.accepted:
            log.warning("state.reported_stale", twin=twin, device=device,
                        version=env["version"], current=outcome.current)
        return outcome, summary

    # -- fan-out and queries --------------------------------------------------------------
    async def _update(self, owner: Owner, kind: str, twin: str, owner_wrap: bytes,
                      doc: bytes, summary: Summary) -> None:
        """``state_update`` to the owner and every reader whose grant admits ``kind``."""
        readers = self.reader_grants(twin, kind)
        keys = await self._rewrap(owner, kind, twin, owner_wrap, readers) if readers else {}
        targets = [(owner.name, owner_wrap)] + [
            (g.grant.receiver, k) for g in readers if (k := keys.get(g.grant_id)) is not None]
        base = {"twin": twin, "desired_version": summary.desired_version,
                "reported_version": summary.reported_version, "in_sync": summary.in_sync,
                "doc": doc}

        async def send(reader: str, key: bytes) -> None:
            try:  # QoS 0 like the item stream: state_query is the reliable path
                await self._publish(self.topics.stream(twin, reader),
                                    encode("state_update", {**base, "key": key}), 0)
            except Exception as exc:  # noqa: BLE001 - never let the live view fail a write
                log.warning("state.update_failed", twin=twin, reader=reader, error=str(exc))

        await asyncio.gather(*(send(r, k) for r, k in dict(targets).items()))

    async def query(self, asker: str, owner: Owner, twin: str, request_id: str,
                    *, may_see: bool) -> dict[str, object]:
        """The ``state_reply`` body for ``asker``: versions (if it has a stake in the twin),
        and each document it can open with the key material for it."""
        body: dict[str, object] = {"request_id": request_id, "twin": twin, "desired_version": 0,
                                   "reported_version": 0, "in_sync": True}
        if not may_see:
            body["error"] = "no grant, device or permit of this twin's owner for you"
            return body
        desired = await self.store.get_desired(twin)
        reported = await self.store.get_reported(twin)
        summary = Summary.of(desired, reported)
        body.update(desired_version=summary.desired_version,
                    reported_version=summary.reported_version, in_sync=summary.in_sync)
        for kind, field, stored in (("desired_set", "desired", desired and desired.envelope),
                                    ("reported_set", "reported",
                                     reported[0].envelope if reported else None)):
            if not stored:
                continue
            owner_wrap = wrap_for(decode(stored, kind), OWNER_RECIPIENT)
            if asker == owner.name:
                key: bytes | None = owner_wrap
            else:
                grants = [g for g in self.grants.of_receiver(asker, twin)
                          if g.policy.allows(doc_attributes(kind, twin))]
                keys = await self._rewrap(owner, kind, twin, owner_wrap, grants[:1])
                key = next(iter(keys.values()), None)
            if key is not None:
                body[field], body[f"{field}_key"] = stored, key
        return body
