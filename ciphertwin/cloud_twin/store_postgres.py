"""PostgreSQL backend of the cloud twin store, so several cloud workers can share one log.

Same contract as :class:`~ciphertwin.cloud_twin.store.SqliteTwinStore` (see that module for
the idempotence rules); what changes is that other processes write concurrently:

* ``append_envelopes`` is one ``INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING
  RETURNING`` statement: the unique key (twin, device, seq) decides which worker stores a row, and
  ``RETURNING`` says exactly which rows *this* statement stored — no timestamp guessing. Rows
  are inserted in key order so two workers with overlapping batches wait on each other
  instead of deadlocking. Only when some rows were not new is there a second read, in a fresh
  snapshot, to tell identical replays (DUPLICATE) from forgeries (CONFLICT).
* Revocation and the re-capsule cache are ordered through the grant row's lock, so a worker
  caching a re-capsule while another revokes the grant cannot leave a stale cached entry.
* All tables live in a caller-chosen schema (tests use a throw-away one); creating it is
  idempotent and serialised by an advisory lock, because concurrent ``CREATE … IF NOT
  EXISTS`` can still collide in the catalogue.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ciphertwin.cloud_twin.store import (
    Fault,
    Grant,
    Outcome,
    StateTx,
    StoredEnvelope,
    StoreUnavailable,
    TwinStore,
    WindowGroup,
    WindowItem,
)

CONNECT_TIMEOUT_S = 5.0  # a supervisor must see an unreachable server as a prompt failure
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SEP = "\x1f"  # same attribute separator as the SQLite store; only used on the wire to PG
_SPLIT = "string_to_array({}, E'\\x1f')"

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.envelopes (
    device     TEXT COLLATE "C" NOT NULL,
    seq        BIGINT           NOT NULL,
    twin       TEXT COLLATE "C" NOT NULL,
    capsule_id BYTEA            NOT NULL,
    attributes TEXT[]           NOT NULL,
    item_time  DOUBLE PRECISION NOT NULL,
    payload    BYTEA            NOT NULL,
    stored_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (twin, device, seq)
);
CREATE INDEX IF NOT EXISTS envelopes_by_twin_time
    ON {s}.envelopes (twin, item_time, device, seq);
CREATE TABLE IF NOT EXISTS {s}.capsules (
    capsule_id BYTEA PRIMARY KEY,
    twin       TEXT   NOT NULL,
    attributes TEXT[] NOT NULL,
    data       BYTEA  NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.grants (
    grant_id TEXT PRIMARY KEY,
    owner    TEXT             NOT NULL,
    receiver TEXT             NOT NULL,
    twins    TEXT[]           NOT NULL,
    policy   TEXT             NOT NULL,
    rekey    BYTEA            NOT NULL,
    created  DOUBLE PRECISION NOT NULL,
    revoked  DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS {s}.kv (
    namespace TEXT  NOT NULL,
    key       TEXT  NOT NULL,
    value     BYTEA NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS {s}.recapsules (
    capsule_id BYTEA NOT NULL,
    grant_id   TEXT  NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (capsule_id, grant_id)
);
CREATE TABLE IF NOT EXISTS {s}.twin_desired (
    twin     TEXT PRIMARY KEY,
    version  BIGINT           NOT NULL,
    writer   TEXT             NOT NULL,
    envelope BYTEA            NOT NULL,
    time     DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.twin_reported (
    twin            TEXT             NOT NULL,
    device          TEXT             NOT NULL,
    version         BIGINT           NOT NULL,
    desired_version BIGINT           NOT NULL,
    in_sync         BOOLEAN          NOT NULL,
    envelope        BYTEA            NOT NULL,
    time            DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (twin, device)
);
CREATE TABLE IF NOT EXISTS {s}.requests (
    requester  TEXT             NOT NULL,
    request_id TEXT             NOT NULL,
    twin       TEXT             NOT NULL,
    envelope   BYTEA            NOT NULL,
    deadline   DOUBLE PRECISION NOT NULL,
    wake       BOOLEAN          NOT NULL,
    received   DOUBLE PRECISION NOT NULL,
    state      TEXT             NOT NULL,
    closed     DOUBLE PRECISION,
    PRIMARY KEY (requester, request_id)
);
CREATE INDEX IF NOT EXISTS requests_by_state_deadline ON {s}.requests (state, deadline);
CREATE TABLE IF NOT EXISTS {s}.request_queue (
    ord        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    twin       TEXT    NOT NULL,
    device     TEXT    NOT NULL,
    requester  TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    wrap       BYTEA   NOT NULL,
    delivered  BOOLEAN NOT NULL,
    UNIQUE (requester, request_id, device)
);
CREATE INDEX IF NOT EXISTS request_queue_by_device ON {s}.request_queue (twin, device, ord);
"""

# First copy of a key within the batch wins (DISTINCT ON … ORDER BY ord); key order of the
# inserts makes concurrent overlapping batches lock rows in the same order.
_APPEND = """
INSERT INTO {s}.envelopes
    (device, seq, twin, capsule_id, attributes, item_time, payload, stored_at)
SELECT DISTINCT ON (twin, device, seq)
       device, seq, twin, capsule_id, """ + _SPLIT.format("attrs") + """, item_time, payload,
       extract(epoch FROM clock_timestamp())
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[], $5::text[], $6::float8[],
            $7::bytea[]) WITH ORDINALITY AS t(device, seq, twin, capsule_id, attrs, item_time,
                                              payload, ord)
ORDER BY twin, device, seq, ord
ON CONFLICT (twin, device, seq) DO NOTHING
RETURNING twin, device, seq
"""

_STORED_PAYLOADS = """
SELECT e.twin, e.device, e.seq, e.payload FROM {s}.envelopes e
JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS k(twin, device, seq)
  ON e.twin = k.twin AND e.device = k.device AND e.seq = k.seq
"""

_PUT_CAPSULES = """
INSERT INTO {s}.capsules (capsule_id, twin, attributes, data)
SELECT cid, twin, """ + _SPLIT.format("attrs") + """, data
FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[]) AS t(cid, twin, attrs, data)
ON CONFLICT (capsule_id) DO NOTHING
"""

_HISTORY = """
SELECT twin, device, seq, capsule_id, attributes, item_time, payload FROM {s}.envelopes
WHERE twin = $1 AND item_time >= $2 AND item_time <= $3 {after}
ORDER BY item_time, device, seq LIMIT $4
"""

_WINDOW = """
SELECT twin, capsule_id, attributes, {columns} FROM {s}.envelopes
WHERE twin = ANY($1::text[]) AND item_time >= $2 AND item_time <= $3 AND stored_at <= $4
{tail}
"""

_PUT_GRANT = """
INSERT INTO {s}.grants (grant_id, owner, receiver, twins, policy, rekey, created, revoked)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (grant_id) DO UPDATE SET owner = EXCLUDED.owner, receiver = EXCLUDED.receiver,
    twins = EXCLUDED.twins, policy = EXCLUDED.policy, rekey = EXCLUDED.rekey,
    created = EXCLUDED.created, revoked = EXCLUDED.revoked
"""

# The FOR SHARE lock on the grant rows makes a concurrent revoke wait for this insert to
# commit (its later DELETE then sees and drops these rows), or, if the revoke came first,
# makes this statement re-read the grant and skip it as revoked.
_CACHE_RECAPSULES = """
WITH g AS (SELECT grant_id, revoked FROM {s}.grants
           WHERE grant_id = ANY($2::text[]) FOR SHARE)
INSERT INTO {s}.recapsules (capsule_id, grant_id, data)
SELECT t.cid, t.gid, t.data FROM unnest($1::bytea[], $2::text[], $3::bytea[]) AS t(cid, gid, data)
WHERE NOT EXISTS (SELECT 1 FROM g WHERE g.grant_id = t.gid AND g.revoked IS NOT NULL)
ON CONFLICT (capsule_id, grant_id) DO NOTHING
"""


_STORE_ERRORS = (
    asyncpg.PostgresConnectionError,  # 08: connection lost
    asyncpg.InsufficientResourcesError,  # 53: disk full, out of memory, too many connections
    asyncpg.OperatorInterventionError,  # 57: shutdown, cancelled
    asyncpg.SyntaxOrAccessError,  # 42: table gone, privileges revoked
    asyncpg.TransactionRollbackError,  # 40: deadlock, serialization (transient)
    asyncpg.InvalidTransactionStateError,  # 25: read-only transaction (a standby)
    asyncpg.InterfaceError,  # the pool is closing, the connection is broken
)
"""Errors that no envelope is to blame for: a batch failing with one is not split."""


_PLACEHOLDER = re.compile(r"\?")


class _PgTx:
    """`StateTx` on one connection inside a transaction; the shared SQL's ``?`` become
    ``$1…`` and ``{s}`` the schema."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn, self.schema = conn, schema

    async def fetch(self, sql: str, *args: object) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(_pg_sql(sql, self.schema), *args))

    async def execute(self, sql: str, *args: object) -> int:
        status = await self.conn.execute(_pg_sql(sql, self.schema), *args)
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 1", "INSERT 0 1", "DELETE 3"


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str, schema: str) -> str:
    numbers = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql).format(s=f'"{schema}".')


class PostgresTwinStore(TwinStore):
    """asyncpg connection pool over tables in one schema; safe for several cloud workers."""

    def __init__(self, dsn: str, *, schema: str = "ciphertwin", min_size: int = 1,
                 max_size: int = 10) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema name must match {_SCHEMA_NAME.pattern}, got {schema!r}")
        self.dsn, self.schema = dsn, schema
        self.min_size, self.max_size = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    def _sql(self, template: str, **extra: str) -> str:
        return template.format(s=f'"{self.schema}"', **extra)

    async def open(self) -> None:
        """Connect and create the schema; StoreUnavailable (never the DSN: it may hold the
        password) when the server is unreachable or refuses us, within CONNECT_TIMEOUT_S.
        Opening an open store does nothing."""
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(self.dsn, min_size=self.min_size,
                                             max_size=self.max_size, timeout=CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(
                f"cannot open the PostgreSQL store: {type(exc).__name__}: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                   f"ciphertwin.schema:{self.schema}")
                await conn.execute(self._sql(_DDL))
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def check(self) -> None:
        await self.pool.fetchval("SELECT 1")

    @asynccontextmanager
    async def _state_tx(self, *, write: bool = True) -> AsyncIterator[StateTx]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield _PgTx(conn, self.schema)

    async def _lock_device(self, tx: StateTx, twin: str, device: str) -> None:
        """A transaction-scoped advisory lock per device queue: the cap is checked and the
        row inserted by one cloud worker at a time."""
        await tx.fetch("SELECT pg_advisory_xact_lock(hashtext(?))",
                       f"ciphertwin.queue:{self.schema}:{twin}/{device}")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _append(self, envelopes: Sequence[StoredEnvelope]) -> list[Outcome]:
        devices = [e.device for e in envelopes]
        seqs = [e.seq for e in envelopes]
        inserted = await self.pool.fetch(
            self._sql(_APPEND), devices, seqs, [e.twin for e in envelopes],
            [e.capsule_id for e in envelopes], [_SEP.join(e.attributes) for e in envelopes],
            [e.item_time for e in envelopes], [e.payload for e in envelopes],
        )
        if len(inserted) == len(envelopes):
            return [Outcome.NEW] * len(envelopes)  # every row was new: one round trip
        # A fresh statement (new snapshot) sees rows another worker committed while our
        # insert waited on them, so a concurrent identical copy reads as DUPLICATE.
        ours = {(r["twin"], r["device"], r["seq"]) for r in inserted}
        stored = {(r["twin"], r["device"], r["seq"]): r["payload"]
                  for r in await self.pool.fetch(self._sql(_STORED_PAYLOADS),
                                                 [e.twin for e in envelopes], devices, seqs)}
        outcome: list[Outcome] = []
        seen: set[tuple[str, str, int]] = set()
        for e in envelopes:
            key = (e.twin, e.device, e.seq)
            if stored.get(key) != e.payload:
                outcome.append(Outcome.CONFLICT)
            elif key in ours and key not in seen:
                outcome.append(Outcome.NEW)
            else:
                outcome.append(Outcome.DUPLICATE)
            seen.add(key)
        return outcome

    def _fault(self, exc: Exception) -> Fault:
        if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
            return Fault.ITEM  # a value out of range (also caught client-side), a constraint
        if isinstance(exc, _STORE_ERRORS):
            return Fault.STORE
        return super()._fault(exc)

    async def put_capsules(self, rows: Sequence[tuple[bytes, str, tuple[str, ...], bytes]]) -> None:
        if rows:
            await self.pool.execute(
                self._sql(_PUT_CAPSULES), [r[0] for r in rows], [r[1] for r in rows],
                [_SEP.join(r[2]) for r in rows], [r[3] for r in rows],
            )

    async def get_capsules(self, capsule_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        rows = await self.pool.fetch(
            self._sql("SELECT capsule_id, data FROM {s}.capsules WHERE capsule_id = ANY($1)"),
            list(capsule_ids),
        )
        return {r["capsule_id"]: r["data"] for r in rows}

    async def capsule_info(
        self, capsule_ids: Sequence[bytes]
    ) -> dict[bytes, tuple[str, tuple[str, ...]]]:
        rows = await self.pool.fetch(
            self._sql("SELECT capsule_id, twin, attributes FROM {s}.capsules "
                      "WHERE capsule_id = ANY($1)"),
            list(capsule_ids),
        )
        return {r["capsule_id"]: (r["twin"], tuple(r["attributes"])) for r in rows}

    async def history(
        self, twin: str, since: float = 0.0, until: float = float("inf"), limit: int = 1000,
        after: tuple[float, str, int] | None = None,
    ) -> list[StoredEnvelope]:
        args: list[object] = [twin, since, until, limit]
        cursor = ""
        if after is not None:
            cursor = "AND (item_time, device, seq) > ($5, $6, $7)"
            args += [float(after[0]), after[1], int(after[2])]
        rows = await self.pool.fetch(self._sql(_HISTORY, after=cursor), *args)
        return [
            StoredEnvelope(r["twin"], r["device"], r["seq"], r["capsule_id"],
                           tuple(r["attributes"]), r["item_time"], r["payload"])
            for r in rows
        ]

    async def window_groups(
        self, twins: Sequence[str], since: float, until: float, stored_until: float = float("inf"),
    ) -> list[WindowGroup]:
        rows = await self._window("count(*) AS n, sum(length(payload)) AS size",
                                  "GROUP BY twin, capsule_id, attributes",
                                  twins, since, until, stored_until)
        return [WindowGroup(r["twin"], r["capsule_id"], tuple(r["attributes"]), r["n"],
                            int(r["size"])) for r in rows]

    async def window_items(
        self, twins: Sequence[str], since: float, until: float, stored_until: float = float("inf"),
    ) -> list[WindowItem]:
        rows = await self._window("payload", "ORDER BY twin, item_time, device, seq",
                                  twins, since, until, stored_until)
        return [WindowItem(r["twin"], r["capsule_id"], tuple(r["attributes"]), r["payload"])
                for r in rows]

    async def _window(self, columns: str, tail: str, twins: Sequence[str], since: float,
                      until: float, stored_until: float) -> list[asyncpg.Record]:
        return await self.pool.fetch(self._sql(_WINDOW, columns=columns, tail=tail),
                                     list(dict.fromkeys(twins)), since, until, stored_until)

    async def put_grant(self, grant: Grant) -> None:
        await self.pool.execute(
            self._sql(_PUT_GRANT), grant.grant_id, grant.owner, grant.receiver, list(grant.twins),
            grant.policy, grant.rekey, grant.created, grant.revoked,
        )

    async def revoke_grant(self, owner: str, grant_id: str, at: float) -> bool:
        # Two statements in one transaction, not one: the DELETE needs a snapshot taken after
        # the UPDATE has waited out any in-flight cache insert holding the grant row.
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                self._sql("UPDATE {s}.grants SET revoked = $1 "
                          "WHERE grant_id = $2 AND owner = $3 AND revoked IS NULL"),
                at, grant_id, owner,
            )
            await conn.execute(self._sql("DELETE FROM {s}.recapsules WHERE grant_id = $1"),
                               grant_id)
        return status != "UPDATE 0"

    async def active_grants(self) -> list[Grant]:
        rows = await self.pool.fetch(self._sql(
            "SELECT grant_id, owner, receiver, twins, policy, rekey, created, revoked "
            "FROM {s}.grants WHERE revoked IS NULL ORDER BY created, grant_id"
        ))
        return [
            Grant(r["grant_id"], r["owner"], r["receiver"], tuple(r["twins"]), r["policy"],
                  r["rekey"], r["created"], r["revoked"])
            for r in rows
        ]

    async def put_kv(self, namespace: str, key: str, value: bytes) -> None:
        await self.pool.execute(
            self._sql("INSERT INTO {s}.kv (namespace, key, value) VALUES ($1, $2, $3) "
                      "ON CONFLICT (namespace, key) DO UPDATE SET value = EXCLUDED.value"),
            namespace, key, value,
        )

    async def get_kv(self, namespace: str, key: str) -> bytes | None:
        value: bytes | None = await self.pool.fetchval(
            self._sql("SELECT value FROM {s}.kv WHERE namespace = $1 AND key = $2"), namespace, key
        )
        return value

    async def list_kv(self, namespace: str) -> dict[str, bytes]:
        rows = await self.pool.fetch(
            self._sql("SELECT key, value FROM {s}.kv WHERE namespace = $1"), namespace
        )
        return {r["key"]: r["value"] for r in rows}

    async def cached_recapsules(
        self, pairs: Sequence[tuple[bytes, str]]
    ) -> dict[tuple[bytes, str], bytes]:
        if not pairs:
            return {}
        rows = await self.pool.fetch(
            self._sql("SELECT r.capsule_id, r.grant_id, r.data FROM {s}.recapsules r "
                      "JOIN unnest($1::bytea[], $2::text[]) AS k(capsule_id, grant_id) "
                      "USING (capsule_id, grant_id)"),
            [p[0] for p in pairs], [p[1] for p in pairs],
        )
        return {(bytes(r[0]), r[1]): bytes(r[2]) for r in rows}

    async def cache_recapsules(self, rows: Sequence[tuple[bytes, str, bytes]]) -> None:
        if rows:
            await self.pool.execute(
                self._sql(_CACHE_RECAPSULES), [r[0] for r in rows], [r[1] for r in rows],
                [r[2] for r in rows],
            )
