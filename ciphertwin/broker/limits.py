"""The brokers' packet size limit, derived from the registered message kinds.

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
