"""Output delivery: each node HPKE-encrypts its re-randomised additive share to the receiver.

A node's output share is x_i + α_i (α a fresh sharing of zero), so each share alone — and any
two together — is uniformly random; only the receiver, holding all three, learns x.
The blob is HPKE (RFC 9180: X25519, HKDF-SHA256, AES-256-GCM, via :mod:`ciphertwin.crypto.hpke`)
over a msgpack record; the job, function and party index are bound into HPKE's ``info``, so a share cannot be replayed into
another job or posing as another party's share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ciphertwin.crypto.errors import DecryptionFailed
from ciphertwin.crypto.hpke import X25519KeyPair, hpke_open, hpke_seal
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.errors import MpcValidationError, TamperedMessageError
from ciphertwin.mpc_nodes.party import check_job_id
from ciphertwin.mpc_nodes.ring import DTYPE, MAX_ELEMENTS
from ciphertwin.mpc_nodes.shares import PARTIES, check_party

SCHEMA = "mpc-out"
VERSION = 1
MAX_BLOB_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputShare:
    """Party ``party``'s additive share of a job's output (uint64 array)."""

    job: str
    function: str
    party: int
    values: np.ndarray


def _info(job: str, function: str, party: int) -> bytes:
    return msgpack.packb(["ct/mpc/out/v1", job, function, party])


def seal_output(share: OutputShare, receiver_public: bytes) -> bytes:
    """Encrypt an output share for the receiver's X25519 public key (32 raw bytes)."""
    check_job_id(share.job)
    check_party(share.party)
    if not isinstance(receiver_public, bytes) or len(receiver_public) != 32:
        raise MpcValidationError("receiver public key must be 32 raw X25519 bytes")
    values = np.ascontiguousarray(share.values, dtype=DTYPE)
    record = msgpack.packb(
        {"t": SCHEMA, "v": VERSION, "job": share.job, "fn": share.function, "party": share.party,
         "shape": list(values.shape), "data": values.tobytes()}
    )
    try:
        return hpke_seal(receiver_public, record, info=_info(share.job, share.function, share.party))
    except ValidationError as exc:
        raise MpcValidationError(f"cannot seal output share: {exc}") from exc


def open_output(
    blob: bytes,
    receiver_private: X25519PrivateKey | X25519KeyPair,
    *,
    job: str,
    function: str,
    party: int,
) -> OutputShare:
    """Decrypt and validate one node's sealed share for (job, function, party)."""
    check_job_id(job)
    check_party(party)
    if not isinstance(blob, bytes) or not 0 < len(blob) <= MAX_BLOB_BYTES:
        raise MpcValidationError("sealed output must be non-empty bytes within the size limit")
    try:
        record = hpke_open(receiver_private, blob, info=_info(job, function, party))
    except (DecryptionFailed, ValidationError):
        raise TamperedMessageError(
            f"output share of party {party} for job {job!r} does not decrypt: wrong key, "
            "wrong job/party or tampered"
        ) from None
    try:
        msg: Any = msgpack.unpackb(record, raw=False)
    except Exception as exc:
        raise MpcValidationError("output share record is not msgpack") from exc
    expected = {"t": SCHEMA, "v": VERSION, "job": job, "fn": function, "party": party}
    if not isinstance(msg, dict) or any(msg.get(k) != v for k, v in expected.items()):
        raise MpcValidationError("output share record has the wrong schema, job, function or party")
    shape, data = msg.get("shape"), msg.get("data")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(data, bytes)
    ):
        raise MpcValidationError("output share record: bad shape or data")
    count = int(np.prod(shape, dtype=np.int64))
    if count > MAX_ELEMENTS or len(data) != 8 * count:
        raise MpcValidationError("output share record: data length does not match its shape")
    values = np.frombuffer(data, dtype=DTYPE).reshape(shape).copy()
    return OutputShare(job, function, party, values)


def combine_outputs(shares: Sequence[OutputShare]) -> np.ndarray:
    """Add the three parties' shares (same job, function, shape) to open the output."""
    if len(shares) != PARTIES or sorted(s.party for s in shares) != [0, 1, 2]:
        raise MpcValidationError("need exactly one output share from each of parties 0, 1, 2")
    first = shares[0]
    for s in shares:
        if (s.job, s.function, s.values.shape) != (first.job, first.function, first.values.shape):
            raise MpcValidationError("output shares belong to different jobs or shapes")
    return shares[0].values + shares[1].values + shares[2].values
