"""KP-CPRE: correctness over random policies, and every refusal the design claims."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_crypto_policy import evaluate, render, trees

from ciphertwin.crypto import (
    Capsule,
    DecryptionFailed,
    KeyMismatch,
    PolicyNotSatisfied,
    PreCiphertext,
    PreKeyPair,
    PrePublicKey,
    ReCapsule,
    ReEncryptedCiphertext,
    ReKey,
    decapsulate_owner,
    decapsulate_receiver,
    decrypt_owner,
    decrypt_receiver,
    encapsulate,
    encrypt,
    reencrypt,
    rekey,
)
from ciphertwin.crypto import wire
from ciphertwin.crypto.pairing import G1_BYTES, g1, g2, hash_to_g2, random_scalar
from ciphertwin.errors import ValidationError

ALICE = PreKeyPair.generate()  # owner
BOB = PreKeyPair.generate()  # receiver
CAROL = PreKeyPair.generate()  # another receiver
MSG = b"47.0707,15.4395 @ 2026-11-22T10:00Z"
AAD = b"twin-1|device-7|seq-42"
ATTRS = {"type:location", "share:1", "day:2026-11-22"}


def test_owner_and_receiver_decrypt() -> None:
    ct = encrypt(ALICE.public, ATTRS, MSG, AAD)
    assert decrypt_owner(ALICE, ct, AAD) == MSG
    rk = rekey(ALICE, "type:location AND share:1", BOB.public)
    assert decrypt_receiver(BOB, reencrypt(rk, ct), AAD) == MSG


def test_kem_keys_agree_and_are_fresh() -> None:
    capsule, key = encapsulate(ALICE.public, ATTRS)
    assert len(key) == 32 and decapsulate_owner(ALICE, capsule) == key
    rk = rekey(ALICE, "day:2026-11-22", BOB.public)
    assert decapsulate_receiver(BOB, reencrypt(rk, capsule)) == key
    capsule2, key2 = encapsulate(ALICE.public, ATTRS)
    assert key2 != key and capsule2.capsule_id != capsule.capsule_id


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.frozensets(st.sampled_from(["a", "b", "c", "d", "x y"]), min_size=1))
def test_receiver_decrypts_exactly_when_policy_allows(tree, attrs) -> None:
    ct = encrypt(ALICE.public, attrs, MSG, AAD)
    rk = rekey(ALICE, render(tree), BOB.public)
    if evaluate(tree, attrs):
        assert decrypt_receiver(BOB, reencrypt(rk, ct), AAD) == MSG
    else:
        with pytest.raises(PolicyNotSatisfied):
            reencrypt(rk, ct)


def test_threshold_policy_uses_lagrange_coefficients() -> None:
    ct = encrypt(ALICE.public, {"b", "c"}, MSG)
    rk = rekey(ALICE, "2 of (a, b, c)", BOB.public)
    assert decrypt_receiver(BOB, reencrypt(rk, ct)) == MSG


def test_reencryption_is_deterministic_for_caching() -> None:
    capsule, _ = encapsulate(ALICE.public, ATTRS)
    rk = rekey(ALICE, "share:1", BOB.public)
    first, second = reencrypt(rk, capsule), reencrypt(rk, capsule)
    assert first == second
    assert first.capsule_id == capsule.capsule_id and first.rekey_id == rk.rekey_id


# --- refusals ----------------------------------------------------------------------------


def test_unsatisfied_policy_raises_and_outputs_nothing() -> None:
    ct = encrypt(ALICE.public, {"type:location", "share:2"}, MSG)
    rk = rekey(ALICE, "type:location AND share:1", BOB.public)
    with pytest.raises(PolicyNotSatisfied, match="do not satisfy"):
        reencrypt(rk, ct)


def _mixed(base: ReKey, other: ReKey, take_from_other: set[int], policy=None, w=None) -> ReKey:
    d = tuple(other.d[j] if j in take_from_other else base.d[j] for j in range(len(base.d)))
    r = tuple(other.r[j] if j in take_from_other else base.r[j] for j in range(len(base.r)))
    return dataclasses.replace(base, d=d, r=r, policy=policy or base.policy, w=w or base.w)


def test_leaves_of_two_rekeys_cannot_be_mixed() -> None:
    ct = encrypt(ALICE.public, {"a", "b"}, MSG)
    rk1 = rekey(ALICE, "a AND b", BOB.public)
    rk2 = rekey(ALICE, "a AND b", BOB.public)
    assert decrypt_receiver(BOB, reencrypt(rk1, ct)) == MSG  # control: each key alone works
    for mixed in (_mixed(rk1, rk2, {1}), _mixed(rk2, rk1, {1}), _mixed(rk1, rk2, {0, 1})):
        with pytest.raises(DecryptionFailed):
            decrypt_receiver(BOB, reencrypt(mixed, ct))


def test_two_rekeys_cannot_be_combined_to_satisfy_a_set_neither_allows() -> None:
    """Cloud holds rk1 (a AND b) and rk2 (c AND d); the item has {a, c}: nothing works."""
    ct = encrypt(ALICE.public, {"a", "c"}, MSG)
    rk1 = rekey(ALICE, "a AND b", BOB.public)
    rk2 = rekey(ALICE, "c AND d", BOB.public)
    for rk in (rk1, rk2):
        with pytest.raises(PolicyNotSatisfied):
            reencrypt(rk, ct)
    from ciphertwin.crypto import Policy

    policy = Policy.parse("a AND c")
    for w in (rk1.w, rk2.w):
        forged = ReKey(policy, rk1.owner_id, rk1.receiver_id, (rk1.d[0], rk2.d[0]),
                       (rk1.r[0], rk2.r[0]), w)
        with pytest.raises(DecryptionFailed):
            decrypt_receiver(BOB, reencrypt(forged, ct))


def test_or_leaf_of_one_key_does_not_widen_another() -> None:
    """Swapping in an OR-leaf (share = y2) from another key gives a wrong y1 share."""
    ct = encrypt(ALICE.public, {"c"}, MSG)
    rk1 = rekey(ALICE, "a OR b", BOB.public)
    rk2 = rekey(ALICE, "c", BOB.public)
    from ciphertwin.crypto import Policy

    forged = ReKey(Policy.parse("c"), rk1.owner_id, rk1.receiver_id, (rk2.d[0],),
                   (rk2.r[0],), rk1.w)
    with pytest.raises(DecryptionFailed):
        decrypt_receiver(BOB, reencrypt(forged, ct))


def test_wrong_receiver_is_refused_and_cannot_force_decryption() -> None:
    ct = encrypt(ALICE.public, ATTRS, MSG)
    rct = reencrypt(rekey(ALICE, "share:1", BOB.public), ct)
    with pytest.raises(KeyMismatch):
        decrypt_receiver(CAROL, rct)
    relabelled = dataclasses.replace(
        rct, recapsule=dataclasses.replace(rct.recapsule, receiver_id=CAROL.key_id)
    )
    with pytest.raises(DecryptionFailed):
        decrypt_receiver(CAROL, relabelled)


def test_receiver_cannot_open_the_second_level_capsule() -> None:
    ct = encrypt(ALICE.public, ATTRS, MSG)
    with pytest.raises(KeyMismatch):
        decrypt_owner(BOB, ct)
    forced = dataclasses.replace(ct, capsule=dataclasses.replace(ct.capsule, owner_id=BOB.key_id))
    with pytest.raises(DecryptionFailed):
        decrypt_owner(BOB, forced)


def test_capsule_of_another_owner_is_refused_by_the_proxy() -> None:
    ct = encrypt(CAROL.public, ATTRS, MSG)
    with pytest.raises(KeyMismatch):
        reencrypt(rekey(ALICE, "share:1", BOB.public), ct)


def _tampered_capsules(capsule: Capsule):
    other = g1 * random_scalar()
    yield "c1", dataclasses.replace(capsule, c1=other)
    yield "e", dataclasses.replace(capsule, e=(hash_to_g2("x") * random_scalar(),) + capsule.e[1:])
    swapped = dict(zip(capsule.attributes, capsule.e, strict=True))
    yield "attrs", dataclasses.replace(
        capsule, attributes=tuple(sorted(swapped)), e=tuple(reversed(capsule.e))
    )


def test_tampered_capsule_fails_for_owner_and_receiver() -> None:
    ct = encrypt(ALICE.public, {"share:1", "type:location"}, MSG, AAD)
    rk = rekey(ALICE, "share:1 AND type:location", BOB.public)
    for field, capsule in _tampered_capsules(ct.capsule):
        forged = dataclasses.replace(ct, capsule=capsule)
        with pytest.raises(DecryptionFailed):
            decrypt_owner(ALICE, forged, AAD)
        with pytest.raises(DecryptionFailed):
            decrypt_receiver(BOB, reencrypt(rk, forged), AAD)
        assert capsule.capsule_id != ct.capsule.capsule_id, field


def test_added_attribute_cannot_be_forged() -> None:
    """The cloud appends an attribute with a made-up E_w to satisfy a wider policy."""
    ct = encrypt(ALICE.public, {"type:location"}, MSG)
    rk = rekey(ALICE, "type:location AND share:1", BOB.public)
    capsule = ct.capsule
    forged = dataclasses.replace(
        capsule, attributes=("share:1", "type:location"),
        e=(hash_to_g2("share:1") * random_scalar(), capsule.e[0]),
    )
    with pytest.raises(DecryptionFailed):
        decrypt_receiver(BOB, reencrypt(rk, dataclasses.replace(ct, capsule=forged)))


def test_tampered_payload_nonce_aad_and_recapsule_fail() -> None:
    ct = encrypt(ALICE.public, ATTRS, MSG, AAD)
    rct = reencrypt(rekey(ALICE, "share:1", BOB.public), ct)
    flipped = bytes([ct.ciphertext[0] ^ 1]) + ct.ciphertext[1:]
    for bad in (
        dataclasses.replace(ct, ciphertext=flipped),
        dataclasses.replace(ct, nonce=bytes(12)),
    ):
        with pytest.raises(DecryptionFailed):
            decrypt_owner(ALICE, bad, AAD)
    with pytest.raises(DecryptionFailed):
        decrypt_owner(ALICE, ct, AAD + b"!")
    with pytest.raises(DecryptionFailed):
        decrypt_receiver(BOB, rct, b"twin-2|device-7|seq-42")
    rc = rct.recapsule
    for bad_rc in (
        dataclasses.replace(rc, t=rc.t * rc.t),
        dataclasses.replace(rc, attributes=("share:1",)),
        dataclasses.replace(rc, capsule_id=bytes(32)),
    ):
        with pytest.raises(DecryptionFailed):
            decrypt_receiver(BOB, dataclasses.replace(rct, recapsule=bad_rc), AAD)


def test_public_key_import_checks_both_halves() -> None:
    pk = PrePublicKey.from_bytes(ALICE.public.to_bytes())
    assert pk == ALICE.public and pk.key_id == ALICE.key_id
    inconsistent = PrePublicKey(ALICE.public.g1x, BOB.public.g2x)
    with pytest.raises(ValidationError, match="do not share"):
        PrePublicKey.from_bytes(inconsistent.to_bytes())


def test_secret_key_round_trip_and_repr_hides_secret() -> None:
    again = PreKeyPair.from_bytes(ALICE.to_bytes())
    assert again.public == ALICE.public
    assert "sk" not in repr(ALICE) and ALICE.key_id.hex() in repr(ALICE)
    with pytest.raises(ValidationError, match="out of range"):
        PreKeyPair.from_bytes(wire.encode("pre-sk", {"sk": bytes(32)}))


def test_serialised_objects_round_trip() -> None:
    ct = encrypt(ALICE.public, ATTRS, MSG, AAD)
    rk = rekey(ALICE, "2 of (share:1, type:location, day:2026-11-22)", BOB.public)
    rk2 = ReKey.from_bytes(rk.to_bytes())
    assert rk2.rekey_id == rk.rekey_id and rk2.policy == rk.policy
    ct2 = PreCiphertext.from_bytes(ct.to_bytes())
    assert ct2.capsule == ct.capsule and ct2.capsule.capsule_id == ct.capsule.capsule_id
    rct = ReEncryptedCiphertext.from_bytes(reencrypt(rk2, ct2).to_bytes())
    assert decrypt_receiver(BOB, rct, AAD) == MSG
    assert ReCapsule.from_bytes(rct.recapsule.to_bytes()) == rct.recapsule
    assert len(ct.capsule.to_bytes()) < 48 + 3 * 96 + 200


def test_capsule_with_invalid_point_bytes_is_rejected() -> None:
    capsule, _ = encapsulate(ALICE.public, {"a"})
    raw = capsule.to_bytes()
    c1 = capsule.c1.serialize()
    bad = raw.replace(c1, bytes([c1[0] ^ 1]) + c1[1:])
    assert len(bad) == len(raw)
    with pytest.raises(ValidationError):
        Capsule.from_bytes(bad)
    with pytest.raises(ValidationError):
        Capsule.from_bytes(raw.replace(c1, bytes(G1_BYTES)))


def test_bad_arguments_raise_validation_errors() -> None:
    with pytest.raises(ValidationError):
        encrypt(ALICE.public, set(), MSG)
    with pytest.raises(ValidationError):
        encrypt(ALICE.public, "share:1", MSG)  # a bare string is not an attribute set
    with pytest.raises(ValidationError):
        encrypt(ALICE.public, {"ok", ""}, MSG)
    with pytest.raises(ValidationError):
        encrypt(ALICE.public, {"a"}, "text")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        encrypt(ALICE, {"a"}, MSG)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        rekey(ALICE, "a AND", BOB.public)
    with pytest.raises(ValidationError):
        decrypt_owner(ALICE, b"bytes", AAD)  # type: ignore[arg-type]
    assert g2 is not None
