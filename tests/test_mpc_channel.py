"""The secure node-to-node channel: encryption, chunking, and what the network may do to it.

Runs real jobs through :class:`SecureTransport` over an in-process broker whose interceptor
drops, duplicates, delays (reorders), alters or misroutes frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import numpy as np
import pytest

from ciphertwin.crypto import wire
from ciphertwin.mpc_nodes.errors import (
    MessageTimeoutError,
    RosterError,
    TamperedMessageError,
    UnexpectedRoundError,
)
from ciphertwin.mpc_nodes.local_cluster import run_parties
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.prf import new_run_nonce, run_digest
from ciphertwin.mpc_nodes.protocols.arithmetic import mul
from ciphertwin.mpc_nodes.protocols.bitslice import unslice
from ciphertwin.mpc_nodes.protocols.boolean import ltz
from ciphertwin.mpc_nodes.roster import NodeIdentity, Roster, RosterEntry
from ciphertwin.mpc_nodes.ring import to_ring
from ciphertwin.mpc_nodes.shares import ArithShare, reconstruct_bool, split_replicated
from ciphertwin.mpc_nodes.transport.framebus import Interceptor, MemoryFrameBus
from ciphertwin.mpc_nodes.transport.secure import FRAME_FIELDS, FRAME_TAG, SecureTransport

VALUES = to_ring(np.arange(-700, 700, dtype=np.int64))  # 1,400 elements: multi-chunk payloads


def identities() -> tuple[list[NodeIdentity], Roster]:
    ids = [NodeIdentity.generate(i, f"node-{i}") for i in range(3)]
    return ids, Roster([i.entry() for i in ids])


def frame_header(data: bytes) -> dict[str, Any]:
    f = wire.decode(data, FRAME_TAG, FRAME_FIELDS, max_bytes=1 << 20)
    return {k: f.raw(k) for k in FRAME_FIELDS}


async def secure_parties(
    bus: MemoryFrameBus, job: str = "job-sec", timeout_s: float = 5.0, roster_ids: Any = None
) -> tuple[list[Party], list[SecureTransport]]:
    ids, roster = roster_ids or identities()
    run = run_digest([new_run_nonce() for _ in range(3)])
    transports = [
        await SecureTransport(job=job, identity=ids[i], roster=roster, bus=bus, timeout_s=timeout_s,
                              chunk_bytes=1024, max_rounds=16, run=run).start()
        for i in range(3)
    ]
    return [Party(i, job, t, *t.secrets(), run=run) for i, t in enumerate(transports)], transports


async def square_then_sign(party: Party, s: ArithShare) -> Any:
    return await ltz(party, (await mul(party, s, s)).add_public(-10_000), 32)


async def run_job(interceptor: Interceptor | None = None, *, timeout_s: float = 5.0,
                  bus: MemoryFrameBus | None = None) -> tuple[list[int], list[SecureTransport], MemoryFrameBus]:
    bus = bus or MemoryFrameBus(interceptor)
    parties, transports = await secure_parties(bus, timeout_s=timeout_s)
    outs = await run_parties(parties, square_then_sign, split_replicated(VALUES))
    bits = unslice(reconstruct_bool(outs), VALUES.size).tolist()
    return bits, transports, bus


EXPECTED = [int(v * v < 10_000) for v in range(-700, 700)]


async def test_clean_run_is_correct_and_encrypted() -> None:
    seen: list[bytes] = []

    def spy(topic: str, data: bytes) -> list[tuple[str, bytes]]:
        seen.append(data)
        return [(topic, data)]

    bits, transports, bus = await run_job(spy)
    assert bits == EXPECTED
    assert bus.published > 3 * 5  # chunked: payloads of ~11 KB in 1 KiB chunks
    # the broker sees no share: no 8-byte window of any share array appears in any frame
    plain_words = {VALUES[i].tobytes() for i in range(0, VALUES.size, 97)}
    assert not any(w in frame for w in plain_words for frame in seen)
    assert all(t.stats.wire_bytes_sent > t.stats.bytes_sent for t in transports)


async def test_duplicated_frames_are_ignored() -> None:
    bits, transports, _ = await run_job(lambda t, d: [(t, d), (t, d)])
    assert bits == EXPECTED
    assert sum(t.duplicates for t in transports) > 0


async def test_reordered_frames_are_reassembled() -> None:
    bus = MemoryFrameBus()
    pending: list[asyncio.Task[None]] = []

    async def later(topic: str, data: bytes) -> None:
        await asyncio.sleep(os.urandom(1)[0] / 255 * 0.02)  # 0–20 ms: chunks and rounds cross
        await bus.deliver(topic, data)

    def delay(topic: str, data: bytes) -> list[tuple[str, bytes]]:
        pending.append(asyncio.create_task(later(topic, data)))
        return []

    bus.interceptor = delay
    bits, _, _ = await run_job(bus=bus)
    assert bits == EXPECTED


async def test_dropped_frame_times_out_with_a_clear_error() -> None:
    def drop_one(topic: str, data: bytes) -> list[tuple[str, bytes]]:
        h = frame_header(data)
        return [] if (h["r"], h["f"], h["c"]) == (2, 1, 2) else [(topic, data)]

    with pytest.raises(MessageTimeoutError, match=r"of node 1's round-2 message"):
        await run_job(drop_one, timeout_s=0.5)


async def test_tampered_frame_stops_the_job_at_once() -> None:
    def flip(topic: str, data: bytes) -> list[tuple[str, bytes]]:
        h = frame_header(data)
        if (h["r"], h["f"], h["c"]) == (0, 2, 0):
            ct = bytearray(h["ct"])
            ct[5] ^= 0x01
            data = wire.encode(FRAME_TAG, {**h, "ct": bytes(ct)})
        return [(topic, data)]

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TamperedMessageError, match="failed authentication"):
        await run_job(flip, timeout_s=10.0)
    assert loop.time() - start < 5.0  # detected, not timed out


@pytest.mark.parametrize("field", ["r", "c", "to", "len"])
async def test_relabelled_frame_fails_authentication(field: str) -> None:
    def relabel(topic: str, data: bytes) -> list[tuple[str, bytes]]:
        h = frame_header(data)
        if (h["r"], h["f"]) == (1, 0) and h["c"] == 0:
            h = {**h, field: {"r": 4, "c": 1, "to": 1, "len": h["len"] + 1}[field]}
            return [(topic, wire.encode(FRAME_TAG, h))]
        return [(topic, data)]

    with pytest.raises(TamperedMessageError):
        await run_job(relabel, timeout_s=2.0)


async def test_frame_on_the_wrong_topic_is_rejected() -> None:
    def misroute(topic: str, data: bytes) -> list[tuple[str, bytes]]:
        if frame_header(data)["f"] == 1:
            topic = topic.replace("/node-1/", "/node-0/")  # claims another sender
        return [(topic, data)]

    with pytest.raises(TamperedMessageError):
        await run_job(misroute, timeout_s=2.0)


async def test_garbage_frame_is_rejected() -> None:
    bus = MemoryFrameBus()
    _, transports = await secure_parties(bus)
    topic = transports[0].topics.mpc("job-sec", "node-1", "node-0")
    for junk in (b"", b"\xc1", os.urandom(100), wire.encode(FRAME_TAG, {"job": "job-sec"})):
        with pytest.raises(TamperedMessageError, match="malformed"):
            transports[0].open_frame(topic, junk)
    with pytest.raises(TamperedMessageError, match="oversized"):
        transports[0].open_frame(topic, b"x" * (1024 + 600))


async def test_frames_of_another_job_are_rejected_but_do_not_stop_this_one() -> None:
    ids = identities()
    other_bus = MemoryFrameBus()
    other, _ = await secure_parties(other_bus, job="job-old", roster_ids=ids)
    recorded: list[bytes] = []
    other_bus.interceptor = lambda t, d: recorded.append(d) or [(t, d)]
    await run_parties(other, square_then_sign, split_replicated(VALUES))

    bus = MemoryFrameBus()
    parties, transports = await secure_parties(bus, job="job-sec", roster_ids=ids)
    topic = transports[1].topics.mpc("job-sec", "node-2", "node-1")
    for frame in recorded[:5]:
        await bus.deliver(topic, frame)  # replayed into the new job's topic
    assert len(transports[1].rejected) == 5
    assert "job 'job-old'" in transports[1].rejected[0]
    outs = await run_parties(parties, square_then_sign, split_replicated(VALUES))
    assert unslice(reconstruct_bool(outs), VALUES.size).tolist() == EXPECTED


async def test_round_beyond_the_job_is_an_error() -> None:
    bus = MemoryFrameBus()
    parties, transports = await secure_parties(bus)
    await transports[1].send(0, 40, b"hello")  # max_rounds is 16
    with pytest.raises(UnexpectedRoundError, match="round 40"):
        await transports[0].recv(1, 0)


async def test_payload_sizes_are_checked() -> None:
    bus = MemoryFrameBus()
    parties, transports = await secure_parties(bus)
    await transports[1].send(0, 0, b"\x00" * 24)  # 3 words where party 0 expects 4
    with pytest.raises(Exception, match="expected 32"):
        await parties[0].exchange(None, (4,))


def test_roster_rejects_swapped_keys_and_wrong_identities() -> None:
    ids, roster = identities()
    entry = ids[1].entry()
    forged = dataclasses.replace(entry, kx_public=ids[2].entry().kx_public)
    with pytest.raises(RosterError, match="rejected"):
        Roster([ids[0].entry(), forged, ids[2].entry()])
    with pytest.raises(RosterError):
        Roster([ids[0].entry(), ids[1].entry()])
    with pytest.raises(RosterError):
        Roster([ids[0].entry(), ids[0].entry(), ids[2].entry()])
    with pytest.raises(RosterError):
        roster.pair_secret(NodeIdentity.generate(1, "node-1"), 0)  # not the listed key
    assert RosterEntry.from_bytes(entry.to_bytes()) == entry
    blob = bytearray(entry.to_bytes())
    blob[-3] ^= 1
    with pytest.raises(RosterError):
        RosterEntry.from_bytes(bytes(blob))


def test_pair_secrets_agree_and_differ() -> None:
    ids, roster = identities()
    s01, s10 = roster.pair_secret(ids[0], 1), roster.pair_secret(ids[1], 0)
    assert s01 == s10 and s01 != roster.pair_secret(ids[0], 2)
    prev1, next0 = roster.secrets_for(ids[1])[0], roster.secrets_for(ids[0])[1]
    assert prev1 == next0

