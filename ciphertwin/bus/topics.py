"""Every MQTT topic of the bus layout, built and parsed from one declarative table.

Services never format topic strings by hand: a typo would silently route messages nowhere,
and the broker ACLs (``ciphertwin.broker.acl``) are generated from the same table, so what a
client may publish and what it actually publishes cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from ciphertwin.errors import ValidationError

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""Identifiers (twins, devices, principals, jobs, request ids): no '/', '+', '#' or '$'."""

_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
DEFAULT_PREFIX = "ct/v1"

# kind -> template below the prefix; "{field}" levels are identifiers, others literals.
TEMPLATES: MappingProxyType[str, str] = MappingProxyType(
    {
        "twin_data": "twins/{twin}/data",
        "ack": "twins/{twin}/ack/{device}",
        "stream": "twins/{twin}/stream/{receiver}",
        "desired": "twins/{twin}/desired",
        "reported": "twins/{twin}/reported",
        "requests": "twins/{twin}/requests",
        "answers": "twins/{twin}/answers",
        "inbox": "devices/{device}/inbox",
        "presence": "devices/{device}/presence",
        "control": "control/{owner}",
        "job_submit": "jobs/submit",
        "job_status": "jobs/{job}/status",
        "node_inputs": "nodes/{node}/inputs/{job}",
        "mpc": "mpc/{job}/{frm}/{to}",
        "results": "receivers/{receiver}/results/{job}/{node}",
        "config_nodes": "config/nodes",
        "token_revoked": "revocations/{owner}/{token}",
        "query": "queries/{principal}",
        "replies": "replies/{principal}/{request_id}",
    }
)


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid identifier, else raise ValidationError.

    Identifiers become topic levels, so anything that could act as a wildcard, a level
    separator or a system topic (``$``) is refused here rather than at the broker.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValidationError(
            f"invalid {what} {value!r}: expected 1-64 characters of [A-Za-z0-9_.:-]"
        )
    return value


def validate_prefix(prefix: object) -> str:
    """Return a valid topic prefix (levels of identifier characters separated by '/')."""
    if not isinstance(prefix, str) or not all(
        _PREFIX_LEVEL.fullmatch(level) for level in prefix.split("/")
    ):
        raise ValidationError(
            f"invalid topic prefix {prefix!r}: expected levels of [A-Za-z0-9_.:-] joined by '/'"
        )
    return prefix


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A concrete topic split back into its kind and identifier fields."""

    kind: str
    fields: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.fields[name]


def _levels(template: str) -> list[str]:
    return template.split("/")


def _field_name(level: str) -> str | None:
    return level[1:-1] if level.startswith("{") and level.endswith("}") else None


class Topics:
    """Topic builder/parser for one deployment prefix (default ``ct/v1``)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = validate_prefix(prefix)
        self._prefix_levels = prefix.split("/")

    # -- generic -------------------------------------------------------------------------
    def build(self, kind: str, **fields: str) -> str:
        """Concrete topic of ``kind``; every field must be given and be a valid identifier."""
        return self._render(kind, fields, wildcard=False)

    def filter(self, kind: str, **fields: str) -> str:
        """Subscription filter of ``kind``; omitted fields become the ``+`` wildcard."""
        return self._render(kind, fields, wildcard=True)

    def everything(self) -> str:
        """Filter matching every topic under the prefix."""
        return f"{self.prefix}/#"

    def parse(self, topic: str) -> ParsedTopic:
        """Split a concrete topic into (kind, fields); raise ValidationError if unknown."""
        if not isinstance(topic, str):
            raise ValidationError(f"topic must be a string, got {type(topic).__name__}")
        levels = topic.split("/")
        n = len(self._prefix_levels)
        if levels[:n] != self._prefix_levels:
            raise ValidationError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        rest = levels[n:]
        for kind, template in TEMPLATES.items():
            tlevels = _levels(template)
            if len(tlevels) != len(rest):
                continue
            fields: dict[str, str] = {}
            for tl, level in zip(tlevels, rest, strict=True):
                name = _field_name(tl)
                if name is None:
                    if tl != level:
                        break
                elif ID_PATTERN.fullmatch(level):
                    fields[name] = level
                else:
                    break
            else:
                return ParsedTopic(kind, fields)
        raise ValidationError(f"topic {topic!r} matches no known topic of the bus layout")

    def _render(self, kind: str, fields: dict[str, str], *, wildcard: bool) -> str:
        try:
            template = TEMPLATES[kind]
        except KeyError:
            raise ValidationError(f"unknown topic kind {kind!r}") from None
        wanted = {_field_name(level) for level in _levels(template)} - {None}
        unknown = set(fields) - wanted
        if unknown:
            raise ValidationError(f"topic {kind!r} has no field(s) {sorted(unknown)}")
        out: list[str] = []
        for level in _levels(template):
            name = _field_name(level)
            if name is None:
                out.append(level)
            elif name in fields:
                out.append(validate_id(fields[name], name))
            elif wildcard:
                out.append("+")
            else:
                raise ValidationError(f"topic {kind!r} needs field {name!r}")
        return "/".join([self.prefix, *out])

    # -- one helper per row of the design's bus table --------------------------------------
    def twin_data(self, twin: str) -> str:
        return self.build("twin_data", twin=twin)

    def ack(self, twin: str, device: str) -> str:
        return self.build("ack", twin=twin, device=device)

    def stream(self, twin: str, receiver: str) -> str:
        return self.build("stream", twin=twin, receiver=receiver)

    def desired(self, twin: str) -> str:
        return self.build("desired", twin=twin)

    def reported(self, twin: str) -> str:
        return self.build("reported", twin=twin)

    def requests(self, twin: str) -> str:
        return self.build("requests", twin=twin)

    def answers(self, twin: str) -> str:
        """Devices' sealed answers to requests (device -> cloud -> requester)."""
        return self.build("answers", twin=twin)

    def inbox(self, device: str) -> str:
        return self.build("inbox", device=device)

    def presence(self, device: str) -> str:
        """A device's awake/asleep announcements (device -> cloud)."""
        return self.build("presence", device=device)

    def control(self, owner: str) -> str:
        return self.build("control", owner=owner)

    def job_submit(self) -> str:
        return self.build("job_submit")

    def job_status(self, job: str) -> str:
        return self.build("job_status", job=job)

    def node_inputs(self, node: str, job: str) -> str:
        return self.build("node_inputs", node=node, job=job)

    def mpc(self, job: str, frm: str, to: str) -> str:
        return self.build("mpc", job=job, frm=frm, to=to)

    def results(self, receiver: str, job: str, node: str) -> str:
        """Node ``node``'s output share of ``job`` for ``receiver`` (retained: one topic per
        node, so the three shares are all kept)."""
        return self.build("results", receiver=receiver, job=job, node=node)

    def config_nodes(self) -> str:
        return self.build("config_nodes")

    def token_revoked(self, owner: str, token: str) -> str:
        """Retained, owner-signed revocation of process token ``token`` (hex id), for nodes."""
        return self.build("token_revoked", owner=owner, token=token)

    def query(self, principal: str) -> str:
        """Where ``principal`` sends request/response queries to the cloud (e.g. history)."""
        return self.build("query", principal=principal)

    def replies(self, principal: str, request_id: str) -> str:
        """Where the answer to ``principal``'s request ``request_id`` is published."""
        return self.build("replies", principal=principal, request_id=request_id)
