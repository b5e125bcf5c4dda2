"""Correlated randomness from pairwise keys, expanded with AES-256-CTR.

Parties i and i+1 share a 32-byte pair secret. For every *run* of a job it is stretched by HKDF
into an AES key: the info binds the job id and the run digest H(nonce0‖nonce1‖nonce2), where
each node draws its 32-byte nonce fresh for the run (and announces it in its signed "ready"
status). A node's keys are therefore fresh as long as its own nonce is, even if the cloud
replays a job id to a restarted node: masks never repeat across runs. The pair secret is long
lived (static X25519), so a key bound to the job id alone would repeat.

Every random draw is the AES-CTR keystream under a counter block built from (round, op)
plus the block offset. Both holders of a key therefore draw the same words for the same
(run, round, op) no matter in which order messages arrived — no state to keep in
sync beyond the program counter every party runs anyway.

Party i holds the key it shares with party i-1 ("prev") and with party i+1 ("next"). The
difference F_prev - F_next is a three-party sharing of zero (each F appears once with each
sign), which is what re-randomises products and outputs.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ciphertwin.mpc_nodes.errors import MpcValidationError
from ciphertwin.mpc_nodes.ring import DTYPE

PAIR_SECRET_BYTES = 32
RUN_NONCE_BYTES = 32
RUN_DIGEST_BYTES = 32
_BLOCK = 16


def new_run_nonce() -> bytes:
    """This node's fresh contribution to one run's keys (never reused, never derived)."""
    return os.urandom(RUN_NONCE_BYTES)


def run_digest(nonces: Sequence[bytes]) -> bytes:
    """H(nonce0‖nonce1‖nonce2): the three nodes' nonces in party order, all required."""
    if len(nonces) != 3 or any(not isinstance(n, bytes) or len(n) != RUN_NONCE_BYTES
                               for n in nonces):
        raise MpcValidationError(f"a run needs three {RUN_NONCE_BYTES}-byte nonces, one per node")
    return hashlib.sha256(b"ct/mpc/run/v1|" + b"".join(nonces)).digest()


def check_run(run: bytes) -> bytes:
    if not isinstance(run, bytes) or len(run) != RUN_DIGEST_BYTES:
        raise MpcValidationError(f"run digest must be {RUN_DIGEST_BYTES} bytes")
    return run


def derive_job_key(pair_secret: bytes, job: str, purpose: bytes, run: bytes) -> bytes:
    """HKDF-SHA256 a pair secret into a 32-byte key bound to one job, run and purpose."""
    if not isinstance(pair_secret, bytes) or len(pair_secret) != PAIR_SECRET_BYTES:
        raise MpcValidationError("pair secret must be 32 bytes")
    info = b"ct/mpc/" + purpose + b"/v2|" + check_run(run) + job.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(pair_secret)


class PrfStream:
    """AES-256-CTR keystream addressed by (round, op): ``words(round, op, n)``."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise MpcValidationError("PRF key must be 32 bytes")
        self._aes = algorithms.AES(key)
        self._zeros = bytearray()

    def words(self, round_: int, op: int, n: int) -> np.ndarray:
        """``n`` pseudo-random uint64 words for draw ``op`` of round ``round_``."""
        if not (0 <= round_ < 1 << 32 and 0 <= op < 1 << 32 and 0 <= n):
            raise MpcValidationError(f"PRF address out of range: round={round_} op={op} n={n}")
        nbytes = n * 8
        if len(self._zeros) < nbytes:
            self._zeros = bytearray(nbytes)
        # update_into needs len(data) + block - 1 bytes of room; the spare tail is never used.
        buf = np.empty(nbytes + _BLOCK, dtype=np.uint8)
        nonce = struct.pack(">IIQ", round_, op, 0)  # low 64 bits count blocks: the offset
        enc = Cipher(self._aes, modes.CTR(nonce)).encryptor()
        enc.update_into(memoryview(self._zeros)[:nbytes], buf)
        return buf[:nbytes].view(DTYPE)


class CorrelatedRandomness:
    """The two PRF streams of one party for one run of a job, and the sharings of zero."""

    def __init__(self, pair_secret_prev: bytes, pair_secret_next: bytes, job: str,
                 run: bytes) -> None:
        self.prev = PrfStream(derive_job_key(pair_secret_prev, job, b"prf", run))
        self.next = PrfStream(derive_job_key(pair_secret_next, job, b"prf", run))

    def zero_arith(self, round_: int, op: int, n: int) -> np.ndarray:
        """This party's share of an additive sharing of zero (sums to 0 mod 2^64 over parties)."""
        return self.prev.words(round_, op, n) - self.next.words(round_, op, n)

    def zero_bool(self, round_: int, op: int, n: int) -> np.ndarray:
        """This party's share of an XOR sharing of zero."""
        return self.prev.words(round_, op, n) ^ self.next.words(round_, op, n)
