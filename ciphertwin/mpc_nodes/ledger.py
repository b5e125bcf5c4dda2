"""A processing node's durable memory: job ids it has run and process-token spending.

Three things must survive a node restart, or the cloud could exploit the amnesia:

* **job ids** — a node refuses any job id it has accepted before (keys of a run are fresh
  anyway, see :mod:`prf`, but a replayed job is a replayed computation: the cloud could
  vary the inputs and difference the outputs);
* **token budgets** — a process token's ``max_jobs`` per ``window_s`` (owner-set limits;
  :data:`DEFAULT_MAX_JOBS` per :data:`DEFAULT_WINDOW_S` when the owner set none) bounds how
  many overlapping jobs, hence differencing attacks, one token admits. Each accepted job is
  recorded as (token id, job, time); a use is forgotten once its token has expired;
* **revoked process tokens** — the owner's signed revocation is retained on the bus, but the
  cloud may publish anywhere and could clear it: once seen, a revocation stays here;
* **retained results** — the topic of every output share the node left retained for its
  receiver, so the node clears it once it is old (also after a restart).

Only accepted jobs (every check passed) are recorded, so garbage specs cannot grow the file.
SQLite (stdlib) in the node's home folder; ``NodeLedger()`` without a path keeps it in memory
(tests). Writes are a few per job, never per MPC round, so calls are synchronous: each one is
atomic with respect to the node's event loop, which makes check-then-record race free.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ciphertwin.errors import ValidationError

DEFAULT_MAX_JOBS = 20
"""jobs per window a process token admits when its owner set no ``max_jobs``"""
DEFAULT_WINDOW_S = 86400
"""the window (one day) when the owner set no ``window_s``; ``window_s=0``: the token's life"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, state TEXT NOT NULL, started REAL NOT NULL, ended REAL);
CREATE TABLE IF NOT EXISTS token_uses (
    token BLOB NOT NULL, job TEXT NOT NULL, time REAL NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (token, job));
CREATE INDEX IF NOT EXISTS token_uses_time ON token_uses (token, time);
CREATE TABLE IF NOT EXISTS revoked (
    owner BLOB NOT NULL, token BLOB NOT NULL, time REAL NOT NULL, PRIMARY KEY (owner, token));
CREATE TABLE IF NOT EXISTS results (
    job TEXT PRIMARY KEY, topic TEXT NOT NULL, time REAL NOT NULL);
"""


def token_budget(limits: Mapping[str, int]) -> tuple[int, int]:
    """(max_jobs, window_s) of a process token's limits, defaults filled in."""
    return (limits.get("max_jobs", DEFAULT_MAX_JOBS), limits.get("window_s", DEFAULT_WINDOW_S))


class NodeLedger:
    """Started/finished job ids and token uses of one node (``path`` None: in memory)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        try:
            self._db = sqlite3.connect(":memory:" if path is None else str(path),
                                       isolation_level=None)
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:  # a damaged or foreign file: say which, never guess
            raise ValidationError(f"{path}: not a usable node ledger ({exc}); a node refuses "
                                  "to start without its record of jobs run and tokens spent") from None

    def close(self) -> None:
        self._db.close()

    # -- job ids -------------------------------------------------------------------------
    def begin(self, job: str) -> bool:
        """Record ``job`` as started; False if this node has seen the job id before."""
        cur = self._db.execute("INSERT OR IGNORE INTO jobs (job, state, started) VALUES (?, ?, ?)",
                               (job, "started", time.time()))
        return cur.rowcount == 1

    def end(self, job: str, state: str) -> None:
        """Record how a started job ended (``delivered``, ``failed``, ``cancelled``)."""
        self._db.execute("UPDATE jobs SET state = ?, ended = ? WHERE job = ? AND ended IS NULL",
                         (state, time.time(), job))

    def state(self, job: str) -> str | None:
        row = self._db.execute("SELECT state FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else str(row[0])

    # -- token budgets -------------------------------------------------------------------
    def uses(self, token_id: bytes, window_s: int, now: float | None = None) -> int:
        """Jobs recorded for the token within the last ``window_s`` seconds (0: ever)."""
        since = (now or time.time()) - window_s if window_s > 0 else float("-inf")
        row = self._db.execute("SELECT COUNT(*) FROM token_uses WHERE token = ? AND time > ?",
                               (token_id, since)).fetchone()
        return int(row[0])

    def charge(self, job: str, tokens: Sequence[tuple[bytes, float]]) -> None:
        """Record one use of each (token id, expiry) for ``job``; drop uses of expired tokens."""
        now = time.time()
        self._db.execute("BEGIN")  # one transaction: all uses of the job or none
        try:
            self._db.execute("DELETE FROM token_uses WHERE expires < ?", (now,))
            self._db.executemany(
                "INSERT OR IGNORE INTO token_uses (token, job, time, expires) VALUES (?, ?, ?, ?)",
                [(token_id, job, now, expires) for token_id, expires in tokens])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- revocations ---------------------------------------------------------------------
    def revoke(self, owner_key: bytes, token_id: bytes) -> None:
        """Remember that the owner revoked the token (idempotent)."""
        self._db.execute("INSERT OR IGNORE INTO revoked (owner, token, time) VALUES (?, ?, ?)",
                         (owner_key, token_id, time.time()))

    def is_revoked(self, owner_key: bytes, token_id: bytes) -> bool:
        row = self._db.execute("SELECT 1 FROM revoked WHERE owner = ? AND token = ?",
                               (owner_key, token_id)).fetchone()
        return row is not None

    # -- retained results ----------------------------------------------------------------
    def record_result(self, job: str, topic: str) -> None:
        """The node is about to leave ``job``'s output share retained on ``topic``."""
        self._db.execute("INSERT OR REPLACE INTO results (job, topic, time) VALUES (?, ?, ?)",
                         (job, topic, time.time()))

    def results_before(self, before: float) -> list[tuple[str, str]]:
        """(job, topic) of retained results recorded before ``before`` (Unix time)."""
        rows = self._db.execute("SELECT job, topic FROM results WHERE time < ? ORDER BY time",
                                (before,)).fetchall()
        return [(str(j), str(t)) for j, t in rows]

    def forget_result(self, job: str) -> None:
        self._db.execute("DELETE FROM results WHERE job = ?", (job,))
