"""The brokers' packet size limit, derived from the registered message kinds, and the embedded
broker's bound on what it queues for one connection.

Importing the protocol modules registers every kind, so :func:`broker_max_packet` is the
largest kind's ``max_size`` plus header room (:func:`ciphertwin.bus.envelope.max_packet_size`):
raising a kind's limit raises the brokers' with it, and nothing larger ever reaches a client.
MPC frames (``ciphertwin.mpc_nodes.transport.secure``, at most 16 MiB plus a small header) are
not envelope kinds and stay well below it.
"""

from __future__ import annotations

import ciphertwin.protocol.jobs  # noqa: F401 - registers the job kinds (and, through it, the twin kinds)
from ciphertwin.bus.envelope import max_packet_size


def broker_max_packet() -> int:
    """Largest MQTT packet either broker accepts, in bytes."""
    return max_packet_size()


# -- a subscriber's outgoing queue in the embedded broker (Mosquitto: max_queued_bytes) --------
# Bytes the broker owes one connection: messages accepted for it and not yet written out (or,
# for QoS >= 1, not yet acknowledged), plus its socket's write buffer.

BROKER_QUEUE_BYTES = 8 * 2**20
"""Above this, QoS 0 messages to the connection are dropped (counted, logged once). A client
that reads does not come near it (the bus client reads eagerly into its own queues): 8 MiB is
thousands of twin items, several seconds of the cloud's ingest at full rate."""

BROKER_STALL_SECONDS = 5.0
"""Above BROKER_QUEUE_BYTES with no byte leaving for this long: the connection is closed."""


def broker_queue_hard_bytes() -> int:
    """Above this a connection is closed at once: more than the largest message (which may
    legitimately take a while on a slow link) plus the soft limit."""
    return broker_max_packet() + BROKER_QUEUE_BYTES
