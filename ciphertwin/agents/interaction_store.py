"""What the device must remember across restarts to interact safely: versions and replays.

* ``desired_version``: the last desired version applied — an older or equal one arriving
  again (a replay, or the cloud re-sending on reconnect) is refused, never applied twice;
* ``reported_version``: the device's own counter for ``reported_set``, strictly increasing
  (the cloud refuses a non-increasing one), committed before the report is published;
* requests seen, by (requester, request_id), with their deadline and — once answered — the
  answer envelope: a second copy (a replay, or the cloud re-delivering after a restart) is
  answered from the cache and never executed twice. A row is written *before* the handler
  runs, so a crash mid-operation leaves it marked (at most once beats at least once for a
  device that moves things). Rows are forgotten after their deadline: the requests are then
  refused as expired anyway;
* the last desired document applied (canonical msgpack): whether the device is in sync is
  judged against it after a restart too (this file lives on the device, which holds the
  plaintext anyway; it never leaves it).

SQLite (WAL, synchronous=FULL) next to the outbox, on one worker thread so the event loop
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ciphertwin.errors import CipherTwinError

__all__ = ["InteractionStore", "InteractionStoreError", "INTERACTION_DB"]

T = TypeVar("T")
INTERACTION_DB = "interaction.db"
_FORGET_AFTER_S = 600.0
"""A request is remembered this long past its deadline (clock skew between cloud and device)."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    requester TEXT NOT NULL, request_id TEXT NOT NULL, deadline REAL NOT NULL,
    answer BLOB, PRIMARY KEY (requester, request_id)
);
CREATE INDEX IF NOT EXISTS requests_deadline ON requests (deadline);
CREATE TABLE IF NOT EXISTS revoked (token_id BLOB PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS docs (name TEXT PRIMARY KEY, value BLOB NOT NULL)
"""


class InteractionStoreError(CipherTwinError):
    """The interaction store file is unusable."""


class InteractionStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="interaction")
        try:
            self._conn = await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open_sync(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}; COMMIT;")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> InteractionStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise InteractionStoreError("interaction store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise InteractionStoreError(f"interaction store {self.path}: {exc}") from None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InteractionStoreError("interaction store is not open")
        return self._conn

    # -- counters ------------------------------------------------------------------------------
    async def counter(self, name: str) -> int:
        def read() -> int:
            row = self._db().execute("SELECT value FROM counters WHERE name = ?",
                                     (name,)).fetchone()
            return 0 if row is None else int(row[0])
        return await self._run(read)

    async def claim_desired(self, version: int, doc: bytes, *, desired: str = "desired_version",
                            reported: str = "reported_version", doc_name: str = "desired_doc",
                            ) -> tuple[bool, int, int]:
        """(claimed, last applied, reserved report version) in ONE transaction: if
        ``version`` is above the last desired version, it becomes the last, ``doc`` is kept
        and a report version is reserved (at most once per version, and one disk commit on
        the latency path); else nothing changes and the report version is 0."""
        def claim() -> tuple[bool, int, int]:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT value FROM counters WHERE name = ?",
                                 (desired,)).fetchone()
                last = 0 if row is None else int(row[0])
                if version <= last:
                    db.execute("ROLLBACK")
                    return False, last, 0
                upsert = ("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                          "DO UPDATE SET value = excluded.value")
                db.execute(upsert, (desired, version))
                db.execute("INSERT INTO docs (name, value) VALUES (?, ?) ON CONFLICT (name) DO "
                           "UPDATE SET value = excluded.value", (doc_name, doc))
                report = db.execute(
                    "INSERT INTO counters (name, value) VALUES (?, 1) ON CONFLICT (name) DO "
                    "UPDATE SET value = counters.value + 1 RETURNING value", (reported,)
                ).fetchone()[0]
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return True, last, int(report)
        return await self._run(claim)

    async def next_counter(self, name: str) -> int:
        """Increment and return ``name`` (committed before the caller uses the value)."""
        def bump() -> int:
            row = self._db().execute(
                "INSERT INTO counters (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE "
                "SET value = counters.value + 1 RETURNING value", (name,)).fetchone()
            return int(row[0])
        return await self._run(bump)

    # -- documents -----------------------------------------------------------------------------
    async def get_doc(self, name: str) -> bytes | None:
        def read() -> bytes | None:
            row = self._db().execute("SELECT value FROM docs WHERE name = ?", (name,)).fetchone()
            return None if row is None else bytes(row[0])
        return await self._run(read)

    # -- requests ------------------------------------------------------------------------------
    async def claim_request(self, requester: str, request_id: str,
                            deadline: float) -> tuple[bool, bytes | None]:
        """(True, None) if this request is new (now marked seen); else (False, cached answer
        or None if it was never answered: in progress, silent, or cut by a crash)."""
        def claim() -> tuple[bool, bytes | None]:
            db = self._db()
            db.execute("DELETE FROM requests WHERE deadline < ?", (time.time() - _FORGET_AFTER_S,))
            cur = db.execute("INSERT OR IGNORE INTO requests (requester, request_id, deadline) "
                             "VALUES (?, ?, ?)", (requester, request_id, deadline))
            if cur.rowcount == 1:
                return True, None
            row = db.execute("SELECT answer FROM requests WHERE requester = ? AND "
                             "request_id = ?", (requester, request_id)).fetchone()
            return False, None if row is None or row[0] is None else bytes(row[0])
        return await self._run(claim)

    async def store_answer(self, requester: str, request_id: str, answer: bytes) -> None:
        await self._run(lambda: self._db().execute(
            "UPDATE requests SET answer = ? WHERE requester = ? AND request_id = ?",
            (answer, requester, request_id)))

    # -- revoked tokens ------------------------------------------------------------------------
    async def revoke(self, token_id: bytes, until: float) -> None:
        """Remember a revoked interact token until it would have expired anyway."""
        await self._run(lambda: self._db().execute(
            "INSERT INTO revoked (token_id, until) VALUES (?, ?) ON CONFLICT (token_id) DO "
            "UPDATE SET until = max(until, excluded.until)", (token_id, until)))

    async def revoked(self) -> set[bytes]:
        def read() -> set[bytes]:
            db = self._db()
            db.execute("DELETE FROM revoked WHERE until < ?", (time.time(),))
            return {bytes(r[0]) for r in db.execute("SELECT token_id FROM revoked")}
        return await self._run(read)
