"""Per-principal topic ACLs: ONE function decides, both brokers apply it.

The embedded amqtt broker evaluates :func:`acl_for` live; the Mosquitto emitter writes the
same patterns into an ``acl_file``. Patterns come from the topic table in
``ciphertwin.bus.topics``, so the rules read like the design's bus layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ciphertwin.bus.topics import Topics
from ciphertwin.config.principals import Principal, Registry, Role, twins_of_owner


@dataclass(frozen=True)
class Acl:
    """Topic filters a principal may publish to and subscribe to (read)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return any(filter_covers(p, topic) for p in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        """Also used for delivery: a concrete topic is a filter without wildcards."""
        return any(filter_covers(p, topic_filter) for p in self.subscribe)


def filter_covers(pattern: str, requested: str) -> bool:
    """True if every topic matched by ``requested`` is matched by ``pattern``.

    ``requested`` may be a concrete topic (publish, delivery) or a filter (subscribe); a
    ``+``/``#`` in the request is only covered by a wildcard at least as broad in the pattern.
    """
    p, r = pattern.split("/"), requested.split("/")
    for i, pl in enumerate(p):
        if pl == "#":
            return True
        if i >= len(r):
            return False
        rl = r[i]
        if rl == "#":
            return False
        if pl != "+" and pl != rl:
            return False
    return len(r) == len(p)


def _dedupe(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


CLOUD_PUBLISHES = ("ack", "stream", "replies", "job_status", "node_inputs", "inbox")
"""The topic kinds the cloud twin publishes (acks, live fan-out, replies, job status, node
inputs, and device inboxes for queued requests)."""


def acl_for(principal: Principal, clients: Registry, topics: Topics) -> Acl:
    """The publish/subscribe filters of ``principal`` in a deployment with ``clients``."""
    t, me = topics, principal.id
    pub: list[str] = []
    sub: list[str] = []
    match principal.role:
        case Role.CLOUD:
            # it reads everything, but publishes only what it serves: never a roster, a
            # revocation, an MPC frame or a result (it could not forge them, but it could
            # clear a retained roster or revocation, or flood the nodes' channels)
            pub = [t.filter(kind) for kind in CLOUD_PUBLISHES]
            sub = [t.everything()]
        case Role.DEVICE:
            twin = principal.twin or ""
            # desired state reaches it re-encrypted through its inbox, never from the topic
            # where writers publish it (that copy is sealed for the owner only)
            pub = [t.twin_data(twin), t.reported(twin), t.answers(twin), t.presence(me),
                   t.query(me)]
            sub = [t.ack(twin, me), t.inbox(me), t.filter("replies", principal=me)]
        case Role.OWNER:
            pub = [t.control(me), t.job_submit(), t.query(me),
                   t.filter("token_revoked", owner=me)]
            sub = [
                t.filter("stream", receiver=me),
                t.filter("replies", principal=me),
                t.filter("job_status"),
                t.config_nodes(),
            ]
            for twin in twins_of_owner(clients, me):
                pub += [t.requests(twin), t.desired(twin)]
                sub += [t.desired(twin), t.reported(twin)]
            if principal.operator:
                pub.append(t.config_nodes())
        case Role.RECEIVER:
            # requests and desired writes to any twin: the cloud checks the InteractToken
            pub = [t.query(me), t.job_submit(), t.filter("requests"), t.filter("desired")]
            sub = [
                t.filter("stream", receiver=me),
                t.filter("results", receiver=me),
                t.filter("replies", principal=me),
                t.filter("job_status"),
                t.config_nodes(),
            ]
        case Role.NODE:
            pub = [
                t.filter("mpc", frm=me),
                t.filter("results", node=me),  # its own retained share only: no other node
                                               # can overwrite or clear it
                t.filter("job_status"),
                t.query(me),
            ]
            sub = [
                t.filter("node_inputs", node=me),
                t.filter("mpc", to=me),
                t.config_nodes(),
                t.filter("token_revoked"),
                t.filter("job_status"),
                t.filter("replies", principal=me),
            ]
        case Role.OPERATOR:
            pub = [t.config_nodes(), t.job_submit(), t.query(me)]
            sub = [t.config_nodes(), t.filter("job_status"), t.filter("replies", principal=me)]
    return Acl(_dedupe(pub), _dedupe(sub))


def client_id_allowed(username: str, client_id: str) -> bool:
    """A principal may use its id as MQTT client id, or ``<id>@<anything>`` for extra links.

    This stops one principal from taking over (and inheriting the session of) another's
    connection; '@' cannot occur in ids, so the prefix is unambiguous.
    """
    return client_id == username or client_id.startswith(username + "@")
