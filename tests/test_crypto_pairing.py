"""Pairing layer: every point read from bytes is validated (curve, subgroup, identity, encoding).

The non-subgroup points are crafted here with plain Python field arithmetic, independently of
mcl, so the tests show that a *real* on-curve point outside the order-r subgroup is refused.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.crypto import pairing as pg
from ciphertwin.errors import ValidationError

P = 0x1A0111EA397FE69A4B1BA7B6434BACD764774B84F38512BF6730D2A0F6B0F6241EABFFFEB153FFFFB9FEFFFFFFFFAAAB
R = pg.ORDER
U = -0xD201000000010000
H1 = (U - 1) ** 2 // 3  # G1 cofactor


# --- tiny independent curve arithmetic (affine, over Fp and Fp2 = Fp[i]/(i^2+1)) ----------


def f2_mul(a, b):
    return ((a[0] * b[0] - a[1] * b[1]) % P, (a[0] * b[1] + a[1] * b[0]) % P)


def f2_add(a, b):
    return ((a[0] + b[0]) % P, (a[1] + b[1]) % P)


def f2_sub(a, b):
    return ((a[0] - b[0]) % P, (a[1] - b[1]) % P)


def f2_inv(a):
    norm_inv = pow(a[0] * a[0] + a[1] * a[1], P - 2, P)
    return (a[0] * norm_inv % P, -a[1] * norm_inv % P)


def f2_pow(a, e):
    acc, base = (1, 0), a
    while e:
        if e & 1:
            acc = f2_mul(acc, base)
        base = f2_mul(base, base)
        e >>= 1
    return acc


def f2_sqrt(a):
    """Square root in Fp2 for p = 3 mod 4 (Adj–Rodríguez-Henríquez, Alg. 9), or None."""
    a1 = f2_pow(a, (P - 3) // 4)
    alpha = f2_mul(f2_mul(a1, a1), a)
    x0 = f2_mul(a1, a)
    if alpha == (P - 1, 0):
        y = f2_mul((0, 1), x0)
    else:
        y = f2_mul(f2_pow(f2_add((1, 0), alpha), (P - 1) // 2), x0)
    return y if f2_mul(y, y) == a else None


def ec_mul(point, k, ops):
    """Double-and-add on y^2 = x^3 + b (affine); ``None`` is the point at infinity."""
    mul, add, sub, inv, const = ops

    def ec_add(p1, p2):
        if p1 is None:
            return p2
        if p2 is None:
            return p1
        (x1, y1), (x2, y2) = p1, p2
        if x1 == x2:
            if add(y1, y2) == const(0):
                return None
            lam = mul(mul(const(3), mul(x1, x1)), inv(add(y1, y1)))
        else:
            lam = mul(sub(y2, y1), inv(sub(x2, x1)))
        x3 = sub(sub(mul(lam, lam), x1), x2)
        return (x3, sub(mul(lam, sub(x1, x3)), y1))

    acc = None
    for bit in bin(k)[2:]:
        acc = ec_add(acc, acc)
        if bit == "1":
            acc = ec_add(acc, point)
    return acc


FP_OPS = (
    lambda a, b: a * b % P,
    lambda a, b: (a + b) % P,
    lambda a, b: (a - b) % P,
    lambda a: pow(a, P - 2, P),
    lambda c: c % P,
)
FP2_OPS = (f2_mul, f2_add, f2_sub, f2_inv, lambda c: (c % P, 0))


def encode_g1(x: int, y: int) -> bytes:
    """mcl's compressed G1 encoding: x little-endian, top bit = parity of y."""
    out = bytearray(x.to_bytes(48, "little"))
    if y & 1:
        out[-1] |= 0x80
    return bytes(out)


def encode_g2(x, y_flag: bool) -> bytes:
    out = bytearray(x[0].to_bytes(48, "little") + x[1].to_bytes(48, "little"))
    if y_flag:
        out[-1] |= 0x80
    return bytes(out)


def crafted_g1():
    """An on-curve G1 point outside the r-subgroup (y^2 = x^3 + 4)."""
    x = 1
    while True:
        rhs = (x**3 + 4) % P
        y = pow(rhs, (P + 1) // 4, P)
        if y * y % P == rhs and ec_mul((x, y), R, FP_OPS) is not None:
            return x, y
        x += 1


def crafted_g2():
    """An on-curve point of the twist y^2 = x^3 + 4(1+i) outside the r-subgroup."""
    b = (4, 4)
    x = (1, 1)
    while True:
        y = f2_sqrt(f2_add(f2_mul(f2_mul(x, x), x), b))
        if y is not None and ec_mul((x, y), R, FP2_OPS) is not None:
            return x, y
        x = (x[0] + 1, x[1])


# --- tests -------------------------------------------------------------------------------


def test_g1_encoding_model_matches_mcl() -> None:
    point = pg.g1 * pg.scalar(123456789)
    _, x, y = str(point).split()
    assert encode_g1(int(x), int(y)) == pg.g1_to_bytes(point)


def test_g1_point_outside_subgroup_is_rejected_but_its_cofactor_multiple_is_accepted() -> None:
    x, y = crafted_g1()
    assert (y * y - x**3 - 4) % P == 0  # really on the curve
    for flip in (False, True):
        yy = P - y if flip else y
        with pytest.raises(ValidationError, match="subgroup"):
            pg.g1_from_bytes(encode_g1(x, yy))
    cleared = ec_mul((x, y), H1, FP_OPS)  # h1·Q lies in the subgroup
    assert pg.g1_from_bytes(encode_g1(*cleared)) is not None


def test_g2_encoding_model_matches_mcl() -> None:
    point = pg.g2 * pg.scalar(987654321)
    _, xa, xb, _, _ = str(point).split()
    assert pg.g2_to_bytes(point) in {encode_g2((int(xa), int(xb)), f) for f in (False, True)}


def test_g2_point_outside_subgroup_is_rejected() -> None:
    x, y = crafted_g2()
    assert f2_mul(y, y) == f2_add(f2_mul(f2_mul(x, x), x), (4, 4))
    for flag in (False, True):
        with pytest.raises(ValidationError, match="subgroup"):
            pg.g2_from_bytes(encode_g2(x, flag))


def test_gt_element_outside_subgroup_is_rejected() -> None:
    z = pg.Z ** pg.random_scalar()
    assert pg.gt_from_bytes(pg.gt_to_bytes(z)) == z
    coeffs = [int.from_bytes(os.urandom(48), "big") % P for _ in range(12)]
    junk = pg.GT(" ".join(map(str, coeffs)), 10)
    with pytest.raises(ValidationError, match="order-r subgroup"):
        pg.gt_from_bytes(pg.gt_to_bytes(junk))


def test_gt_cyclotomic_element_outside_gt_is_rejected() -> None:
    """f^((p^6-1)(p^2+1)) is in the cyclotomic subgroup (order r·h_T) but, w.h.p., not in GT."""
    coeffs = [int.from_bytes(os.urandom(48), "big") % P for _ in range(12)]
    f = pg.GT(" ".join(map(str, coeffs)), 10)
    acc, base, e = pg.GT(), f, (P**6 - 1) * (P**2 + 1)
    while e:  # generic square-and-multiply (GT.__pow__ assumes membership)
        if e & 1:
            acc = acc * base
        base = base * base
        e >>= 1
    tampered = pg.Z ** pg.random_scalar() * acc
    with pytest.raises(ValidationError, match="order-r subgroup"):
        pg.gt_from_bytes(pg.gt_to_bytes(tampered))


@pytest.mark.parametrize(
    "parse, size", [(pg.g1_from_bytes, 48), (pg.g2_from_bytes, 96), (pg.gt_from_bytes, 576)]
)
def test_identity_wrong_length_and_wrong_type_are_rejected(parse, size) -> None:
    identity = {48: pg.G1(), 96: pg.G2(), 576: pg.GT()}[size].serialize()
    with pytest.raises(ValidationError):
        parse(identity)
    with pytest.raises(ValidationError, match="bytes"):
        parse(bytes(size - 1))
    with pytest.raises(ValidationError, match="bytes"):
        parse("not bytes")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=48, max_size=48))
def test_random_g1_bytes_never_crash(data: bytes) -> None:
    try:
        point = pg.g1_from_bytes(data)
    except ValidationError:
        return
    assert pg.g1_to_bytes(point) == data


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=96, max_size=96))
def test_random_g2_bytes_never_crash(data: bytes) -> None:
    try:
        point = pg.g2_from_bytes(data)
    except ValidationError:
        return
    assert pg.g2_to_bytes(point) == data


def test_non_canonical_x_is_rejected() -> None:
    k = 1
    while True:  # find a subgroup point whose x + p still fits the 381-bit field
        _, x, y = str(pg.g1 * pg.scalar(k)).split()
        if int(x) + P < 2**381:
            break
        k += 1
    assert pg.g1_from_bytes(encode_g1(int(x), int(y)))
    with pytest.raises(ValidationError):
        pg.g1_from_bytes(encode_g1(int(x) + P, int(y)))


def test_scalars_round_trip_and_reject_out_of_range() -> None:
    s = pg.random_scalar()
    assert pg.scalar_from_bytes(pg.scalar_to_bytes(s)) == s
    for bad in (bytes(32), R.to_bytes(32, "big"), (2**256 - 1).to_bytes(32, "big")):
        with pytest.raises(ValidationError, match="out of range"):
            pg.scalar_from_bytes(bad)


def test_attribute_hash_is_domain_separated_cached_and_in_g2() -> None:
    h = pg.hash_to_g2("type:location")
    assert h is pg.hash_to_g2("type:location")  # cached
    assert h != pg.G2.hash(b"type:location")  # domain tag applied
    assert h != pg.hash_to_g2("type:locatio")
    assert pg.g2_from_bytes(pg.g2_to_bytes(h)) == h  # in the subgroup


def test_bilinearity_sanity() -> None:
    a, b = pg.random_scalar(), pg.random_scalar()
    assert pg.pair(pg.g1 * a, pg.g2 * b) == pg.Z ** (a * b)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pair_product_equals_product_of_pairings(k) -> None:
    pairs = [(pg.g1 * pg.random_scalar(), pg.g2 * pg.random_scalar()) for _ in range(k)]
    expected = pg.GT()
    for p, q in pairs:
        expected = expected * pg.pair(p, q)
    assert pg.pair_product(pairs) == expected
    assert pg._product_of_pairings(pairs) == expected
    assert pg.pair_product([]).is_one()
    assert pg.pair_product([(pg.G1(), pg.g2), *pairs]) == expected  # identity contributes 1


def test_multi_pairing_is_active_here_and_fallback_still_works() -> None:
    import subprocess
    import sys

    assert pg.MULTI_PAIRING, "mcl Miller-loop vector self-test failed on this machine"
    code = (
        "from ciphertwin.crypto import pairing, PreKeyPair, encrypt, rekey, reencrypt, "
        "decrypt_receiver, PrePublicKey\n"
        "assert not pairing.MULTI_PAIRING\n"
        "a, b = PreKeyPair.generate(), PreKeyPair.generate()\n"
        "ct = encrypt(a.public, {'x', 'y'}, b'm')\n"
        "assert decrypt_receiver(b, reencrypt(rekey(a, '2 of (x, y, z)', b.public), ct)) == b'm'\n"
        "assert PrePublicKey.from_bytes(a.public.to_bytes()) == a.public\n"
    )
    env = {**__import__("os").environ, "CIPHERTWIN_NO_MULTIPAIRING": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_native_exponentiation_is_in_use_here() -> None:
    """On this machine's pymcl the GT-membership test runs mcl's generic exponentiation
    (checked against the Python reference at import); if this fails, the check still holds
    but decapsulation is 0.3 ms slower."""
    assert pg._pow_abs_u is pg._pow_abs_u_native


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, P - 1), min_size=12, max_size=12))
def test_native_pow_by_u_equals_plain_square_and_multiply_on_any_fp12(coeffs: list[int]) -> None:
    """x^|u| computed from its definition (exponent bits, generic products), independent of
    mcl's exponentiation, for arbitrary Fp12 values — almost none of which are in GT."""
    x = pg.GT(" ".join(map(str, coeffs)), 10)
    expected, base, e = pg.GT(), x, pg._BLS_U_ABS
    while e:
        if e & 1:
            expected = expected * base
        base = base * base
        e >>= 1
    assert pg._pow_abs_u_native(x) == expected
