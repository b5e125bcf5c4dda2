"""The cloud twin's durable store: an append-only, idempotent envelope log plus grants.

The cloud is untrusted with data, so everything stored here is ciphertext, public keys,
signed tokens and re-encryption keys — never a plaintext or a secret key. The store only
knows bytes and ids; the cloud service interprets them.

Idempotence: an envelope is identified by (twin, device, seq) — device names are the
twin owner's to give, so they are unique only within a twin. Storing the same envelope twice is a
no-op that still reports it as stored (so a replayed outbox gets its acknowledgement); storing
a *different* envelope under an existing (twin, device, seq) is a conflict and is refused.

One bad envelope never costs the others their place: when a batch fails, its halves are
tried, down to the one envelope the database refuses, which alone is reported
:class:`Unstorable` (final: its device is told). A failure of the store itself (disk full,
locked, connection lost, schema gone) is not an envelope's fault: it raises
:class:`StoreUnavailable`, nothing is acknowledged and devices resend.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import structlog

from ciphertwin.config.settings import StorageSettings
from ciphertwin.errors import CipherTwinError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """One data envelope as the cloud keeps it (opaque, signed ciphertext)."""

    twin: str
    device: str
    seq: int
    capsule_id: bytes
    attributes: tuple[str, ...]
    item_time: float
    payload: bytes  # the complete signed envelope bytes, re-sent as-is to readers


@dataclass(frozen=True, slots=True)
class WindowGroup:
    """Items of one twin in a job window that share a capsule and an attribute set.

    A job plans with these (counts and sizes, no payloads): grants are matched once per
    group, not once per item."""

    twin: str
    capsule_id: bytes
    attributes: tuple[str, ...]
    count: int
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class WindowItem:
    """What a job sends of one stored envelope: the payload plus what picks its key."""

    twin: str
    capsule_id: bytes
    attributes: tuple[str, ...]
    payload: bytes


@dataclass(frozen=True, slots=True)
class Grant:
    """A re-encryption key installed by an owner for one receiver over some twins."""

    grant_id: str
    owner: str
    receiver: str
    twins: tuple[str, ...]
    policy: str
    rekey: bytes
    created: float
    revoked: float | None = None


class Outcome(StrEnum):
    """What storing one envelope did; NEW and DUPLICATE are both durably stored."""

    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Unstorable:
    """The database refused this one envelope (a value it cannot hold, a constraint) while
    storing the rest of its batch: final for the envelope."""

    reason: str


Stored = Outcome | Unstorable



# -- twin state (P4) and requests (P5): records ------------------------------------------


@dataclass(frozen=True, slots=True)
class DesiredRecord:
    """The latest desired document of a twin: an opaque, signed ``desired_set`` envelope
    (always the full document) plus the plaintext metadata the cloud decides on."""

    twin: str
    version: int
    writer: str
    envelope: bytes
    time: float


@dataclass(frozen=True, slots=True)
class ReportedRecord:
    """A device's latest ``reported_set`` envelope and its plaintext metadata."""

    twin: str
    device: str
    version: int
    desired_version: int
    in_sync: bool
    envelope: bytes
    time: float


@dataclass(frozen=True, slots=True)
class VersionOutcome:
    """Result of a compare-and-set on a version: ``accepted`` and the version stored after
    the call (the caller's on success, the winner's on a refusal)."""

    accepted: bool
    current: int
    duplicate: bool = False
    """Accepted because exactly these bytes were stored already (a resend): nothing changed."""


class RequestState(StrEnum):
    """A request as the cloud keeps it; ``OPEN`` is queued or delivered, not yet final."""

    OPEN = "open"
    ANSWERED = "answered"
    EXPIRED = "expired"
    REFUSED = "refused"  # e.g. its permit was revoked while it waited in the queue


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One accepted request: opaque envelope plus metadata (no plaintext)."""

    requester: str
    request_id: str
    twin: str
    envelope: bytes
    deadline: float
    wake: bool
    received: float
    state: RequestState = RequestState.OPEN


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request in one device's queue, in arrival order (``ord``)."""

    ord: int
    twin: str
    device: str
    requester: str
    request_id: str
    wrap: bytes
    delivered: bool
    envelope: bytes
    deadline: float
    wake: bool


class Enqueued(StrEnum):
    NEW = "new"
    REPLAYED = "replayed"
    FULL = "full"


class StateTx(Protocol):
    """One open transaction of a backend, over the shared SQL (``?`` placeholders)."""

    async def fetch(self, sql: str, *args: object) -> list[Sequence[Any]]: ...

    async def execute(self, sql: str, *args: object) -> int:
        """Run a statement; the number of rows it changed."""
        ...


_STATE_SQL = {
    "desired_get": "SELECT version, writer, envelope, time FROM {s}twin_desired WHERE twin = ?",
    "desired_insert": "INSERT INTO {s}twin_desired (twin, version, writer, envelope, time) "
                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT (twin) DO NOTHING",
    "desired_update": "UPDATE {s}twin_desired SET version = ?, writer = ?, envelope = ?, time = ? "
                      "WHERE twin = ? AND version = ?",
    "reported_get": "SELECT device, version, desired_version, in_sync, envelope, time "
                    "FROM {s}twin_reported WHERE twin = ? ORDER BY time DESC, device",
    "reported_one": "SELECT version, envelope FROM {s}twin_reported WHERE twin = ? AND device = ?",
    "reported_put": (
        "INSERT INTO {s}twin_reported AS cur (twin, device, version, desired_version, in_sync, "
        "envelope, time) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (twin, device) DO UPDATE SET "
        "version = excluded.version, desired_version = excluded.desired_version, "
        "in_sync = excluded.in_sync, envelope = excluded.envelope, time = excluded.time "
        "WHERE cur.version < excluded.version"),
    "request_insert": "INSERT INTO {s}requests (requester, request_id, twin, envelope, deadline, "
                      "wake, received, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'open') "
                      "ON CONFLICT (requester, request_id) DO NOTHING",
    "request_get": "SELECT twin, envelope, deadline, wake, received, state FROM {s}requests "
                   "WHERE requester = ? AND request_id = ?",
    "request_close": "UPDATE {s}requests SET state = ?, closed = ? "
                     "WHERE requester = ? AND request_id = ? AND state = 'open'",
    "requests_due": "SELECT requester, request_id, twin, envelope, deadline, wake, received, "
                    "state FROM {s}requests WHERE state = 'open' AND deadline < ? "
                    "ORDER BY deadline LIMIT ?",
    "requests_purge": "DELETE FROM {s}requests WHERE state <> 'open' AND deadline < ?",
    "queue_count": "SELECT count(*) FROM {s}request_queue WHERE twin = ? AND device = ?",
    "queue_insert": "INSERT INTO {s}request_queue (twin, device, requester, request_id, wrap, "
                    "delivered) VALUES (?, ?, ?, ?, ?, ?)",
    "queue_of_device": (
        "SELECT q.ord, q.requester, q.request_id, q.wrap, q.delivered, r.envelope, r.deadline, "
        "r.wake FROM {s}request_queue q JOIN {s}requests r "
        "ON r.requester = q.requester AND r.request_id = q.request_id "
        "WHERE q.twin = ? AND q.device = ? AND q.ord > ? AND (? OR q.delivered = ?) "
        "ORDER BY q.ord LIMIT ?"),
    "queue_mark": "UPDATE {s}request_queue SET delivered = ? "
                  "WHERE twin = ? AND device = ? AND ord <= ? AND ord >= ? AND delivered = ?",
    "queue_has": "SELECT 1 FROM {s}request_queue WHERE requester = ? AND request_id = ? "
                 "AND twin = ? AND device = ?",
    "queue_drop": "DELETE FROM {s}request_queue WHERE requester = ? AND request_id = ?",
    "queue_devices": "SELECT DISTINCT twin, device FROM {s}request_queue",
}
"""SQL both backends share (PostgreSQL numbers the ``?``; ``{s}`` is its schema)."""


class StoreUnavailable(CipherTwinError):
    """The store failed for a reason of its own, not an envelope's: nothing is acknowledged.
    Raised too when the store cannot be opened or was lost while running: the service then
    exits (non-zero) so that its supervisor restarts it, instead of running without storage."""


class Fault(Enum):
    """Whose fault a failed write is, as far as the database's error tells."""

    ITEM = "item"  # a value or constraint of the rows written: bisect, refuse the one
    STORE = "store"  # disk, lock, connection, schema: no envelope is to blame
    UNKNOWN = "unknown"  # bisect, but blame no single envelope for it


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class TwinStore(abc.ABC):
    """What the cloud service needs from storage; SQLite by default."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def append_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> list[Stored]:
        """Commit a batch; per input NEW, DUPLICATE (identical bytes already stored), CONFLICT
        or :class:`Unstorable`. Raises :class:`StoreUnavailable` when the store itself fails.

        A failed batch is split in halves (and those again), so one bad envelope costs about
        2·log2(n) smaller commits and is refused alone; a failure that is the store's stops
        at once (a lock wait or a full disk would only repeat)."""
        if not envelopes:
            return []
        try:
            return list(await self._append(envelopes))
        except Exception as exc:  # noqa: BLE001 - classified right here
            fault = self._fault(exc)
            if fault is Fault.STORE or (len(envelopes) == 1 and fault is Fault.UNKNOWN):
                log.error("store.unavailable", envelopes=len(envelopes), fault=fault.value,
                          error=_brief(exc))
                raise StoreUnavailable(_brief(exc)) from exc
            if len(envelopes) == 1:
                e = envelopes[0]
                log.warning("store.envelope_refused", twin=e.twin, device=e.device, seq=e.seq,
                            error=_brief(exc))
                return [Unstorable(f"the store refused it: {_brief(exc)}")]
        mid = len(envelopes) // 2
        return [*await self.append_envelopes(envelopes[:mid]),
                *await self.append_envelopes(envelopes[mid:])]

    @abc.abstractmethod
    async def _append(self, envelopes: Sequence[StoredEnvelope]) -> list[Outcome]:
        """Commit the batch as a whole (or nothing of it: a failure leaves no row behind);
        per input NEW, DUPLICATE or CONFLICT."""

    def _fault(self, exc: Exception) -> Fault:
        """Whose fault a failed ``_append`` is; backends know their drivers' errors."""
        if isinstance(exc, OverflowError | UnicodeError):  # a value the driver cannot bind
            return Fault.ITEM
        if isinstance(exc, OSError | TimeoutError | RuntimeError):  # RuntimeError: not open
            return Fault.STORE
        return Fault.UNKNOWN

    @abc.abstractmethod
    async def put_capsules(self, rows: Sequence[tuple[bytes, str, tuple[str, ...], bytes]]) -> None:
        """(capsule_id, twin, attributes, capsule bytes) rows; existing ids are kept."""

    @abc.abstractmethod
    async def get_capsules(self, capsule_ids: Sequence[bytes]) -> dict[bytes, bytes]: ...

    @abc.abstractmethod
    async def capsule_info(
        self, capsule_ids: Sequence[bytes]
    ) -> dict[bytes, tuple[str, tuple[str, ...]]]:
        """capsule_id -> (twin it was stored for, its attributes)."""

    @abc.abstractmethod
    async def history(
        self, twin: str, since: float = 0.0, until: float = float("inf"), limit: int = 1000,
        after: tuple[float, str, int] | None = None,
    ) -> list[StoredEnvelope]:
        """Envelopes of a twin by item time; `after` is the (item_time, device, seq) cursor
        of the previous page's last row."""

    @abc.abstractmethod
    async def window_groups(
        self, twins: Sequence[str], since: float, until: float, stored_until: float = float("inf"),
    ) -> list[WindowGroup]:
        """Per (twin, capsule, attributes): items with since <= item_time <= until that were
        stored at or before ``stored_until`` — one query for many twins."""

    @abc.abstractmethod
    async def window_items(
        self, twins: Sequence[str], since: float, until: float, stored_until: float = float("inf"),
    ) -> list[WindowItem]:
        """The items ``window_groups`` counts, ordered by (twin, item_time, device, seq)."""

    @abc.abstractmethod
    async def put_grant(self, grant: Grant) -> None: ...

    @abc.abstractmethod
    async def revoke_grant(self, owner: str, grant_id: str, at: float) -> bool: ...

    @abc.abstractmethod
    async def active_grants(self) -> list[Grant]: ...

    @abc.abstractmethod
    async def put_kv(self, namespace: str, key: str, value: bytes) -> None:
        """Small registry records: owner keys, write tokens, process tokens."""

    @abc.abstractmethod
    async def get_kv(self, namespace: str, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def list_kv(self, namespace: str) -> dict[str, bytes]: ...

    @abc.abstractmethod
    async def cached_recapsules(
        self, pairs: Sequence[tuple[bytes, str]]
    ) -> dict[tuple[bytes, str], bytes]:
        """Re-encrypted capsules already made for these (capsule_id, grant_id) pairs."""

    @abc.abstractmethod
    async def cache_recapsules(self, rows: Sequence[tuple[bytes, str, bytes]]) -> None: ...

    # -- twin state (P4) and requests (P5) ------------------------------------------------
    # The logic lives here once; a backend gives a transaction (`_state_tx`) running the
    # shared SQL of `_STATE_SQL`, and `_lock_device` (serialises one device's queue across
    # cloud workers for the cap check).

    @abc.abstractmethod
    def _state_tx(self, *, write: bool = True) -> contextlib.AbstractAsyncContextManager[StateTx]:
        """One transaction: committed when the block ends, rolled back if it raises.
        ``write=False`` for one that only reads (SQLite then takes no write lock, which
        ingest's writer would otherwise wait on)."""

    async def _lock_device(self, tx: StateTx, twin: str, device: str) -> None:
        """Hold one device's queue until the transaction ends (a backend that serialises
        every write transaction needs nothing more)."""

    async def get_desired(self, twin: str) -> DesiredRecord | None:
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["desired_get"], twin)
        if not rows:
            return None
        version, writer, envelope, at = rows[0]
        return DesiredRecord(twin, int(version), str(writer), bytes(envelope), float(at))

    async def set_desired(self, record: DesiredRecord, base_version: int) -> VersionOutcome:
        """Store ``record`` (whose version must be ``base_version + 1``) iff the stored
        version is still ``base_version`` — one transaction, so of two concurrent writers
        from the same base exactly one wins. A resend of the stored envelope is accepted
        again (``duplicate``) without changing anything."""
        if record.version != base_version + 1:
            raise ValueError("a desired version is its base version + 1")
        async with self._state_tx() as tx:
            if base_version == 0:
                changed = await tx.execute(
                    _STATE_SQL["desired_insert"], record.twin, record.version, record.writer,
                    record.envelope, float(record.time))
            else:
                changed = await tx.execute(
                    _STATE_SQL["desired_update"], record.version, record.writer,
                    record.envelope, float(record.time), record.twin, base_version)
            if changed:
                return VersionOutcome(True, record.version)
            rows = await tx.fetch(_STATE_SQL["desired_get"], record.twin)
        current = int(rows[0][0]) if rows else 0
        if current == record.version and rows and bytes(rows[0][2]) == record.envelope:
            return VersionOutcome(True, current, duplicate=True)
        return VersionOutcome(False, current)

    async def get_reported(self, twin: str) -> list[ReportedRecord]:
        """Every device's latest report of ``twin``, newest first."""
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["reported_get"], twin)
        return [ReportedRecord(twin, str(d), int(v), int(dv), bool(s), bytes(e), float(t))
                for d, v, dv, s, e, t in rows]

    async def put_reported(self, record: ReportedRecord) -> VersionOutcome:
        """Store a device's report iff its version is above the stored one (a resend of the
        stored bytes is a ``duplicate``)."""
        async with self._state_tx() as tx:
            changed = await tx.execute(
                _STATE_SQL["reported_put"], record.twin, record.device, record.version,
                record.desired_version, record.in_sync, record.envelope, float(record.time))
            if changed:
                return VersionOutcome(True, record.version)
            rows = await tx.fetch(_STATE_SQL["reported_one"], record.twin, record.device)
        current = int(rows[0][0]) if rows else 0
        if current == record.version and rows and bytes(rows[0][1]) == record.envelope:
            return VersionOutcome(True, current, duplicate=True)
        return VersionOutcome(False, current)

    async def enqueue_request(self, record: RequestRecord, wraps: Mapping[str, bytes],
                              cap: int) -> tuple[Enqueued, str | None]:
        """Queue a request for each device of ``wraps`` (device -> its wrap), in one
        transaction: REPLAYED if (requester, request_id) was seen, FULL (with the device) if
        a device already holds ``cap`` queued requests — then nothing is stored."""
        try:
            async with self._state_tx() as tx:
                for device in sorted(wraps):  # one lock order: two workers cannot deadlock
                    await self._lock_device(tx, record.twin, device)
                if not await tx.execute(
                        _STATE_SQL["request_insert"], record.requester, record.request_id,
                        record.twin, record.envelope, float(record.deadline), record.wake,
                        float(record.received)):
                    return Enqueued.REPLAYED, None
                for device in sorted(wraps):
                    rows = await tx.fetch(_STATE_SQL["queue_count"], record.twin, device)
                    if int(rows[0][0]) >= cap:
                        raise _Full(device)  # rolls the request row back too
                    await tx.execute(_STATE_SQL["queue_insert"], record.twin, device,
                                     record.requester, record.request_id, wraps[device], False)
        except _Full as full:
            return Enqueued.FULL, full.device
        return Enqueued.NEW, None

    async def device_queue(self, twin: str, device: str, *, after: int = 0,
                           include_delivered: bool = True, limit: int = 1000) -> list[Delivery]:
        """Open requests queued for a device, in arrival order, from after ``after``."""
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["queue_of_device"], twin, device, after,
                                  include_delivered, False, limit)
        return [Delivery(int(o), twin, device, str(r), str(i), bytes(w), bool(d), bytes(e),
                         float(dl), bool(wk)) for o, r, i, w, d, e, dl, wk in rows]

    async def queue_length(self, twin: str, device: str) -> int:
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["queue_count"], twin, device)
        return int(rows[0][0])

    async def queued_devices(self) -> list[tuple[str, str]]:
        """(twin, device) of every device with a non-empty queue."""
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["queue_devices"])
        return [(str(t), str(d)) for t, d in rows]

    async def mark_delivered(self, twin: str, device: str, first: int, last: int) -> None:
        """The device's queued requests with ``first <= ord <= last`` were published."""
        async with self._state_tx() as tx:
            await tx.execute(_STATE_SQL["queue_mark"], True, twin, device, last, first, False)

    async def get_request(self, requester: str, request_id: str) -> RequestRecord | None:
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["request_get"], requester, request_id)
        if not rows:
            return None
        return _request_record(requester, request_id, rows[0])

    async def close_request(self, requester: str, request_id: str, state: RequestState,
                            at: float, *, twin: str | None = None,
                            device: str | None = None) -> RequestRecord | None:
        """Make an open request final (answered, expired) and drop it from every queue; the
        record if it was open (and, when given, queued for ``device`` of ``twin``)."""
        async with self._state_tx() as tx:
            rows = await tx.fetch(_STATE_SQL["request_get"], requester, request_id)
            if not rows or rows[0][5] != RequestState.OPEN:
                return None
            if device is not None and not await tx.fetch(
                    _STATE_SQL["queue_has"], requester, request_id, twin, device):
                return None
            if not await tx.execute(_STATE_SQL["request_close"], state.value, float(at),
                                    requester, request_id):
                return None
            await tx.execute(_STATE_SQL["queue_drop"], requester, request_id)
        return _request_record(requester, request_id, rows[0])

    async def due_requests(self, now: float, limit: int = 1000) -> list[RequestRecord]:
        """Open requests whose deadline has passed, oldest deadline first."""
        async with self._state_tx(write=False) as tx:
            rows = await tx.fetch(_STATE_SQL["requests_due"], float(now), limit)
        return [_request_record(r[0], r[1], r[2:]) for r in rows]

    async def purge_requests(self, before: float) -> int:
        """Forget final requests whose deadline is before ``before``: a replay of one is
        refused as expired by then, so its id need not be remembered."""
        async with self._state_tx() as tx:
            return await tx.execute(_STATE_SQL["requests_purge"], float(before))

    async def check(self) -> None:
        """Health check for `store_watch`: StoreUnavailable if the store is lost for good,
        another error if it failed now (it may recover)."""


class _Full(Exception):
    """A device's queue is at its cap: aborts (rolls back) the enqueue transaction."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.device = device


def _request_record(requester: str, request_id: str, row: Sequence[Any]) -> RequestRecord:
    twin, envelope, deadline, wake, received, state = row
    return RequestRecord(str(requester), str(request_id), str(twin), bytes(envelope),
                         float(deadline), bool(wake), float(received), RequestState(state))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    device     TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    twin       TEXT    NOT NULL,
    capsule_id BLOB    NOT NULL,
    attributes TEXT    NOT NULL,
    item_time  REAL    NOT NULL,
    payload    BLOB    NOT NULL,
    stored_at  REAL    NOT NULL,
    PRIMARY KEY (twin, device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS envelopes_by_twin_time ON envelopes (twin, item_time, device, seq);
CREATE TABLE IF NOT EXISTS capsules (
    capsule_id BLOB PRIMARY KEY,
    twin       TEXT NOT NULL,
    attributes TEXT NOT NULL,
    data       BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,
    receiver TEXT NOT NULL,
    twins    TEXT NOT NULL,
    policy   TEXT NOT NULL,
    rekey    BLOB NOT NULL,
    created  REAL NOT NULL,
    revoked  REAL
);
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recapsules (
    capsule_id BLOB NOT NULL,
    grant_id   TEXT NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (capsule_id, grant_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS twin_desired (
    twin     TEXT    PRIMARY KEY,
    version  INTEGER NOT NULL,
    writer   TEXT    NOT NULL,
    envelope BLOB    NOT NULL,
    time     REAL    NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS twin_reported (
    twin            TEXT    NOT NULL,
    device          TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    desired_version INTEGER NOT NULL,
    in_sync         INTEGER NOT NULL,
    envelope        BLOB    NOT NULL,
    time            REAL    NOT NULL,
    PRIMARY KEY (twin, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    requester  TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    twin       TEXT    NOT NULL,
    envelope   BLOB    NOT NULL,
    deadline   REAL    NOT NULL,
    wake       INTEGER NOT NULL,
    received   REAL    NOT NULL,
    state      TEXT    NOT NULL,
    closed     REAL,
    PRIMARY KEY (requester, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_state_deadline ON requests (state, deadline);
CREATE TABLE IF NOT EXISTS request_queue (
    ord        INTEGER PRIMARY KEY AUTOINCREMENT,
    twin       TEXT    NOT NULL,
    device     TEXT    NOT NULL,
    requester  TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    wrap       BLOB    NOT NULL,
    delivered  INTEGER NOT NULL,
    UNIQUE (requester, request_id, device)
);
CREATE INDEX IF NOT EXISTS request_queue_by_device ON request_queue (twin, device, ord);
"""


def _prepare_file(path: Path) -> tuple[int, int]:
    """Create the file (WAL mode, which is kept in the file) and schema with a plain
    connection; the (device, inode) of the file, to notice later if it is deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        db.commit()
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


_SEP = "\x1f"  # attribute separator: attributes are validated never to contain control chars


class SqliteTwinStore(TwinStore):
    """aiosqlite in WAL mode: one file, durable on commit (synchronous=FULL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._state_db: aiosqlite.Connection | None = None
        """Connection of the state and request tables: their transactions span several
        statements, which on the shared connection another task's commit (or rollback)
        could cut in two."""
        self._state_lock = asyncio.Lock()
        self._file: tuple[int, int] | None = None  # (device, inode) of the file we opened

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        """Open (creating the file and schema); on failure nothing is left running — the
        connection's thread would keep the process alive — and StoreUnavailable says why.
        Opening an open store does nothing (a service may open it early, to fail fast)."""
        if self._db is not None:
            return
        try:
            # errors surface here, before an aiosqlite thread exists: one whose connect failed
            # stops on its own but may still be running when the event loop closes
            self._file = await asyncio.to_thread(_prepare_file, self.path)
            self._db = await aiosqlite.connect(self.path)
            await self._db.execute("PRAGMA synchronous=FULL")
            self._state_db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._state_db.execute("PRAGMA synchronous=FULL")
        except BaseException as exc:
            for db in (self._db, self._state_db):
                if db is not None:
                    with contextlib.suppress(Exception):  # the thread ends even if closing fails
                        await db.close()
            self._db = self._state_db = None
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StoreUnavailable(f"cannot open the store {self.path}: {exc}") from exc
            raise

    async def close(self) -> None:
        if self._state_db is not None:
            async with self._state_lock:  # a transaction in progress ends first
                state_db, self._state_db = self._state_db, None
                await state_db.close()
        if self._db is not None:
            await self._db.close()
            self._db = None

    @asynccontextmanager
    async def _state_tx(self, *, write: bool = True) -> AsyncIterator[StateTx]:
        """BEGIN IMMEDIATE on the state connection: the write lock from the start, so a
        compare-and-set cannot interleave with another writer's (another process too);
        a read-only one begins deferred (in WAL mode readers block no writer)."""
        async with self._state_lock:
            if self._state_db is None:
                raise RuntimeError("store is not open")
            db = self._state_db
            await db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SqliteTx(db)
            except BaseException:
                with contextlib.suppress(Exception):
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _append(self, envelopes: Sequence[StoredEnvelope]) -> list[Outcome]:
        now = time.time()
        before = self.db.total_changes
        try:
            await self.db.executemany(
                "INSERT OR IGNORE INTO envelopes VALUES (?,?,?,?,?,?,?,?)",
                [
                    (e.device, e.seq, e.twin, e.capsule_id, _SEP.join(e.attributes),
                     e.item_time, e.payload, now)
                    for e in envelopes
                ],
            )
            await self.db.commit()
        except Exception:
            await self._rollback()  # rows before the bad one must not ride on the next commit
            raise
        if self.db.total_changes - before == len(envelopes):
            return [Outcome.NEW] * len(envelopes)  # every row was new: the common, fast path
        # Some were already there: tell identical duplicates (replays) from conflicts. Rows
        # inserted by this very batch are NEW; within one batch the first copy wins.
        stored = await self._stored_rows([(e.twin, e.device, e.seq) for e in envelopes])
        outcome: list[Outcome] = []
        seen: set[tuple[str, str, int]] = set()
        for e in envelopes:
            key = (e.twin, e.device, e.seq)
            row = stored.get(key)
            if row is None or row[0] != e.payload:
                outcome.append(Outcome.CONFLICT)
            elif key in seen or row[1] < now:
                outcome.append(Outcome.DUPLICATE)
            else:
                outcome.append(Outcome.NEW)
            seen.add(key)
        return outcome

    async def _rollback(self) -> None:
        try:
            await self.db.rollback()
        except Exception as exc:  # noqa: BLE001 - the caller raises the original error
            log.error("store.rollback_failed", error=_brief(exc))

    def _fault(self, exc: Exception) -> Fault:
        fault = super()._fault(exc)
        if fault is Fault.UNKNOWN:
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):  # constraint, size
                return Fault.ITEM
            if isinstance(exc, sqlite3.Error | ValueError):  # locked, full, I/O; ValueError:
                return Fault.STORE  # aiosqlite's "no active connection"
        return fault

    async def _stored_rows(
        self, keys: Sequence[tuple[str, str, int]]
    ) -> dict[tuple[str, str, int], tuple[bytes, float]]:
        """(payload, stored_at) of the given (twin, device, seq) keys."""
        rows = await self._rows_by_key(
            "SELECT twin, device, seq, payload, stored_at FROM envelopes "
            "WHERE (twin, device, seq)", keys)
        return {(w, d, s): (bytes(p), t) for w, d, s, p, t in rows}

    async def _rows_by_key(self, select: str, keys: Sequence[tuple[object, ...]]) -> list[tuple]:  # type: ignore[type-arg]
        """Rows of ``select … WHERE (a, b, …)`` IN the given keys, a few hundred per query."""
        rows: list[tuple] = []  # type: ignore[type-arg]
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 300):
            chunk = unique[i : i + 300]
            values = ",".join("(" + ",".join("?" * len(key)) + ")" for key in chunk)
            async with self.db.execute(f"{select} IN (VALUES {values})",
                                       [v for key in chunk for v in key]) as cur:
                rows += await cur.fetchall()
        return rows

    async def put_capsules(self, rows: Sequence[tuple[bytes, str, tuple[str, ...], bytes]]) -> None:
        await self.db.executemany(
            "INSERT OR IGNORE INTO capsules VALUES (?,?,?,?)",
            [(cid, twin, _SEP.join(attrs), data) for cid, twin, attrs, data in rows],
        )
        await self.db.commit()

    async def _capsule_rows(self, columns: str, capsule_ids: Sequence[bytes]) -> list[tuple]:  # type: ignore[type-arg]
        rows: list[tuple] = []  # type: ignore[type-arg]
        ids = list(dict.fromkeys(capsule_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            async with self.db.execute(
                f"SELECT capsule_id, {columns} FROM capsules WHERE capsule_id IN ({marks})", chunk
            ) as cur:
                rows += await cur.fetchall()
        return rows

    async def get_capsules(self, capsule_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        return {bytes(cid): bytes(data) for cid, data in await self._capsule_rows("data", capsule_ids)}

    async def capsule_info(
        self, capsule_ids: Sequence[bytes]
    ) -> dict[bytes, tuple[str, tuple[str, ...]]]:
        rows = await self._capsule_rows("twin, attributes", capsule_ids)
        return {bytes(cid): (twin, tuple(attrs.split(_SEP))) for cid, twin, attrs in rows}

    async def history(
        self, twin: str, since: float = 0.0, until: float = float("inf"), limit: int = 1000,
        after: tuple[float, str, int] | None = None,
    ) -> list[StoredEnvelope]:
        sql = ("SELECT twin, device, seq, capsule_id, attributes, item_time, payload "
               "FROM envelopes WHERE twin=? AND item_time>=? AND item_time<=?")
        args: list[object] = [twin, since, min(until, 1e18)]
        if after is not None:
            sql += " AND (item_time, device, seq) > (?, ?, ?)"
            args += list(after)
        sql += " ORDER BY item_time, device, seq LIMIT ?"
        args.append(limit)
        async with self.db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [_row_to_envelope(r) for r in rows]

    async def window_groups(
        self, twins: Sequence[str], since: float, until: float, stored_until: float = float("inf"),
    ) -> list[WindowGroup]:
        rows = await self._window(
            "SELECT twin, capsule_id, attributes, count(*), sum(length(payload))",
            "GROUP BY twin, capsule_id, attributes", twins, since, until, stored_until)
        split = _AttributeCache()
        return [WindowGroup(t, bytes(c), split(a), n, b) for t, c, a, n, b in rows]

    async def window_items(
        self, twins: Sequence[str], since: float, until: float, stored_until: float = float("inf"),
    ) -> list[WindowItem]:
        rows = await self._window(
            "SELECT twin, capsule_id, attributes, payload",
            "ORDER BY twin, item_time, device, seq", twins, since, until, stored_until)
        split = _AttributeCache()
        return [WindowItem(t, bytes(c), split(a), bytes(p)) for t, c, a, p in rows]

    async def _window(self, select: str, tail: str, twins: Sequence[str], since: float,
                      until: float, stored_until: float) -> list[tuple]:  # type: ignore[type-arg]
        """``select … FROM envelopes`` in the window for twins, a few hundred per query."""
        rows: list[tuple] = []  # type: ignore[type-arg]
        unique = list(dict.fromkeys(twins))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            sql = (f"{select} FROM envelopes WHERE twin IN ({','.join('?' * len(chunk))}) "
                   f"AND item_time>=? AND item_time<=? AND stored_at<=? {tail}")
            async with self.db.execute(sql, [*chunk, since, min(until, 1e18),
                                             min(stored_until, 1e18)]) as cur:
                rows += await cur.fetchall()
        return rows

    async def put_grant(self, grant: Grant) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO grants VALUES (?,?,?,?,?,?,?,?)",
            (grant.grant_id, grant.owner, grant.receiver, _SEP.join(grant.twins), grant.policy,
             grant.rekey, grant.created, grant.revoked),
        )
        await self.db.commit()

    async def revoke_grant(self, owner: str, grant_id: str, at: float) -> bool:
        cur = await self.db.execute(
            "UPDATE grants SET revoked=? WHERE grant_id=? AND owner=? AND revoked IS NULL",
            (at, grant_id, owner),
        )
        await self.db.execute(
            "DELETE FROM recapsules WHERE grant_id=?", (grant_id,)
        )
        await self.db.commit()
        return cur.rowcount > 0

    async def active_grants(self) -> list[Grant]:
        async with self.db.execute(
            "SELECT grant_id, owner, receiver, twins, policy, rekey, created, revoked "
            "FROM grants WHERE revoked IS NULL"
        ) as cur:
            rows = await cur.fetchall()
        return [
            Grant(r[0], r[1], r[2], tuple(r[3].split(_SEP)) if r[3] else (), r[4], bytes(r[5]),
                  r[6], r[7])
            for r in rows
        ]

    async def put_kv(self, namespace: str, key: str, value: bytes) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO kv VALUES (?,?,?)", (namespace, key, value)
        )
        await self.db.commit()

    async def get_kv(self, namespace: str, key: str) -> bytes | None:
        async with self.db.execute(
            "SELECT value FROM kv WHERE namespace=? AND key=?", (namespace, key)
        ) as cur:
            row = await cur.fetchone()
        return bytes(row[0]) if row else None

    async def list_kv(self, namespace: str) -> dict[str, bytes]:
        async with self.db.execute(
            "SELECT key, value FROM kv WHERE namespace=?", (namespace,)
        ) as cur:
            return {k: bytes(v) async for k, v in cur}

    async def cached_recapsules(
        self, pairs: Sequence[tuple[bytes, str]]
    ) -> dict[tuple[bytes, str], bytes]:
        rows = await self._rows_by_key(
            "SELECT capsule_id, grant_id, data FROM recapsules WHERE (capsule_id, grant_id)", pairs)
        return {(bytes(c), g): bytes(d) for c, g, d in rows}

    async def cache_recapsules(self, rows: Sequence[tuple[bytes, str, bytes]]) -> None:
        await self.db.executemany("INSERT OR IGNORE INTO recapsules VALUES (?,?,?)", rows)
        await self.db.commit()

    async def check(self) -> None:
        """The file must still be the one we opened: once it is deleted or replaced, every
        commit goes to a file nobody will ever open again (the data is lost on restart)."""
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._file
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreUnavailable(f"the store file {self.path} was deleted or replaced")
        await self.db.execute_fetchall("SELECT 1")


class _SqliteTx:
    """`StateTx` over an aiosqlite connection (the shared SQL needs no translation)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def fetch(self, sql: str, *args: object) -> list[Sequence[Any]]:
        return list(await self.db.execute_fetchall(sql.format(s=""), args))

    async def execute(self, sql: str, *args: object) -> int:
        async with self.db.execute(sql.format(s=""), args) as cur:
            return int(cur.rowcount)


class _AttributeCache:
    """Splits stored attribute strings, once per distinct string (they repeat per epoch)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, ...]] = {}

    def __call__(self, joined: str) -> tuple[str, ...]:
        got = self._seen.get(joined)
        if got is None:
            got = self._seen[joined] = tuple(joined.split(_SEP)) if joined else ()
        return got


def _row_to_envelope(r: Sequence[object]) -> StoredEnvelope:
    attrs = str(r[4])
    return StoredEnvelope(
        twin=str(r[0]), device=str(r[1]), seq=int(r[2]), capsule_id=bytes(r[3]),  # type: ignore[arg-type]
        attributes=tuple(attrs.split(_SEP)) if attrs else (), item_time=float(r[5]),  # type: ignore[arg-type]
        payload=bytes(r[6]),  # type: ignore[arg-type]
    )


def open_store(settings: StorageSettings) -> TwinStore:
    """The deployment's store (not yet opened): one SQLite file, or PostgreSQL when several
    cloud workers must share the log."""
    if settings.backend == "postgres":
        from ciphertwin.cloud_twin.store_postgres import PostgresTwinStore  # avoids an import cycle

        return PostgresTwinStore(settings.postgres_dsn)
    return SqliteTwinStore(settings.sqlite_path)
