"""Policy parser, canonical text, LSSS sharing and satisfying-set search."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.crypto.pairing import ORDER
from ciphertwin.crypto.policy import Gate, Leaf, Policy, PolicySyntaxError
from ciphertwin.errors import ValidationError

UNIVERSE = ["a", "b", "c", "d", "type:location", "day:2026-11-22", "x y", "and", 'q"t']


def render_attr(a: str) -> str:
    if a in ("x y", "and", 'q"t'):
        return '"' + a.replace('"', '\\"') + '"'
    return a


# A tree is ("leaf", attr) or ("gate", k, [children]); rendered with explicit parentheses,
# random keyword case, and evaluated independently of the library.
leaf_trees = st.sampled_from(UNIVERSE).map(lambda a: ("leaf", a))


def _gate(children_strategy):
    return children_strategy.flatmap(
        lambda kids: st.integers(1, len(kids)).map(lambda k: ("gate", k, kids))
    )


trees = st.recursive(
    leaf_trees, lambda inner: _gate(st.lists(inner, min_size=2, max_size=4)), max_leaves=10
)


def render(tree, case: str = "upper") -> str:
    if tree[0] == "leaf":
        return render_attr(tree[1])
    _, k, kids = tree
    and_kw, or_kw, of_kw = ("AND", "OR", "of") if case == "upper" else ("and", "Or", "OF")
    parts = [render(c, case) for c in kids]
    if k == len(kids):
        return "(" + f" {and_kw} ".join(parts) + ")"
    if k == 1:
        return "(" + f" {or_kw} ".join(parts) + ")"
    return f"{k} {of_kw} (" + ", ".join(parts) + ")"


def evaluate(tree, attrs: frozenset[str]) -> bool:
    if tree[0] == "leaf":
        return tree[1] in attrs
    _, k, kids = tree
    return sum(evaluate(c, attrs) for c in kids) >= k


attr_sets = st.frozensets(st.sampled_from(UNIVERSE))


@settings(max_examples=200, deadline=None)
@given(trees, attr_sets, st.sampled_from(["upper", "lower"]))
def test_allows_matches_independent_evaluation(tree, attrs, case) -> None:
    policy = Policy.parse(render(tree, case))
    assert policy.allows(attrs) == evaluate(tree, attrs)


@settings(max_examples=200, deadline=None)
@given(trees)
def test_canonical_text_round_trips(tree) -> None:
    policy = Policy.parse(render(tree))
    text = str(policy)
    again = Policy.parse(text)
    assert again == policy
    assert str(again) == text
    assert again.rows == policy.rows


@settings(max_examples=200, deadline=None)
@given(trees, attr_sets, st.integers(0, ORDER - 1))
def test_lsss_reconstructs_exactly_for_satisfying_sets(tree, attrs, secret) -> None:
    policy = Policy.parse(render(tree))
    shares = policy.share(secret)
    assert len(shares) == len(policy.rows)
    rows = policy.satisfying_rows(attrs)
    if not evaluate(tree, attrs):
        assert rows is None
        return
    assert rows is not None
    assert all(policy.rows[j] in attrs for j, _ in rows)
    assert sum(w * shares[j] for j, w in rows) % ORDER == secret


@settings(max_examples=100, deadline=None)
@given(trees, attr_sets)
def test_and_or_policies_have_unit_coefficients(tree, attrs) -> None:
    def and_or_only(t):
        return t[0] == "leaf" or (t[1] in (1, len(t[2])) and all(and_or_only(c) for c in t[2]))

    rows = Policy.parse(render(tree)).satisfying_rows(attrs)
    if rows and and_or_only(tree):
        assert {w for _, w in rows} == {1}


def test_shares_are_fresh_each_time() -> None:
    policy = Policy.parse("a AND b")
    assert policy.share(5) != policy.share(5)


def test_satisfying_set_is_minimal() -> None:
    policy = Policy.parse("(a AND b AND c) OR d OR 2 of (e, f, g)")
    assert policy.satisfying_rows({"a", "b", "c", "d"}) == [(3, 1)]
    rows = policy.satisfying_rows({"a", "b", "c", "e", "g"})
    assert [j for j, _ in rows] == [4, 6]


def test_precedence_and_canonical_form() -> None:
    policy = Policy.parse("a and b or c AND (d or e)")
    assert str(policy) == "(a AND b) OR (c AND (d OR e))"
    assert Policy.parse("1 of (a, b)") == Policy.parse("a OR b")
    assert Policy.parse("2 of (a, b)") == Policy.parse("a AND b")
    assert Policy.parse("(a AND (b AND c))") == Policy.parse("a AND b AND c")
    assert str(Policy.parse('"share 1" AND "or"')) == '"share 1" AND "or"'
    assert Policy.parse("(a)").root == Leaf("a")
    assert isinstance(Policy.parse("2 of (a, b, c)").root, Gate)


def test_design_example_time_window() -> None:
    policy = Policy.parse(
        "type:location AND share:1 AND (day:2026-11-21 OR day:2026-11-22)"
    )
    assert policy.allows({"type:location", "share:1", "day:2026-11-22", "device:x"})
    assert not policy.allows({"type:location", "share:1", "day:2026-11-23"})
    assert not policy.allows({"type:location", "share:2", "day:2026-11-22"})


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("", 0, "empty"),
        ("a AND", 5, "expected an attribute"),
        ("AND a", 0, "expected an attribute"),
        ("a b", 2, "unexpected"),
        ("(a OR b", 7, "expected ')'"),
        ("a OR b)", 6, "unexpected"),
        ("3 of (a, b)", 0, "impossible"),
        ("0 of (a, b)", 0, "impossible"),
        ("2 of a, b", 5, "'(' after 'of'"),
        ('a AND "b', 6, "unterminated"),
        ("a AND ()", 7, "expected an attribute"),
        ("2 of (a, b,)", 11, "expected an attribute"),
    ],
)
def test_syntax_errors_point_at_the_offending_position(text, position, fragment) -> None:
    with pytest.raises(PolicySyntaxError) as info:
        Policy.parse(text)
    assert info.value.position == position
    assert fragment in str(info.value)
    assert isinstance(info.value, ValidationError)


def test_limits() -> None:
    with pytest.raises(PolicySyntaxError, match="leaves"):
        Policy.parse(" OR ".join(f"a{i}" for i in range(300)))
    with pytest.raises(PolicySyntaxError, match="deeper"):
        Policy.parse("(" * 40 + "a" + ")" * 40)
    with pytest.raises(PolicySyntaxError, match="longer"):
        Policy.parse("a" * 10_000)
    with pytest.raises(PolicySyntaxError, match="longer than 128"):
        Policy.parse("x" * 200)
    with pytest.raises(ValidationError):
        Policy.parse(42)  # type: ignore[arg-type]
    with pytest.raises(PolicySyntaxError, match="non-printable"):
        Policy.parse('"a\x00b"')


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab ()",ANDORof2\\x', max_size=30))
def test_garbage_text_only_raises_syntax_errors(text) -> None:
    try:
        policy = Policy.parse(text)
    except PolicySyntaxError as exc:
        assert 0 <= exc.position <= len(text)
        return
    assert Policy.parse(str(policy)) == policy
