"""Re-encryption on a pool of worker processes, with results cached per (capsule, grant).

Each re-encryption costs a multi-pairing (~1 ms) plus parsing and validating the capsule's
points, so the cloud never does it on its event loop. Workers keep the parsed re-keys and
capsules they have seen, so a grant's key is parsed once per worker, not once per item.
Inputs and outputs cross the process boundary as bytes only. A capsule is re-encrypted for
several grants at once (a processing job: one per node), so work is cut into chunks that keep
a capsule's pairs together, and a worker parses each capsule's points once per chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

from ciphertwin.crypto.errors import KeyMismatch, PolicyNotSatisfied
from ciphertwin.crypto.kpcpre import EncodedCapsule, ReKey, reencrypt_encoded
from ciphertwin.errors import ValidationError
from ciphertwin.workers import worker_pool

_REKEYS: OrderedDict[bytes, ReKey] = OrderedDict()
_CACHE_LIMIT = 4096


def _rekey(data: bytes) -> ReKey:
    """Parsed re-key, kept per worker: a grant's points are decoded once, not per item."""
    digest = hashlib.sha256(data).digest()
    rk = _REKEYS.get(digest)
    if rk is None:
        rk = _REKEYS[digest] = ReKey.from_bytes(data)
        if len(_REKEYS) > _CACHE_LIMIT:
            _REKEYS.popitem(last=False)
    return rk


def reencrypt_batch(work: Sequence[tuple[bytes, bytes]]) -> list[bytes | str]:
    """Worker: (rekey bytes, capsule bytes) -> recapsule bytes, or the reason it failed.

    Capsules are decoded from bytes with only the points the policy uses (the cloud
    validated every point at ingest; the ones used here are validated again anyway), once per
    distinct capsule in the batch."""
    out: list[bytes | str] = []
    parsed: dict[bytes, EncodedCapsule | str] = {}
    rekeys: dict[bytes, ReKey] = {}  # a grant's bytes arrive as one object: hashed once
    for rekey_bytes, capsule_bytes in work:
        try:
            capsule = parsed.get(capsule_bytes)
            if capsule is None:
                try:
                    capsule = parsed[capsule_bytes] = EncodedCapsule(capsule_bytes)
                except ValidationError as exc:
                    capsule = parsed[capsule_bytes] = f"{type(exc).__name__}: {exc}"
            if isinstance(capsule, str):
                out.append(capsule)
                continue
            rk = rekeys.get(rekey_bytes)
            if rk is None:
                rk = rekeys[rekey_bytes] = _rekey(rekey_bytes)
            out.append(reencrypt_encoded(rk, capsule).to_bytes())
        except (PolicyNotSatisfied, KeyMismatch, ValidationError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def capsule_chunks(work: Sequence[tuple[bytes, bytes]], parts: int) -> list[list[int]]:
    """Indices of ``work`` cut into about ``parts`` chunks, a capsule's pairs never split."""
    groups: dict[bytes, list[int]] = {}
    for i, (_, capsule) in enumerate(work):
        groups.setdefault(capsule, []).append(i)
    size = max(1, -(-len(work) // max(1, parts)))
    chunks: list[list[int]] = [[]]
    for members in groups.values():
        if len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].extend(members)
    return [c for c in chunks if c]


class ReencryptionPool:
    """Spread re-encryptions over ``workers`` processes (threads with ``processes=False``).

    The processes are clean workers (`ciphertwin.workers`), started here; the ingest
    pipeline's signature checks run on them too, so that module is preloaded as well."""

    def __init__(self, workers: int | None = None, *, processes: bool = True) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._executor: Executor = (
            worker_pool(self.workers, preload=(__name__, "ciphertwin.cloud_twin.ingest"))
            if processes else ThreadPoolExecutor(self.workers)
        )

    async def reencrypt(self, work: Sequence[tuple[bytes, bytes]]) -> list[bytes | str]:
        """Re-encrypt in parallel; order of results follows ``work``."""
        if not work:
            return []
        loop = asyncio.get_running_loop()
        chunks = capsule_chunks(work, self.workers)
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._executor, reencrypt_batch, [work[i] for i in c])
            for c in chunks))
        out: list[bytes | str] = [""] * len(work)
        for chunk, part in zip(chunks, parts, strict=True):
            for i, result in zip(chunk, part, strict=True):
                out[i] = result
        return out

    @property
    def executor(self) -> Executor:
        """The pool itself, for other CPU-bound batch work (e.g. signature checks)."""
        return self._executor

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
