"""Topic helpers: every table row builds, parses back, and ids are validated."""

from __future__ import annotations

import pytest

from ciphertwin.bus.topics import TEMPLATES, Topics, validate_id
from ciphertwin.errors import ValidationError

T = Topics()


@pytest.mark.parametrize(
    ("topic", "kind", "fields"),
    [
        (T.twin_data("t1"), "twin_data", {"twin": "t1"}),
        (T.ack("t1", "d-1"), "ack", {"twin": "t1", "device": "d-1"}),
        (T.stream("t1", "bob"), "stream", {"twin": "t1", "receiver": "bob"}),
        (T.desired("t1"), "desired", {"twin": "t1"}),
        (T.reported("t1"), "reported", {"twin": "t1"}),
        (T.requests("t1"), "requests", {"twin": "t1"}),
        (T.inbox("d1"), "inbox", {"device": "d1"}),
        (T.answers("t1"), "answers", {"twin": "t1"}),
        (T.presence("d1"), "presence", {"device": "d1"}),
        (T.control("alice"), "control", {"owner": "alice"}),
        (T.job_submit(), "job_submit", {}),
        (T.job_status("j:1"), "job_status", {"job": "j:1"}),
        (T.node_inputs("n0", "j1"), "node_inputs", {"node": "n0", "job": "j1"}),
        (T.mpc("j1", "n0", "n1"), "mpc", {"job": "j1", "frm": "n0", "to": "n1"}),
        (T.results("bob", "j1", "n0"), "results", {"receiver": "bob", "job": "j1", "node": "n0"}),
        (T.config_nodes(), "config_nodes", {}),
        (T.query("alice"), "query", {"principal": "alice"}),
        (T.replies("alice", "r.7"), "replies", {"principal": "alice", "request_id": "r.7"}),
    ],
)
def test_build_and_parse_round_trip(topic: str, kind: str, fields: dict[str, str]) -> None:
    assert topic.startswith("ct/v1/")
    parsed = T.parse(topic)
    assert parsed.kind == kind
    assert parsed.fields == fields


def test_every_template_has_a_helper_that_parses_back() -> None:
    for kind, template in TEMPLATES.items():
        names = [lvl[1:-1] for lvl in template.split("/") if lvl.startswith("{")]
        topic = T.build(kind, **{n: f"x{i}" for i, n in enumerate(names)})
        assert T.parse(topic).kind == kind


def test_design_table_strings() -> None:
    assert T.ack("tw", "dv") == "ct/v1/twins/tw/ack/dv"
    assert T.mpc("j", "0", "2") == "ct/v1/mpc/j/0/2"
    assert Topics("site-a/ct").results("r", "j", "n") == "site-a/ct/receivers/r/results/j/n"


def test_filters_use_plus_for_missing_fields() -> None:
    assert T.filter("stream", receiver="bob") == "ct/v1/twins/+/stream/bob"
    assert T.filter("mpc", to="n1") == "ct/v1/mpc/+/+/n1"
    assert T.everything() == "ct/v1/#"


@pytest.mark.parametrize(
    "bad", ["", "a/b", "+", "#", "a+", "$SYS", "x" * 65, "ü", "a b", None, 5]
)
def test_invalid_ids_rejected(bad: object) -> None:
    with pytest.raises(ValidationError):
        validate_id(bad)
    with pytest.raises(ValidationError):
        T.twin_data(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "ct/v2/twins/t/data",  # other prefix
        "ct/v1/twins/t/data/extra",
        "ct/v1/twins/t",
        "ct/v1/twins/+/data",  # wildcard is not a concrete topic
        "ct/v1/unknown/x",
        "ct/v1/twins//data",
        "",
    ],
)
def test_parse_rejects_unknown_or_malformed(topic: str) -> None:
    with pytest.raises(ValidationError):
        T.parse(topic)


def test_build_rejects_missing_unknown_fields_and_kinds() -> None:
    with pytest.raises(ValidationError, match="needs field"):
        T.build("ack", twin="t")
    with pytest.raises(ValidationError, match="no field"):
        T.build("ack", twin="t", device="d", extra="x")
    with pytest.raises(ValidationError, match="unknown topic kind"):
        T.build("nope")


@pytest.mark.parametrize("prefix", ["", "/ct", "ct/", "ct/+", "ct/#", "a//b"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValidationError):
        Topics(prefix)
