"""The device's persistent outbox: nothing is lost between a reading and the cloud's ack.

Each item gets a sequence number when it enters the outbox; the cloud stores envelopes
idempotently by (device, seq) and acknowledges them, and only then does the device delete them.
So a crash, a reboot, or a broker/cloud outage at any point costs at most a re-send.

Sequence numbers are gapless, strictly increasing and never reused — not after deletion, not
after a restart — because the counter is kept in its own row and committed in the *same*
transaction as the item. The envelope usually has to carry its own seq (it is signed and bound
into the AEAD associated data), so `append` accepts either the finished payload or a callable
`build(seq) -> bytes` (sync or async) that is called with the seq about to be assigned:

    seq = await outbox.append(lambda seq: seal_and_sign(reading, seq))

If `build` raises, nothing is consumed; the seq is assigned only if the item is committed.

Storage is stdlib `sqlite3` in WAL mode with `synchronous=FULL` (a committed append survives
power loss) on one dedicated thread, so every operation is a single short transaction and the
event loop never blocks on disk. One outbox file belongs to one agent process.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ciphertwin.bus.envelope import STORED_INT
from ciphertwin.errors import CipherTwinError, ValidationError

log = structlog.get_logger(__name__)

T = TypeVar("T")
Build = Callable[[int], bytes | Awaitable[bytes]]

MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
MAX_SEQ = STORED_INT.hi - 1
"""The last seq handed out: ``next_seq`` (one more) must still fit SQLite's INTEGER, and the
cloud refuses seqs its stores cannot hold."""
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO outbox_meta (id, next_seq) VALUES (1, 1);
CREATE TABLE IF NOT EXISTS outbox_items (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
"""


class OutboxError(CipherTwinError):
    """The outbox file is unusable (corrupt, foreign, used by another process, or full)."""


class OutboxFull(OutboxError):
    """`max_items` items are waiting for acknowledgement; the caller decides what to drop."""


class SequenceExhausted(OutboxError):
    """Every seq up to MAX_SEQ is used: this device identity can send nothing more (a new
    device name starts a new sequence)."""


def _check_seq(seq: object) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= STORED_INT.hi:
        raise ValidationError(f"sequence numbers are integers from 1 to {STORED_INT.hi}")
    return seq


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise ValidationError("limit must be an integer between 1 and 100000")
    return limit


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, if a failed COMMIT has not already ended it."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class Outbox:
    """Durable FIFO of signed envelopes awaiting the cloud's acknowledgement."""

    def __init__(self, path: str | Path, *, max_items: int | None = None) -> None:
        if max_items is not None and (
            isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1
        ):
            raise ValidationError("max_items must be a positive integer or None")
        self.path = Path(path)
        self.max_items = max_items
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._append_lock = asyncio.Lock()
        self._next_seq = 1
        self._count = 0

    # -- lifecycle

    async def open(self) -> None:
        """Open (creating if needed) the outbox file and load the sequence counter."""
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        log.info("outbox_opened", path=str(self.path), pending=self._count, next_seq=self._next_seq)

    def _open_sync(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                log.warning("outbox_not_wal", path=str(self.path), journal_mode=mode)
            conn.execute("PRAGMA synchronous = FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise OutboxError(f"outbox {self.path} has unknown schema version {version}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            self._next_seq = conn.execute("SELECT next_seq FROM outbox_meta").fetchone()[0]
            self._count = conn.execute("SELECT COUNT(*) FROM outbox_items").fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError(f"outbox {self.path} is unusable: {exc}") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        """Close the file; committed items stay for the next `open`."""
        if self._conn is None:
            return
        await self._run(self._conn.close)
        self._conn = None
        assert self._executor is not None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def __aenter__(self) -> Outbox:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise OutboxError("outbox is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:  # disk full, I/O error, file replaced under us
            raise OutboxError(f"outbox {self.path}: {exc}") from None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("outbox is not open")
        return self._conn

    # -- writing

    async def append(self, payload: bytes | Build) -> int:
        """Durably add one item and return its seq; see the module doc for `build(seq)`.

        Raises OutboxFull when `max_items` are pending, ValidationError for a bad payload.
        """
        async with self._append_lock:
            self._db()
            if self.max_items is not None and self._count >= self.max_items:
                raise OutboxFull(f"outbox holds {self._count} unacknowledged items")
            seq = self._next_seq
            if seq > MAX_SEQ:
                raise SequenceExhausted(f"outbox {self.path}: every sequence number is used")
            if callable(payload):
                built = payload(seq)
                data = await built if inspect.isawaitable(built) else built
            else:
                data = payload
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValidationError("outbox payloads must be bytes")
            data = bytes(data)
            if not 0 < len(data) <= MAX_PAYLOAD_BYTES:
                raise ValidationError(f"outbox payload must be 1 to {MAX_PAYLOAD_BYTES} bytes")
            await self._run(self._append_sync, seq, data)
            self._next_seq = seq + 1
            self._count += 1
            return seq

    def _append_sync(self, seq: int, data: bytes) -> None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Compare-and-set: a second process writing the same file would be caught here.
            cur = conn.execute(
                "UPDATE outbox_meta SET next_seq = ? WHERE id = 1 AND next_seq = ?", (seq + 1, seq)
            )
            if cur.rowcount != 1:
                raise OutboxError(f"outbox {self.path} was modified by another process")
            conn.execute(
                "INSERT INTO outbox_items (seq, payload, created) VALUES (?, ?, ?)",
                (seq, data, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    async def acknowledge(self, seqs: Iterable[int]) -> int:
        """Delete exactly these items (the cloud has committed them); returns how many
        existed. Unknown or already-acknowledged seqs are ignored: acks may repeat."""
        wanted = sorted({_check_seq(s) for s in seqs})
        if not wanted:
            return 0
        deleted = await self._run(self._acknowledge_sync, wanted)
        self._count -= deleted
        return deleted

    def _acknowledge_sync(self, seqs: list[int]) -> int:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            for i in range(0, len(seqs), 500):  # stay under SQLite's bound-parameter limit
                chunk = seqs[i : i + 500]
                marks = ",".join("?" * len(chunk))
                deleted += conn.execute(
                    f"DELETE FROM outbox_items WHERE seq IN ({marks})", chunk
                ).rowcount
            conn.execute("COMMIT")
            return deleted
        except BaseException:
            _rollback(conn)
            raise

    async def acknowledge_through(self, seq: int) -> int:
        """Delete every item with seq <= `seq` (the cloud's "stored up to seq n" ack)."""
        _check_seq(seq)
        deleted = await self._run(self._acknowledge_through_sync, seq)
        self._count -= deleted
        return deleted

    def _acknowledge_through_sync(self, seq: int) -> int:
        # A single statement is its own transaction in autocommit mode.
        return self._db().execute("DELETE FROM outbox_items WHERE seq <= ?", (seq,)).rowcount

    # -- reading

    async def pending(self, limit: int = 100, after: int = 0) -> list[tuple[int, bytes]]:
        """Up to `limit` unacknowledged items with seq > `after`, oldest first.

        `after` lets a publisher page past items it already has in flight.
        """
        _check_limit(limit)
        if after != 0:
            _check_seq(after)
        return await self._run(self._pending_sync, limit, after)

    def _pending_sync(self, limit: int, after: int) -> list[tuple[int, bytes]]:
        rows = self._db().execute(
            "SELECT seq, payload FROM outbox_items WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [(seq, bytes(payload)) for seq, payload in rows]

    async def count(self) -> int:
        """Number of items awaiting acknowledgement."""
        self._db()
        return self._count

    @property
    def last_seq(self) -> int:
        """The highest seq ever assigned (0 if none); the next append gets last_seq + 1."""
        return self._next_seq - 1
