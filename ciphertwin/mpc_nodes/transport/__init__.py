"""Transports carry opaque round payloads between the three parties of one job."""

from ciphertwin.mpc_nodes.transport.base import Transport, TransportStats
from ciphertwin.mpc_nodes.transport.memory import MemoryNetwork

__all__ = ["MemoryNetwork", "Transport", "TransportStats"]
