"""Append throughput of the twin store backends: envelopes/s committed in batches of 500.

What is timed is ``append_envelopes`` alone (the store's share of ingest), from the first
call to the last commit, on fresh (device, seq) keys — the common path — and again replaying
the same batches (every row a DUPLICATE, the path a restarted outbox takes). PostgreSQL is
also run with several concurrent appenders, one connection each, as several cloud workers
would. SQLite runs with synchronous=FULL, PostgreSQL with its default synchronous_commit=on:
both durable on commit. There is no reference figure for this; only ours is printed.

    python benchmarks/store_backends.py [--batches 40] [--batch 500] [--payload 400]
        [--workers 4] [--dsn postgresql://postgres@127.0.0.1:5432/test] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # noqa: E402

from ciphertwin.cloud_twin.store import SqliteTwinStore, StoredEnvelope, TwinStore  # noqa: E402
from ciphertwin.cloud_twin.store_postgres import PostgresTwinStore  # noqa: E402

DEFAULT_DSN = os.environ.get("CIPHERTWIN_TEST_POSTGRES_DSN",
                             "postgresql://postgres@127.0.0.1:5432/test")


def _batches(n: int, size: int, payload: int, device_prefix: str) -> list[list[StoredEnvelope]]:
    """Batches as ingest builds them: 10 devices interleaved, realistic attribute lists."""
    blob = secrets.token_bytes(payload)
    out = []
    for b in range(n):
        out.append([
            StoredEnvelope("twin1", f"{device_prefix}{i % 10}", b * size + i,
                           secrets.token_bytes(32), ("type:temp", "day:2026-11-22"),
                           1.7e9 + b * size + i, blob)
            for i in range(size)
        ])
    return out


async def _rate(stores: list[TwinStore], work: list[list[list[StoredEnvelope]]]) -> float:
    """Envelopes/s with store i appending work[i] batch after batch, all stores at once."""
    async def run(store: TwinStore, batches: list[list[StoredEnvelope]]) -> None:
        for batch in batches:
            await store.append_envelopes(batch)

    start = time.perf_counter()
    await asyncio.gather(*(run(s, w) for s, w in zip(stores, work, strict=True)))
    return sum(len(b) for w in work for b in w) / (time.perf_counter() - start)


async def _measure(stores: list[TwinStore], args: argparse.Namespace) -> dict[str, float]:
    work = [_batches(args.batches, args.batch, args.payload, f"w{i}-dev")
            for i in range(len(stores))]
    for store in stores:
        await store.open()
    try:
        return {"new_per_s": await _rate(stores, work), "replay_per_s": await _rate(stores, work)}
    finally:
        for store in stores:
            await store.close()


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = await _measure([SqliteTwinStore(Path(tmp) / "bench.db")], args)
    schema = f"ct_bench_{secrets.token_hex(4)}"
    try:
        results["postgres"] = await _measure(
            [PostgresTwinStore(args.dsn, schema=schema, max_size=2)], args)
        results[f"postgres_{args.workers}_workers"] = await _measure(
            [PostgresTwinStore(args.dsn, schema=schema, max_size=2) for _ in range(args.workers)],
            args)
    except OSError as exc:
        print(f"PostgreSQL not reachable at {args.dsn}: {exc}", file=sys.stderr)
    finally:
        try:
            conn = await asyncpg.connect(args.dsn)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        except OSError:
            pass
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches per appender")
    parser.add_argument("--batch", type=int, default=500, help="envelopes per batch")
    parser.add_argument("--payload", type=int, default=400, help="envelope bytes")
    parser.add_argument("--workers", type=int, default=4, help="concurrent PostgreSQL appenders")
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--json", action="store_true", help="print the JSON object only")
    args = parser.parse_args()
    figures = asyncio.run(main(args))
    if args.json:
        print(json.dumps({k: {m: round(v) for m, v in f.items()} for k, f in figures.items()}))
    else:
        print(f"append throughput, batches of {args.batch}, {args.payload}-byte envelopes "
              "(no reference figure exists; ours only)")
        print(f"{'backend':<22}{'new env/s':>12}{'replay env/s':>14}")
        for name, f in figures.items():
            print(f"{name:<22}{f['new_per_s']:>12,.0f}{f['replay_per_s']:>14,.0f}")
