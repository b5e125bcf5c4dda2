"""The MPC engine over a real MQTT broker (Mosquitto on 127.0.0.1:1883)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import pytest

from ciphertwin.mpc_nodes.engine import expected_rounds, load_inputs, run_function
from ciphertwin.mpc_nodes.errors import MessageTimeoutError
from ciphertwin.mpc_nodes.functions import get_function
from ciphertwin.mpc_nodes.layout import Layout
from ciphertwin.mpc_nodes.output import OutputShare, combine_outputs
from ciphertwin.mpc_nodes.prf import new_run_nonce, run_digest
from ciphertwin.mpc_nodes.roster import NodeIdentity, Roster
from ciphertwin.mpc_nodes.ring import to_ring
from ciphertwin.mpc_nodes.shares import split_additive
from ciphertwin.mpc_nodes.transport.mqtt import mqtt_party

pytestmark = pytest.mark.mosquitto

PARAMS = {"radius": 50, "coord_bits": 16}


def workload(users: int, points: int) -> tuple[dict[str, np.ndarray], Layout]:
    """Every user and the reference with one reading in each of ``points`` epochs (flat
    per-reading vectors ordered by row, then epoch, and their public layout)."""
    rnd = lambda shape, b: (np.frombuffer(os.urandom(8 * int(np.prod(shape))), np.uint64)  # noqa: E731
                            % np.uint64(2 * b)).astype(np.int64).reshape(shape) - b
    ref_x, ref_y = rnd((points,), 30_000), rnd((points,), 30_000)
    user_x, user_y = ref_x + rnd((users, points), 80), ref_y + rnd((users, points), 80)
    epochs = np.arange(points)
    layout = Layout.build(points, user=(users, np.repeat(np.arange(users), points), np.tile(epochs, users)),
                          reference=(1, np.zeros(points, np.int64), epochs))
    return {"ref_x": ref_x, "ref_y": ref_y, "user_x": user_x.ravel(), "user_y": user_y.ravel()}, layout


async def test_contact_tracing_over_mosquitto() -> None:
    plain, layout = workload(200, 20)  # 4,000 pairs; 8 KiB chunks make every payload multi-chunk
    per_node: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for key, values in plain.items():
        for i, s in enumerate(split_additive(values)):
            per_node[i][key] = s
    ids = [NodeIdentity.generate(i, f"t-node{i}") for i in range(3)]
    roster = Roster([i.entry() for i in ids])
    job = f"t-{os.urandom(4).hex()}"
    run = run_digest([new_run_nonce() for _ in range(3)])

    async def node(i: int) -> tuple[OutputShare, int, Any]:
        async with mqtt_party(job, ids[i], roster, run=run, chunk_bytes=8 * 1024,
                              timeout_s=20) as party:
            await asyncio.sleep(0.3)  # every node subscribed before the first round
            inputs = await load_inputs(party, "contact_tracing", PARAMS, per_node[i], layout)
            out = await run_function(party, "contact_tracing", PARAMS, inputs, layout)
            await asyncio.sleep(0.2)
            return out, party.round, party.transport

    results = await asyncio.gather(*(node(i) for i in range(3)))
    opened = combine_outputs([r[0] for r in results])
    spec = get_function("contact_tracing")
    ref = spec.reference(spec.parse(PARAMS), {k: to_ring(v) for k, v in plain.items()}, layout)
    assert np.array_equal(opened, ref) and ref.sum() > 0
    assert results[0][1] == expected_rounds("contact_tracing", PARAMS, layout)
    assert all(r[2].stats.wire_bytes_sent > 8 * 1024 for r in results)  # several chunks each


async def test_silent_peer_times_out_over_mosquitto() -> None:
    ids = [NodeIdentity.generate(i, f"s-node{i}") for i in range(3)]
    roster = Roster([i.entry() for i in ids])
    job = f"s-{os.urandom(4).hex()}"
    async with mqtt_party(job, ids[0], roster, run=bytes(32), timeout_s=0.5) as party:
        with pytest.raises(MessageTimeoutError, match="node 1"):
            await party.exchange(np.zeros(4, dtype=np.uint64), (4,))
