"""The embedded broker's live view of the deployment's principals and their ACLs.

Kept separate from the amqtt plugins so the same object serves authentication and topic
checks, and so reload-on-change (enrollment without restart) lives in one place.
"""

from __future__ import annotations

import time

import structlog

from ciphertwin.broker.acl import Acl, acl_for
from ciphertwin.bus.topics import Topics
from ciphertwin.config.principals import CredentialsFile, Principal
from ciphertwin.errors import ValidationError

log = structlog.get_logger(__name__)


class ClientDirectory:
    """Principals loaded from a credentials file, reloaded when the file changes."""

    def __init__(self, credentials: CredentialsFile, topics: Topics, *, min_interval: float = 0.5):
        self.credentials = credentials
        self.topics = topics
        self.min_interval = min_interval
        self._clients: dict[str, Principal] = {}
        self._acls: dict[str, Acl] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.reloads = 0
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> None:
        """Reload if the file changed; a broken file keeps the last good view (and is logged)."""
        now = time.monotonic()
        if not force and now - self._checked < self.min_interval:
            return
        self._checked = now
        stamp = self.credentials.stamp()
        if stamp == self._stamp and not force:
            return
        try:
            clients = self.credentials.load()
        except ValidationError as exc:
            log.error("broker.credentials_invalid", path=str(self.credentials.path), error=str(exc))
            self._stamp = stamp  # do not re-parse the same broken file on every packet
            return
        self._clients, self._acls, self._stamp = clients, {}, stamp
        self.reloads += 1
        log.info("broker.credentials_loaded", path=str(self.credentials.path), clients=len(clients))

    def principal(self, username: str | None, *, fresh: bool = False) -> Principal | None:
        self.refresh(force=False) if not fresh else self._refresh_now()
        return self._clients.get(username or "")

    def _refresh_now(self) -> None:
        self._checked = 0.0
        self.refresh()

    def acl(self, username: str | None) -> Acl | None:
        self.refresh()
        principal = self._clients.get(username or "")
        if principal is None:
            return None
        acl = self._acls.get(principal.id)
        if acl is None:
            acl = self._acls[principal.id] = acl_for(principal, self._clients, self.topics)
        return acl
