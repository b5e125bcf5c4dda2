"""Envelope codec: round trips and every class of malformed input is an EnvelopeError."""

from __future__ import annotations

import msgpack
import pytest

from ciphertwin.bus import envelope as env
from ciphertwin.bus.errors import EnvelopeError
from ciphertwin.errors import ValidationError

KIND = "test_reading"
env.register_kind(
    KIND,
    {
        "twin": env.ID,
        "seq": env.U64,
        "blob": env.Bytes(32),
        "note": env.Opt(env.Str(16)),
        "attrs": env.ListOf(env.Str(20, 1), 4),
        "meta": env.Struct({"ok": env.BOOL, "t": env.FLOAT}),
    },
    max_size=512,
)
env.register_kind("test_big", {"chunk": env.Bytes(600_000)}, max_size=1 << 20)
env.register_kind("test_small", {"blob": env.Bytes(100)}, max_size=64)

GOOD = {
    "twin": "t1",
    "seq": 7,
    "blob": b"\x00" * 8,
    "attrs": ["type:x"],
    "meta": {"ok": True, "t": 1.5},
}


def raw(**overrides: object) -> bytes:
    """Hand-made wire bytes (keys sorted, as ``encode`` does; ``...`` drops a field)."""
    msg = {"t": KIND, "v": env.VERSION, **GOOD, **overrides}
    return msgpack.packb({k: v for k, v in sorted(msg.items()) if v is not ...},
                         use_bin_type=True)


def test_round_trip_and_error_is_validation_error() -> None:
    data = env.encode(KIND, GOOD)
    e = env.decode(data, KIND)
    assert (e.kind, e.version, e.body, e.size) == (KIND, 1, GOOD, len(data))
    assert e["seq"] == 7 and e.get("note") is None
    assert env.decode(env.encode(KIND, {**GOOD, "note": "hi"}), [KIND, "error"])["note"] == "hi"
    assert issubclass(EnvelopeError, ValidationError)


def test_encoding_is_deterministic() -> None:
    assert env.encode(KIND, dict(reversed(list(GOOD.items())))) == env.encode(KIND, GOOD)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"\xc1", "not a msgpack"),
        (b"\x92\x01\x02", "must be a map"),
        (msgpack.packb(3), "must be a map"),
        (b"\x91" * 5000, "exceeds limit"),
        (b"\x91" * 400, "not a msgpack"),  # nested too deep / truncated
        (msgpack.packb({1: 2}), "not a msgpack"),  # non-string keys
        (msgpack.packb({"t": KIND, "v": 1}) + b"\x00", "not a msgpack"),  # trailing data
        (msgpack.packb(msgpack.ExtType(5, b"x")), "extension"),
        (raw(t=...), "no kind"),
        (raw(t="error"), "unexpected kind"),
        (raw(v=2), "version"),
        (raw(v=True), "version"),
        (raw(v="1"), "version"),
        (raw(seq=...), "missing field 'seq'"),
        (raw(extra=1), "unexpected field"),
        (raw(seq=-1), "out of range"),
        (raw(seq=7.0), "expected int"),
        (raw(seq=True), "expected int"),
        (raw(seq="7"), "expected int"),
        (raw(twin="a/b"), "identifier"),
        (raw(twin="#"), "identifier"),
        (raw(blob="text"), "expected bytes"),
        (raw(blob=b"x" * 33), "too long"),
        (raw(note=None), "expected str"),
        (raw(note="x" * 17), "too long"),
        (raw(attrs="type:x"), "expected list"),
        (raw(attrs=["a"] * 5), "too long"),
        (raw(attrs=[""]), "too short"),
        (raw(attrs=[b"a"]), "expected str"),
        (raw(meta={"ok": 1, "t": 1.0}), "expected bool"),
        (raw(meta={"ok": True}), "missing field 't'"),
        (raw(meta={"ok": True, "t": float("nan")}), "not finite"),
        (raw(meta={"ok": True, "t": 1.0, "x": 0}), "unexpected field"),
    ],
)
def test_malformed_rejected_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        env.decode(payload, KIND)


def test_oversize_by_kind_and_by_caller() -> None:
    big = env.encode("test_big", {"chunk": b"z" * 300_000})
    assert env.decode(big, "test_big").size == len(big)
    with pytest.raises(EnvelopeError, match="exceeds limit"):
        env.decode(big, "test_big", max_size=1000)
    with pytest.raises(EnvelopeError, match="exceeds limit 512"):
        env.decode(big, KIND)
    # a small kind is refused by its own limit even when decoded next to a big kind
    padded = raw(blob=b"x" * 32, note="y" * 16, attrs=["z" * 20] * 4) + b""
    assert len(padded) < 512
    env.decode(padded, [KIND, "test_big"])


def test_encode_refuses_invalid_bodies() -> None:
    with pytest.raises(EnvelopeError, match="missing field"):
        env.encode(KIND, {"twin": "t"})
    with pytest.raises(EnvelopeError, match="unknown envelope kind"):
        env.encode("nope", {})
    with pytest.raises(EnvelopeError, match="bytes > limit 64"):
        env.encode("test_small", {"blob": b"z" * 80})
    with pytest.raises(EnvelopeError, match="expected bytes"):
        env.encode("test_small", {"blob": object()})


def test_registration_rules() -> None:
    env.register_kind(KIND, dict(env.get_kind(KIND).fields), max_size=512)  # identical: no-op
    with pytest.raises(EnvelopeError, match="already registered"):
        env.register_kind(KIND, {"x": env.U64})
    with pytest.raises(EnvelopeError, match="reserved"):
        env.register_kind("test_reserved", {"t": env.U64})
    with pytest.raises(EnvelopeError, match="invalid kind"):
        env.register_kind("bad/kind", {})
    assert KIND in env.registered_kinds()


def test_non_bytes_payload() -> None:
    with pytest.raises(EnvelopeError, match="must be bytes"):
        env.decode("text", KIND)  # type: ignore[arg-type]
