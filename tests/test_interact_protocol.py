"""Issue 11 protocol: sealed documents, desired/reported, requests/answers, presence —
round trips through real crypto (PRE re-encryption included) and every refusal."""

from __future__ import annotations

import time

import pytest

from ciphertwin.bus.envelope import decode
from ciphertwin.crypto.kpcpre import PreCiphertext, reencrypt
from ciphertwin.protocol.sealed_docs import OWNER_RECIPIENT, wrap_for
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
    return reencrypt(rk, PreCiphertext.from_bytes(env_wrap)).to_bytes()


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
