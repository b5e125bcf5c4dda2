"""ciphertwin.broker: embedded amqtt broker with per-principal auth/ACLs; Mosquitto emitter."""

from ciphertwin.broker.acl import Acl, acl_for, filter_covers
from ciphertwin.broker.embedded import BrokerError, EmbeddedBroker, free_port
from ciphertwin.broker.mosquitto import emit_mosquitto

__all__ = ["Acl", "BrokerError", "EmbeddedBroker", "acl_for", "emit_mosquitto", "filter_covers", "free_port"]
