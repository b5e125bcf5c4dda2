"""Access policies: parsing, canonical text, LSSS sharing and satisfying-set search.

A policy is a tree of threshold gates over attribute leaves.  ``a AND b`` is a 2-of-2 gate,
``a OR b`` a 1-of-2 gate, ``2 of (a, b, c)`` a 2-of-3 gate.  The leaves, read left to right,
are the rows of the linear secret-sharing scheme (ρ(j) = ``policy.rows[j]``):

* AND gates split their value additively and OR gates copy it (the Lewko–Waters conversion),
  so AND/OR formulas reconstruct with coefficients that are all 1;
* k-of-n gates (1 < k < n) use Shamir sharing; their reconstruction uses Lagrange
  coefficients at 0.

Grammar (keywords case-insensitive; AND binds tighter than OR)::

    expr      := and_expr ("OR" and_expr)*
    and_expr  := atom ("AND" atom)*
    atom      := "(" expr ")" | INT "of" "(" expr ("," expr)* ")" | attribute
    attribute := bare word (no space, parenthesis, comma or quote) | "quoted \\"string\\""
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ciphertwin.crypto.errors import PolicySyntaxError
from ciphertwin.crypto.pairing import ORDER
from ciphertwin.errors import ValidationError

__all__ = [
    "Gate",
    "Leaf",
    "Policy",
    "PolicySyntaxError",
    "validate_attribute",
    "validate_attributes",
    "MAX_ATTRIBUTE_BYTES",
    "MAX_ATTRIBUTES",
    "MAX_LEAVES",
]

MAX_ATTRIBUTE_BYTES = 128
MAX_ATTRIBUTES = 64
MAX_LEAVES = 256
MAX_DEPTH = 32
MAX_POLICY_CHARS = 8192
_KEYWORDS = {"and", "or", "of"}
_BARE = re.compile(r'[^\s(),"]+')


def validate_attribute(attribute: object) -> str:
    """Return ``attribute`` if it is a usable attribute string, else raise ValidationError."""
    if not isinstance(attribute, str):
        raise ValidationError(f"attribute must be a string, got {type(attribute).__name__}")
    if not attribute:
        raise ValidationError("attribute must not be empty")
    if len(attribute.encode("utf-8", "surrogatepass")) > MAX_ATTRIBUTE_BYTES:
        raise ValidationError(f"attribute longer than {MAX_ATTRIBUTE_BYTES} bytes")
    if not attribute.isprintable():
        raise ValidationError(f"attribute {attribute!r} contains non-printable characters")
    try:
        attribute.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"attribute {attribute!r} is not valid Unicode text") from None
    return attribute


def validate_attributes(attributes: Iterable[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated, validated attribute tuple (the canonical attribute set)."""
    if isinstance(attributes, (str, bytes)):
        raise ValidationError("attributes must be a collection of strings, not one string")
    result = tuple(sorted({validate_attribute(a) for a in attributes}))
    if not result:
        raise ValidationError("at least one attribute is required")
    if len(result) > MAX_ATTRIBUTES:
        raise ValidationError(f"more than {MAX_ATTRIBUTES} attributes")
    return result


@dataclass(frozen=True)
class Leaf:
    attribute: str


@dataclass(frozen=True)
class Gate:
    """A k-of-n threshold gate; AND is k = n, OR is k = 1."""

    threshold: int
    children: tuple[Leaf | Gate, ...]

    @property
    def kind(self) -> str:
        if self.threshold == len(self.children):
            return "AND"
        if self.threshold == 1:
            return "OR"
        return "OF"


Node = Leaf | Gate


# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # "(", ")", ",", "word", "quoted", "end"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),":
            tokens.append(_Token(c, c, i))
            i += 1
        elif c == '"':
            start, i, chars = i, i + 1, []
            while True:
                if i >= n:
                    raise PolicySyntaxError("unterminated quoted attribute", start, text)
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    chars.append(text[i + 1])
                    i += 2
                elif text[i] == '"':
                    i += 1
                    break
                else:
                    chars.append(text[i])
                    i += 1
            tokens.append(_Token("quoted", "".join(chars), start))
        else:
            m = _BARE.match(text, i)
            assert m is not None  # any other character starts a bare word
            tokens.append(_Token("word", m.group(), i))
            i = m.end()
    tokens.append(_Token("end", "", n))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.leaves = 0

    def error(self, message: str, token: _Token | None = None) -> PolicySyntaxError:
        token = token or self.peek()
        return PolicySyntaxError(message, token.pos, self.text)

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.i += 1
        return token

    def is_keyword(self, token: _Token, word: str) -> bool:
        return token.kind == "word" and token.text.lower() == word

    def expect(self, kind: str, what: str) -> _Token:
        if self.peek().kind != kind:
            found = self.peek().text or "end of text"
            raise self.error(f"expected {what}, found {found!r}")
        return self.take()

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("empty policy")
        node = self.expr(0)
        if self.peek().kind != "end":
            raise self.error(f"unexpected {self.peek().text!r}")
        return node

    def expr(self, depth: int) -> Node:
        return self.chain(depth, "or", self.and_expr)

    def and_expr(self, depth: int) -> Node:
        return self.chain(depth, "and", self.atom)

    def chain(self, depth: int, keyword: str, operand) -> Node:  # type: ignore[no-untyped-def]
        children = [operand(depth)]
        while self.is_keyword(self.peek(), keyword):
            self.take()
            children.append(operand(depth))
        if len(children) == 1:
            return children[0]
        return _gate(1 if keyword == "or" else len(children), children)

    def atom(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise self.error(f"policy nested deeper than {MAX_DEPTH} levels")
        token = self.peek()
        if token.kind == "(":
            self.take()
            node = self.expr(depth + 1)
            self.expect(")", "')'")
            return node
        if token.kind == "word" and token.text.isdigit() and self.is_keyword(self.peek(1), "of"):
            return self.threshold(depth)
        if token.kind == "quoted" or (token.kind == "word" and token.text.lower() not in _KEYWORDS):
            self.take()
            try:
                attribute = validate_attribute(token.text)
            except ValidationError as exc:
                raise self.error(str(exc), token) from None
            self.leaves += 1
            if self.leaves > MAX_LEAVES:
                raise self.error(f"policy has more than {MAX_LEAVES} leaves", token)
            return Leaf(attribute)
        found = token.text or "end of text"
        raise self.error(f"expected an attribute, '(' or 'k of (...)', found {found!r}", token)

    def threshold(self, depth: int) -> Node:
        k_token = self.take()
        self.take()  # "of"
        self.expect("(", "'(' after 'of'")
        children = [self.expr(depth + 1)]
        while self.peek().kind == ",":
            self.take()
            children.append(self.expr(depth + 1))
        self.expect(")", "',' or ')'")
        k = int(k_token.text)
        if not 1 <= k <= len(children):
            raise self.error(f"threshold {k} of {len(children)} is impossible", k_token)
        if len(children) == 1:
            return children[0]
        if k in (1, len(children)):
            return _gate(k, children)  # 1-of-n is OR, n-of-n is AND
        return Gate(k, tuple(children))


def _gate(k: int, children: list[Node]) -> Gate:
    """Flatten nested AND-in-AND and OR-in-OR so the canonical form is unique."""
    flat: list[Node] = []
    for child in children:
        same = isinstance(child, Gate) and child.kind == ("OR" if k == 1 else "AND")
        flat.extend(child.children if same else [child])  # type: ignore[union-attr]
    return Gate(1 if k == 1 else len(flat), tuple(flat))


# --- the policy object -------------------------------------------------------------------


def _quote(attribute: str) -> str:
    if _BARE.fullmatch(attribute) and attribute.lower() not in _KEYWORDS:
        return attribute
    return '"' + attribute.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(node: Node, parent: str | None = None) -> str:
    if isinstance(node, Leaf):
        return _quote(node.attribute)
    kind = node.kind
    if kind == "OF":
        return f"{node.threshold} of (" + ", ".join(_render(c) for c in node.children) + ")"
    text = f" {kind} ".join(_render(c, kind) for c in node.children)
    return f"({text})" if parent is not None else text


class Policy:
    """A parsed policy; ``rows[j]`` is the attribute ρ(j) of LSSS row j."""

    __slots__ = ("root", "rows")

    def __init__(self, root: Node) -> None:
        self.root = root
        rows: list[str] = []
        _collect_leaves(root, rows)
        self.rows: tuple[str, ...] = tuple(rows)

    @classmethod
    def parse(cls, text: str) -> Policy:
        if isinstance(text, Policy):
            return text
        if not isinstance(text, str):
            raise ValidationError(f"policy must be text, got {type(text).__name__}")
        if len(text) > MAX_POLICY_CHARS:
            raise PolicySyntaxError(f"policy longer than {MAX_POLICY_CHARS} characters", 0)
        return cls(_Parser(text).parse())

    def __str__(self) -> str:
        return _render(self.root)

    def __repr__(self) -> str:
        return f"Policy({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset(self.rows)

    def allows(self, attributes: Iterable[str]) -> bool:
        """Whether an item carrying ``attributes`` satisfies the policy."""
        return self.satisfying_rows(attributes) is not None

    def satisfying_rows(self, attributes: Iterable[str]) -> list[tuple[int, int]] | None:
        """A cheapest satisfying row set with reconstruction coefficients, or None.

        Returns ``[(j, ω_j), ...]`` with Σ ω_j λ_j = secret (mod r); the set minimises the
        number of rows (each row costs a pairing at re-encryption).
        """
        have = frozenset(attributes)
        found = _cheapest(self.root, have, iter(range(len(self.rows))))
        if found is None:
            return None
        return sorted(found.items())

    def share(self, secret: int) -> list[int]:
        """LSSS shares λ_j (mod r) of ``secret``, one per row, with fresh os.urandom randomness."""
        shares: list[int] = []
        _share(self.root, secret % ORDER, shares)
        return shares


def _collect_leaves(node: Node, out: list[str]) -> None:
    if isinstance(node, Leaf):
        out.append(node.attribute)
    else:
        for child in node.children:
            _collect_leaves(child, out)


def _random_mod_r() -> int:
    return int.from_bytes(os.urandom(64), "big") % ORDER


def _share(node: Node, value: int, out: list[int]) -> None:
    if isinstance(node, Leaf):
        out.append(value)
        return
    n, k = len(node.children), node.threshold
    if k == 1:  # OR: every child gets the value
        child_values = [value] * n
    elif k == n:  # AND: additive sharing
        child_values = [_random_mod_r() for _ in range(n - 1)]
        child_values.append((value - sum(child_values)) % ORDER)
    else:  # Shamir: f(0) = value, child i gets f(i)
        coeffs = [value] + [_random_mod_r() for _ in range(k - 1)]
        child_values = [_horner(coeffs, i) for i in range(1, n + 1)]
    for child, child_value in zip(node.children, child_values, strict=True):
        _share(child, child_value, out)


def _horner(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % ORDER
    return acc


def _lagrange_at_zero(indices: list[int]) -> list[int]:
    """Coefficients c_i with f(0) = Σ c_i f(i) for a polynomial of degree < len(indices)."""
    coefficients = []
    for i in indices:
        num, den = 1, 1
        for j in indices:
            if j != i:
                num = num * j % ORDER
                den = den * (j - i) % ORDER
        coefficients.append(num * pow(den, -1, ORDER) % ORDER)
    return coefficients


def _cheapest(node: Node, have: frozenset[str], counter) -> dict[int, int] | None:  # type: ignore[no-untyped-def]
    """Row -> coefficient map of a minimum-size satisfying set of ``node`` (None if unsatisfied).

    ``counter`` yields the global row numbers in leaf order; every leaf consumes one.
    """
    if isinstance(node, Leaf):
        row = next(counter)
        return {row: 1} if node.attribute in have else None
    options = [_cheapest(child, have, counter) for child in node.children]
    usable = sorted(
        ((len(o), i, o) for i, o in enumerate(options) if o is not None), key=lambda t: t[:2]
    )
    k = node.threshold
    if len(usable) < k:
        return None
    chosen = sorted(usable[:k], key=lambda t: t[1])
    if k == len(node.children) or k == 1:
        weights = [1] * k  # AND sums, OR copies: coefficients stay 0/1
    else:
        weights = _lagrange_at_zero([i + 1 for _, i, _ in chosen])
    result: dict[int, int] = {}
    for weight, (_, _, rows) in zip(weights, chosen, strict=True):
        for row, coeff in rows.items():
            result[row] = coeff * weight % ORDER
    return result
