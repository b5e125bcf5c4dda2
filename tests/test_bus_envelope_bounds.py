"""Numbers a store cannot hold are refused at decode, with a reason (issue 9, finding 2).

SQLite INTEGER and PostgreSQL BIGINT are signed 64-bit: a seq of 2**63 in a correctly signed
item, or a history query with ``since = 2**64 - 1``, used to pass decoding and then fail the
store call (a whole ingest batch, or a query left without reply). Here every registered kind
is checked to bound its stored integers and times, messages around the bounds are decoded
(hypothesis), and the device side is shown never to produce an out-of-range seq.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ciphertwin.protocol.jobs  # noqa: F401 - registers the processing kinds
from ciphertwin.agents.outbox import MAX_SEQ, Outbox, SequenceExhausted
from ciphertwin.bus.envelope import (
    EXACT_INT, STORED_INT, TIME, Float, Int, ListOf, MapOf, Opt, Spec, Struct, decode,
    get_kind, registered_kinds, salvage,
)
from ciphertwin.bus.errors import EnvelopeError
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.items import DeviceCredentials, build_item

INT64_MAX = 2**63 - 1
STORED_NAMES = {"seq", "seqs", "limit", "count", "version", "round", "rounds"}
TIME_NAMES = {"time", "since", "until"}


def canonical(kind: str, body: dict[str, Any]) -> bytes:
    """The one wire form, packed by hand: what a sender that skips ``encode`` can send."""
    def sort(v: Any) -> Any:
        return {k: sort(v[k]) for k in sorted(v)} if isinstance(v, dict) else v
    return msgpack.packb(sort({"t": kind, "v": 1, **body}), use_bin_type=True)


def query(**changes: Any) -> bytes:
    body = {"request_id": "r1", "twin": "t1", "since": 0.0, "until": 2e9, "limit": 10,
            "after": {"time": 1.0, "device": "d1", "seq": 1}}
    after = changes.pop("after", {})
    body["after"].update(after)
    return canonical("history_query", {**body, **changes})


def _walk(spec: Spec, name: str) -> Iterator[tuple[str, Spec]]:
    yield name, spec
    if isinstance(spec, Opt):
        yield from _walk(spec.inner, name)
    elif isinstance(spec, ListOf):
        yield from _walk(spec.item, name)
    elif isinstance(spec, MapOf):
        yield from _walk(spec.value, name)
    elif isinstance(spec, Struct):
        for field, inner in spec.fields.items():
            yield from _walk(inner, field)


def test_every_kind_bounds_its_integers_and_times() -> None:
    """Every Int of every registered kind fits a signed 64-bit column; every seq, limit,
    count, version and round is a STORED_INT and every time a TIME."""
    seen = set()
    for kind in registered_kinds():
        if kind.startswith("test"):
            continue  # kinds the tests declare for themselves (tests/test_bus_envelope.py)
        for field, top in get_kind(kind).fields.items():
            for name, spec in _walk(top, field):
                where = f"{kind}.{name}"
                if isinstance(spec, Int):
                    assert -(2**63) <= spec.lo and spec.hi <= INT64_MAX, where
                    if name in STORED_NAMES:
                        assert spec == STORED_INT, where
                        seen.add(name)
                if isinstance(spec, Float):
                    if name in TIME_NAMES:
                        assert spec == TIME, where
                        seen.add(name)
                if name in STORED_NAMES | TIME_NAMES:
                    assert isinstance(spec, Int | Float | ListOf | Opt), where
    assert seen == STORED_NAMES | TIME_NAMES  # the name lists are not stale


PACKABLE = (-(2**63), 2**64 - 1)
"""What msgpack can carry at all (int64 and uint64): -2**64 cannot even be sent."""
AROUND = st.one_of(*(st.integers(max(b - 3, PACKABLE[0]), min(b + 3, PACKABLE[1]))
                     for b in (0, 2**53, 2**63, 2**64 - 1, -(2**53), -(2**63))),
                   st.integers(*PACKABLE))


@given(AROUND)
def test_item_seq_is_refused_beyond_what_stores_hold(n: int) -> None:
    # the bound check comes before the signature check: no key needed to see it
    body = {"twin": "t1", "device": "d1", "seq": n, "time": 1.7e9, "attrs": ["twin:t1"],
            "capsule_id": bytes(32), "sealed": bytes(16), "token": bytes(16), "sig": bytes(64)}
    payload = canonical("item", body)
    if 0 <= n <= INT64_MAX:
        assert decode(payload, "item")["seq"] == n
    else:
        with pytest.raises(EnvelopeError, match=r"field 'seq': out of range"):
            decode(payload, "item")


@given(AROUND)
def test_history_query_integers_are_refused_beyond_what_stores_hold(n: int) -> None:
    for payload, field in ((query(limit=n), "limit"), (query(after={"seq": n}), "seq")):
        if 0 <= n <= INT64_MAX:
            decode(payload, "history_query")
        else:
            with pytest.raises(EnvelopeError, match=rf"'{field}': out of range"):
                decode(payload, "history_query")


@given(st.one_of(AROUND, st.floats(allow_nan=True, allow_infinity=True)))
def test_times_are_finite_sane_unix_times(t: float) -> None:
    for field in ("since", "until"):
        payload = query(**{field: t})
        if isinstance(t, int) and abs(t) > EXACT_INT:
            with pytest.raises(EnvelopeError, match=rf"'{field}': int too large for a float"):
                decode(payload, "history_query")
        elif t == t and 0 <= t <= 1e12:
            assert decode(payload, "history_query")[field] == t
        else:
            with pytest.raises(EnvelopeError, match=rf"'{field}': (out of range|not finite)"):
                decode(payload, "history_query")


@pytest.mark.parametrize("changes", [{"since": 2**64 - 1}, {"until": -(2**63)},
                                     {"after": {"seq": 2**63}}, {"after": {"time": 2**63}},
                                     {"limit": 2**64 - 1}])
def test_the_reported_queries_are_refused_and_their_request_id_salvaged(
        changes: dict[str, Any]) -> None:
    payload = query(**changes)
    with pytest.raises(EnvelopeError):
        decode(payload, "history_query")
    assert salvage(payload, "history_query", "request_id") == "r1"


def test_salvage_trusts_nothing_else() -> None:
    assert salvage(b"\xc1", "history_query", "request_id") is None
    assert salvage(canonical("history_reply", {"request_id": "r1"}), "history_query",
                   "request_id") is None
    assert salvage(query(request_id="no/slash"), "history_query", "request_id") is None
    assert salvage(query(), "history_query", "nonexistent") is None


# --- the device side never produces an out-of-range seq ----------------------------------


def test_build_item_refuses_a_seq_the_cloud_could_not_store() -> None:
    owner_pre, owner_sig, key = PreKeyPair.generate(), SigningKey.generate(), SigningKey.generate()
    token = issue_write_token(owner_sig, "t1", key.verify_key, ["twin:*"], device="d1",
                              valid_for_s=60)
    creds = DeviceCredentials("t1", "d1", key, token.to_bytes())
    keys = DataKeyManager(owner_pre.public)
    reading = {"type": "x", "values": {}, "time": 1.7e9}
    assert decode(build_item(creds, keys, INT64_MAX, reading, ("twin:t1",)), "item")
    with pytest.raises(EnvelopeError, match="'seq': out of range"):
        build_item(creds, keys, INT64_MAX + 1, reading, ("twin:t1",))


async def test_outbox_stops_before_its_seqs_leave_the_stored_range(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as box:
        assert await box.append(b"first") == 1
    with sqlite3.connect(path) as conn:  # as if 2**63 - 3 items had gone before
        conn.execute("UPDATE outbox_meta SET next_seq = ?", (MAX_SEQ,))
    async with Outbox(path) as box:
        assert await box.append(b"last") == MAX_SEQ
        with pytest.raises(SequenceExhausted):
            await box.append(b"one too many")
        assert box.last_seq == MAX_SEQ
        with pytest.raises(ValidationError):  # an ack the cloud can never send
            await box.acknowledge([2**63])
        assert await box.acknowledge([MAX_SEQ]) == 1
