"""acl_for: the one rule table, checked role by role (no broker needed)."""

from __future__ import annotations

import pytest

from ciphertwin.broker.acl import acl_for, client_id_allowed, filter_covers
from ciphertwin.broker.mosquitto import render_acl, render_passwd
from ciphertwin.bus.topics import Topics
from ciphertwin.config import Principal

T = Topics()
H = "$7$1000$" + "c2FsdHNhbHRzYWx0" + "$" + "A" * 86 + "=="


def p(cid: str, role: str, **kw: object) -> Principal:
    return Principal(cid, role, H, **kw)  # type: ignore[arg-type]


CLIENTS = {
    x.id: x
    for x in [
        p("cloud", "cloud"),
        p("alice", "owner", twins=("t0",)),
        p("bob", "owner", operator=True),
        p("d1", "device", twin="t1", owner="alice"),
        p("d2", "device", twin="t2", owner="bob"),
        p("rec", "receiver"),
        p("n0", "node"),
        p("op", "operator"),
    ]
}


@pytest.mark.parametrize(
    ("pattern", "requested", "covered"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/b", "a/+", False),
        ("a/+", "a/#", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/#", "a/+/c", True),
        ("a/+/c", "a/b", False),
        ("a/b", "a/b/c", False),
        ("+/b", "#", False),
    ],
)
def test_filter_covers(pattern: str, requested: str, covered: bool) -> None:
    assert filter_covers(pattern, requested) is covered


def acl(cid: str):  # noqa: ANN201
    return acl_for(CLIENTS[cid], CLIENTS, T)


def test_device_only_its_own_twin() -> None:
    a = acl("d1")
    assert a.may_publish(T.twin_data("t1")) and a.may_publish(T.reported("t1"))
    assert not a.may_publish(T.twin_data("t2")) and not a.may_publish(T.reported("t2"))
    assert not a.may_publish(T.desired("t1")) and not a.may_publish(T.control("alice"))
    assert a.may_subscribe(T.ack("t1", "d1"))
    # desired state reaches a device re-encrypted through its inbox (issue 11), not the topic
    assert not a.may_subscribe(T.desired("t1"))
    assert a.may_subscribe(T.inbox("d1")) and a.may_subscribe(T.filter("replies", principal="d1"))
    assert not a.may_subscribe(T.ack("t1", "d2")) and not a.may_subscribe(T.inbox("d2"))
    assert not a.may_subscribe(T.twin_data("t1")) and not a.may_subscribe(T.everything())
    assert not a.may_subscribe(T.filter("ack", device="d1"))  # wildcard twin: too broad


def test_device_interaction_topics() -> None:
    """Issue 11: a device answers requests and announces presence only for its own twin and
    itself; it never writes desired state or requests."""
    a = acl("d1")
    assert a.may_publish(T.answers("t1")) and not a.may_publish(T.answers("t2"))
    assert a.may_publish(T.presence("d1")) and not a.may_publish(T.presence("d2"))
    assert not a.may_publish(T.filter("presence")) and not a.may_publish(T.filter("answers"))
    assert not a.may_publish(T.desired("t1")) and not a.may_publish(T.requests("t1"))
    assert not a.may_subscribe(T.answers("t1")) and not a.may_subscribe(T.presence("d1"))
    assert not a.may_publish(T.inbox("d1"))  # only the cloud fills inboxes


def test_requesters_and_cloud_for_interaction() -> None:
    r = acl("rec")
    assert r.may_publish(T.requests("t1")) and r.may_publish(T.desired("t2"))
    assert not r.may_publish(T.reported("t1")) and not r.may_publish(T.answers("t1"))
    assert not r.may_publish(T.presence("d1")) and not r.may_subscribe(T.inbox("d1"))
    assert r.may_subscribe(T.replies("rec", "r1")) and not r.may_subscribe(T.answers("t1"))
    o = acl("alice")
    assert o.may_publish(T.requests("t1")) and not o.may_publish(T.answers("t1"))
    c = acl("cloud")
    assert c.may_subscribe(T.answers("t1")) and c.may_subscribe(T.presence("d1"))
    assert c.may_publish(T.inbox("d1")) and c.may_publish(T.replies("bob", "r1"))
    for topic in (T.answers("t1"), T.presence("d1"), T.desired("t1"), T.requests("t1"),
                  T.reported("t1")):
        assert not c.may_publish(topic), topic


def test_owner_addresses_only_its_twins() -> None:
    a = acl("alice")
    assert a.may_publish(T.control("alice")) and not a.may_publish(T.control("bob"))
    assert a.may_publish(T.desired("t1")) and a.may_publish(T.requests("t0"))
    assert not a.may_publish(T.desired("t2")) and not a.may_publish(T.config_nodes())
    assert acl("bob").may_publish(T.config_nodes())  # operator flag
    assert a.may_subscribe(T.filter("stream", receiver="alice"))
    assert not a.may_subscribe(T.filter("stream", receiver="rec"))
    assert a.may_subscribe(T.replies("alice", "r1")) and not a.may_subscribe(T.replies("bob", "r1"))
    assert a.may_subscribe(T.reported("t1")) and not a.may_subscribe(T.reported("t2"))


def test_receiver_node_operator_cloud() -> None:
    r = acl("rec")
    assert r.may_subscribe(T.stream("t1", "rec")) and r.may_subscribe(T.results("rec", "j", "n0"))
    assert r.may_subscribe(T.filter("results", receiver="rec", job="j"))
    assert not r.may_subscribe(T.results("x", "j", "n0")) and not r.may_publish(T.twin_data("t1"))
    n = acl("n0")
    assert n.may_publish(T.mpc("j", "n0", "n1")) and not n.may_publish(T.mpc("j", "n1", "n0"))
    assert n.may_subscribe(T.mpc("j", "n1", "n0")) and not n.may_subscribe(T.mpc("j", "n0", "n1"))
    assert n.may_subscribe(T.filter("node_inputs", node="n0"))
    assert not n.may_subscribe(T.node_inputs("n1", "j"))
    # a node publishes (and may clear) only its own retained output share
    assert n.may_publish(T.results("rec", "j", "n0")) and not n.may_publish(T.results("rec", "j", "n1"))
    o = acl("op")
    assert o.may_publish(T.config_nodes()) and not o.may_publish(T.twin_data("t1"))
    c = acl("cloud")
    assert c.may_publish(T.ack("t1", "d1")) and c.may_subscribe(T.everything())
    assert not c.may_publish("other/prefix")


def test_cloud_cannot_publish_rosters_revocations_frames_or_results() -> None:
    """The cloud may read every topic but must not clear a retained roster or revocation,
    inject MPC frames, post results, or write into a twin as if it were a device."""
    c = acl("cloud")
    for topic in (T.config_nodes(), T.token_revoked("o1", "ab" * 16), T.mpc("j", "n0", "n1"),
                  T.results("rec", "j", "n0"), T.twin_data("t1"), T.control("o1"), T.job_submit()):
        assert not c.may_publish(topic), topic
    for topic in (T.ack("t1", "d1"), T.stream("t1", "rec"), T.replies("o1", "r1"),
                  T.job_status("j"), T.node_inputs("n0", "j"), T.inbox("d1")):
        assert c.may_publish(topic), topic


def test_client_id_rule() -> None:
    assert client_id_allowed("d1", "d1") and client_id_allowed("d1", "d1@outbox")
    assert not client_id_allowed("d1", "d10") and not client_id_allowed("d1", "cloud")


def test_mosquitto_rendering_mirrors_acl_for() -> None:
    text = render_acl(CLIENTS, T)
    blocks = {b.split("\n", 1)[0]: b for b in text.split("\nuser ")[1:]}
    assert set(blocks) == set(CLIENTS)
    assert "topic write ct/v1/twins/t1/data\n" in blocks["d1"]
    assert "topic read ct/v1/twins/t1/ack/d1\n" in blocks["d1"]
    assert "topic read ct/v1/#\n" in blocks["cloud"]
    assert "topic write ct/v1/twins/+/ack/+\n" in blocks["cloud"]
    assert "ct/v1/config/nodes" not in blocks["cloud"]
    assert "t2" not in blocks["d1"]
    for cid, block in blocks.items():
        a = acl(cid)
        n_lines = block.count("\ntopic ")
        assert n_lines == len(set(a.publish) | set(a.subscribe))
    assert render_passwd(CLIENTS).count(":$7$") == len(CLIENTS)
