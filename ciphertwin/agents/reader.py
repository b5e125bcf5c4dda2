"""Reading a twin: history by request/response and live items from the stream topic.

Owners, receivers and devices all read the same way; only the key material differs (the
capsule itself for the owner, a re-encrypted capsule for a grantee). Data keys are cached per
capsule, so a key epoch costs one decapsulation however many items it holds. Every item is
authenticated end to end (device signatures, and the write token against the owner's key
when the reader knows it) — the cloud is not trusted to say who wrote what.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
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

log = structlog.get_logger(__name__)

_UNREADABLE = (ValidationError, DecryptionFailed, KeyMismatch, SignatureInvalid, TokenRejected)


class HistoryUnavailable(CipherTwinError):
    """The cloud answered a history query with an error: the query was refused (its reason
    says why) or the cloud's store failed (asking again later may work)."""


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

    async def watch(self, twin: str) -> AsyncIterator[OpenedItem]:
        """Live items of ``twin`` as the cloud streams them to this principal."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(10_000)

        async def on_item(topic: str, payload: bytes, retain: bool) -> None:
            await queue.put(payload)

        topic = self.bus.topics.stream(twin, self.name)
        await self.bus.subscribe(topic, on_item)
        try:
            while True:
                payload = await queue.get()
                try:
                    env = decode(payload, "stream_items")
                except CipherTwinError as exc:
                    log.warning("reader.stream_refused", reason=str(exc))
                    continue
                for entry in env["items"]:
                    opened = self.try_open(entry["item"], entry["key"])
                    if opened is not None:
                        yield opened
        finally:
            await self.bus.unsubscribe(topic)
