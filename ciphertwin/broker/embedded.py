"""The embedded amqtt broker as an importable async context manager.

Services, tests and demos start it in-process::

    async with EmbeddedBroker(deployment) as broker:      # auth + ACLs from the deployment
        ...
    async with EmbeddedBroker(port=0) as broker:          # open (anonymous) on a free port
        print(broker.port)

It can be stopped and started again on the same port (reconnect tests).

Two things amqtt 0.12.1 gets wrong are fixed here (:class:`_Broker`):

* packet size: amqtt reads any packet a client announces, up to 256 MiB. A read larger than
  :func:`~ciphertwin.broker.limits.broker_max_packet` (the largest message kind plus header
  room; amqtt reads a PUBLISH payload in one read of its announced length) is refused before
  a byte of it is buffered: the connection is closed and ``broker.packet_refused`` logged;
* client-id takeover: a CONNECT with a clean session deleted the subscriptions of any
  connection using the same client id *before authenticating it*, and left that connection
  open but deaf; a refused CONNECT even replaced the connection deliveries go to. Now only an
  authenticated client takes an id over, and the connection it replaces is closed (as MQTT
  requires), so that client notices and reconnects. (A CONNECT *without* a clean session
  still reaches amqtt's own handling of a persistent session before it is authenticated; no
  ciphertwin client asks for one.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import structlog
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.session import Session

from ciphertwin.broker.directory import ClientDirectory
from ciphertwin.broker.limits import broker_max_packet
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


class PacketTooLarge(ConnectionError):
    """A client announced a packet above the limit; its connection is closed."""


class _LimitedReader(ReaderAdapter):
    """A connection's reader that refuses any read above ``limit`` bytes before making it."""

    def __init__(self, inner: ReaderAdapter, limit: int, peer: str) -> None:
        self._inner, self._limit, self._peer = inner, limit, peer

    async def read(self, n: int = -1) -> bytes:
        if n > self._limit:
            log.warning("broker.packet_refused", peer=self._peer, size=n, limit=self._limit,
                        reason="packet larger than any message kind: connection closed")
            raise PacketTooLarge(f"packet of {n} bytes > limit {self._limit}")
        return await self._inner.read(n)

    def feed_eof(self) -> None:
        self._inner.feed_eof()


_ADMITTED = "_ciphertwin_admitted"  # set on a Session once its credentials passed


class _Sessions(dict):  # type: ignore[type-arg]
    """amqtt files every connecting session under its client id *before* refusing bad
    credentials, and finds a subscriber's connection by that id when delivering: a refused
    client would deafen the one holding the id. Only admitted sessions are filed."""

    def __setitem__(self, client_id: str, entry: tuple[Session, Any]) -> None:
        if getattr(entry[0], _ADMITTED, False):
            super().__setitem__(client_id, entry)


class _Broker(Broker):
    """amqtt's broker with a packet size limit and an authenticated, visible takeover (see
    the module docstring; these override amqtt 0.12.1 internals, pinned in pyproject)."""

    def __init__(self, config: dict[str, Any], *, max_packet: int) -> None:
        super().__init__(config)
        self.max_packet = max_packet
        self._sessions = _Sessions()

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        peer = writer.get_extra_info("peername")
        limited = _LimitedReader(StreamReaderAdapter(reader), self.max_packet, str(peer))
        await self._client_connected(listener_name, limited, StreamWriterAdapter(writer))

    async def _delete_session(self, client_id: str) -> None:
        """amqtt calls this for every clean-session CONNECT before authenticating it: an
        unauthenticated client must not drop another's subscriptions, so it waits for
        :meth:`_authenticate`."""

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        ok = await super()._authenticate(session, listener)
        if ok:
            setattr(session, _ADMITTED, True)
            if session.clean_session and session.client_id:
                await self._take_over(session)
        return bool(ok)

    async def _take_over(self, session: Session) -> None:
        """Close the connection ``session``'s id was in use by, and forget its session."""
        old = self._sessions.get(session.client_id or "")
        if old is None or old[0] is session:
            return
        old_session, old_handler = old
        if old_session.transitions.is_connected():
            log.warning("broker.session_taken_over", client_id=session.client_id,
                        username=session.username, reason="a new connection uses this client id")
            await old_handler.handle_connection_closed()
            await old_handler.stop()
        await super()._delete_session(session.client_id or "")


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
        broker = _Broker(self._config(), max_packet=broker_max_packet())
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
