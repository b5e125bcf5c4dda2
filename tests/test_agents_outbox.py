"""The device outbox: ordering, acknowledgement, seq discipline, and durability under SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ciphertwin.agents.outbox import Outbox, OutboxError, OutboxFull
from ciphertwin.errors import ValidationError

REPO = Path(__file__).resolve().parent.parent


async def test_append_pending_acknowledge_in_order(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        seqs = [await ob.append(b"item-%d" % i) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5] and await ob.count() == 5
        assert await ob.pending(3) == [(1, b"item-0"), (2, b"item-1"), (3, b"item-2")]
        assert await ob.pending(10, after=3) == [(4, b"item-3"), (5, b"item-4")]
        # Only the acknowledged ones go; unknown and repeated acks are harmless.
        assert await ob.acknowledge([2, 4, 4, 99]) == 2
        assert await ob.acknowledge([2]) == 0
        assert [s for s, _ in await ob.pending(10)] == [1, 3, 5]
        assert await ob.acknowledge_through(3) == 2
        assert await ob.pending(10) == [(5, b"item-4")] and await ob.count() == 1


async def test_seq_is_never_reused_across_deletion_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path) as ob:
        for _ in range(3):
            await ob.append(b"x")
        await ob.acknowledge([1, 2, 3])
        assert await ob.count() == 0 and ob.last_seq == 3
    async with Outbox(path) as ob:
        assert ob.last_seq == 3 and await ob.count() == 0
        assert await ob.append(b"y") == 4


async def test_build_callable_embeds_the_seq_and_failure_consumes_nothing(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        assert await ob.append(lambda seq: b"envelope seq=%d" % seq) == 1

        async def build_async(seq: int) -> bytes:
            await asyncio.sleep(0)
            return b"async seq=%d" % seq

        assert await ob.append(build_async) == 2

        def failing(seq: int) -> bytes:
            raise RuntimeError("signing failed")

        with pytest.raises(RuntimeError):
            await ob.append(failing)
        with pytest.raises(ValidationError):
            await ob.append(lambda seq: "not bytes")  # type: ignore[arg-type, return-value]
        assert await ob.append(lambda seq: b"next seq=%d" % seq) == 3  # no gap
        assert await ob.pending(10) == [
            (1, b"envelope seq=1"), (2, b"async seq=2"), (3, b"next seq=3")]


async def test_concurrent_appends_get_distinct_consecutive_seqs(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:

        async def build(seq: int) -> bytes:
            await asyncio.sleep(0.001 * (seq % 3))  # interleave the builders
            return b"%d" % seq

        seqs = await asyncio.gather(*(ob.append(build) for _ in range(20)))
        assert sorted(seqs) == list(range(1, 21))
        assert all(p == b"%d" % s for s, p in await ob.pending(100))


async def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Outbox(tmp_path / "o.db", max_items=0)
    async with Outbox(tmp_path / "o.db") as ob:
        for payload in (b"", "text", 5, b"x" * (16 * 1024 * 1024 + 1)):
            with pytest.raises(ValidationError):
                await ob.append(payload)  # type: ignore[arg-type]
        for seqs in ([0], [-1], [True], ["1"], [1.0]):
            with pytest.raises(ValidationError):
                await ob.acknowledge(seqs)  # type: ignore[arg-type]
        for kwargs in ({"limit": 0}, {"limit": 10**6}, {"limit": 5, "after": -1},
                       {"limit": True}):
            with pytest.raises(ValidationError):
                await ob.pending(**kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await ob.acknowledge_through(0)
        assert await ob.count() == 0 and ob.last_seq == 0


async def test_max_items_refuses_until_acknowledged(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", max_items=2) as ob:
        await ob.append(b"a")
        await ob.append(b"b")
        with pytest.raises(OutboxFull):
            await ob.append(b"c")
        await ob.acknowledge([1])
        assert await ob.append(b"c") == 3


async def test_closed_corrupt_and_shared_outboxes_raise_outbox_error(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    with pytest.raises(OutboxError):
        await ob.append(b"x")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError):
        await Outbox(corrupt).open()
    with pytest.raises(OutboxError):
        await Outbox(tmp_path / "missing-dir" / "o.db").open()
    # Two agents on one file: the second writer notices instead of reusing a seq.
    async with Outbox(tmp_path / "o.db") as first, Outbox(tmp_path / "o.db") as second:
        assert await first.append(b"a") == 1
        with pytest.raises(OutboxError, match="another process"):
            await second.append(b"b")
        assert await first.pending(10) == [(1, b"a")]


async def test_file_is_in_wal_mode(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        await ob.append(b"a")
        with sqlite3.connect(tmp_path / "o.db") as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from ciphertwin.agents.outbox import Outbox
    from ciphertwin.log import configure_logging

    async def main():
        configure_logging()  # logs to stderr; stdout carries only the protocol
        ob = Outbox(sys.argv[1])
        await ob.open()
        await ob.acknowledge_through(ob.last_seq or 1)  # drain what a previous run left
        print("ready", ob.last_seq, flush=True)
        while True:
            seq = await ob.append(lambda s: b"item-%d" % s)
            print(seq, flush=True)  # reported only after append returned (committed)

    asyncio.run(main())
    """
)


def _run_and_kill(path: Path, appended: int) -> tuple[int, list[int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    try:
        head = proc.stdout.readline().split()
        assert head[0] == "ready", head
        seqs = [int(proc.stdout.readline()) for _ in range(appended)]
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to close or flush anything
        proc.wait(timeout=10)
    return int(head[1]), seqs


@pytest.mark.timeout(60)
async def test_appended_items_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    last_before, seqs = await asyncio.to_thread(_run_and_kill, path, 40)
    assert last_before == 0 and seqs == list(range(1, 41))
    async with Outbox(path) as ob:
        items = dict(await ob.pending(100_000))
        # Every append that returned is there, intact. The writer runs on until the kill
        # lands, so a few later appends may be there too — intact and without gaps.
        assert all(items[s] == b"item-%d" % s for s in items)
        extra = sorted(set(items) - set(seqs))
        assert set(seqs) <= set(items) and extra == list(range(41, 41 + len(extra)))
        last = ob.last_seq
        assert last == 40 + len(extra)
    # A second killed run continues after, never reusing a seq.
    last_before, seqs2 = await asyncio.to_thread(_run_and_kill, path, 10)
    assert last_before == last and seqs2 == list(range(last + 1, last + 11))
    async with Outbox(path) as ob:
        assert [s for s, _ in await ob.pending(100)][:10] == seqs2
