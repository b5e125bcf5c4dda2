"""Errors of the bus layer, so callers can tell "broker down" from "not allowed"."""

from ciphertwin.errors import CipherTwinError, ValidationError


class BusError(CipherTwinError):
    """Base of bus-layer failures."""


class BusUnavailable(BusError):
    """The broker could not be reached (or re-reached) within the allowed time."""


class BusAuthError(BusUnavailable):
    """The broker refused our credentials; retrying with the same ones is pointless."""


class SubscriptionDenied(BusError):
    """The broker refused a subscription (topic ACL)."""


class RequestTimeout(BusError):
    """No reply arrived for a request/response exchange in time."""


class EnvelopeError(ValidationError):
    """A message envelope is malformed, of the wrong kind/version, or too large."""
