"""The one MQTT client every ciphertwin service uses (aiomqtt 2.x underneath).

Why a wrapper: aiomqtt gives a single connection that dies with the broker. Services here must
outlive broker restarts and network cuts, so this class owns a supervisor task that reconnects
with exponential back-off and jitter, re-subscribes everything, and hands each message to a
per-subscription worker so one slow or failing handler neither blocks the others nor kills
the loop.

Receiving is the hot path of the cloud (thousands of messages per second), so two costs of
the libraries underneath are cut: paho reads every packet with three or more ``recv`` calls
and one event-loop wake-up (a read buffer, :class:`_BufferedSocket`, serves a whole burst
from one ``recv``), and aiomqtt's message iterator creates a task per message (messages are
routed to the subscriptions straight from paho's callback instead, :class:`_Inbox`, with the
matching subscriptions of each topic remembered).

Everything that arrives is attacker-controlled (the broker and the cloud are not trusted), so
memory stays bounded: a subscription may declare the largest payload it carries
(``max_payload``, e.g. :func:`ciphertwin.bus.envelope.max_size_of` of its kinds) and larger
messages are dropped, logged, before they are queued or decoded; and each subscription's
queue holds at most ``queue_bytes`` (:class:`~ciphertwin.bus.budget.ByteBudget`), beyond
which messages are dropped with a logged reason (senders that need every message resend
until acknowledged end to end, as devices do).

Client ids: every connection gets its own, ``<principal>@<96 random bits>``
(:func:`unique_client_id`), unless the caller insists on one. Two processes of one principal
under one id would make the broker drop (or, with amqtt, silently deafen) the older
connection; the random suffix also keeps other principals from guessing, and so taking over,
an id on brokers that cannot restrict ids per user (Mosquitto). A connection the broker drops
is re-established at once and logged; one dropped again and again soon after connecting is
logged as an error (another client with the same id, typically).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt
import structlog

from ciphertwin.bus.budget import ByteBudget
from ciphertwin.bus.errors import (
    BusAuthError,
    BusError,
    BusUnavailable,
    RequestTimeout,
    SubscriptionDenied,
)
from ciphertwin.bus.topics import DEFAULT_PREFIX, Topics, validate_id
from ciphertwin.errors import ValidationError

if TYPE_CHECKING:
    from ciphertwin.config.settings import Deployment

log = structlog.get_logger(__name__)

T = TypeVar("T")

Handler = Callable[[str, bytes, bool], Awaitable[None]]
"""handler(topic, payload, retain) — called once per delivered message."""

_AUTH_REFUSED = {4, 5, 0x86, 0x87}  # 3.1.1 bad credentials / not authorised, and MQTT 5 codes
_SUBACK_FAILURE = 0x80
_READ_CHUNK = 256 * 1024
_ROUTES_LIMIT = 10_000
_QUEUE_BYTES = 256 * 1024 * 1024
_SHORT_LIVED = 10.0  # seconds: a connection dropped sooner counts towards "repeatedly kicked"
_KICKS_BEFORE_ERROR = 3


def unique_client_id(principal: str | None) -> str:
    """``<principal>@<96 random bits>``: the broker's id rule
    (:func:`ciphertwin.broker.acl.client_id_allowed`) admits it, no other process uses it."""
    return f"{principal or 'anonymous'}@{secrets.token_hex(12)}"


class _BufferedSocket:
    """A plain TCP socket as paho sees it, with a read buffer.

    paho asks for the type byte, each length byte and the body separately; one large
    ``recv`` answers them all. ``pending()`` tells aiomqtt (which asks it of TLS sockets) that
    buffered bytes remain, so its reader keeps parsing instead of waiting for the next
    wake-up. Everything else is the socket's own.
    """

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(size, _READ_CHUNK))  # BlockingIOError passes through
            if len(data) <= size:
                return data
            self._buf, self._pos = data, 0
        start, self._pos = self._pos, min(self._pos + size, len(self._buf))
        return self._buf[start : self._pos]

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _tune_socket(client: aiomqtt.Client) -> None:
    """Make paho's socket send small packets at once (TCP_NODELAY: paho leaves Nagle on,
    which holds an ack back until the previous one is acknowledged — tens of ms each) and
    read plain TCP through :class:`_BufferedSocket` (TLS sockets buffer already). Leaves
    the client alone if the library internals are not as expected."""
    paho = getattr(client, "_client", None)
    create = getattr(paho, "_create_socket", None)
    if create is None:
        return

    def create_tuned() -> Any:
        sock = create()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _BufferedSocket(sock) if type(sock) is socket.socket else sock

    paho._create_socket = create_tuned  # type: ignore[union-attr]


class _Inbox(asyncio.Queue):  # type: ignore[type-arg]
    """Stands in for aiomqtt's incoming queue: paho's callback puts each message here and it
    is delivered at once, so nothing waits on this queue per message (aiomqtt's iterator
    still waits on it, and still ends when the connection drops)."""

    def __init__(self, deliver: Callable[[aiomqtt.Message], None], maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._deliver = deliver

    def put_nowait(self, item: aiomqtt.Message) -> None:
        self._deliver(item)


@dataclass(eq=False)
class _Subscription:
    filter: str
    handler: Handler | None
    qos: int
    queue: asyncio.Queue[tuple[str, bytes, bool]]
    budget: ByteBudget
    max_payload: int | None = None
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    dropping: int = 0
    """Messages dropped since the queue last had room (logged when it has room again)."""


class _ConnectionLost(Exception):
    """The connection an operation was waiting on dropped (internal: the operation is retried
    on the next connection)."""


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done-callback of an abandoned operation: collect its outcome (no "never retrieved")."""
    if not task.cancelled():
        task.exception()


def _on_disconnect(client: aiomqtt.Client, lost: asyncio.Future[None]) -> None:
    """Resolve ``lost`` the moment aiomqtt learns the connection dropped (its internal
    ``_disconnected`` future), before the supervisor's message loop ends; left alone if the
    library internals are not as expected (the supervisor resolves ``lost`` then)."""
    disconnected = getattr(client, "_disconnected", None)
    if isinstance(disconnected, asyncio.Future):
        disconnected.add_done_callback(lambda _: None if lost.done() else lost.set_result(None))


def _check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        raise ValidationError(f"invalid publish topic {topic!r}: non-empty, no wildcards")
    return topic


def _check_filter(topic_filter: object) -> str:
    if not isinstance(topic_filter, str) or not topic_filter:
        raise ValidationError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise ValidationError(f"invalid topic filter {topic_filter!r}: misplaced wildcard")
    return topic_filter


def _check_qos(qos: object) -> int:
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise ValidationError(f"invalid QoS {qos!r}: expected 0, 1 or 2")
    return int(qos)  # type: ignore[arg-type]


class BusClient:
    """Resilient MQTT connection: ``async with BusClient(...) as bus: ...``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        keepalive: int = 30,
        tls_context: ssl.SSLContext | None = None,
        clean_session: bool = True,
        connect_timeout: float = 30.0,
        publish_timeout: float = 10.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
        max_inflight: int = 200,
        queue_size: int = 10_000,
        queue_bytes: int = _QUEUE_BYTES,
    ) -> None:
        """``client_id`` None (the default): :func:`unique_client_id` of ``username``.
        ``queue_size``: backlog of one subscription above which ``bus.backlog`` is logged;
        ``queue_bytes``: bytes one subscription's queue may hold, beyond which messages are
        dropped and logged (``bus.queue_full``).
        ``publish_timeout``: how long ``publish``/``subscribe`` wait by default (through an
        outage included) before raising BusUnavailable; ``math.inf`` waits for ever.
        ``backoff_max``: the longest pause between reconnect attempts (jitter included);
        2 s lets a device resume within a few seconds of the broker's return, however long
        the outage was."""
        if client_id is None:
            client_id = unique_client_id(username)
        if not isinstance(host, str) or not host:
            raise ValidationError(f"invalid broker host {host!r}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValidationError(f"invalid broker port {port!r}")
        if not isinstance(client_id, str) or not 0 < len(client_id) <= 128:
            raise ValidationError(f"invalid client id {client_id!r}")
        if username is not None:
            validate_id(username, "username")
        if keepalive < 5 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValidationError("keepalive must be >= 5 s and 0 < backoff_initial <= backoff_max")
        self.host, self.port, self.client_id = host, port, client_id
        self.topics = Topics(prefix)
        self._username, self._password = username, password
        self._keepalive = keepalive
        self._tls_context = tls_context
        self._clean_session = clean_session
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._backoff = (backoff_initial, backoff_max)
        self._op_timeout = min(publish_timeout, connect_timeout)
        """Bound of the waits on one connection that have no caller's timeout (finite)."""
        self._max_inflight = max_inflight
        self._queue_size = queue_size
        self._queue_bytes = ByteBudget(queue_bytes).limit
        self._inflight = asyncio.Semaphore(max_inflight)

        self._subs: dict[str, _Subscription] = {}
        self._routes: dict[str, tuple[_Subscription, ...]] = {}
        self._waiters: dict[str, asyncio.Future[bytes]] = {}
        self._client: aiomqtt.Client | None = None
        self._lost: asyncio.Future[None] | None = None
        """Resolved when ``_client``'s connection drops: wakes operations waiting on it (aiomqtt
        never wakes the wait for the PUBACK of a publish cut by a disconnect)."""
        self._connected = asyncio.Event()
        self._first_connect: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._log = log.bind(client_id=client_id, broker=f"{host}:{port}")
        self.reconnects = 0
        """How many times the connection was (re-)established after the first one."""

    @classmethod
    def for_deployment(
        cls,
        deployment: Deployment,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> BusClient:
        """A client for the deployment's broker (host, port, prefix, keepalive, TLS), with a
        client id of its own unless one is given."""
        b = deployment.broker
        tls = None
        if b.tls.enabled:
            tls = ssl.create_default_context(cafile=str(b.tls.cafile) if b.tls.cafile else None)
        return cls(b.host, b.port, client_id=client_id, username=username, password=password,
                   prefix=b.prefix, keepalive=b.keepalive, tls_context=tls, **kwargs)

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> BusClient:
        if self._supervisor is not None:
            raise BusError("BusClient is already running")
        self._first_connect = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._run(), name=f"bus:{self.client_id}")
        try:
            await asyncio.wait_for(asyncio.shield(self._first_connect), self.connect_timeout)
        except TimeoutError:
            await self.close()
            raise BusUnavailable(
                f"could not connect to MQTT broker {self.host}:{self.port} "
                f"within {self.connect_timeout:.1f} s"
            ) from None
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reconnecting, stop handler workers, disconnect."""
        sup, self._supervisor = self._supervisor, None
        tasks = [w for s in self._subs.values() for w in s.workers]
        if sup is not None:
            tasks.append(sup)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs.values():
            sub.workers.clear()
        self._subs.clear()
        self._routes.clear()
        self._connected.clear()
        self._client, self._lost = None, None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Block until connected; raise BusUnavailable after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise BusUnavailable(
                f"MQTT broker {self.host}:{self.port} unreachable for {timeout:.1f} s"
            ) from None

    # -- public operations --------------------------------------------------------------
    async def subscribe(
        self, topic_filter: str, handler: Handler | None, qos: int = 1, *, concurrency: int = 1,
        max_payload: int | None = None,
    ) -> None:
        """Subscribe now and after every reconnect; raise SubscriptionDenied if refused.

        ``concurrency`` > 1 runs that many handler calls in parallel (message order is then
        no longer guaranteed for this subscription). ``handler=None`` subscribes only to feed
        ``request()`` replies. ``max_payload``: larger messages are dropped (and logged)
        before they are queued — give the largest size of the kinds the topic carries.
        """
        _check_filter(topic_filter)
        qos = _check_qos(qos)
        if topic_filter in self._subs:
            raise BusError(f"already subscribed to {topic_filter!r}")
        if not 1 <= concurrency <= 64:
            raise ValidationError("concurrency must be within 1..64")
        if max_payload is not None and not 0 < max_payload <= self._queue_bytes:
            raise ValidationError(f"max_payload must be within 1..{self._queue_bytes} bytes")
        sub = _Subscription(topic_filter, handler, qos, asyncio.Queue(),
                            ByteBudget(self._queue_bytes), max_payload)
        if handler is not None:
            sub.workers = [
                asyncio.create_task(self._worker(sub), name=f"bus-handler:{topic_filter}")
                for _ in range(concurrency)
            ]
        self._subs[topic_filter] = sub
        self._routes.clear()
        try:
            await self._until_done(functools.partial(self._subscribe_on, sub=sub),
                                   self.publish_timeout, f"subscribe to {topic_filter!r}")
        except BaseException:
            self._drop_subscription(topic_filter)
            raise

    async def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription (and tell the broker if connected)."""
        client, lost = self._client, self._lost
        if self._drop_subscription(topic_filter) and client is not None and lost is not None:
            with contextlib.suppress(aiomqtt.MqttError, _ConnectionLost):
                await self._unless_lost(client.unsubscribe(topic_filter, timeout=math.inf), lost,
                                        asyncio.get_running_loop().time() + self._op_timeout)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        """Publish; for QoS >= 1 return once the broker acknowledged.

        Waits through outages: a publish whose connection drops before the broker
        acknowledged it is sent again on the next connection (QoS 1 is at-least-once anyway).
        ``timeout`` (default ``publish_timeout``; ``math.inf`` for none) bounds the whole
        wait, reconnects included; past it BusUnavailable is raised.
        """
        _check_topic(topic)
        qos = _check_qos(qos)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValidationError(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)

        async def send(client: aiomqtt.Client) -> None:
            async with self._inflight:
                await client.publish(topic, data, qos=qos, retain=retain, timeout=math.inf)

        await self._until_done(send, self.publish_timeout if timeout is None else timeout,
                               f"publish to {topic!r}")

    async def request(
        self,
        topic: str,
        payload: bytes,
        reply_topic: str,
        timeout: float = 10.0,
        qos: int = 1,
    ) -> bytes:
        """Publish ``payload`` to ``topic`` and return the first message on ``reply_topic``.

        If no standing subscription covers ``reply_topic`` a temporary one is made (and
        removed afterwards), so the reply cannot be missed.
        """
        _check_topic(reply_topic)
        if reply_topic in self._waiters:
            raise BusError(f"a request is already waiting on {reply_topic!r}")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[reply_topic] = fut
        temporary = not any(aiomqtt.Topic(reply_topic).matches(f) for f in self._subs)
        try:
            if temporary:
                await self.subscribe(reply_topic, None, qos)
            await self.publish(topic, payload, qos)
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply on {reply_topic!r} within {timeout:.1f} s"
                ) from None
        finally:
            self._waiters.pop(reply_topic, None)
            if temporary and reply_topic in self._subs:
                await self.unsubscribe(reply_topic)

    # -- internals ----------------------------------------------------------------------
    def _drop_subscription(self, topic_filter: str) -> bool:
        sub = self._subs.pop(topic_filter, None)
        if sub is None:
            return False
        self._routes.clear()
        for w in sub.workers:
            w.cancel()
        return True

    async def _until_done(self, op: Callable[[aiomqtt.Client], Awaitable[T]], timeout: float,
                          what: str) -> T:
        """``op`` on the current connection; if that connection drops first, ``op`` again on
        the next one. BusUnavailable once ``timeout`` seconds have passed (``math.inf``:
        never)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        failed: aiomqtt.Client | None = None
        while True:
            client, lost = await self._wait_client(deadline - loop.time(), not_this=failed)
            try:
                return await self._unless_lost(op(client), lost, deadline)
            except (aiomqtt.MqttError, _ConnectionLost) as exc:
                failed = client
                if loop.time() >= deadline:
                    raise BusUnavailable(f"{what} failed: {exc}") from exc
                self._log.debug("bus.retry", op=what, error=str(exc))

    @staticmethod
    async def _unless_lost(aw: Awaitable[T], lost: asyncio.Future[None], deadline: float) -> T:
        """Await ``aw`` (an operation on one connection) unless that connection drops first
        (_ConnectionLost) or ``deadline`` passes (MqttError): aiomqtt itself would wait for the
        acknowledgement of an operation cut by a disconnect until its timeout."""
        task = asyncio.ensure_future(aw)
        try:
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED,
                               timeout=None if remaining == math.inf else max(remaining, 0.0))
            if task.done():
                return task.result()
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve)
        if lost.done():
            raise _ConnectionLost("connection lost before the broker acknowledged")
        raise aiomqtt.MqttError("operation timed out")

    async def _wait_client(
        self, timeout: float, not_this: aiomqtt.Client | None = None
    ) -> tuple[aiomqtt.Client, asyncio.Future[None]]:
        """The current connection (its client and its "lost" future), waiting up to
        ``timeout`` seconds for one other than ``not_this``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            client, lost = self._client, self._lost
            if (self._connected.is_set() and client is not None and client is not not_this
                    and lost is not None and not lost.done()):
                return client, lost
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BusUnavailable(
                    f"MQTT broker {self.host}:{self.port} unavailable (waited {timeout:.1f} s)"
                )
            if self._supervisor is None:
                raise BusError("BusClient is not running (use 'async with')")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), min(remaining, 0.05))
            if self._connected.is_set() and (self._client is not_this or
                                             (self._lost is not None and self._lost.done())):
                await asyncio.sleep(0.01)  # supervisor has not noticed the drop yet

    async def _subscribe_on(self, client: aiomqtt.Client, sub: _Subscription) -> None:
        result = await client.subscribe(sub.filter, qos=sub.qos, timeout=math.inf)
        codes = [getattr(c, "value", c) for c in result]
        if any(c >= _SUBACK_FAILURE for c in codes):
            raise SubscriptionDenied(f"broker refused subscription to {sub.filter!r}")

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive,
            clean_session=self._clean_session,
            tls_context=self._tls_context,
            max_inflight_messages=self._max_inflight,
            timeout=self._op_timeout,  # connecting, disconnecting
            queue_type=functools.partial(_Inbox, self._deliver),  # type: ignore[arg-type]
        )
        _tune_socket(client)
        # aiomqtt warns on every call above this; concurrency is bounded by _inflight instead
        client.pending_calls_threshold = 1 << 30
        return client

    def _backoff_delay(self, attempt: int) -> float:
        initial, cap = self._backoff
        return min(cap, initial * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter

    async def _run(self) -> None:
        attempt = 0
        ever_connected = False
        kicks = 0  # connections in a row the broker dropped soon after they were made
        loop = asyncio.get_running_loop()
        while True:
            client = self._new_client()
            lost: asyncio.Future[None] = loop.create_future()
            since: float | None = None
            try:
                async with client:
                    _on_disconnect(client, lost)
                    for sub in list(self._subs.values()):
                        try:
                            await self._unless_lost(self._subscribe_on(client, sub), lost,
                                                    loop.time() + self._op_timeout)
                        except SubscriptionDenied as exc:
                            self._log.error("bus.resubscribe_denied", error=str(exc))
                        except _ConnectionLost as exc:
                            raise aiomqtt.MqttError("connection lost while resubscribing") from exc
                    self._client, self._lost = client, lost
                    self._connected.set()
                    since = loop.time()
                    attempt = 0
                    if ever_connected:
                        self.reconnects += 1
                        self._log.info("bus.reconnected", subscriptions=len(self._subs))
                    else:
                        ever_connected = True
                        self._log.info("bus.connected")
                        if self._first_connect and not self._first_connect.done():
                            self._first_connect.set_result(None)
                    async for message in client.messages:  # only ends (see _Inbox)
                        self._deliver(message)
            except aiomqtt.MqttError as exc:  # noqa: PERF203
                rc = getattr(exc, "rc", None)
                rc = getattr(rc, "value", rc)
                if not ever_connected and rc in _AUTH_REFUSED:
                    if self._first_connect and not self._first_connect.done():
                        self._first_connect.set_exception(
                            BusAuthError(f"broker {self.host}:{self.port} refused credentials "
                                         f"of {self.client_id!r}: {exc}")
                        )
                    return
                kicks = self._connection_lost(exc, since, kicks, attempt)
            except Exception as exc:  # noqa: BLE001 - the supervisor must never die
                self._log.error("bus.supervisor_error", error=f"{type(exc).__name__}: {exc}",
                                exc_info=True)
            finally:
                if not lost.done():
                    lost.set_result(None)  # wakes every operation waiting on this connection
                self._connected.clear()
                self._client, self._lost = None, None
            await asyncio.sleep(self._backoff_delay(attempt))
            attempt += 1

    def _connection_lost(self, exc: aiomqtt.MqttError, since: float | None, kicks: int,
                         attempt: int) -> int:
        """Log a dropped connection (reconnecting follows); return how many connections in a
        row were dropped soon after they were made — a session taken over by another client
        with this id, typically, which is an error: both keep losing messages."""
        if since is None:  # not connected yet: the broker is unreachable
            self._log.warning("bus.connection_lost", error=str(exc), attempt=attempt)
            return kicks
        lived = asyncio.get_running_loop().time() - since
        kicks = kicks + 1 if lived < _SHORT_LIVED else 0
        self._log.warning("bus.connection_lost", error=str(exc), connected_for=round(lived, 3),
                          reconnecting=True)
        if kicks >= _KICKS_BEFORE_ERROR:
            self._log.error("bus.repeatedly_disconnected", kicks=kicks,
                            reason="the broker keeps dropping this connection soon after it "
                                   "is made: is another client using this client id?")
        return kicks

    def _deliver(self, message: aiomqtt.Message) -> None:
        """Hand a message to its request waiter and to the queue of every matching
        subscription (called from paho's read callback: must not block)."""
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes):
            payload = bytes(payload) if isinstance(payload, bytearray) else b""
        waiter = self._waiters.get(topic)
        if waiter is not None and not waiter.done():
            waiter.set_result(payload)
        entry = (topic, payload, bool(message.retain))
        for sub in self._route(message.topic):
            if self._admit(sub, topic, len(payload)):
                sub.queue.put_nowait(entry)
                if sub.queue.qsize() == self._queue_size:
                    self._log.warning("bus.backlog", filter=sub.filter, queued=self._queue_size)

    def _admit(self, sub: _Subscription, topic: str, size: int) -> bool:
        """Room for a message of ``size`` bytes in ``sub``'s queue? Else drop it, logged."""
        if sub.max_payload is not None and size > sub.max_payload:
            self._log.warning("bus.oversize_dropped", topic=topic, filter=sub.filter, size=size,
                              limit=sub.max_payload)
            return False
        if not sub.budget.try_take(size):
            if not sub.dropping:
                self._log.warning("bus.queue_full", filter=sub.filter, queued_bytes=sub.budget.used,
                                  limit=sub.budget.limit, reason="handler too slow: dropping")
            sub.dropping += 1
            return False
        if sub.dropping:
            self._log.warning("bus.queue_recovered", filter=sub.filter, dropped=sub.dropping)
            sub.dropping = 0
        return True

    def _route(self, topic: aiomqtt.Topic) -> tuple[_Subscription, ...]:
        """Subscriptions with a handler whose filter matches ``topic``; remembered per topic
        (matching every filter costs more than everything else per message)."""
        subs = self._routes.get(topic.value)
        if subs is None:
            subs = tuple(s for s in self._subs.values()
                         if s.handler is not None and topic.matches(s.filter))
            if len(self._routes) >= _ROUTES_LIMIT:
                self._routes.clear()
            self._routes[topic.value] = subs
        return subs

    async def _worker(self, sub: _Subscription) -> None:
        assert sub.handler is not None
        while True:
            topic, payload, retain = await sub.queue.get()
            try:
                await sub.handler(topic, payload, retain)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a handler must never kill the loop
                self._log.error(
                    "bus.handler_failed",
                    topic=topic,
                    filter=sub.filter,
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=not isinstance(exc, ValidationError),
                )
            finally:
                sub.budget.release(len(payload))


__all__ = ["BusClient", "Handler", "unique_client_id"]
