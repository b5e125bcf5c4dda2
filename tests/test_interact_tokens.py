"""InteractToken: issue, encode, verify — and every way a token is refused."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import TokenRejected
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import (
    MAX_TOKEN_DEVICES,
    DeviceKeys,
    InteractToken,
    issue_interact_token,
    issue_write_token,
    verify_interact_token,
)
from ciphertwin.errors import ValidationError

OWNER = SigningKey.generate()
HOLDER = SigningKey.generate()
NOW = 1_800_000_000
DEV = DeviceKeys("d1", PreKeyPair.generate().public.to_bytes(), SigningKey.generate().verify_key.raw)


def token(**kw: object) -> InteractToken:
    args: dict = dict(operations=("set_target", "read"), devices=[DEV], not_before=NOW - 10,
                      valid_for_s=3600)
    args.update(kw)
    return issue_interact_token(OWNER, "bob", HOLDER.verify_key, ["t1", "t2"],
                                ["request", "desired"], **args)


def verify(t: InteractToken, **kw: object) -> InteractToken:
    return verify_interact_token(t, OWNER.verify_key, now=NOW, **kw)  # type: ignore[arg-type]


def test_round_trip_and_accessors() -> None:
    t = token()
    back = InteractToken.from_bytes(t.to_bytes())
    assert back == t and wire.decode_any(t.to_bytes()) == t
    assert back.twins == ("t1", "t2") and back.rights == ("desired", "request")
    assert back.device("d1") == DEV and back.device("d2") is None
    assert back.allows_operation("read") and not back.allows_operation("firmware_update")
    assert token(operations=["*"]).allows_operation("anything")
    verify(back, principal="bob", holder_key=HOLDER.verify_key, twin="t2", right="desired",
           operation="set_target")
    assert len(t.token_id) == 16 and t.token_id != token().token_id  # fresh ids


@pytest.mark.parametrize(("kw", "reason"), [
    ({"principal": "mallory"}, "wrong-principal"),
    ({"holder_key": SigningKey.generate().verify_key}, "wrong-holder"),
    ({"twin": "t3"}, "wrong-twin"),
    ({"operation": "firmware_update"}, "operation-not-allowed"),
])
def test_wrong_principal_holder_twin_operation(kw: dict, reason: str) -> None:
    with pytest.raises(TokenRejected) as exc:
        verify(token(), **kw)
    assert exc.value.reason == reason


def test_wrong_right() -> None:
    t = issue_interact_token(OWNER, "bob", HOLDER.verify_key, ["t1"], ["request"],
                             not_before=NOW - 10, valid_for_s=60)
    with pytest.raises(TokenRejected) as exc:
        verify(t, right="desired")
    assert exc.value.reason == "right-not-granted"


def test_window() -> None:
    t = token(valid_for_s=100)
    with pytest.raises(TokenRejected, match="expired"):
        verify_interact_token(t, OWNER.verify_key, now=NOW + 100)
    with pytest.raises(TokenRejected, match="not-yet-valid"):
        verify_interact_token(t, OWNER.verify_key, now=NOW - 11)
    verify_interact_token(t, OWNER.verify_key, now=NOW + 100, leeway_s=20)
    # default: the current time, so a token valid from now on is fine without ``now``
    verify_interact_token(issue_interact_token(OWNER, "bob", HOLDER.verify_key, ["t1"],
                                               ["request"]), OWNER.verify_key)


def test_signed_by_another_owner_or_forged() -> None:
    other = SigningKey.generate()
    t = issue_interact_token(other, "bob", HOLDER.verify_key, ["t1"], ["request"],
                             not_before=NOW - 10, valid_for_s=60)
    with pytest.raises(TokenRejected) as exc:
        verify(t)
    assert exc.value.reason == "wrong-issuer"
    # a token claiming OWNER as issuer but signed by someone else
    forged = dataclasses.replace(t, issuer=OWNER.verify_key)
    with pytest.raises(TokenRejected) as exc:
        verify(forged)
    assert exc.value.reason == "bad-signature"


@pytest.mark.parametrize("change", [
    {"principal": "mallory"},
    {"twins": ("t1", "t2", "t9")},
    {"rights": ("desired", "request")},
    {"operations": ("*",)},
    {"devices": ()},
    {"not_after": NOW + 10**6},
    {"holder_key": SigningKey.generate().verify_key},
])
def test_every_field_is_signed(change: dict) -> None:
    base = issue_interact_token(OWNER, "bob", HOLDER.verify_key, ["t1", "t2"], ["request"],
                                operations=["read"], devices=[DEV], not_before=NOW - 10,
                                valid_for_s=60)
    tampered = dataclasses.replace(base, **change)
    with pytest.raises(TokenRejected) as exc:
        verify(InteractToken.from_bytes(tampered.to_bytes()))
    assert exc.value.reason == "bad-signature"


@pytest.mark.parametrize(("kw", "match"), [
    ({"rights": ["admin"]}, "rights"),
    ({"rights": []}, "rights"),
    ({"rights": "request"}, "rights"),
    ({"operations": []}, "operations"),
    ({"operations": ["x" * 65]}, "operation"),
    ({"operations": ["bad\nop"]}, "operation"),
    ({"devices": [DEV, DEV]}, "once"),
    ({"devices": [DeviceKeys("d1", b"x", b"short")]}, "verify_key"),
    ({"devices": [DeviceKeys("d1", b"x" * 2000, DEV.verify_key)]}, "pre_pk"),
    ({"devices": [DeviceKeys(f"d{i}", DEV.pre_pk, DEV.verify_key)
                  for i in range(MAX_TOKEN_DEVICES + 1)]}, "devices"),
    ({"valid_for_s": 0}, "window"),
])
def test_issue_refuses_bad_input(kw: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        if "rights" in kw:
            issue_interact_token(OWNER, "bob", HOLDER.verify_key, ["t1"], kw["rights"])
        else:
            token(**kw)


def test_issue_refuses_bad_principal_twins_holder() -> None:
    with pytest.raises(ValidationError):
        issue_interact_token(OWNER, "", HOLDER.verify_key, ["t1"], ["request"])
    with pytest.raises(ValidationError):
        issue_interact_token(OWNER, "bob", HOLDER.verify_key, [], ["request"])
    with pytest.raises(ValidationError):
        issue_interact_token(OWNER, "bob", HOLDER.verify_key.raw, ["t1"], ["request"])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        verify_interact_token(object(), OWNER.verify_key)  # type: ignore[arg-type]


def test_decoding_refuses_non_canonical_and_foreign_objects() -> None:
    t = token()
    body = {**t.body(), "sig": t.signature}
    # unsorted list (twins reversed) re-encoded canonically otherwise: refused
    unsorted = wire.encode(InteractToken.TAG, {**body, "twins": ["t2", "t1"]})
    with pytest.raises(ValidationError, match="sorted"):
        InteractToken.from_bytes(unsorted)
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(wire.encode(InteractToken.TAG, {**body, "rights": ["root"]}))
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(wire.encode(InteractToken.TAG, {**body, "extra": 1}))
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(wire.encode(InteractToken.TAG, {**body, "devices": [{"device": "d"}]}))
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(wire.encode(InteractToken.TAG, {**body, "nbf": -1}))
    wt = issue_write_token(OWNER, "t1", HOLDER.verify_key, ["a"], valid_for_s=60)
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(wt.to_bytes())  # a write token is no interact token
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(b"\x00" * 100)
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(b"x" * (64 * 1024))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_escapes_as_anything_but_validation_error(data: bytes) -> None:
    with pytest.raises(ValidationError):
        InteractToken.from_bytes(data)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_any_bit_flip_is_refused(bit: int) -> None:
    raw = bytearray(TOKEN_BYTES)
    i = bit % (len(raw) * 8)
    raw[i // 8] ^= 1 << (i % 8)
    try:
        t = InteractToken.from_bytes(bytes(raw))
    except ValidationError:
        return
    with pytest.raises(TokenRejected):
        verify(t)


TOKEN_BYTES = token().to_bytes()


def test_real_clock_default() -> None:
    t = issue_interact_token(OWNER, "bob", HOLDER.verify_key, ["t1"], ["request"], valid_for_s=5)
    verify_interact_token(t, OWNER.verify_key, now=time.time())
    with pytest.raises(TokenRejected):
        verify_interact_token(t, OWNER.verify_key, now=time.time() + 10)


def test_devices_scoped_to_twins() -> None:
    d1 = DeviceKeys("d1", DEV.pre_pk, DEV.verify_key, "t1")
    d2 = DeviceKeys("d2", DEV.pre_pk, SigningKey.generate().verify_key.raw, "t2")
    anywhere = DeviceKeys("d3", DEV.pre_pk, DEV.verify_key)
    t = token(devices=[d2, anywhere, d1])
    back = InteractToken.from_bytes(t.to_bytes())
    assert [d.device for d in back.devices] == ["d1", "d2", "d3"]
    assert [d.device for d in back.devices_of("t1")] == ["d1", "d3"]
    assert [d.device for d in back.devices_of("t2")] == ["d2", "d3"]
    assert back.device("d3").twin == "" and back.device("d1").twin == "t1"
    with pytest.raises(ValidationError):
        token(devices=[DeviceKeys("d1", DEV.pre_pk, DEV.verify_key, "bad\ntwin")])
