"""Errors of the MPC engine.

Every failure a node can meet while running a job has its own class, so the node service can
report *why* a job stopped (peer silent, message forged, wrong job) without parsing text.
"""

from __future__ import annotations

from ciphertwin.errors import CipherTwinError, ValidationError


class MpcError(CipherTwinError):
    """Base of every error raised by the MPC engine."""


class MpcValidationError(ValidationError, MpcError):
    """An input array, parameter or message failed a shape, type or range check."""


class ProtocolError(MpcError):
    """Parties fell out of step (wrong payload size, unexpected message)."""


class ChannelError(MpcError):
    """Base of node-to-node channel failures."""


class MessageTimeoutError(ChannelError):
    """A peer's message for a round did not (completely) arrive in time."""


class TamperedMessageError(ChannelError):
    """A payload failed AES-GCM authentication: forged, altered or mis-addressed."""


class UnknownJobError(ChannelError):
    """A message names a job this channel does not serve."""


class UnexpectedRoundError(ChannelError):
    """A message names a round outside the job's declared range."""


class RosterError(MpcValidationError):
    """A node roster is malformed or an entry's signature does not verify."""


class UnknownFunctionError(MpcValidationError):
    """A job names a function that is not registered."""
