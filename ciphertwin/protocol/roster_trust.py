"""What a principal checks about a node roster beyond the operator's signature (M4).

The operator signature says *who* may publish a roster (``config/nodes``, retained). It does
not stop a roster signed by that same key that is old (a broker replays an earlier retained
one), far in the future (one typo such as ``--version 9223372036854775807`` would lock every
later roster out) or that moves a node to another share index (a node key that held share 0
and later holds share 1 learns two shares of one item: with the third, the plaintext). So
every principal that follows the roster keeps a :class:`RosterHistory`:

* the pinned operator key — mandatory, an unpinned roster is never accepted;
* the last accepted version: a new roster must be newer and at most ``MAX_VERSION_JUMP``
  newer (the same version is accepted again only with identical content: retained
  re-deliveries). The first roster a principal ever sees has nothing to be bounded against;
  the operator's ``publish-roster`` applies the bound against the roster it replaces;
* a :class:`ShareIndexBook`: the share index each node id, node signing key and node PRE key
  ever had; a roster putting one of them at another index (or twice in one roster) is refused;
* every accepted roster by digest (the last ``KEEP_ROSTERS``): a job is pinned to the roster
  it was checked against for its whole life, so a receiver checks a result against the roster
  the result names (:meth:`RosterHistory.by_digest`) — one it accepted itself — even after a
  hot swap.

Given a state file (in the principal's home folder) both survive restarts. Owners keep a
second book of the node keys they actually re-keyed (``grant_processing``), so an owner never
gives share i to a key it once gave share j ≠ i, whatever roster it is shown.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ciphertwin.config.files import read_private_file, write_private_file
from ciphertwin.crypto import wire
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.jobs import NodeRoster, parse_roster

MAX_VERSION_JUMP = 1000
"""How far past the last accepted version a new roster may jump (operators count up by one)."""
ROSTER_STATE_FILE = "roster-history.json"
GRANTED_SHARES_FILE = "granted-shares.json"
NO_OPERATOR_KEY = ("no operator key: rosters are only accepted when signed by the pinned "
                   "operator key")
_MAX_STATE_BYTES = 4 * 1024 * 1024
KEEP_ROSTERS = 64
"""accepted rosters remembered by digest (results of jobs pinned to older rosters verify)"""


class RosterRefused(ValidationError):
    """A correctly signed roster this principal will still not follow; the message says why."""


def _node_keys(roster: NodeRoster) -> Iterator[tuple[str, str, int]]:
    """(book key, label for messages, share index) of every node identity in ``roster``."""
    for entry, pre in zip(roster.roster.entries, roster.pre_keys, strict=True):
        i = entry.index
        yield f"node:{entry.node_id}", f"node {entry.node_id!r}", i
        yield f"sign:{entry.sign_public.hex()}", f"signing key {entry.sign_public.hex()[:12]}", i
        pre_id = hashlib.sha256(pre.to_bytes()).hexdigest()
        yield f"pre:{pre_id}", f"PRE key {pre_id[:12]}", i


def _load(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        state = json.loads(read_private_file(path, _MAX_STATE_BYTES))
    except ValueError:
        raise ValidationError(f"{path}: not a roster state file (invalid JSON)") from None
    if not isinstance(state, dict):
        raise ValidationError(f"{path}: not a roster state file")
    return state


def _save(path: Path | None, state: Mapping[str, Any]) -> None:
    if path is not None:
        write_private_file(path, json.dumps(state, sort_keys=True).encode())


def _indices(raw: object, where: str) -> dict[str, int]:
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and type(v) is int and 0 <= v <= 2 for k, v in raw.items()):
        raise ValidationError(f"{where}: share index history is malformed")
    return dict(raw)


class ShareIndexBook:
    """Node identity → the one share index it may ever have (kept in ``path`` if given)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.indices = _indices(_load(path).get("indices", {}), str(path))

    def check(self, roster: NodeRoster) -> None:
        """Refuse a roster placing any node identity at a second index."""
        seen = dict(self.indices)
        for key, label, index in _node_keys(roster):
            earlier = seen.setdefault(key, index)
            if earlier != index:
                raise RosterRefused(f"roster v{roster.version} puts {label} at share {index}, "
                                    f"it had share {earlier}: no node may hold two shares")

    def record(self, roster: NodeRoster) -> None:
        """Remember the roster's indices (after :meth:`check`); written before anything is sent."""
        self.check(roster)
        self.indices.update((key, index) for key, _, index in _node_keys(roster))
        _save(self.path, {"indices": self.indices})


class RosterHistory:
    """Accepts rosters signed by ``operator`` that are newer, not too new and move no node."""

    def __init__(self, operator: VerifyKey, path: Path | None = None) -> None:
        if not isinstance(operator, VerifyKey):
            raise ValidationError(NO_OPERATOR_KEY)
        self.operator, self.path = operator, path
        state = _load(path)
        self.version: int | None = state.get("version")
        self.content: str | None = state.get("content")
        if self.version is not None and (type(self.version) is not int or self.version < 0):
            raise ValidationError(f"{path}: malformed roster version")
        self.book = ShareIndexBook()
        self.book.indices = _indices(state.get("indices", {}), str(path))
        self._known: dict[bytes, tuple[int, bytes]] = {}
        """roster digest -> (version, signed payload) of accepted rosters"""
        self._parsed: dict[bytes, NodeRoster] = {}
        for raw in _payloads(state.get("rosters", []), str(path)):
            try:
                self._remember(parse_roster(raw, operator), raw)
            except ValidationError:
                continue  # signed by an operator key no longer pinned: not ours to trust

    def by_digest(self, digest: bytes) -> NodeRoster | None:
        """An accepted roster with this digest (of its node signing keys), or None."""
        return self._parsed.get(bytes(digest))

    def _remember(self, roster: NodeRoster, payload: bytes) -> None:
        self._known[roster.digest] = (roster.version, payload)
        self._parsed[roster.digest] = roster
        for digest, _ in sorted(self._known.items(), key=lambda kv: kv[1][0])[:-KEEP_ROSTERS]:
            del self._known[digest], self._parsed[digest]

    def accept(self, payload: bytes) -> NodeRoster:
        """Parse, verify and check ``payload``; record it. Raises with the reason to log."""
        roster = parse_roster(payload, self.operator)
        content = _content(roster)
        if self.version is not None:
            if roster.version == self.version and content == self.content:
                if roster.digest not in self._parsed:
                    self._remember(roster, payload)
                return roster  # the accepted roster again (retained re-delivery)
            if roster.version <= self.version:
                raise RosterRefused(f"roster v{roster.version} is not newer than the accepted "
                                    f"v{self.version}")
            if roster.version - self.version > MAX_VERSION_JUMP:
                raise RosterRefused(f"roster v{roster.version} jumps more than "
                                    f"{MAX_VERSION_JUMP} versions past v{self.version}")
        self.book.record(roster)
        self.version, self.content = roster.version, content
        self._remember(roster, payload)
        _save(self.path, {"version": self.version, "content": content,
                          "indices": self.book.indices,
                          "rosters": [base64.b64encode(p).decode() for _, p in self._known.values()]})
        return roster


def _payloads(raw: object, where: str) -> list[bytes]:
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise ValidationError(f"{where}: kept rosters are malformed")
    try:
        return [base64.b64decode(r, validate=True) for r in raw]
    except binascii.Error:
        raise ValidationError(f"{where}: kept rosters are malformed") from None


def _content(roster: NodeRoster) -> str:
    """Digest of what a roster says (entries and PRE keys), to tell a re-delivery from a fork."""
    return hashlib.sha256(wire.canonical(
        [[e.to_bytes() for e in roster.roster.entries], [k.to_bytes() for k in roster.pre_keys]]
    )).hexdigest()


def replaced_nodes(old: NodeRoster, new: NodeRoster) -> list[str]:
    """What ``new`` changes about ``old``'s nodes, per share index ("index 1 node1 -> node1b");
    empty if every index keeps the same node with the same keys (a job may go on)."""
    out = []
    for i, (a, b) in enumerate(zip(old.roster.entries, new.roster.entries, strict=True)):
        if a.to_bytes() == b.to_bytes() and old.pre_keys[i].to_bytes() == new.pre_keys[i].to_bytes():
            continue
        out.append(f"index {i} {a.node_id} -> {b.node_id}" if a.node_id != b.node_id
                   else f"index {i} {a.node_id} has new keys")
    return out


def swap_reason(old: NodeRoster, new: NodeRoster) -> str | None:
    """Why a job pinned to ``old`` must end now that ``new`` is the roster (None: it need not)."""
    changes = replaced_nodes(old, new)
    if not changes:
        return None
    return (f"node roster changed to version {new.version} during the job: "
            f"{', '.join(changes)}; re-grant processing and resubmit")
