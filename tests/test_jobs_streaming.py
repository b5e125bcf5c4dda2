"""Job streaming helpers: batches cut at chunk limits, chunks split evenly, nothing lost."""

from __future__ import annotations

from ciphertwin.cloud_twin.jobs import _batches, _split
from ciphertwin.protocol.jobs import CHUNK_ITEMS, MAX_CHUNK_BYTES


def test_batches_keep_twin_order_and_chunk_limits() -> None:
    twins = [f"t{i}" for i in range(100)]
    sizes = [{t: [50, 50 * 2600] for t in twins} for _ in range(3)]
    batches = _batches(twins, sizes)
    assert [t for b, _ in batches for t in b] == twins
    for b, k in batches:
        assert k == 1 and 50 * len(b) <= CHUNK_ITEMS and 50 * 2600 * len(b) <= MAX_CHUNK_BYTES


def test_a_twin_larger_than_a_chunk_gets_several_chunks() -> None:
    sizes = [{"big": [5000, 5000 * 100], "small": [10, 1000]} for _ in range(3)]
    assert _batches(["big", "small"], sizes) == [(["big"], 3), (["small"], 1)]
    assert _batches([], sizes) == []


def test_split_covers_every_entry_once() -> None:
    entries = [{"item": bytes([i]), "key": b"k"} for i in range(7)]
    parts = _split(entries, 3)
    assert len(parts) == 3 and [e for p in parts for e in p] == entries
    assert _split([], 2) == [[], []]
