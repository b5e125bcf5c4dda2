"""One party's entire view is independent of the secrets (statistical test over many runs).

A party's view is its input shares plus every payload it receives. For two very different
secret vectors we run the contact-tracing kernel (multiplication, comparison, bit injection)
many times and compare, bit by bit, the distribution of each party's received payloads:
every bit must look like a fair coin under both secrets and the two frequencies must agree.
A negative control runs the same statistic on a leaky "view" (the opened comparison result)
and must fail, so the test is known to be able to fail.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ciphertwin.mpc_nodes.local_cluster import memory_parties, run_parties
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.protocols.arithmetic import inner
from ciphertwin.mpc_nodes.protocols.bitslice import unslice_bit
from ciphertwin.mpc_nodes.protocols.boolean import b2a_additive, ltz
from ciphertwin.mpc_nodes.ring import to_ring
from ciphertwin.mpc_nodes.shares import ArithShare, reconstruct_bool, split_replicated

RUNS = 300
BITS = 24
SECRET_A = to_ring([0, 0, 0, 0, 0, 0, 0, 0])
SECRET_B = to_ring([2047, -2047, 1, -1, 1000, 3, -900, 5])
R2 = 25


async def kernel(party: Party, x: ArithShare) -> tuple[np.ndarray, object]:
    d = await inner(party, [(x, x)], bits=BITS)
    close = await ltz(party, d.add_public(-R2), BITS)
    return await b2a_additive(party, close), close


def views(secret: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(bits of each party's received payloads per run, opened results per run)."""

    async def one() -> tuple[list[bytes], np.ndarray]:
        parties = memory_parties("privacy", keep_view=True)
        outs = await run_parties(parties, kernel, split_replicated(secret))
        opened = unslice_bit(reconstruct_bool([o[1] for o in outs])[0], secret.size)
        return [b"".join(p.log.received) for p in parties], opened

    async def many() -> list[tuple[list[bytes], np.ndarray]]:
        return [await one() for _ in range(RUNS)]

    runs = asyncio.run(many())
    per_party = [
        np.stack([np.unpackbits(np.frombuffer(r[0][i], dtype=np.uint8)) for r in runs])
        for i in range(3)
    ]  # per party: (run, bit)
    return per_party, np.stack([r[1] for r in runs])


def looks_independent(a: np.ndarray, b: np.ndarray) -> bool:
    """Every bit column a fair coin under both secrets, and the same under both.

    Per column: 7 sigma (a false alarm over ~10^5 columns has probability < 10^-6, while a bit
    that depends deterministically on the secret sits at ~17 sigma). Over all columns: the sum
    of squared z-scores must stay within 6 standard deviations of its chi-square mean, which
    catches weak leaks spread over many bits.
    """
    sigma = np.sqrt(0.25 / RUNS)
    za, zb = (a.mean(axis=0) - 0.5) / sigma, (b.mean(axis=0) - 0.5) / sigma
    zd = (za - zb) / np.sqrt(2)
    m = za.size
    per_column = max(np.abs(za).max(), np.abs(zb).max(), np.abs(zd).max()) < 7.0
    aggregate = all(abs(float((z * z).sum()) - m) < 6 * np.sqrt(2 * m) for z in (za, zb, zd))
    return bool(per_column and aggregate)


def test_each_party_view_is_independent_of_the_secret() -> None:
    view_a, opened_a = views(SECRET_A)
    view_b, opened_b = views(SECRET_B)
    for party in range(3):
        assert view_a[party].shape == view_b[party].shape and view_a[party].shape[1] > 1000
        assert looks_independent(view_a[party], view_b[party]), f"party {party}'s view leaks"
    # the computation itself is right in every run
    assert np.all(opened_a == 1) and np.all(opened_b == [0, 0, 1, 1, 0, 1, 0, 0])
    # negative control: a view that also contained the 8 result bits would be caught
    leaky_a = np.concatenate([view_a[1], opened_a.astype(np.uint8)], axis=1)
    leaky_b = np.concatenate([view_b[1], opened_b.astype(np.uint8)], axis=1)
    assert not looks_independent(leaky_a, leaky_b)
