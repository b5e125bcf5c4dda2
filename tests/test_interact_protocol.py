"""Issue 11 protocol: sealed documents, desired/reported, requests/answers, presence —
round trips through real crypto (PRE re-encryption included) and every refusal."""

from __future__ import annotations

import time

import pytest

from ciphertwin.bus.envelope import decode
from ciphertwin.protocol.sealed_docs import OWNER_RECIPIENT, reencrypt_wrap, wrap_for
from ciphertwin.protocol.twin_requests import (
    build_answer,
    build_presence,
    build_request,
    open_answer,
    open_request,
    verify_answer_outer,
    verify_presence,
    verify_request_outer,
)
from ciphertwin.protocol.twin_state import (
    build_desired,
    build_reported,
    open_desired,
    open_reported,
    verify_desired_outer,
    verify_reported_outer,
)

from interact_world import World, make_world


@pytest.fixture(scope="module")
def w() -> World:
    return make_world()


def _via_grant(env_wrap: bytes, rk) -> bytes:  # noqa: ANN001
    """What the cloud does: re-encrypt the owner's wrap through a grant's re-key."""
    return reencrypt_wrap(rk, env_wrap)


def test_desired_by_owner_round_trip(w: World) -> None:
    raw = build_desired(w.owner.sig, w.twin, "alice", w.owner.pre.public, {"target_c": 21.5}, 0)
    env = decode(raw, "desired_set")
    assert verify_desired_outer(env, w.owner.sig.verify_key, now=time.time()) == "alice"
    assert env["version"] == 1 and env["base_version"] == 0
    own = open_desired(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre, w.owner.sig.verify_key)
    assert own.doc == {"target_c": 21.5} and own.writer == "alice" and own.permit is None
    dev = open_desired(env, _via_grant(wrap_for(env, OWNER_RECIPIENT), w.device_rekey),
                       w.device.pre, w.owner.sig.verify_key)
    assert dev.doc == own.doc and dev.version == 1


def test_desired_by_permit_holder(w: World) -> None:
    permit = w.permit(["desired"]).to_bytes()
    raw = build_desired(w.requester.sig, w.twin, "bob", w.owner.pre.public, {"a": {"b": 1}}, 4,
                        permit=permit)
    env = decode(raw, "desired_set")
    assert verify_desired_outer(env, w.owner.sig.verify_key, now=time.time()) == "bob"
    d = open_desired(env, _via_grant(wrap_for(env, OWNER_RECIPIENT), w.device_rekey),
                     w.device.pre, w.owner.sig.verify_key)
    assert d.version == 5 and d.writer == "bob" and d.permit is not None


def test_reported_round_trip(w: World) -> None:
    raw = build_reported(w.creds, w.owner.pre.public, 7, 5, {"room_c": 20.0}, False)
    env = decode(raw, "reported_set")
    verify_reported_outer(env, w.owner.sig.verify_key, now=time.time())
    r = open_reported(env, _via_grant(wrap_for(env, OWNER_RECIPIENT), w.reader_rekey),
                      w.reader.pre, w.owner.sig.verify_key)
    assert (r.version, r.desired_version, r.in_sync, r.state) == (7, 5, False, {"room_c": 20.0})
    assert r.device == "d1"


def test_request_answer_round_trip(w: World) -> None:
    token = w.permit(["request"], operations=["set_target"])
    raw, reply_key, rid = build_request(
        w.requester.sig, w.twin, "bob", w.owner.pre.public, "set_target", {"c": 22},
        permit=token.to_bytes(), devices=[w.device_recipient], deadline=time.time() + 60)
    env = decode(raw, "request")
    verify_request_outer(env, w.owner.sig.verify_key, now=time.time())
    req = open_request(env, wrap_for(env, "d1"), w.device.pre, w.owner.sig.verify_key)
    assert (req.request_id, req.requester, req.body.op, req.body.args) == (
        rid, "bob", "set_target", {"c": 22})
    owner_view = open_request(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre,
                              w.owner.sig.verify_key)
    assert owner_view.body.args == {"c": 22}
    ans_raw = build_answer(w.creds, req, True, {"applied": 22})
    ans = decode(ans_raw, "answer")
    verify_answer_outer(ans, w.owner.sig.verify_key, now=time.time())
    body = open_answer(ans, reply_key, w.owner.sig.verify_key, rid, token.devices)
    assert body.ok and body.result == {"applied": 22} and body.device == "d1"


def test_presence_round_trip(w: World) -> None:
    now = time.time()
    raw = build_presence(w.creds, awake=True, until=now + 30, window_s=30, next_wake=now + 600,
                         wakeable=True)
    env = decode(raw, "presence")
    verify_presence(env, w.owner.sig.verify_key, now=now)
    assert env["awake"] and env["next_wake"] == pytest.approx(now + 600)


# --- negative: the sealed document layer --------------------------------------------------

from ciphertwin.bus.envelope import Envelope, encode  # noqa: E402
from ciphertwin.bus.errors import EnvelopeError  # noqa: E402
from ciphertwin.crypto.errors import DecryptionFailed, SignatureInvalid, TokenRejected  # noqa: E402
from ciphertwin.crypto.hpke import X25519KeyPair  # noqa: E402
from ciphertwin.crypto.kpcpre import rekey  # noqa: E402
from ciphertwin.crypto.signing import SigningKey  # noqa: E402
from ciphertwin.crypto.tokens import issue_write_token  # noqa: E402
from ciphertwin.errors import CipherTwinError, ValidationError  # noqa: E402
from ciphertwin.protocol.items import DeviceCredentials  # noqa: E402
from ciphertwin.protocol.sealed_docs import (  # noqa: E402
    Recipient,
    open_document,
    seal_document,
    sign_envelope,
    unwrap,
)

META = {"version": 3, "time": 1.0}


def _sealed(w: World, **kw: object):  # noqa: ANN202
    args = dict(kind="desired_set", twin=w.twin, author="alice", meta=META)
    args.update(kw)
    wraps, sealed = seal_document(args["kind"], args["twin"], args["author"], w.owner.sig,
                                  args["meta"], {"doc": {"x": 1}},
                                  [Recipient(OWNER_RECIPIENT, w.owner.pre.public)])
    return args, wraps[0]["wrap"], sealed


def test_document_opens_only_in_its_place(w: World) -> None:
    args, wrap, sealed = _sealed(w)
    key = unwrap(w.owner.pre, wrap, args["kind"], w.twin, "alice", META)
    assert open_document("desired_set", w.twin, "alice", META, sealed, key,
                         w.owner.sig.verify_key) == {"doc": {"x": 1}}
    for place in [("reported_set", w.twin, "alice", META),   # other kind
                  ("desired_set", "t2", "alice", META),       # other twin
                  ("desired_set", w.twin, "bob", META),       # other author
                  ("desired_set", w.twin, "alice", {**META, "version": 4})]:  # other meta
        with pytest.raises(DecryptionFailed):
            unwrap(w.owner.pre, wrap, *place)
        with pytest.raises(DecryptionFailed):
            open_document(*place, sealed, key, w.owner.sig.verify_key)


def test_wrap_moved_between_documents(w: World) -> None:
    _, wrap_a, sealed_a = _sealed(w)
    _, wrap_b, sealed_b = _sealed(w, meta={**META, "version": 4})
    with pytest.raises(DecryptionFailed):  # B's key wrap under A's place
        unwrap(w.owner.pre, wrap_b, "desired_set", w.twin, "alice", META)
    # same place, other document (a second doc with identical meta): K of A opens not B
    _, wrap_c, sealed_c = _sealed(w)
    key_a = unwrap(w.owner.pre, wrap_a, "desired_set", w.twin, "alice", META)
    with pytest.raises(DecryptionFailed):
        open_document("desired_set", w.twin, "alice", META, sealed_c, key_a,
                      w.owner.sig.verify_key)


def test_inner_signature_checked_and_wrong_reader(w: World) -> None:
    args, wrap, sealed = _sealed(w)
    key = unwrap(w.owner.pre, wrap, "desired_set", w.twin, "alice", META)
    with pytest.raises(SignatureInvalid):
        open_document("desired_set", w.twin, "alice", META, sealed, key, w.device.sig.verify_key)
    with pytest.raises(CipherTwinError):  # a key pair that is not the owner's
        unwrap(w.device.pre, wrap, "desired_set", w.twin, "alice", META)
    with pytest.raises(ValidationError):
        unwrap(w.owner.pre, sealed, "desired_set", w.twin, "alice", META)  # not a wrap
    with pytest.raises(ValidationError):
        seal_document("desired_set", w.twin, "alice", w.owner.sig, META, {}, [])
    with pytest.raises(ValidationError):
        seal_document("item", w.twin, "alice", w.owner.sig, META, {},
                      [Recipient(OWNER_RECIPIENT, w.owner.pre.public)])


def test_request_wrap_is_not_reencryptable_by_twin_grants(w: World) -> None:
    """A reader (or the device) holding a twin:<T> grant cannot get a request re-encrypted:
    the owner's request wrap carries no twin: or type: attribute."""
    from ciphertwin.crypto.errors import PolicyNotSatisfied

    raw, _, _ = build_request(w.owner.sig, w.twin, "alice", w.owner.pre.public, "op", {},
                              permit=None, devices=[w.device_recipient],
                              deadline=time.time() + 60)
    env = decode(raw, "request")
    with pytest.raises(PolicyNotSatisfied):
        _via_grant(wrap_for(env, OWNER_RECIPIENT), w.reader_rekey)
    broad = rekey(w.owner.pre, '"type:request" OR "twin:t1"', w.reader.pre.public)
    with pytest.raises(PolicyNotSatisfied):
        _via_grant(wrap_for(env, OWNER_RECIPIENT), broad)


# --- negative: desired ---------------------------------------------------------------------


def _desired(w: World, **kw: object) -> Envelope:
    args: dict = dict(signer=w.owner.sig, writer="alice", doc={"a": 1}, base_version=0)
    args.update(kw)
    raw = build_desired(args.pop("signer"), w.twin, args.pop("writer"), w.owner.pre.public,
                        args.pop("doc"), args.pop("base_version"), **args)
    return decode(raw, "desired_set")


def _resign(kind: str, signer: SigningKey, body: dict) -> Envelope:
    body = {k: v for k, v in body.items() if k != "sig"}
    body["sig"] = sign_envelope(kind, signer, body)
    return decode(encode(kind, body), kind)


def test_desired_forged_outer_signature(w: World) -> None:
    mallory = SigningKey.generate()
    env = _desired(w, signer=mallory)  # claims to be the owner, signed by another key
    with pytest.raises(SignatureInvalid):
        verify_desired_outer(env, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(SignatureInvalid):
        open_desired(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre, w.owner.sig.verify_key)


def test_desired_forged_inner_signature(w: World) -> None:
    """Outer signature right, inner by someone else: only the end-to-end check sees it."""
    mallory = SigningKey.generate()
    env = _desired(w, signer=mallory)
    good = _resign("desired_set", w.owner.sig, env.body)
    verify_desired_outer(good, w.owner.sig.verify_key, now=time.time())  # cloud is fooled
    with pytest.raises(SignatureInvalid):
        open_desired(good, wrap_for(good, OWNER_RECIPIENT), w.owner.pre, w.owner.sig.verify_key)


@pytest.mark.parametrize("field", ["version", "base_version", "time", "twin", "writer",
                                   "request_id", "sealed", "wraps"])
def test_desired_any_field_changed_breaks_the_outer_signature(w: World, field: str) -> None:
    env = _desired(w, base_version=3)
    body = dict(env.body)
    body[field] = {"version": 5, "base_version": 4, "time": body["time"] - 1, "twin": "t2",
                   "writer": "bob", "request_id": "feedfeedfeedfeed",
                   "sealed": body["sealed"][:-1] + bytes([body["sealed"][-1] ^ 1]),
                   "wraps": [{"to": "owner", "wrap": _desired(w)["wraps"][0]["wrap"]}]}[field]
    bad = decode(encode("desired_set", body), "desired_set")
    with pytest.raises(CipherTwinError):
        verify_desired_outer(bad, w.owner.sig.verify_key, now=time.time())


def test_desired_renumbered_by_whoever_signs_outside_fails_inside(w: World) -> None:
    """Even with a valid outer signature (say a compromised owner-side relay), moving a
    document to another version or twin breaks the AAD: the device refuses it."""
    env = _desired(w, base_version=3)
    for change in ({"version": 9, "base_version": 8}, {"twin": "t9"}):
        moved = _resign("desired_set", w.owner.sig, {**env.body, **change})
        with pytest.raises(DecryptionFailed):
            open_desired(moved, wrap_for(moved, OWNER_RECIPIENT), w.owner.pre,
                         w.owner.sig.verify_key)


def test_desired_version_must_follow_base_and_not_be_postdated(w: World) -> None:
    env = _desired(w, base_version=3)
    skipped = _resign("desired_set", w.owner.sig, {**env.body, "version": 9})
    with pytest.raises(ValidationError, match="base_version"):
        verify_desired_outer(skipped, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(ValidationError, match="future"):
        verify_desired_outer(env, w.owner.sig.verify_key, now=time.time() - 3600)
    no_owner_wrap = _resign("desired_set", w.owner.sig,
                            {**env.body, "wraps": [{"to": "d1", "wrap": env["wraps"][0]["wrap"]}]})
    with pytest.raises(ValidationError, match="no wrap"):
        verify_desired_outer(no_owner_wrap, w.owner.sig.verify_key, now=time.time())


@pytest.mark.parametrize(("permit_kw", "writer", "reason"), [
    ({"rights": ["request"]}, "bob", "right-not-granted"),
    ({"twins": ["t2"]}, "bob", "wrong-twin"),
    ({}, "carol", "wrong-principal"),
    ({"owner": SigningKey.generate()}, "bob", "wrong-issuer"),
    ({"valid_for_s": 60, "not_before": int(time.time()) - 3600}, "bob", "expired"),
])
def test_desired_permit_refused(w: World, permit_kw: dict, writer: str, reason: str) -> None:
    permit = w.permit(permit_kw.pop("rights", ["desired"]), **permit_kw).to_bytes()
    env = _desired(w, signer=w.requester.sig, writer=writer, permit=permit)
    for check in (lambda: verify_desired_outer(env, w.owner.sig.verify_key, now=time.time()),
                  lambda: open_desired(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre,
                                       w.owner.sig.verify_key)):
        with pytest.raises(TokenRejected) as exc:
            check()
        assert exc.value.reason == reason


def test_desired_permit_holder_key_must_sign(w: World) -> None:
    permit = w.permit(["desired"]).to_bytes()
    env = _desired(w, signer=SigningKey.generate(), writer="bob", permit=permit)
    with pytest.raises(SignatureInvalid):
        verify_desired_outer(env, w.owner.sig.verify_key, now=time.time())


def test_desired_reader_without_grant_or_wrong_key(w: World) -> None:
    env = _desired(w)
    with pytest.raises(CipherTwinError):  # the device cannot open the owner's own wrap
        open_desired(env, wrap_for(env, OWNER_RECIPIENT), w.device.pre, w.owner.sig.verify_key)
    recaps = _via_grant(wrap_for(env, OWNER_RECIPIENT), w.device_rekey)
    with pytest.raises(CipherTwinError):  # re-encrypted for the device, not the reader
        open_desired(env, recaps, w.reader.pre, w.owner.sig.verify_key)


def test_oversized_and_too_deep_desired(w: World) -> None:
    with pytest.raises(ValidationError):
        _desired(w, doc={"s": "x" * (16 * 1024)})
    deep: dict = {"v": 1}
    for _ in range(8):
        deep = {"n": deep}
    with pytest.raises(ValidationError):
        _desired(w, doc=deep)
    # an authentic (owner-signed) document that breaks the limits is refused on opening too
    from ciphertwin.protocol.sealed_docs import seal_envelope

    meta = {"request_id": "0123456789abcdef", "base_version": 0, "version": 1,
            "time": time.time()}
    raw = seal_envelope("desired_set", w.twin, "writer", "alice", w.owner.sig, meta,
                        {"doc": deep}, [Recipient(OWNER_RECIPIENT, w.owner.pre.public)])
    env = decode(raw, "desired_set")
    with pytest.raises(ValidationError, match="deeper"):
        open_desired(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre, w.owner.sig.verify_key)
    # a sealed blob beyond 24 KiB never decodes
    body = {**env.body, "sealed": b"\x00" * (24 * 1024 + 1)}
    with pytest.raises(EnvelopeError):
        encode("desired_set", body)


# --- negative: reported -------------------------------------------------------------------


def _creds(w: World, *, owner: SigningKey | None = None, twin: str | None = None,
           device: str = "d1", key: SigningKey | None = None,
           signer: SigningKey | None = None) -> DeviceCredentials:
    token = issue_write_token(owner or w.owner.sig, twin or w.twin,
                              (key or w.device.sig).verify_key, ["type:*"], device=device,
                              not_before=int(time.time()) - 7200, valid_for_s=3 * 7200)
    return DeviceCredentials(w.twin, device, signer or w.device.sig, token.to_bytes())


@pytest.mark.parametrize(("creds_kw", "error"), [
    ({"owner": SigningKey.generate()}, TokenRejected),        # token of another owner
    ({"twin": "t2"}, TokenRejected),                          # token for another twin
    ({"signer": SigningKey.generate()}, SignatureInvalid),    # not the token's device key
])
def test_reported_refused(w: World, creds_kw: dict, error: type) -> None:
    env = decode(build_reported(_creds(w, **creds_kw), w.owner.pre.public, 1, 0, {}, True),
                 "reported_set")
    with pytest.raises(error):
        verify_reported_outer(env, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(error):
        open_reported(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre, w.owner.sig.verify_key)


def test_reported_other_device_name(w: World) -> None:
    env = decode(build_reported(_creds(w), w.owner.pre.public, 1, 0, {}, True), "reported_set")
    renamed = _resign("reported_set", w.device.sig, {**env.body, "device": "d2"})
    with pytest.raises(TokenRejected) as exc:
        verify_reported_outer(renamed, w.owner.sig.verify_key, now=time.time())
    assert exc.value.reason == "wrong-device"


def test_reported_forged_inner_and_tampered(w: World) -> None:
    evil = build_reported(_creds(w, signer=SigningKey.generate()), w.owner.pre.public, 2, 1,
                          {"x": 1}, True)
    env = _resign("reported_set", w.device.sig, decode(evil, "reported_set").body)
    verify_reported_outer(env, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(SignatureInvalid):
        open_reported(env, wrap_for(env, OWNER_RECIPIENT), w.owner.pre, w.owner.sig.verify_key)
    good = decode(build_reported(w.creds, w.owner.pre.public, 2, 1, {"x": 1}, True),
                  "reported_set")
    for change in ({"in_sync": False}, {"version": 3}, {"desired_version": 0}):
        bad = decode(encode("reported_set", {**good.body, **change}), "reported_set")
        with pytest.raises(SignatureInvalid):
            verify_reported_outer(bad, w.owner.sig.verify_key, now=time.time())


# --- negative: requests and answers -----------------------------------------------------------


def _request(w: World, **kw: object):  # noqa: ANN202
    args: dict = dict(signer=w.requester.sig, requester="bob", op="set_target",
                      args={"c": 20}, permit=w.permit(["request"]).to_bytes(),
                      devices=[w.device_recipient], deadline=time.time() + 60)
    args.update(kw)
    raw, reply, rid = build_request(args.pop("signer"), w.twin, args.pop("requester"),
                                    w.owner.pre.public, args.pop("op"), args.pop("args"), **args)
    return decode(raw, "request"), reply, rid


def _open(w: World, env: Envelope, **kw: object):  # noqa: ANN202
    return open_request(env, wrap_for(env, "d1"), w.device.pre, w.owner.sig.verify_key, **kw)


def test_request_deadline_bounds(w: World) -> None:
    now = time.time()
    env, _, _ = _request(w, deadline=now + 60)
    with pytest.raises(ValidationError, match="passed"):
        verify_request_outer(env, w.owner.sig.verify_key, now=now + 61)
    with pytest.raises(ValidationError, match="passed"):
        _open(w, env, now=now + 61)
    far, _, _ = _request(w, deadline=now + 8 * 86400)
    with pytest.raises(ValidationError, match="days"):
        verify_request_outer(far, w.owner.sig.verify_key, now=now)


@pytest.mark.parametrize(("permit_kw", "requester", "reason"), [
    ({"rights": ["desired"]}, "bob", "right-not-granted"),
    ({"twins": ["t2"]}, "bob", "wrong-twin"),
    ({}, "carol", "wrong-principal"),
    ({"owner": SigningKey.generate()}, "bob", "wrong-issuer"),
    ({"valid_for_s": 60, "not_before": int(time.time()) - 3600}, "bob", "expired"),
])
def test_request_permit_refused(w: World, permit_kw: dict, requester: str, reason: str) -> None:
    permit = w.permit(permit_kw.pop("rights", ["request"]), **permit_kw).to_bytes()
    env, _, _ = _request(w, requester=requester, permit=permit)
    with pytest.raises(TokenRejected) as exc:
        verify_request_outer(env, w.owner.sig.verify_key, now=time.time())
    assert exc.value.reason == reason
    with pytest.raises(TokenRejected):
        _open(w, env)


def test_request_operation_checked_by_the_device(w: World) -> None:
    """The cloud cannot see the operation; the device refuses one the permit does not list."""
    permit = w.permit(["request"], operations=["read"]).to_bytes()
    env, _, _ = _request(w, op="firmware_update", permit=permit)
    verify_request_outer(env, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(TokenRejected) as exc:
        _open(w, env)
    assert exc.value.reason == "operation-not-allowed"


def test_request_by_owner_needs_owner_key(w: World) -> None:
    env, _, _ = _request(w, signer=w.owner.sig, requester="alice", permit=None)
    assert _open(w, env).permit is None
    forged, _, _ = _request(w, signer=w.requester.sig, requester="alice", permit=None)
    with pytest.raises(SignatureInvalid):
        verify_request_outer(forged, w.owner.sig.verify_key, now=time.time())


def test_request_forged_inner_and_moved(w: World) -> None:
    env, _, _ = _request(w, signer=w.requester.sig)
    # inner by another key, outer re-signed by the holder: device refuses
    evil, _, _ = _request(w, signer=SigningKey.generate())
    resigned = _resign("request", w.requester.sig, evil.body)
    verify_request_outer(resigned, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(SignatureInvalid):
        _open(w, resigned)
    # a copy moved to another id or deadline (re-signed by the holder): AAD breaks
    for change in ({"request_id": "00000000deadbeef"}, {"deadline": env["deadline"] + 5},
                   {"wake": True}):
        moved = _resign("request", w.requester.sig, {**env.body, **change})
        with pytest.raises(DecryptionFailed):
            _open(w, moved)


def test_request_body_limits(w: World) -> None:
    with pytest.raises(ValidationError):
        _request(w, attachment=b"x" * (256 * 1024 + 1))
    with pytest.raises(ValidationError):
        _request(w, op="")
    with pytest.raises(ValidationError):
        _request(w, args={"s": "x" * 20_000})
    with pytest.raises(ValidationError):
        _request(w, approvals=[{"approver": "a"}])
    env, _, _ = _request(w, attachment=b"\x01" * (256 * 1024))
    assert _open(w, env).body.attachment == b"\x01" * (256 * 1024)


def test_answer_refusals(w: World) -> None:
    token = w.permit(["request"])
    env, reply, rid = _request(w, permit=token.to_bytes())
    req = _open(w, env)
    ans = decode(build_answer(w.creds, req, False, None, "refused: office hours"), "answer")
    body = open_answer(ans, reply, w.owner.sig.verify_key, rid, token.devices)
    assert (body.ok, body.result, body.reason) == (False, None, "refused: office hours")
    with pytest.raises(DecryptionFailed):  # wrong reply key
        open_answer(ans, X25519KeyPair.generate(), w.owner.sig.verify_key, rid, token.devices)
    with pytest.raises(ValidationError, match="another request"):
        open_answer(ans, reply, w.owner.sig.verify_key, "ffffffffffffffff", token.devices)
    # a device of the twin with a valid write token, but not one the token lists
    other = SigningKey.generate()
    stranger = decode(build_answer(_creds(w, device="d2", key=other, signer=other), req, True, 1),
                      "answer")
    verify_answer_outer(stranger, w.owner.sig.verify_key, now=time.time())
    with pytest.raises(ValidationError, match="does not list"):
        open_answer(stranger, reply, w.owner.sig.verify_key, rid, token.devices)
    # ... the owner (devices=None) trusts any device it gave a write token
    assert open_answer(stranger, reply, w.owner.sig.verify_key, rid, None).device == "d2"
    # a device key the write token does not name, and a token of another owner
    forged = decode(build_answer(_creds(w, signer=SigningKey.generate()), req, True, 1), "answer")
    with pytest.raises(SignatureInvalid):
        verify_answer_outer(forged, w.owner.sig.verify_key, now=time.time())
    foreign = decode(build_answer(_creds(w, owner=SigningKey.generate()), req, True, 1), "answer")
    with pytest.raises(TokenRejected):
        open_answer(foreign, reply, w.owner.sig.verify_key, rid, token.devices)
    # tampered reply / redirected to another requester
    flipped = {**ans.body, "reply": ans["reply"][:-1] + bytes([ans["reply"][-1] ^ 1])}
    with pytest.raises(SignatureInvalid):
        verify_answer_outer(decode(encode("answer", flipped), "answer"), w.owner.sig.verify_key,
                            now=time.time())
    moved = _resign("answer", w.device.sig, {**ans.body, "requester": "carol"})
    with pytest.raises(DecryptionFailed):
        open_answer(moved, reply, w.owner.sig.verify_key, rid, token.devices)
    with pytest.raises(ValidationError):  # a result beyond the limit
        build_answer(w.creds, req, True, "x" * 40_000)
    with pytest.raises(ValidationError):  # answering for another twin
        build_answer(DeviceCredentials("t2", "d1", w.device.sig, w.creds.write_token), req, True, 1)


# --- negative: presence ---------------------------------------------------------------------


def test_presence_refusals(w: World) -> None:
    now = time.time()

    def presence(creds: DeviceCredentials) -> Envelope:
        return decode(build_presence(creds, awake=True, until=now + 30, window_s=30,
                                     next_wake=None, wakeable=False), "presence")

    assert "next_wake" not in presence(w.creds).body
    with pytest.raises(SignatureInvalid):
        verify_presence(presence(_creds(w, signer=SigningKey.generate())),
                        w.owner.sig.verify_key, now=now)
    with pytest.raises(TokenRejected):
        verify_presence(presence(_creds(w, owner=SigningKey.generate())),
                        w.owner.sig.verify_key, now=now)
    with pytest.raises(ValidationError, match="future"):
        verify_presence(presence(_creds(w)), w.owner.sig.verify_key, now=now - 3600)
    flipped = {**presence(w.creds).body, "until": now + 86400}
    with pytest.raises(SignatureInvalid):
        verify_presence(decode(encode("presence", flipped), "presence"),
                        w.owner.sig.verify_key, now=now)
    with pytest.raises(ValidationError):  # a desired envelope is not a presence
        verify_presence(_desired(w), w.owner.sig.verify_key, now=now)


# --- garbage on every new kind ----------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ciphertwin.protocol.kinds import INBOX_KINDS  # noqa: E402

NEW_KINDS = ("desired_set", "reported_set", "state_result", "state_query", "state_reply",
             "state_update", "request", "request_status", "answer", "presence", *INBOX_KINDS,
             "interact_grant", "interact_revoke")
JUNK = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                    | st.text(max_size=70) | st.binary(max_size=70),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=3),
                    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_on_every_new_kind(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(data, NEW_KINDS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(NEW_KINDS), st.dictionaries(st.text(max_size=16), JUNK, max_size=12))
def test_well_formed_msgpack_junk_on_every_new_kind(kind: str, fields: dict) -> None:
    import msgpack

    payload = msgpack.packb({"t": kind, "v": 1, **fields}, use_bin_type=True)
    try:
        decode(payload, kind)
    except EnvelopeError:
        return
    # anything that passes the schema is well typed; the checks downstream refuse it politely


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_every_new_kind_refuses_missing_extra_and_wrong_type(kind: str) -> None:
    import msgpack

    from ciphertwin.bus.envelope import get_kind

    spec = get_kind(kind)
    with pytest.raises(EnvelopeError):
        decode(msgpack.packb({"t": kind, "v": 1}, use_bin_type=True), kind)
    with pytest.raises(EnvelopeError):
        decode(msgpack.packb({"t": kind, "v": 2}, use_bin_type=True), kind)
    wrong = {name: object() for name in spec.fields}
    with pytest.raises(EnvelopeError):
        encode(kind, wrong)
    assert spec.max_size <= 1024 * 1024  # every new kind is bounded well below the broker's


def _genuine(w: World) -> dict[str, tuple[Envelope, object]]:
    """One genuine envelope per device/requester-signed kind and its cloud-side check."""
    now = time.time()
    req, _, _ = _request(w)
    return {
        "desired_set": (_desired(w), lambda e: verify_desired_outer(e, w.owner.sig.verify_key,
                                                                    now=now)),
        "desired_set by a permit holder": (
            _desired(w, signer=w.requester.sig, writer="bob",
                     permit=w.permit(["desired"]).to_bytes()),
            lambda e: verify_desired_outer(e, w.owner.sig.verify_key, now=now)),
        "reported_set": (decode(build_reported(w.creds, w.owner.pre.public, 1, 0, {"a": 1},
                                               True), "reported_set"),
                         lambda e: verify_reported_outer(e, w.owner.sig.verify_key, now=now)),
        "request": (req, lambda e: verify_request_outer(e, w.owner.sig.verify_key, now=now)),
        "answer": (decode(build_answer(w.creds, _open(w, req), True, [1]), "answer"),
                   lambda e: verify_answer_outer(e, w.owner.sig.verify_key, now=now)),
        "presence": (decode(build_presence(w.creds, awake=False, until=now, window_s=0,
                                           next_wake=now + 60, wakeable=True), "presence"),
                     lambda e: verify_presence(e, w.owner.sig.verify_key, now=now)),
    }


def _mutations(value: object) -> list[object]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value - 1.0]
    if isinstance(value, str):
        return [value[:-1] + ("x" if value[-1:] != "x" else "y")]
    if isinstance(value, bytes):
        return [value[:-1] + bytes([value[-1] ^ 1]), value[:-1]]
    if isinstance(value, list):
        return [value[:-1] + value[-1:] * 2, []]
    return []


def test_every_field_of_every_signed_kind_is_protected(w: World) -> None:
    """Change any one field of a genuine envelope (keeping the schema): the cloud-side check
    refuses it with one of our errors — never accepts it, never crashes otherwise."""
    for name, (env, check) in _genuine(w).items():
        kind = name.split()[0]
        check(env)  # the genuine one passes
        for field, value in env.body.items():
            for changed in _mutations(value):
                try:
                    bad = decode(encode(kind, {**env.body, field: changed}), kind)
                except EnvelopeError:
                    continue
                with pytest.raises(CipherTwinError):
                    check(bad)


def test_multi_twin_token_wraps_only_the_twins_devices(w: World) -> None:
    """A token for two twins lists each twin's device; a request to t1 is wrapped for t1's
    device only, and an answer from t2's device does not count for a request to t1."""
    from ciphertwin.crypto.kpcpre import PreKeyPair
    from ciphertwin.crypto.tokens import DeviceKeys, issue_interact_token
    from ciphertwin.protocol.twin_requests import recipients_from_token

    other_sig, other_pre = SigningKey.generate(), PreKeyPair.generate()
    d2 = DeviceKeys("d2", other_pre.public.to_bytes(), other_sig.verify_key.raw, "t2")
    d1 = DeviceKeys("d1", w.device.pre.public.to_bytes(), w.device.sig.verify_key.raw, w.twin)
    token = issue_interact_token(w.owner.sig, "bob", w.requester.sig.verify_key, [w.twin, "t2"],
                                 ["request"], devices=[d1, d2])
    recipients = recipients_from_token(token, w.twin)
    assert [r.name for r in recipients] == ["d1"]
    env, reply, rid = _request(w, permit=token.to_bytes(), devices=recipients)
    assert {x["to"] for x in env["wraps"]} == {OWNER_RECIPIENT, "d1"}
    req = _open(w, env)
    ans = decode(build_answer(w.creds, req, True, 1), "answer")
    assert open_answer(ans, reply, w.owner.sig.verify_key, rid, token.devices, twin=w.twin).ok
    # d2 (a genuine device of t2) answering about its own twin with the stolen reply key
    t2_token = issue_write_token(w.owner.sig, "t2", other_sig.verify_key, ["type:*"],
                                 device="d2", valid_for_s=600)
    from dataclasses import replace

    stray = decode(build_answer(DeviceCredentials("t2", "d2", other_sig, t2_token.to_bytes()),
                                replace(req, twin="t2"), True, 1), "answer")
    with pytest.raises(ValidationError, match="about twin"):
        open_answer(stray, reply, w.owner.sig.verify_key, rid, token.devices, twin=w.twin)
    # ... nor by claiming t1 under its t2 write token
    with pytest.raises(TokenRejected):
        open_answer(_resign("answer", other_sig, {**stray.body, "twin": w.twin}), reply,
                    w.owner.sig.verify_key, rid, token.devices)
    # a device with a t1 write token that the permit lists for t2 only does not count for t1
    t1_token = issue_write_token(w.owner.sig, w.twin, other_sig.verify_key, ["type:*"],
                                 device="d2", valid_for_s=600)
    wrong_twin = decode(build_answer(DeviceCredentials(w.twin, "d2", other_sig,
                                                       t1_token.to_bytes()), req, True, 1),
                        "answer")
    with pytest.raises(ValidationError, match="does not list"):
        open_answer(wrong_twin, reply, w.owner.sig.verify_key, rid, token.devices, twin=w.twin)


# --- property: any document within the limits survives sealing, re-encryption and opening ----

from test_json_state import OBJECTS  # noqa: E402


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(OBJECTS, st.integers(0, 2**62))
def test_any_document_round_trips_to_the_device(w: World, doc: dict, base: int) -> None:
    env = decode(build_desired(w.owner.sig, w.twin, "alice", w.owner.pre.public, doc, base),
                 "desired_set")
    opened = open_desired(env, _via_grant(wrap_for(env, OWNER_RECIPIENT), w.device_rekey),
                          w.device.pre, w.owner.sig.verify_key)
    assert opened.version == base + 1
    from ciphertwin.protocol.json_state import same_value

    assert same_value(opened.doc, doc)
