"""The re-encryption pool: one parse per capsule serves every grant, chunks keep a capsule's
pairs together, results come back in the order of the work, failures as reasons."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.cloud_twin.reencryption import ReencryptionPool, capsule_chunks, reencrypt_batch
from ciphertwin.crypto.kpcpre import (
    EncodedCapsule, PreKeyPair, ReCapsule, decapsulate_receiver, encapsulate, reencrypt_capsule,
    rekey,
)

OWNER, OTHER = PreKeyPair.generate(), PreKeyPair.generate()
NODES = [PreKeyPair.generate() for _ in range(3)]
RKS = [rekey(OWNER, f"share:{i} AND type:location", n.public) for i, n in enumerate(NODES)]
ATTRS = ["share:0", "share:1", "share:2", "type:location", "day:1"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=60), st.integers(1, 5))
def test_chunks_cover_every_index_once_and_never_split_a_capsule(caps: list[int], parts: int) -> None:
    work = [(b"rk", bytes([c])) for c in caps]
    chunks = capsule_chunks(work, parts)
    assert sorted(i for c in chunks for i in c) == list(range(len(work)))
    home = {work[i][1]: n for n, c in enumerate(chunks) for i in c}
    assert all(home[work[i][1]] == n for n, c in enumerate(chunks) for i in c)


def test_one_capsule_for_three_grants_equals_separate_reencryptions() -> None:
    capsule, key = encapsulate(OWNER.public, ATTRS)
    raw = capsule.to_bytes()
    got = reencrypt_batch([(rk.to_bytes(), raw) for rk in RKS])
    for rk, node, out in zip(RKS, NODES, got, strict=True):
        assert isinstance(out, bytes)
        assert out == reencrypt_capsule(rk, capsule).to_bytes()  # parsed once or not: same
    shared = EncodedCapsule(raw)
    assert shared.capsule_id == capsule.capsule_id
    assert all(decapsulate_receiver(n, ReCapsule.from_bytes(o)) == key
               for n, o in zip(NODES, got, strict=True) if isinstance(o, bytes))


def test_failures_come_back_as_reasons_in_place() -> None:
    good, _ = encapsulate(OWNER.public, ATTRS)
    other, _ = encapsulate(OTHER.public, ATTRS)
    unsatisfied, _ = encapsulate(OWNER.public, ["share:0", "day:1"])
    work = [(RKS[0].to_bytes(), good.to_bytes()), (RKS[0].to_bytes(), b"\x80garbage"),
            (RKS[1].to_bytes(), other.to_bytes()), (RKS[2].to_bytes(), unsatisfied.to_bytes()),
            (RKS[2].to_bytes(), b"\x80garbage"), (RKS[1].to_bytes(), good.to_bytes())]
    out = reencrypt_batch(work)
    assert isinstance(out[0], bytes) and isinstance(out[5], bytes)
    assert out[1].startswith("ValidationError") and out[4] == out[1]
    assert out[2].startswith("KeyMismatch")
    assert out[3].startswith("PolicyNotSatisfied")


def test_pool_returns_results_in_work_order() -> None:
    capsules = [encapsulate(OWNER.public, ATTRS)[0] for _ in range(4)]
    # interleaved on purpose: chunking regroups by capsule, the answer must not be reordered
    work = [(rk.to_bytes(), c.to_bytes()) for rk in RKS for c in capsules]
    pool = ReencryptionPool(2, processes=False)
    try:
        out = asyncio.run(pool.reencrypt(work))
    finally:
        pool.close()
    expected = [reencrypt_capsule(rk, c).to_bytes() for rk in RKS for c in capsules]
    assert out == expected
