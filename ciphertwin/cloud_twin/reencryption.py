"""Re-encryption on a pool of worker processes, with results cached per (capsule, grant).

Each re-encryption costs a multi-pairing (~1 ms) plus parsing and validating the capsule's
points, so the cloud never does it on its event loop. Workers keep the parsed re-keys and
capsules they have seen, so a grant's key is parsed once per worker, not once per item.
Inputs and outputs cross the process boundary as bytes only.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

from ciphertwin.crypto.errors import KeyMismatch, PolicyNotSatisfied
from ciphertwin.crypto.kpcpre import ReKey, reencrypt_encoded
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
    validated every point at ingest; the ones used here are validated again anyway)."""
    out: list[bytes | str] = []
    for rekey_bytes, capsule_bytes in work:
        try:
            out.append(reencrypt_encoded(_rekey(rekey_bytes), capsule_bytes).to_bytes())
        except (PolicyNotSatisfied, KeyMismatch, ValidationError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


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
        size = max(1, -(-len(work) // self.workers))
        chunks = [work[i : i + size] for i in range(0, len(work), size)]
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._executor, reencrypt_batch, list(c)) for c in chunks)
        )
        return [r for part in parts for r in part]

    @property
    def executor(self) -> Executor:
        """The pool itself, for other CPU-bound batch work (e.g. signature checks)."""
        return self._executor

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
