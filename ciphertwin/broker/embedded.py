"""The embedded amqtt broker as an importable async context manager.

Services, tests and demos start it in-process::

    async with EmbeddedBroker(deployment) as broker:      # auth + ACLs from the deployment
        ...
    async with EmbeddedBroker(port=0) as broker:          # open (anonymous) on a free port
        print(broker.port)

It can be stopped and started again on the same port (reconnect tests).

Three things amqtt 0.12.1 gets wrong are fixed here (:class:`_Broker`):

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
* the subscription table is walked while awaiting the ACL plugins: a SUBSCRIBE or a
  disconnect meanwhile killed the broadcast (``dictionary changed size during iteration``)
  and the message was lost for the remaining subscribers. It is walked over a snapshot
  (:class:`_Subscriptions`).

and two things it lacks, which let one stalled subscriber (a client that stops reading its
socket) grow the broker by every message published to it, forever (issue 9, finding 5):

* keepalive: amqtt reads with a timeout of the client's keepalive and ignores its expiry
  (``BrokerProtocolHandler.handle_read_timeout`` does nothing). Now a client from which
  nothing was read for 1.5 x its keepalive is cut off (MQTT 3.1.1 §3.1.2.10:
  ``broker.keepalive_expired``); large packets are read in chunks so that one still arriving
  counts as activity. amqtt's close first waits for the peer to take the last bytes: for a
  stalled peer a task waited forever and the socket stayed open, even after the broker
  stopped; now a close that does not finish within :data:`_CLOSE_SECONDS` aborts;
* an outgoing queue: amqtt queues a task per message and subscriber, waiting for the socket,
  without bound. Now each connection counts the bytes owed to it (messages accepted and not
  yet written out or acknowledged, plus the socket's write buffer) against
  :mod:`~ciphertwin.broker.limits` (Mosquitto's ``max_queued_bytes``): above
  ``BROKER_QUEUE_BYTES`` QoS 0 messages to it are dropped (``broker.subscriber_queue_full``,
  once); above it with no byte leaving for ``BROKER_STALL_SECONDS``, or above
  :func:`~ciphertwin.broker.limits.broker_queue_hard_bytes` at all, the connection is cut
  (``broker.slow_subscriber_dropped``, with the bytes queued) and its queued messages
  released at once; amqtt then forgets a clean session within a second. A finished
  delivery's message is returned without its payload: amqtt's broadcast loop keeps
  finished tasks behind the oldest unfinished one, which held every later message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import structlog
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import OutgoingApplicationMessage, Session

from ciphertwin.broker.directory import ClientDirectory
from ciphertwin.broker.limits import (
    BROKER_QUEUE_BYTES,
    BROKER_STALL_SECONDS,
    broker_max_packet,
    broker_queue_hard_bytes,
)
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


_CLOSE_SECONDS = 2.0  # a closing connection's peer gets this long to take its last bytes
_READ_CHUNK = 2**20  # larger reads are made in chunks, each counting as activity


class _Link:
    """What the broker's own checks know of one client connection (amqtt has no such object):
    when anything was last read from it, how much was written to it, and how to cut it off."""

    def __init__(self, transport: asyncio.WriteTransport, peer: str) -> None:
        self.transport, self.peer = transport, peer
        self.client_id: str | None = None
        self._loop = asyncio.get_running_loop()
        self.last_read = self._loop.time()
        self.written = 0  # bytes handed to the transport
        self._max_idle = 0.0
        self._sent_mark, self._moved_at = 0, self.last_read

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def send_idle(self) -> float:
        """Seconds since the kernel last took bytes for the peer while some were waiting."""
        sent, now = self.written - self.buffered(), self._loop.time()
        if sent != self._sent_mark or not self.buffered():
            self._sent_mark, self._moved_at = sent, now
        return now - self._moved_at

    def touch(self) -> None:
        self.last_read = self._loop.time()

    def cut(self, event: str, **fields: Any) -> None:
        """Log ``event`` and abort the connection: unsent data is discarded, nothing waits for
        the peer, and amqtt's reader sees the end of the stream and tears the session down."""
        if not self.closed:
            log.warning(event, client_id=self.client_id, peer=self.peer, **fields)
            self.transport.abort()

    def enforce_keepalive(self, keepalive: int) -> None:
        """MQTT 3.1.1 §3.1.2.10: nothing received for 1.5 x keepalive -> disconnect."""
        if keepalive > 0:
            self._max_idle = 1.5 * keepalive
            self._check_idle()

    def _check_idle(self) -> None:
        if self.closed:
            return
        idle = self._loop.time() - self.last_read
        if idle >= self._max_idle:
            self.cut("broker.keepalive_expired", keepalive=self._max_idle / 1.5,
                     idle_seconds=round(idle, 1), reason="nothing received for 1.5 x keepalive")
        else:
            self._loop.call_later(self._max_idle - idle, self._check_idle)


class _LimitedReader(ReaderAdapter):
    """A connection's reader that refuses any read above ``limit`` bytes before making it,
    and marks the link active whenever bytes arrive."""

    def __init__(self, inner: ReaderAdapter, limit: int, link: _Link) -> None:
        self._inner, self._limit, self.link = inner, limit, link

    async def read(self, n: int = -1) -> bytes:
        if n > self._limit:
            log.warning("broker.packet_refused", peer=self.link.peer, size=n, limit=self._limit,
                        reason="packet larger than any message kind: connection closed")
            raise PacketTooLarge(f"packet of {n} bytes > limit {self._limit}")
        if n <= _READ_CHUNK:
            data = await self._inner.read(n)
            self.link.touch()
            return data
        chunks, left = [], n
        while left:
            chunks.append(await self._inner.read(min(left, _READ_CHUNK)))
            left -= len(chunks[-1])
            self.link.touch()
        return b"".join(chunks)

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _Writer(StreamWriterAdapter):
    """Counts the bytes written (progress checks), writes nothing to a connection being torn
    down, and aborts a close the peer does not let finish within :data:`_CLOSE_SECONDS`."""

    def __init__(self, writer: asyncio.StreamWriter, link: _Link) -> None:
        super().__init__(writer)
        self._link = link

    def write(self, data: bytes) -> None:
        if not self._link.closed:
            self._link.written += len(data)
            super().write(data)

    async def close(self) -> None:
        closed = False
        try:
            await asyncio.wait_for(super().close(), _CLOSE_SECONDS)
            closed = True
        except (TimeoutError, OSError):
            pass
        finally:  # also when cancelled (amqtt stops a handler from several places)
            if not closed:
                self._link.transport.abort()


class _Handler(BrokerProtocolHandler):
    """amqtt's per-connection handler with a bounded outgoing queue (module docstring)."""

    def __init__(self, plugins_manager: PluginManager[Any], link: _Link, hard_limit: int) -> None:
        super().__init__(plugins_manager)
        self.link, self._hard_limit = link, hard_limit
        self._pending = 0  # payload bytes of publishes accepted and not finished
        self._publishing: set[asyncio.Task[Any]] = set()
        self._dropped = 0  # QoS 0 messages refused since the queue went over the limit
        self._unacked = 0  # QoS >= 1 messages the client did not acknowledge in time
        self._stall_timer: asyncio.Handle | None = None
        self._stopped = False

    def queued_bytes(self) -> int:
        return self._pending + self.link.buffered()

    async def mqtt_publish(self, topic: str, data: bytes | bytearray, qos: int | None,
                           retain: bool, ack_timeout: int | None = None,
                           ) -> OutgoingApplicationMessage:
        task, size = asyncio.current_task(), len(data)
        if task is None or not self._admit(qos):
            return OutgoingApplicationMessage(None, topic, qos, b"", retain)
        self._pending += size
        self._publishing.add(task)
        try:
            message = await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        except TimeoutError:  # amqtt gave up waiting for PUBACK/PUBREC/PUBCOMP (5 s)
            self._unacked += 1
            if self._unacked == 1:  # amqtt would log a traceback per message
                log.warning("broker.ack_timeout", client_id=self.link.client_id, qos=qos,
                            reason="no acknowledgement within 5 s: message not redelivered")
            return OutgoingApplicationMessage(None, topic, qos, b"", retain)
        except (Exception, asyncio.CancelledError):
            if self.link.closed or self._stopped:  # the message is simply not delivered
                return OutgoingApplicationMessage(None, topic, qos, b"", retain)
            raise
        finally:
            self._pending -= size
            self._publishing.discard(task)
        message.data, message.publish_packet = b"", None  # see the module docstring
        return message

    def _admit(self, qos: int | None) -> bool:
        """Whether a message may join this connection's queue (module docstring)."""
        if self.link.closed or self._stopped:
            return False
        self.link.send_idle()  # keeps track of when bytes last left
        queued = self.queued_bytes()
        if queued < BROKER_QUEUE_BYTES:
            return True
        if queued >= self._hard_limit:
            self._cut(queued, f"more than {self._hard_limit} bytes queued")
            return False
        if self._stall_timer is None:
            self._stall_timer = self._loop.call_soon(self._check_stall)
        if qos != QOS_0:
            return True
        if not self._dropped:
            log.warning("broker.subscriber_queue_full", client_id=self.link.client_id,
                        queued_bytes=queued, limit=BROKER_QUEUE_BYTES,
                        reason="QoS 0 messages to this client are dropped")
        self._dropped += 1
        return False

    def _check_stall(self) -> None:
        """While over the limit, each second: cut the connection once no byte has left for
        BROKER_STALL_SECONDS."""
        self._stall_timer = None
        queued = self.queued_bytes()
        if self.link.closed:
            return
        if queued < BROKER_QUEUE_BYTES:
            if self._dropped:
                log.info("broker.subscriber_caught_up", client_id=self.link.client_id,
                         dropped_messages=self._dropped)
                self._dropped = 0
            return
        idle = self.link.send_idle()
        if idle >= BROKER_STALL_SECONDS:
            self._cut(queued, f"no byte taken for {idle:.1f} s")
        else:
            self._stall_timer = self._loop.call_later(
                min(1.0, BROKER_STALL_SECONDS - idle), self._check_stall)

    def _cut(self, queued: int, reason: str) -> None:
        self.link.cut("broker.slow_subscriber_dropped", queued_bytes=queued,
                      dropped_messages=self._dropped, limit=BROKER_QUEUE_BYTES, reason=reason)

    async def stop(self) -> None:
        """Also cancel the publishes still queued: amqtt lets each wait for the socket, then up
        to 5 s for an acknowledgement, keeping its payload alive meanwhile."""
        self._stopped = True
        await super().stop()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        for task in list(self._publishing):
            if task is not asyncio.current_task():
                task.cancel()


_ADMITTED = "_ciphertwin_admitted"  # set on a Session once its credentials passed


class _Sessions(dict):  # type: ignore[type-arg]
    """amqtt files every connecting session under its client id *before* refusing bad
    credentials, and finds a subscriber's connection by that id when delivering: a refused
    client would deafen the one holding the id. Only admitted sessions are filed."""

    def __setitem__(self, client_id: str, entry: tuple[Session, Any]) -> None:
        if getattr(entry[0], _ADMITTED, False):
            super().__setitem__(client_id, entry)


class _Subscriptions(dict):  # type: ignore[type-arg]
    """amqtt's subscription table (filter -> [(session, qos)]), walked over a snapshot.

    amqtt awaits the ACL plugins for each subscriber *inside* its walk of this table
    (``_run_broadcast``, and when a client connects): a SUBSCRIBE or a disconnect handled
    meanwhile changed the table, the walk died with ``RuntimeError: dictionary changed size
    during iteration``, and the message never reached the remaining subscribers."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, list[tuple[Session, int]]]]:  # type: ignore[override]
        return [(k, list(v)) for k, v in super().items()]


class _Broadcast(dict):  # type: ignore[type-arg]
    """amqtt's record of one message to broadcast, whose text form leaves the payload out.

    amqtt formats every broadcast into a debug f-string whether debug logging is on or not;
    the repr of a node-input chunk (megabytes) cost 15-50 ms of the broker's event loop per
    message, more than routing it."""

    def __repr__(self) -> str:
        data = self.get("data")
        return f"<broadcast on {self.get('topic')!r}: {0 if data is None else len(data)} bytes>"

    __str__ = __repr__


class _Broker(Broker):
    """amqtt's broker with a packet size limit and an authenticated, visible takeover (see
    the module docstring; these override amqtt 0.12.1 internals, pinned in pyproject)."""

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """amqtt's, with a :class:`_Broadcast` record (same keys, cheap to format)."""
        broadcast = _Broadcast(session=session, topic=topic, data=data)
        if force_qos is not None:
            broadcast["qos"] = force_qos
        await self._broadcast_queue.put(broadcast)  # type: ignore[arg-type]

    def __init__(self, config: dict[str, Any], *, max_packet: int, max_queued: int) -> None:
        super().__init__(config)
        self.max_packet, self.max_queued = max_packet, max_queued
        self._sessions = _Sessions()
        self._subscriptions = _Subscriptions()

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        link = _Link(writer.transport, str(writer.get_extra_info("peername")))
        limited = _LimitedReader(StreamReaderAdapter(reader), self.max_packet, link)
        await self._client_connected(listener_name, limited, _Writer(writer, link))

    async def _initialize_client_session(self, reader: ReaderAdapter, writer: Any,
                                         remote_address: str, remote_port: int,
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        """Once CONNECT is read: our handler instead of amqtt's (still unattached and idle),
        and the keepalive the client announced enforced."""
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port)
        if not isinstance(reader, _LimitedReader):  # a listener type we do not wrap
            return handler, session
        link = reader.link
        link.client_id = session.client_id
        link.enforce_keepalive(session.keep_alive)
        return _Handler(self.plugins_manager, link, self.max_queued), session

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
        broker = _Broker(self._config(), max_packet=broker_max_packet(),
                         max_queued=broker_queue_hard_bytes())
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

    def session_state(self, client_id: str) -> str | None:
        """amqtt's state of ``client_id``'s session ("connected", "disconnected"), None if none."""
        entry = self._broker.sessions.get(client_id) if self._broker else None
        return entry[0].transitions.state if entry else None

    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        """Topic filter -> (session, QoS) of each subscriber (read-only view for checks)."""
        return dict(self._broker.subscriptions) if self._broker else {}

    def queued_bytes(self, client_id: str) -> int:
        """Bytes the broker owes ``client_id``'s connection (0 if none; module docstring)."""
        entry = self._broker.sessions.get(client_id) if self._broker else None
        return entry[1].queued_bytes() if entry and isinstance(entry[1], _Handler) else 0

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
