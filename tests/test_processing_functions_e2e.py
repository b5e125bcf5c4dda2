"""Every registered function end to end over the bus (the demo world, embedded broker):
devices encode as declared, split, seal and upload at real times; the cloud re-encrypts; three
nodes compute; the receiver opens — and the result equals the plaintext reference written
from the definition (:mod:`ciphertwin.demo.plaintext`), never from the MPC's arrays.

The aggregates' data has what real twins have: negative and fractional values, readings out of
time order, several in one epoch, values on a threshold or an edge, a reading outside the job
window, and a twin without readings in the window (sum 0, mean None, empty histogram).
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest

from ciphertwin.agents.share_mode import ShareMode
from ciphertwin.demo import plaintext
from ciphertwin.demo.contact_tracing import (
    add_owners, epoch_policy, permit_all, plaintext_reference, prepare, process, random_paths,
    run_job, start_world, sync_phones,
)
from ciphertwin.mpc_nodes.functions.registry import REGISTRY
from ciphertwin.protocol.jobs import DEFAULT_FIELDS

DAY = (int(time.time()) // 86400 - 1) * 86400
SINCE, UNTIL = float(DAY + 3600), float(DAY + 3600 + 20 * 60)
ENC = DEFAULT_FIELDS["sum"]["v"]  # "1", 1/65536, ±2^30: what the CLI declares
E = lambda v: round(v * (1 << ENC.frac))  # noqa: E731  # params are in encoded units

SERIES = {  # twin -> [(seconds after SINCE, value)], deliberately out of order
    "meter-a": [(600, 7.75), (0, 1.5), (61, -2.25), (62, 3.0), (1199, 2.5), (300, 1e6),
                (1300, 99.0)],  # the last one is after the window: not part of the job
    "meter-b": [(30, -0.5), (30, -0.5), (31, 0.0), (900, 1.0), (905, -1e6 + 0.125)],
    "meter-idle": [(-45, 5.0)],  # only before the window: no readings in the job
}
PARAMS = {
    "sum": {"frac_bits": ENC.frac},
    "mean": {"frac_bits": ENC.frac},
    "count_above": {"threshold": E(2.5), "value_bits": ENC.bound.bit_length()},
    "histogram": {"edges": [E(-10), E(0), E(1), E(5), E(1e5)],
                  "value_bits": ENC.bound.bit_length()},
}


def _readings(twin: str) -> list[dict]:
    return [{"type": "meter", "time": SINCE + dt, "values": {"v": v}} for dt, v in SERIES[twin]]


async def test_every_registered_function_matches_the_definition() -> None:
    assert set(REGISTRY) == {"contact_tracing", *PARAMS}, "a new function needs a test here"
    twins = list(SERIES)
    plain = {t: [(SINCE + dt, v) for dt, v in SERIES[t]] for t in twins}
    async with AsyncExitStack() as stack:
        w = await start_world(stack, pool_workers=2, rtt_ms=0)
        phones = await stack.enter_async_context(w.client("phones"))
        owners = await stack.enter_async_context(w.client("owners"))

        # contact tracing, through the demo's own flow
        paths = random_paths(4, 8, 5.0, seed=2)
        t0, _ = await prepare(w, paths, 2, owners, phones)
        status, result = await process(w, paths, 5.0, t0, owners, timeout=120)
        assert status["state"] == "done", status.get("reason")
        assert result.as_dict() == plaintext_reference(paths, 5.0)

        # the aggregates: meters with a declared "v" (prepare subscribed the owners' replies)
        await add_owners(w, twins, epoch_policy(20, 4), owners, SINCE - 3600)
        for t in twins:
            w.phones[t].mode = ShareMode({"v": ENC})
        await permit_all(w, twins, "type:meter", ["aggregate", "distribution"], owners)
        await sync_phones(w, {t: _readings(t) for t in twins}, phones)
        inputs = [(w.phones[t].owner, t, "user") for t in twins]
        points = max(len(s) for s in SERIES.values())
        for function, params in PARAMS.items():
            status, result = await run_job(w, owners, function, params, inputs, points, SINCE,
                                           UNTIL, fields={"v": ENC.as_dict()}, timeout=120)
            assert status["state"] == "done", (function, status.get("reason"))
            want = plaintext.aggregate(function, plain, encoding=ENC, params=params,
                                       since=SINCE, until=UNTIL)
            got = result.as_dict()
            assert list(got) == twins, function  # one row per user twin, in spec order, verbatim
            assert got == want, function  # exact: the values are binary fractions
        # no parameters given: the declared encoding implies frac_bits at submission, and the
        # receiver decodes with the parameters the nodes signed into their result shares
        status, result = await run_job(w, owners, "mean", {}, inputs, points, SINCE, UNTIL,
                                       fields={"v": ENC.as_dict()}, timeout=120)
        assert status["state"] == "done", status.get("reason")
        assert result.as_dict() == plaintext.aggregate("mean", plain, encoding=ENC, params={},
                                                       since=SINCE, until=UNTIL)
        # the definition, by hand, for the rows that test the edges
        assert want["meter-idle"] == [0, 0, 0, 0]
        sums = plaintext.aggregate("sum", plain, encoding=ENC, params={}, since=SINCE, until=UNTIL)
        means = plaintext.aggregate("mean", plain, encoding=ENC, params={}, since=SINCE, until=UNTIL)
        counts = plaintext.aggregate("count_above", plain, encoding=ENC, params=PARAMS["count_above"],
                                     since=SINCE, until=UNTIL)
        assert sums["meter-a"] == 1.5 - 2.25 + 3.0 + 7.75 + 2.5 + 1e6 and sums["meter-idle"] == 0
        assert means["meter-idle"] is None and means["meter-b"] == pytest.approx(
            (-1.0 + 1.0 - 1e6 + 0.125) / 5)
        assert counts == {"meter-a": 3, "meter-b": 0, "meter-idle": 0}  # 2.5 is not above 2.5
