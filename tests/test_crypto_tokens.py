"""Ed25519 signing with domain separation, write tokens and process tokens."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.crypto import (
    ProcessToken,
    SignatureInvalid,
    SigningKey,
    TokenRejected,
    VerifyKey,
    WriteToken,
    canonical,
    issue_process_token,
    issue_write_token,
    roster_digest,
    verify_process_token,
    verify_write_token,
)
from ciphertwin.errors import ValidationError

OWNER = SigningKey.generate()
DEVICE = SigningKey.generate()
NOW = 1_800_000_000
NODES = [SigningKey.generate().verify_key.raw for _ in range(3)]
RECEIVER = b"\x01" * 32


def test_sign_verify_and_domain_separation() -> None:
    sig = OWNER.sign("envelope", b"payload")
    OWNER.verify_key.verify("envelope", b"payload", sig)
    with pytest.raises(SignatureInvalid):
        OWNER.verify_key.verify("write-token", b"payload", sig)
    with pytest.raises(SignatureInvalid):
        OWNER.verify_key.verify("envelope", b"payloaD", sig)
    with pytest.raises(SignatureInvalid):
        DEVICE.verify_key.verify("envelope", b"payload", sig)
    with pytest.raises(SignatureInvalid):
        OWNER.verify_key.verify("envelope", b"payload", sig[:-1])
    with pytest.raises(ValidationError):
        OWNER.sign("Bad Context", b"x")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 63 * 8 - 1))
def test_openssl_signatures_verify_under_libsodium_and_tampering_fails(message: bytes,
                                                                       bit: int) -> None:
    """Signing (OpenSSL) and verifying (libsodium) are two implementations: every honest
    signature must verify, and any flipped bit of it must not."""
    sig = DEVICE.sign("envelope", message)
    DEVICE.verify_key.verify("envelope", message, sig)
    flipped = bytearray(sig)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SignatureInvalid):
        DEVICE.verify_key.verify("envelope", message, bytes(flipped))


def test_small_order_key_universal_forgery_is_refused() -> None:
    """With the identity point as public key, (R = identity, S = 0) satisfies the lenient
    verification equation for *every* message; OpenSSL accepts it, our verifier must not."""
    identity = b"\x01" + bytes(31)
    forged = identity + bytes(32)
    for message in (b"", b"any reading", b"x" * 500):
        with pytest.raises(SignatureInvalid):
            VerifyKey(identity).verify("envelope", message, forged)


def test_canonical_is_order_independent_and_strict() -> None:
    assert canonical({"b": 1, "a": [1, {"d": 2, "c": b"x"}]}) == canonical(
        {"a": (1, {"c": b"x", "d": 2}), "b": 1}
    )
    for bad in ({1: "x"}, {"a": {1, 2}}, object()):
        with pytest.raises(ValidationError):
            canonical(bad)
    sig = OWNER.sign_object("obj", {"x": 1, "y": 2})
    OWNER.verify_key.verify_object("obj", {"y": 2, "x": 1}, sig)


def test_keys_round_trip() -> None:
    again = SigningKey.from_bytes(OWNER.to_bytes())
    assert again.verify_key == OWNER.verify_key
    assert VerifyKey.from_bytes(OWNER.verify_key.to_bytes()) == OWNER.verify_key
    assert OWNER.verify_key.raw.hex()[:16] in repr(OWNER)


def _write_token(**kw) -> WriteToken:
    args = dict(not_before=NOW, valid_for_s=3600)
    args.update(kw)
    return issue_write_token(OWNER, "twin-1", DEVICE.verify_key, ["type:location", "day:*"], **args)


def test_write_token_accepts_the_right_upload() -> None:
    token = WriteToken.from_bytes(_write_token().to_bytes())
    verify_write_token(token, OWNER.verify_key, twin="twin-1", device_key=DEVICE.verify_key,
                       attributes={"type:location", "day:2026-11-22"}, now=NOW + 10)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"now": NOW - 1}, "not-yet-valid"),
        ({"now": NOW + 3600}, "expired"),
        ({"twin": "twin-2"}, "wrong-twin"),
        ({"device_key": SigningKey.generate().verify_key}, "wrong-device"),
        ({"attributes": {"type:camera"}}, "attribute-not-allowed"),
        ({"attributes": {"day"}}, "attribute-not-allowed"),
    ],
)
def test_write_token_refusals_have_clear_reasons(kwargs, reason) -> None:
    args = {"now": NOW + 10, **kwargs}
    with pytest.raises(TokenRejected) as info:
        verify_write_token(_write_token(), OWNER.verify_key, **args)
    assert info.value.reason == reason
    assert reason in str(info.value)


def test_leeway_tolerates_small_clock_skew() -> None:
    verify_write_token(_write_token(), OWNER.verify_key, now=NOW - 5, leeway_s=30)


def test_forged_write_tokens_are_rejected() -> None:
    token = _write_token()
    widened = dataclasses.replace(token, attributes=("*",))
    with pytest.raises(TokenRejected) as info:
        verify_write_token(widened, OWNER.verify_key, now=NOW + 1)
    assert info.value.reason == "bad-signature"
    extended = dataclasses.replace(token, not_after=token.not_after + 10**6)
    with pytest.raises(TokenRejected, match="bad-signature"):
        verify_write_token(extended, OWNER.verify_key, now=NOW + 1)
    mallory = SigningKey.generate()
    self_signed = issue_write_token(mallory, "twin-1", DEVICE.verify_key, ["*"],
                                    not_before=NOW, valid_for_s=60)
    with pytest.raises(TokenRejected) as info:
        verify_write_token(self_signed, OWNER.verify_key, now=NOW + 1)
    assert info.value.reason == "wrong-issuer"
    # claim the owner as issuer but keep mallory's signature
    spoofed = dataclasses.replace(self_signed, issuer=OWNER.verify_key)
    with pytest.raises(TokenRejected, match="bad-signature"):
        verify_write_token(spoofed, OWNER.verify_key, now=NOW + 1)


def test_write_token_issuance_validates_input() -> None:
    with pytest.raises(ValidationError):
        issue_write_token(OWNER, "twin", DEVICE.verify_key, ["a"], not_before=NOW)
    with pytest.raises(ValidationError):
        issue_write_token(OWNER, "twin", DEVICE.verify_key, ["a"], not_before=NOW,
                          not_after=NOW - 1)
    with pytest.raises(ValidationError):
        issue_write_token(OWNER, "", DEVICE.verify_key, ["a"], valid_for_s=60)
    with pytest.raises(ValidationError):
        issue_write_token(OWNER, "twin", DEVICE.verify_key, "a", valid_for_s=60)
    with pytest.raises(ValidationError):
        issue_write_token(OWNER, "twin", b"raw", ["a"], valid_for_s=60)  # type: ignore[arg-type]


def _process_token(**kw) -> ProcessToken:
    args = dict(limits={"max_users": 100, "max_jobs": 5}, not_before=NOW, valid_for_s=86400,
                twins=["t1", "t2"])
    args.update(kw)
    return issue_process_token(
        OWNER, "type:location AND (day:2026-11-21 OR day:2026-11-22)",
        ["contact-tracing", "aggregate"], [RECEIVER], NODES, **args,
    )


def test_process_token_round_trip_and_accept() -> None:
    token = ProcessToken.from_bytes(_process_token().to_bytes())
    assert token.policy.allows({"type:location", "day:2026-11-22"})
    assert token.limits == {"max_users": 100, "max_jobs": 5}
    assert token.twins == ("t1", "t2")
    verify_process_token(token, OWNER.verify_key, function_class="contact-tracing",
                         receiver=RECEIVER, roster=roster_digest(NODES), node_key=NODES[2],
                         now=NOW + 1)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"function_class": "raw-export"}, "function-class-not-allowed"),
        ({"receiver": b"\x02" * 32}, "receiver-not-authorised"),
        ({"roster": roster_digest(NODES[::-1])}, "roster-mismatch"),
        ({"node_key": b"\x09" * 32}, "node-not-in-roster"),
        ({"now": NOW + 86400}, "expired"),
        ({"now": NOW - 100}, "not-yet-valid"),
    ],
)
def test_process_token_refusals(kwargs, reason) -> None:
    args = {"now": NOW + 1, **kwargs}
    with pytest.raises(TokenRejected) as info:
        verify_process_token(_process_token(), OWNER.verify_key, **args)
    assert info.value.reason == reason


def test_forged_process_token_is_rejected() -> None:
    token = _process_token()
    for forged in (
        dataclasses.replace(token, selector="type:location"),
        dataclasses.replace(token, receivers=(b"\x02" * 32,)),
        dataclasses.replace(token, limits={"max_users": 10**6, "max_jobs": 5}),
        dataclasses.replace(token, twins=("t1", "t2", "t3")),  # the twin scope is signed too
    ):
        with pytest.raises(TokenRejected, match="bad-signature"):
            verify_process_token(forged, OWNER.verify_key, now=NOW + 1)
    with pytest.raises(TokenRejected, match="wrong-issuer"):
        verify_process_token(token, DEVICE.verify_key, now=NOW + 1)


def test_process_token_with_inconsistent_roster_does_not_parse() -> None:
    token = _process_token()
    raw = dataclasses.replace(token, roster=bytes(32)).to_bytes()
    with pytest.raises(ValidationError, match="roster"):
        ProcessToken.from_bytes(raw)


def test_process_token_issuance_validates_input() -> None:
    with pytest.raises(ValidationError):
        _process_token(limits={"max_users": -1})
    with pytest.raises(ValidationError):
        issue_process_token(OWNER, "a AND", ["f"], [RECEIVER], NODES, twins=["t"],
                            valid_for_s=60)
    with pytest.raises(ValidationError):
        issue_process_token(OWNER, "a", ["f"], [], NODES, twins=["t"], valid_for_s=60)
    with pytest.raises(ValidationError):  # a token without a twin scope
        issue_process_token(OWNER, "a", ["f"], [RECEIVER], NODES, twins=[], valid_for_s=60)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_token_garbage_raises_validation_error(data: bytes) -> None:
    for cls in (WriteToken, ProcessToken):
        with pytest.raises(ValidationError):
            cls.from_bytes(data)
