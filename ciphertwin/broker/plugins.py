"""amqtt 0.12.1 plugins: authentication and topic ACLs from the deployment's principals.

Both plugins receive the shared :class:`ClientDirectory` through their ``Config`` dataclass
(amqtt's recommended plugin configuration), so nothing is global and several brokers can run
in one process (tests).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from ciphertwin.broker.acl import client_id_allowed
from ciphertwin.broker.directory import ClientDirectory
from ciphertwin.config.passwords import verify_password
from ciphertwin.errors import ValidationError

log = structlog.get_logger(__name__)


def _directory(config: Any) -> ClientDirectory:
    directory = getattr(config, "directory", None)
    if not isinstance(directory, ClientDirectory):
        raise TypeError("plugin config needs 'directory': a ClientDirectory")
    return directory


class DeploymentAuthPlugin(BaseAuthPlugin):
    """Username = principal id, password checked against its ``$7$`` hash off the loop."""

    @dataclass
    class Config:
        directory: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.directory = _directory(self.config)

    async def authenticate(self, *, session: Session) -> bool:
        username, client_id = session.username, session.client_id or ""
        principal = self.directory.principal(username, fresh=True)
        if principal is None:
            log.warning("broker.auth_refused", client_id=client_id, username=username,
                        reason="unknown principal")
            return False
        if not client_id_allowed(principal.id, client_id):
            log.warning("broker.auth_refused", client_id=client_id, username=username,
                        reason="client id must be the username or start with '<username>@'")
            return False
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                None, verify_password, session.password, principal.password_hash
            )
        except ValidationError:
            ok = False
        if not ok:
            log.warning("broker.auth_refused", client_id=client_id, username=username,
                        reason="bad password")
            return False
        log.info("broker.auth_ok", client_id=client_id, role=principal.role.value)
        return True


class DeploymentAclPlugin(BaseTopicPlugin):
    """Allows a publish/subscribe/delivery only if the principal's ACL covers the topic."""

    @dataclass
    class Config:
        directory: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.directory = _directory(self.config)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or not topic:
            return False
        acl = self.directory.acl(session.username)
        if acl is None:
            allowed = False
        elif action == Action.PUBLISH:
            allowed = acl.may_publish(topic)
        else:  # SUBSCRIBE checks the filter, RECEIVE the concrete topic being delivered
            allowed = acl.may_subscribe(topic)
        if not allowed and action != Action.RECEIVE:
            log.warning("broker.acl_denied", client_id=session.client_id,
                        username=session.username, action=str(action), topic=topic)
        return allowed
