"""The embedded amqtt broker as an importable async context manager.

Services, tests and demos start it in-process::

    async with EmbeddedBroker(deployment) as broker:      # auth + ACLs from the deployment
        ...
    async with EmbeddedBroker(port=0) as broker:          # open (anonymous) on a free port
        print(broker.port)

It can be stopped and started again on the same port (reconnect tests).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import structlog
from amqtt.broker import Broker

from ciphertwin.broker.directory import ClientDirectory
from ciphertwin.bus.topics import Topics
from ciphertwin.config.settings import Deployment
from ciphertwin.errors import CipherTwinError, ValidationError

log = structlog.get_logger(__name__)

_AUTH = "ciphertwin.broker.plugins.DeploymentAuthPlugin"
_ACL = "ciphertwin.broker.plugins.DeploymentAclPlugin"
_ANON = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for tests and demos)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BrokerError(CipherTwinError):
    """The embedded broker failed to start."""


class EmbeddedBroker:
    """amqtt broker with the deployment's authentication and per-client topic ACLs.

    ``deployment`` None (or ``open=True``) serves anonymously without ACLs — for benchmarks
    and unit tests only. ``port`` 0 picks a free port once (kept across restarts).
    """

    def __init__(
        self,
        deployment: Deployment | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        open: bool | None = None,  # noqa: A002 - mirrors the deployment setting
        quiet: bool = True,
    ) -> None:
        settings = deployment.broker if deployment else None
        self.deployment = deployment
        self.host = host or (settings.bind if settings else "127.0.0.1")
        port = port if port is not None else (settings.port if settings else 0)
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValidationError(f"invalid broker port {port!r}")
        self.port = port or free_port(self.host)
        self.open = bool(open if open is not None else (settings.open if settings else True))
        if not self.open and deployment is None:
            raise ValidationError("an authenticated broker needs a deployment (principals)")
        self.topics = Topics(settings.prefix if settings else Topics().prefix)
        self.directory: ClientDirectory | None = None
        if not self.open and deployment is not None:
            self.directory = ClientDirectory(deployment.credentials(), self.topics)
        self._broker: Broker | None = None
        if quiet:  # amqtt logs every connection at INFO through stdlib logging
            for name in ("amqtt", "transitions"):
                logging.getLogger(name).setLevel(logging.WARNING)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        tls = self.deployment.broker.tls if self.deployment else None
        if tls is not None and tls.enabled:
            if tls.certfile is None or tls.keyfile is None:
                raise ValidationError("broker.tls.enabled needs certfile and keyfile for the broker")
            listener.update(ssl=True, certfile=str(tls.certfile), keyfile=str(tls.keyfile))
            if tls.cafile is not None:
                listener["cafile"] = str(tls.cafile)
        if self.open:
            plugins: dict[str, Any] = {_ANON: {"allow_anonymous": True}}
        else:
            plugins = {_AUTH: {"directory": self.directory}, _ACL: {"directory": self.directory}}
        return {"listeners": {"default": listener}, "plugins": plugins}

    async def start(self) -> None:
        if self._broker is not None:
            raise BrokerError("broker already running")
        broker = Broker(self._config())
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerError(f"embedded broker could not start on {self.url}: {exc}") from exc
        self._broker = broker
        log.info("broker.started", url=self.url, open=self.open)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("broker.stopped", url=self.url)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
