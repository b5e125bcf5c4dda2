"""Ingest pipeline mechanics: raw-bytes signature checks for the pool, acks of all devices in
flight together, and commits that do not wait for the previous batch's acks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgpack

from ciphertwin.bus.envelope import decode
from ciphertwin.cloud_twin.ingest import (
    BAD_SIGNATURE,
    CHECK_FAILED,
    BatchResult,
    IngestPipeline,
    expensive_checks,
)
from ciphertwin.cloud_twin.store import SqliteTwinStore
from ciphertwin.cloud_twin.trust import TrustRegistry
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.protocol.items import DeviceCredentials, build_item

OWNER_PRE, OWNER_SIG = PreKeyPair.generate(), SigningKey.generate()


def _device(twin: str, name: str) -> tuple[DeviceCredentials, DataKeyManager]:
    key = SigningKey.generate()
    token = issue_write_token(OWNER_SIG, twin, key.verify_key, ["twin:*", "type:*"],
                              device=name, valid_for_s=3600)
    return DeviceCredentials(twin, name, key, token.to_bytes()), DataKeyManager(OWNER_PRE.public)


def _items(twin: str, name: str, seqs: range) -> tuple[bytes, list[bytes]]:
    creds, keys = _device(twin, name)
    reading = {"type": "temperature", "values": {"c": 1}, "time": time.time()}
    attrs = (f"twin:{twin}", "type:temperature")
    return creds.signing_key.verify_key.raw, [build_item(creds, keys, s, reading, attrs)
                                              for s in seqs]


def test_expensive_checks_take_raw_envelope_bytes() -> None:
    device_key, (first, second) = _items("t1", "d1", range(1, 3))
    body = msgpack.unpackb(second, raw=False)
    body["seq"] = 99  # signature no longer covers the fields
    forged = msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
    wrong_owner = b"\x00" * 16
    owner_id = OWNER_PRE.public.key_id
    assert expensive_checks([(first, device_key, owner_id), (second, device_key, owner_id),
                             (forged, device_key, owner_id)]) == [None, None, BAD_SIGNATURE]
    assert expensive_checks([(first, device_key, wrong_owner)]) == [
        "capsule is not under the twin owner's key"]
    # bytes that never passed decode (a bug, not an input) fail one item, not the batch
    assert expensive_checks([(b"\xc1", device_key, owner_id), (first, device_key, owner_id)]
                            ) == [CHECK_FAILED, None]


class _Acks:
    """publish_ack that records calls and can be held back."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.seqs: dict[tuple[str, str], set[int]] = {}
        self.release = asyncio.Event()

    async def __call__(self, twin: str, device: str, payload: bytes) -> None:
        self.started.append((twin, device))
        await self.release.wait()
        self.seqs.setdefault((twin, device), set()).update(decode(payload, "ack")["seqs"])


async def _pipeline(tmp_path: Path, acks: Callable[[str, str, bytes], Awaitable[None]]
                    ) -> tuple[IngestPipeline, SqliteTwinStore]:
    store = SqliteTwinStore(tmp_path / "cloud.sqlite")
    await store.open()
    trust = TrustRegistry(store)
    await trust.register_owner("alice", OWNER_SIG.verify_key, OWNER_PRE.public)

    async def on_stored(items: object) -> None:
        return None

    return IngestPipeline(store, trust, acks, on_stored), store


async def _until(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_acks_of_all_devices_are_in_flight_together(tmp_path: Path) -> None:
    acks = _Acks()
    pipeline, store = await _pipeline(tmp_path, acks)
    try:
        result = BatchResult()
        for d in range(5):
            result.acks[("t", f"d{d}")] = [1, 2]
        finishing = asyncio.create_task(pipeline.finish(result))
        await _until(lambda: len(acks.started) == 5)  # none waited for another's PUBACK
        acks.release.set()
        await finishing
        assert acks.seqs == {("t", f"d{d}"): {1, 2} for d in range(5)}
    finally:
        await store.close()


async def test_commits_go_on_while_acks_are_pending(tmp_path: Path) -> None:
    acks = _Acks()
    pipeline, store = await _pipeline(tmp_path, acks)
    _, first = _items("t1", "d1", range(1, 21))
    _, second = _items("t2", "d2", range(1, 21))
    runner = asyncio.create_task(pipeline.run())
    try:
        for payload in first:
            await pipeline.submit("t1", payload)
        await _until(lambda: pipeline.stored == 20)
        for payload in second:  # the first batch's ack is still held back
            await pipeline.submit("t2", payload)
        await _until(lambda: pipeline.stored == 40)
        assert not acks.seqs
        acks.release.set()
        await _until(lambda: acks.seqs == {("t1", "d1"): set(range(1, 21)),
                                           ("t2", "d2"): set(range(1, 21))})
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()


async def test_finish_failure_is_logged_and_ingest_goes_on(tmp_path: Path) -> None:
    acks = _Acks()
    acks.release.set()
    pipeline, store = await _pipeline(tmp_path, acks)

    async def broken_fan_out(items: object) -> None:
        raise RuntimeError("fan-out down")

    pipeline._on_stored = broken_fan_out  # noqa: SLF001
    _, items = _items("t1", "d1", range(1, 4))
    runner = asyncio.create_task(pipeline.run())
    try:
        for i, payload in enumerate(items):
            await pipeline.submit("t1", payload)
            await _until(lambda i=i: acks.seqs.get(("t1", "d1"), set()) >= {i + 1})
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()


async def test_signatures_of_known_devices_are_checked_while_decoding(tmp_path: Path) -> None:
    acks = _Acks()
    acks.release.set()
    pipeline, store = await _pipeline(tmp_path, acks)
    _, items = _items("t1", "d1", range(1, 6))
    body = msgpack.unpackb(items[4], raw=False)
    body["seq"] = 99  # the signature no longer covers the fields
    forged = msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
    try:
        first = pipeline.prepare([("t1", items[0])])
        assert first.speculative == [None]  # its write token is new: checked in stage 2
        assert len((await pipeline.check_and_store(first)).accepted) == 1
        later = pipeline.prepare([("t1", p) for p in (*items[1:4], forged)])
        assert all(w is not None for w in later.speculative)  # token known: pool at once
        result = await pipeline.check_and_store(later)
        assert [a.seq for a in result.accepted] == [2, 3, 4]
        assert pipeline.rejected == 1 and not result.refusals  # forger is not told
    finally:
        await store.close()


async def test_large_acks_are_split_within_the_kind_limits(tmp_path: Path) -> None:
    acks = _Acks()
    acks.release.set()
    pipeline, store = await _pipeline(tmp_path, acks)
    try:
        result, later = BatchResult(), BatchResult()
        result.acks[("t", "d")] = list(range(1, 1501))
        later.acks[("t", "d")] = list(range(1501, 2001))
        later.refusals[("t", "d")] = [{"seq": s, "reason": "x" * 256} for s in range(1, 1201)]
        result.absorb(later)  # what the finisher does with batches that queued up
        await pipeline.finish(result)
        assert acks.started == [("t", "d")] * 2
        assert acks.seqs == {("t", "d"): set(range(1, 2001))}
    finally:
        await store.close()


async def test_items_overtaking_their_capsule_are_not_refused_and_store_on_resend(
        tmp_path: Path) -> None:
    """The epoch's capsule travels in its first item; if that one is lost or overtaken, the
    later items must not get a (final) refusal — the device resends them after the capsule."""
    told: list[dict[str, object]] = []
    stored: set[int] = set()

    async def publish_ack(twin: str, device: str, payload: bytes) -> None:
        ack = decode(payload, "ack")
        stored.update(ack["seqs"])
        told.extend(ack["rejected"])

    pipeline, store = await _pipeline(tmp_path, publish_ack)
    try:
        _, (first, second, third) = _items("t1", "d1", range(1, 4))
        assert await pipeline.process([("t1", second), ("t1", third)]) == []
        assert told == [] and stored == set()
        accepted = await pipeline.process([("t1", first), ("t1", second), ("t1", third)])
        assert len(accepted) == 3 and stored == {1, 2, 3} and told == []
    finally:
        await store.close()
