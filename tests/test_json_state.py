"""JSON state documents: RFC 7386 merge patch (the RFC's own examples as the oracle), delta
from its definition, the algebra tying them together (hypothesis), and the limits."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.errors import ValidationError
from ciphertwin.protocol import json_state
from ciphertwin.protocol.json_state import (
    MAX_DEPTH,
    MAX_DOC_BYTES,
    MAX_KEY_CHARS,
    check_document,
    delta,
    document_bytes,
    merge_patch,
    same_value,
)

# RFC 7386 Appendix A, verbatim (ORIGINAL, PATCH, RESULT)
RFC_7386_APPENDIX_A = [
    ('{"a":"b"}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"b"}', '{"b":"c"}', '{"a":"b","b":"c"}'),
    ('{"a":"b"}', '{"a":null}', "{}"),
    ('{"a":"b","b":"c"}', '{"a":null}', '{"b":"c"}'),
    ('{"a":["b"]}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"c"}', '{"a":["b"]}', '{"a":["b"]}'),
    ('{"a":{"b":"c"}}', '{"a":{"b":"d","c":null}}', '{"a":{"b":"d"}}'),
    ('{"a":[{"b":"c"}]}', '{"a":[1]}', '{"a":[1]}'),
    ('["a","b"]', '["c","d"]', '["c","d"]'),
    ('{"a":"b"}', '["c"]', '["c"]'),
    ('{"a":"foo"}', "null", "null"),
    ('{"a":"foo"}', '"bar"', '"bar"'),
    ('{"e":null}', '{"a":1}', '{"e":null,"a":1}'),
    ('[1,2]', '{"a":"b","c":null}', '{"a":"b"}'),
    ("{}", '{"a":{"bb":{"ccc":null}}}', '{"a":{"bb":{}}}'),
]

# RFC 7386 section 3 (the worked example)
RFC_SECTION_3 = (
    {"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
     "tags": ["example", "sample"], "content": "This will be unchanged"},
    {"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": None},
     "tags": ["example"]},
    {"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
     "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"},
)


@pytest.mark.parametrize(("original", "patch", "result"), RFC_7386_APPENDIX_A)
def test_rfc7386_appendix_a(original: str, patch: str, result: str) -> None:
    o, p, r = json.loads(original), json.loads(patch), json.loads(result)
    assert json_state._merge(o, p) == r  # the RFC's MergePatch on any JSON values
    if isinstance(o, dict) and isinstance(p, dict):
        assert merge_patch(o, p) == r
        assert o == json.loads(original) and p == json.loads(patch)  # inputs untouched


def test_rfc7386_section_3() -> None:
    target, patch, result = RFC_SECTION_3
    assert merge_patch(target, patch) == result


def test_merge_patch_needs_objects() -> None:
    for bad in ([], "x", None, 1):
        with pytest.raises(ValidationError):
            merge_patch(bad, {})  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            merge_patch({}, bad)  # type: ignore[arg-type]


def test_merge_patch_result_shares_nothing_with_inputs() -> None:
    target, patch = {"a": {"b": [1, {"c": 2}]}}, {"x": {"y": [3]}}
    out = merge_patch(target, patch)
    out["a"]["b"][1]["c"] = 99
    out["x"]["y"].append(4)
    assert target == {"a": {"b": [1, {"c": 2}]}} and patch == {"x": {"y": [3]}}


# --- delta ------------------------------------------------------------------------------


@pytest.mark.parametrize(("desired", "reported", "expected"), [
    ({}, {"a": 1}, {}),                                   # reported extras are not pending
    ({"a": 1}, {"a": 1}, {}),
    ({"a": 1}, {"a": 1.0}, {}),                           # JSON numbers
    ({"a": 1}, {"a": True}, {"a": 1}),                    # a boolean is not a number
    ({"a": True}, {"a": 1}, {"a": True}),
    ({"a": 1}, {}, {"a": 1}),
    ({"a": None}, {"a": 1}, {"a": None}),                 # removal pending
    ({"a": None}, {}, {}),                                # already removed
    ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, {"a": {"c": 2}}),
    ({"a": {"b": None}}, {"a": {"b": 0}}, {"a": {"b": None}}),
    ({"a": {"b": None}}, {"a": 5}, {"a": {}}),            # must become an object
    ({"a": {"b": 1}}, {"a": [1]}, {"a": {"b": 1}}),
    ({"a": [1, 2]}, {"a": [1, 2]}, {}),
    ({"a": [1, 2]}, {"a": [2, 1]}, {"a": [1, 2]}),        # arrays are values
    ({"a": [{"b": None}]}, {"a": [{}]}, {"a": [{"b": None}]}),
])
def test_delta_examples(desired: dict, reported: dict, expected: dict) -> None:
    assert delta(desired, reported) == expected


def test_delta_needs_objects() -> None:
    with pytest.raises(ValidationError):
        delta([], {})  # type: ignore[arg-type]


# --- algebra ----------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])  # few keys: patches and targets collide often
SCALARS = (st.none() | st.booleans() | st.integers(-(2**53), 2**53)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=4)


def _flat_delta(desired: dict, reported: dict) -> dict:
    """delta straight from its definition, for documents without nested objects."""
    return {k: v for k, v in desired.items()
            if (v is None and k in reported)
            or (v is not None and (k not in reported or not same_value(v, reported[k])))}


@settings(max_examples=200, deadline=None)
@given(OBJECTS, OBJECTS)
def test_merge_patch_is_idempotent(target: dict, patch: dict) -> None:
    once = merge_patch(target, patch)
    assert same_value(merge_patch(once, patch), once)


@settings(max_examples=200, deadline=None)
@given(OBJECTS, OBJECTS)
def test_applying_desired_leaves_no_delta(desired: dict, reported: dict) -> None:
    assert delta(desired, merge_patch(reported, desired)) == {}


@settings(max_examples=200, deadline=None)
@given(OBJECTS, OBJECTS)
def test_delta_is_the_pending_patch(desired: dict, reported: dict) -> None:
    """Applying only the delta gets where applying all of desired gets; and the delta is
    empty exactly when applying desired would change nothing (= in sync)."""
    d = delta(desired, reported)
    assert same_value(merge_patch(reported, d), merge_patch(reported, desired))
    assert (d == {}) == same_value(merge_patch(reported, desired), reported)


@settings(max_examples=200, deadline=None)
@given(OBJECTS, OBJECTS)
def test_inputs_are_never_mutated(a: dict, b: dict) -> None:
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    merge_patch(a, b)
    delta(a, b)
    assert same_value(a, a0) and same_value(b, b0)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEYS, SCALARS | st.lists(SCALARS, max_size=3), max_size=4),
       st.dictionaries(KEYS, SCALARS | st.lists(SCALARS, max_size=3), max_size=4))
def test_flat_delta_matches_definition(desired: dict, reported: dict) -> None:
    assert delta(desired, reported) == _flat_delta(desired, reported)


@settings(max_examples=200, deadline=None)
@given(OBJECTS)
def test_empty_patch_and_self_delta(doc: dict) -> None:
    assert same_value(merge_patch(doc, {}), doc)
    assert delta(json_state._merge({}, doc), json_state._merge({}, doc)) == {}


# --- limits -----------------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        doc = {"n": doc}
    return doc


def test_limits_accept_the_edge() -> None:
    assert check_document(_nested(MAX_DEPTH)) == _nested(MAX_DEPTH)
    check_document({"k" * MAX_KEY_CHARS: [2**53, -(2**53), 1.5, None, True, "ü"]})
    base = {"s": ""}
    room = MAX_DOC_BYTES - len(document_bytes(base))
    exact = {"s": "x" * room}
    assert len(document_bytes(exact)) == MAX_DOC_BYTES
    check_document(exact)


@pytest.mark.parametrize("bad", [
    _nested(MAX_DEPTH + 1),
    {"a": [[[[[[[[1]]]]]]]]},                    # lists count as depth too
    {"s": "x" * MAX_DOC_BYTES},                  # too large
    {"ü" * (MAX_DOC_BYTES // 2): 1},             # too large in UTF-8 bytes (and key)
    {"k" * (MAX_KEY_CHARS + 1): 1},
    {"": 1},
    {1: "int key"},
    {"a": float("nan")},
    {"a": float("inf")},
    {"a": 2**53 + 1},
    {"a": -(2**53) - 1},
    {"a": (1, 2)},                               # tuple: not a JSON type here
    {"a": b"bytes"},
    {"a": {1, 2}},
    [],
    "doc",
    None,
])
def test_limits_refuse(bad: Any) -> None:
    with pytest.raises(ValidationError):
        check_document(bad)


def test_cyclic_document_is_refused_without_recursion_error() -> None:
    doc: dict[str, Any] = {}
    doc["self"] = doc
    with pytest.raises(ValidationError):
        check_document(doc)


def test_huge_width_is_refused_by_size() -> None:
    with pytest.raises(ValidationError, match="bytes of JSON"):
        check_document({f"k{i}": i for i in range(5000)})
