"""Share mode, roster / status / result signing: the pieces the processing flow relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ciphertwin.agents.share_mode import share_items
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.shares import decode_fixed
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.protocol.jobs import (
    build_result, build_roster, build_status, parse_roster, verify_result, verify_status,
)


def test_share_items_recombine_and_are_labelled() -> None:
    reading = {"type": "location", "time": 1_790_000_000.0,
               "values": {"epoch": 613, "x": -12.5625, "y": 3.0}}
    out = share_items(reading, {"twin:t1"}, frac_bits={"x": 4, "y": 4})
    assert [r["share"] for r, _ in out] == [0, 1, 2]
    for i, (r, attrs) in enumerate(out):
        assert f"share:{i}" in attrs and "type:location" in attrs and "twin:t1" in attrs
        assert not {f"share:{j}" for j in range(3) if j != i} & set(attrs)
        assert any(a.startswith("day:") for a in attrs) and any(a.startswith("hour:") for a in attrs)
    total = {f: sum(r["values"][f] for r, _ in out) % 2**64 for f in ("epoch", "x", "y")}
    assert decode_fixed(total["x"], 4) == -12.5625 and decode_fixed(total["epoch"], 0) == 613
    again = share_items(reading, {"twin:t1"}, frac_bits={"x": 4, "y": 4})
    assert again[0][0]["values"] != out[0][0]["values"]  # fresh randomness every time


@pytest.mark.parametrize("bad", [{"values": {}}, {"values": {"X": 1}}, {"values": {"x": "1"}},
                                 {"values": {"x": float("nan")}}, {"type": "Bad Type"}])
def test_share_items_rejects_garbage(bad: dict) -> None:
    reading = {"type": "location", "time": 1.0, "values": {"x": 1}} | bad
    with pytest.raises(ValidationError):
        share_items(reading, set())


def test_share_mode_needs_no_numpy() -> None:
    code = "import sys, ciphertwin.agents.share_mode; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _roster(op: SigningKey, version: int = 1):
    ids = [NodeIdentity.generate(i, f"n{i}") for i in range(3)]
    pres = [PreKeyPair.generate().public for _ in range(3)]
    return ids, build_roster(op, [i.entry() for i in ids], pres, version)


def test_roster_is_pinned_to_the_operator() -> None:
    op = SigningKey.generate()
    ids, payload = _roster(op)
    roster = parse_roster(payload, op.verify_key)
    assert roster.node_ids == ("n0", "n1", "n2") and roster.index_of("n2") == 2
    with pytest.raises(ValidationError):
        parse_roster(payload, SigningKey.generate().verify_key)
    env = decode(payload, "node_roster")
    swapped = dict(env.body, entries=list(reversed(env["entries"])))
    with pytest.raises(ValidationError):
        parse_roster(encode("node_roster", swapped), op.verify_key)


def test_results_and_status_must_be_signed_by_the_roster_node() -> None:
    op = SigningKey.generate()
    ids, payload = _roster(op)
    roster = parse_roster(payload, op.verify_key)
    good = decode(build_result("j1", "sum", 1, "n1", ["t1"], b"x" * 40, ids[1].signing), "job_result")
    verify_result(good, roster)
    for forged in (build_result("j1", "sum", 1, "n1", ["t1"], b"x" * 40, ids[0].signing),
                   build_result("j1", "sum", 0, "n1", ["t1"], b"x" * 40, ids[1].signing)):
        with pytest.raises(ValidationError):
            verify_result(decode(forged, "job_result"), roster)
    tampered = dict(good.body, blob=b"y" * 40)
    with pytest.raises(ValidationError):
        verify_result(decode(encode("job_result", tampered), "job_result"), roster)
    st = decode(build_status("j1", "failed", "n2", reason="x", signer=ids[2].signing), "job_status")
    verify_status(st, ids[2].signing.verify_key)
    with pytest.raises(ValidationError):
        verify_status(st, ids[0].signing.verify_key)
    with pytest.raises(ValidationError):
        build_status("j1", "exploded", "n2")
