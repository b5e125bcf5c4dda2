"""Reading a twin: history by request/response, its state (desired/reported) and live items
and state changes from the stream topic.

Owners, receivers and devices all read the same way; only the key material differs (the
capsule itself for the owner, a re-encrypted capsule for a grantee). Data keys are cached per
capsule, so a key epoch costs one decapsulation however many items it holds. Every item is
authenticated end to end (device signatures, and the write token against the owner's key
when the reader knows it) — the cloud is not trusted to say who wrote what.

State (P4) is read the same way: the cloud hands over the sealed desired and reported
documents with a wrap this reader can open; versions, delta and "in sync" are taken from the
signed documents, the cloud's metadata only where no document is readable.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.protocol.items import (
    OpenedItem, decode_item, key_from_capsule, key_from_recapsule, open_item,
)
from ciphertwin.protocol.json_state import delta
from ciphertwin.protocol.twin_state import DesiredDoc, ReportedDoc, open_desired, open_reported

log = structlog.get_logger(__name__)

_UNREADABLE = (ValidationError, DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected)


class HistoryUnavailable(CipherTwinError):
    """The cloud answered a history query with an error: the query was refused (its reason
    says why) or the cloud's store failed (asking again later may work)."""


class StateUnavailable(HistoryUnavailable):
    """The cloud answered a state query with an error (unknown twin, no right to read it)."""


@dataclass(frozen=True)
class TwinState:
    """A twin's state as this reader can see it: the opened documents (None where there is
    none yet or none this reader may open) and the delta computed here, from plaintext."""

    twin: str
    desired_version: int
    reported_version: int
    in_sync: bool
    desired: DesiredDoc | None = None
    reported: ReportedDoc | None = None
    delta: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "twin": self.twin, "desired_version": self.desired_version,
            "reported_version": self.reported_version, "in_sync": self.in_sync,
            "desired": None if self.desired is None else {
                "doc": self.desired.doc, "writer": self.desired.writer,
                "version": self.desired.version, "time": self.desired.time},
            "reported": None if self.reported is None else {
                "state": self.reported.state, "device": self.reported.device,
                "version": self.reported.version,
                "desired_version": self.reported.desired_version,
                "in_sync": self.reported.in_sync, "time": self.reported.time},
            "delta": self.delta,
        }


@dataclass(frozen=True)
class StateChange:
    """One ``state_update`` from the stream: the new desired or reported document, opened."""

    twin: str
    desired_version: int
    reported_version: int
    in_sync: bool
    desired: DesiredDoc | None = None
    reported: ReportedDoc | None = None


def state_delta(desired: DesiredDoc | None, reported: ReportedDoc | None) -> dict[str, Any]:
    """What the device still has to do: desired keys whose value differs from reported."""
    if desired is None:
        return {}
    return delta(desired.doc, reported.state if reported is not None else {})


class TwinReader:
    """Opens items for one principal (``name`` on the bus, ``pre`` its PRE key pair).

    ``owner_keys`` is what this reader knows of the twins' owners: one verify key for every
    twin (an owner reading its own twins) or a map twin -> key. Items of a twin whose owner
    key is unknown are refused — the cloud could otherwise inject items under a device key
    and write token of its own making.
    """

    def __init__(self, bus: BusClient, name: str, pre: PreKeyPair,
                 owner_keys: Mapping[str, VerifyKey] | VerifyKey) -> None:
        self.bus, self.name, self.pre = bus, name, pre
        self.owner_keys = owner_keys
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()
        self.unreadable = 0

    def owner_key(self, twin: str) -> VerifyKey:
        if isinstance(self.owner_keys, VerifyKey):
            return self.owner_keys
        key = self.owner_keys.get(twin)
        if key is None:
            raise ValidationError(f"owner key of twin {twin!r} is unknown to this reader")
        return key

    def data_key(self, key_material: bytes) -> tuple[bytes, bytes]:
        """(capsule_id, data key) from a capsule (owner) or re-encrypted capsule (grantee)."""
        tag = wire.peek_tag(key_material, 64 * 1024)
        if tag == "capsule":
            return key_from_capsule(self.pre, key_material)
        if tag == "recapsule":
            return key_from_recapsule(self.pre, key_material)
        raise ValidationError(f"unexpected key material {tag!r}")

    def open(self, item: bytes, key_material: bytes) -> OpenedItem:
        """Decrypt and authenticate one item (raises on anything wrong)."""
        envelope = decode_item(item)
        capsule_id, twin = envelope["capsule_id"], envelope["twin"]
        owner_key = self.owner_key(twin)
        key = self._keys.get(capsule_id)
        if key is not None:
            return open_item(envelope, key, owner_key)
        cid, key = self.data_key(key_material)
        if cid != capsule_id:
            raise ValidationError("key material is for another capsule")
        opened = open_item(envelope, key, owner_key)
        self._keys[cid] = key  # cached only once it has opened an authentic item
        if len(self._keys) > 10_000:
            self._keys.popitem(last=False)
        return opened

    def try_open(self, item: bytes, key_material: bytes) -> OpenedItem | None:
        try:
            return self.open(item, key_material)
        except _UNREADABLE as exc:
            self.unreadable += 1
            log.warning("reader.item_refused", reader=self.name, reason=f"{type(exc).__name__}: {exc}")
            return None

    async def history(self, twin: str, since: float = 0.0, until: float | None = None,
                      page: int = 1000, timeout: float = 30.0) -> list[OpenedItem]:
        """Every item of ``twin`` in [since, until] this principal may read, oldest first."""
        out: list[OpenedItem] = []
        after: dict[str, Any] | None = None
        while True:
            request_id = f"h{secrets.token_hex(8)}"
            body: dict[str, Any] = {"request_id": request_id, "twin": twin, "since": since,
                                    "until": until if until is not None else time.time() + 86400,
                                    "limit": page}
            if after is not None:
                body["after"] = after
            reply = await self.bus.request(
                self.bus.topics.query(self.name), encode("history_query", body),
                self.bus.topics.replies(self.name, request_id), timeout=timeout,
            )
            env = decode(reply, "history_reply")
            if "error" in env.body:
                raise HistoryUnavailable(f"history of {twin!r}: {env['error']}")
            for entry in env["items"]:
                opened = self.try_open(entry["item"], entry["key"])
                if opened is not None:
                    out.append(opened)
            after = env.get("more")
            if after is None:
                return out

    def open_desired(self, doc: bytes, key: bytes) -> DesiredDoc:
        """Open a ``desired_set`` envelope with the wrap addressed to this reader (a writer's
        permit is checked as of the write: it may have expired since)."""
        env = decode(doc, "desired_set")
        return open_desired(env, key, self.pre, self.owner_key(env["twin"]), now=env["time"])

    def open_reported(self, doc: bytes, key: bytes) -> ReportedDoc:
        """Open a ``reported_set`` envelope with the wrap addressed to this reader."""
        env = decode(doc, "reported_set")
        return open_reported(env, key, self.pre, self.owner_key(env["twin"]))

    def _try(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, or None (counted, logged with the reason) if it is unreadable."""
        try:
            return fn(*args)
        except _UNREADABLE as exc:
            self.unreadable += 1
            log.warning("reader.state_refused", reader=self.name, doc=what,
                        reason=f"{type(exc).__name__}: {exc}")
            return None

    async def state(self, twin: str, timeout: float = 15.0) -> TwinState:
        """The twin's current desired and reported documents (opened and checked here)."""
        request_id = f"s{secrets.token_hex(8)}"
        reply = await self.bus.request(
            self.bus.topics.query(self.name),
            encode("state_query", {"request_id": request_id, "twin": twin}),
            self.bus.topics.replies(self.name, request_id), timeout=timeout)
        env = decode(reply, "state_reply")
        if env.get("error") is not None:
            raise StateUnavailable(f"state of {twin!r}: {env['error']}")
        desired = reported = None
        if env.get("desired") is not None and env.get("desired_key") is not None:
            desired = self._try("desired", self.open_desired, env["desired"], env["desired_key"])
        if env.get("reported") is not None and env.get("reported_key") is not None:
            reported = self._try("reported", self.open_reported, env["reported"],
                                 env["reported_key"])
        for doc, what in ((desired, "desired"), (reported, "reported")):
            if doc is not None and doc.twin != twin:
                raise ValidationError(f"the cloud answered with the {what} state of {doc.twin!r}")
        return TwinState(
            twin=twin,
            desired_version=desired.version if desired else env["desired_version"],
            reported_version=reported.version if reported else env["reported_version"],
            in_sync=env["in_sync"], desired=desired, reported=reported,
            delta=state_delta(desired, reported))

    def open_state_update(self, env: Any) -> StateChange | None:
        """A ``state_update`` opened (None, logged, if it is unreadable or not this twin's)."""
        try:
            inner = decode(env["doc"], ("desired_set", "reported_set"))
        except CipherTwinError as exc:
            self.unreadable += 1
            log.warning("reader.state_refused", reader=self.name, reason=str(exc))
            return None
        if inner.kind == "desired_set":
            desired = self._try("desired", self.open_desired, env["doc"], env["key"])
            reported = None
            opened: Any = desired
        else:
            reported = self._try("reported", self.open_reported, env["doc"], env["key"])
            desired = None
            opened = reported
        if opened is None:
            return None
        if opened.twin != env["twin"]:
            log.warning("reader.state_refused", reader=self.name, reason="twin mismatch")
            self.unreadable += 1
            return None
        return StateChange(env["twin"], env["desired_version"], env["reported_version"],
                           env["in_sync"], desired, reported)

    async def watch(self, twin: str) -> AsyncIterator[OpenedItem]:
        """Live items of ``twin`` as the cloud streams them to this principal."""
        async for event in self.watch_all(twin):
            if isinstance(event, OpenedItem):
                yield event

    async def watch_all(self, twin: str) -> AsyncIterator[OpenedItem | StateChange]:
        """Live items and state changes (desired set, device reported) of ``twin``."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(10_000)

        async def on_item(topic: str, payload: bytes, retain: bool) -> None:
            await queue.put(payload)

        topic = self.bus.topics.stream(twin, self.name)
        await self.bus.subscribe(topic, on_item)
        try:
            while True:
                payload = await queue.get()
                try:
                    env = decode(payload, ("stream_items", "state_update"))
                except CipherTwinError as exc:
                    log.warning("reader.stream_refused", reason=str(exc))
                    continue
                if env.kind == "state_update":
                    change = self.open_state_update(env)
                    if change is not None:
                        yield change
                    continue
                for entry in env["items"]:
                    opened = self.try_open(entry["item"], entry["key"])
                    if opened is not None:
                        yield opened
        finally:
            await self.bus.unsubscribe(topic)
