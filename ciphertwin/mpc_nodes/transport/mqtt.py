"""A party whose rounds travel over MQTT: BusClient + SecureTransport + Party in one step.

    run = run_digest([nonce0, nonce1, nonce2])  # every node's fresh nonce for this run
    async with mqtt_party("job-7", identity, roster, run=run, host="127.0.0.1") as party:
        share = await run_function(party, "sum", {}, inputs)

The node service needs to subscribe *before* the nonces are known (it announces its own
nonce only once subscribed): it uses :func:`mqtt_transport`, then ``transport.set_run`` and
builds the :class:`Party` itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ciphertwin.bus.client import BusClient, unique_client_id
from ciphertwin.bus.topics import DEFAULT_PREFIX
from ciphertwin.mpc_nodes.party import Party
from ciphertwin.mpc_nodes.roster import NodeIdentity, Roster
from ciphertwin.mpc_nodes.transport.framebus import BusFrameBus
from ciphertwin.mpc_nodes.transport.secure import DEFAULT_CHUNK_BYTES, SecureTransport


@asynccontextmanager
async def mqtt_transport(
    job: str,
    identity: NodeIdentity,
    roster: Roster,
    *,
    host: str = "127.0.0.1",
    port: int = 1883,
    prefix: str = DEFAULT_PREFIX,
    username: str | None = None,
    password: str | None = None,
    timeout_s: float = 30.0,
    latency_s: float = 0.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_rounds: int = 64,
    qos: int = 0,
    bus: BusClient | None = None,
) -> AsyncIterator[SecureTransport]:
    """Connect (or reuse ``bus``) and subscribe to the job's inbound topic; keys come later.

    QoS 0 by default: the channel already detects loss (timeout naming the missing round)
    and duplicates, and QoS 1 costs a 40 ms stall per round against brokers that leave
    Nagle's algorithm on (Mosquitto's default: its PUBACK and the next PUBLISH to the same
    client wait for our delayed ACK). Pass ``qos=1`` for at-least-once across reconnects.
    """
    own_bus = bus is None
    client = bus or BusClient(
        host, port, client_id=unique_client_id(username or identity.node_id),
        username=username, password=password, prefix=prefix, max_inflight=64,
    )
    if own_bus:
        await client.__aenter__()
    try:
        transport = SecureTransport(
            job=job, identity=identity, roster=roster, bus=BusFrameBus(client, qos=qos),
            topics=client.topics, timeout_s=timeout_s, chunk_bytes=chunk_bytes,
            max_rounds=max_rounds, latency_s=latency_s,
        )
        await transport.start()
        try:
            yield transport
        finally:
            await transport.close()
    finally:
        if own_bus:
            await client.close()


@asynccontextmanager
async def mqtt_party(job: str, identity: NodeIdentity, roster: Roster, *, run: bytes,
                     **kw: object) -> AsyncIterator[Party]:
    """:func:`mqtt_transport` keyed for the run digest ``run``, as a :class:`Party`."""
    async with mqtt_transport(job, identity, roster, **kw) as transport:  # type: ignore[arg-type]
        transport.set_run(run)
        yield Party(identity.index, job, transport, *transport.secrets(), run=run)
