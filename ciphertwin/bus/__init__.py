"""ciphertwin.bus: the one way to talk MQTT — topics, envelope codec, resilient client."""

from ciphertwin.bus.client import BusClient, Handler
from ciphertwin.bus.envelope import Envelope, decode, encode, register_kind
from ciphertwin.bus.errors import (
    BusAuthError,
    BusError,
    BusUnavailable,
    EnvelopeError,
    RequestTimeout,
    SubscriptionDenied,
)
from ciphertwin.bus.topics import Topics, validate_id

__all__ = [
    "BusAuthError",
    "BusClient",
    "BusError",
    "BusUnavailable",
    "Envelope",
    "EnvelopeError",
    "Handler",
    "RequestTimeout",
    "SubscriptionDenied",
    "Topics",
    "decode",
    "encode",
    "register_kind",
    "validate_id",
]
