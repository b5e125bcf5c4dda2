"""Share mode, roster / status / result signing: the pieces the processing flow relies on."""

from __future__ import annotations

import math
from pathlib import Path
import re
import subprocess
import sys

import pytest

from ciphertwin.agents.geo import GeoFrame
from ciphertwin.agents.share_mode import SHARE_MODE_FILE, load_share_mode, share_items
from ciphertwin.bus.envelope import decode, encode
from ciphertwin.crypto.kpcpre import PreKeyPair
from ciphertwin.crypto.shares import decode_fixed
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.protocol.job_epochs import FieldEncoding
from ciphertwin.protocol.jobs import (
    build_result, build_roster, build_status, pack_params, parse_roster, verify_result,
    verify_status,
)


XY = FieldEncoding("m", 4, -50_000.0, 50_000.0)
ENC = {"x": XY, "y": XY, "epoch": FieldEncoding("min", 0, 0.0, 1e9)}


def test_share_items_recombine_and_are_labelled() -> None:
    reading = {"type": "location", "time": 1_790_000_000.0,
               "values": {"epoch": 613, "x": -12.5625, "y": 3.0}}
    out = share_items(reading, {"twin:t1"}, encodings=ENC)
    assert [r["share"] for r, _ in out] == [0, 1, 2]
    for i, (r, attrs) in enumerate(out):
        assert set(r) == {"type", "time", "share", "enc", "values"}  # no "frac" any more
        assert r["enc"] == {f: ENC[f].as_dict() for f in ("epoch", "x", "y")}
        assert f"share:{i}" in attrs and "type:location" in attrs and "twin:t1" in attrs
        assert not {f"share:{j}" for j in range(3) if j != i} & set(attrs)
        assert any(a.startswith("day:") for a in attrs) and any(a.startswith("hour:") for a in attrs)
    total = {f: sum(r["values"][f] for r, _ in out) % 2**64 for f in ("epoch", "x", "y")}
    assert decode_fixed(total["x"], 4) == -12.5625 and decode_fixed(total["epoch"], 0) == 613
    assert FieldEncoding.from_dict(out[0][0]["enc"]["x"]) == XY  # what a node compares
    again = share_items(reading, {"twin:t1"}, encodings=ENC)
    assert again[0][0]["values"] != out[0][0]["values"]  # fresh randomness every time


@pytest.mark.parametrize("bad", [{"values": {}}, {"values": {"X": 1}}, {"values": {"x": "1"}},
                                 {"values": {"x": float("nan")}}, {"type": "Bad Type"},
                                 {"time": float("inf")}])
def test_share_items_rejects_garbage(bad: dict) -> None:
    reading = {"type": "location", "time": 1.0, "values": {"x": 1}} | bad
    with pytest.raises(ValidationError):
        share_items(reading, set(), encodings=ENC)


def test_share_items_refuses_out_of_range_and_undeclared_fields_without_the_value() -> None:
    reading = {"type": "location", "time": 1.0, "values": {"x": 50_000.5, "y": 0.0}}
    with pytest.raises(ValidationError, match=r"'x' is outside its declared range \[-50000, 50000\] m") as e:
        share_items(reading, set(), encodings=ENC)
    assert "50000.5" not in str(e.value)  # reasons are logged: never the plaintext value
    share_items(reading | {"values": {"x": 50_000.0, "y": -50_000.0}}, set(), encodings=ENC)
    with pytest.raises(ValidationError, match="'speed' has no declared encoding"):
        share_items(reading | {"values": {"x": 1.0, "speed": 2.0}}, set(), encodings=ENC)
    with pytest.raises(TypeError):
        share_items(reading, set())  # type: ignore[call-arg]  # encodings are mandatory
    with pytest.raises(ValidationError):
        share_items(reading, set(), encodings={"x": XY.as_dict()})  # type: ignore[dict-item]


def test_share_mode_file_with_geo_projects_on_the_device(tmp_path) -> None:
    cfg = tmp_path / SHARE_MODE_FILE
    cfg.write_text('''
[geo]
origin = [48.2082, 16.3738]

[fields.x]
unit = "m@aeqd:48.2082,16.3738"
frac = 4
min = -50000
max = 50000

[fields.y]
unit = "m@aeqd:48.2082,16.3738"
frac = 4
min = -50000.0
max = 50000.0
''')
    mode = load_share_mode(cfg)
    assert mode.geo.unit == "m@aeqd:48.2082,16.3738"
    out = mode({"type": "location", "time": 1.0, "values": {"lat": 48.2082, "lon": 16.3838}},
               {"twin:t1"})
    x = decode_fixed(sum(r["values"]["x"] for r, _ in out) % 2**64, 4)
    y = decode_fixed(sum(r["values"]["y"] for r, _ in out) % 2**64, 4)
    assert 740 < x < 745 and abs(y) < 1  # 0.01° of longitude at 48.2° N is about 742 m east
    assert out[0][0]["enc"]["x"]["unit"] == "m@aeqd:48.2082,16.3738"
    with pytest.raises(ValidationError, match="must carry lat and lon"):
        mode({"type": "location", "time": 1.0, "values": {"x": 1.0, "y": 2.0}}, set())
    with pytest.raises(ValidationError, match="latitude"):
        mode({"type": "location", "time": 1.0, "values": {"lat": 91.0, "lon": 0.0}}, set())
    with pytest.raises(ValidationError, match="outside its declared range"):  # Bratislava
        mode({"type": "location", "time": 1.0, "values": {"lat": 48.1486, "lon": 17.1077}}, set())


@pytest.mark.parametrize("text, reason", [
    ("[fields.x]\nunit = \"m\"\nfrac = 4\nmin = 0\n", "exactly"),
    ("[fields.x]\nunit = \"m\"\nfrac = 4\nmin = 5\nmax = 1\n", "empty"),
    ("[fieldz.x]\n", "unknown section"),
    ("[geo]\norigin = [48.2, 16.3]\n[fields.x]\nunit = \"m\"\nfrac = 4\nmin = 0\nmax = 1\n",
     "must be declared with unit 'm@aeqd:48.2,16.3'"),
    ("[geo]\norigin = [100, 16.3]\n", "latitude"),
    ("not toml [", "invalid TOML"),
])
def test_share_mode_file_is_checked(tmp_path, text: str, reason: str) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(text)
    with pytest.raises(ValidationError, match=re.escape(reason)):
        load_share_mode(cfg)
    with pytest.raises(ValidationError, match="does not exist"):
        load_share_mode(tmp_path / "none.toml")


def test_geo_frame_names_itself_and_measures_metres() -> None:
    vienna = GeoFrame.from_origin([48.2082, 16.3738])
    assert GeoFrame.from_unit(vienna.unit) == vienna and GeoFrame.from_unit("m") is None
    assert vienna.project(48.2082, 16.3738) == pytest.approx((0.0, 0.0), abs=1e-6)
    # one degree of latitude north of 48.2° is about 111.2 km on the ellipsoid
    x, y = vienna.project(49.2082, 16.3738)
    assert abs(x) < 1e-6 and 111_100 < y < 111_300
    # two points 10 m apart 3 km from the origin stay 10 m apart (to well under 1 cm)
    a = vienna.project(48.2352, 16.3738)
    b = vienna.project(48.2352 + 10 / 111_200, 16.3738)
    assert abs(math.dist(a, b) - 10.0) < 0.01
    for bad in ([48.2], "48,16", [float("nan"), 0], [0, 181], [True, 0]):
        with pytest.raises(ValidationError):
            GeoFrame.from_origin(bad)


def test_share_mode_needs_no_numpy() -> None:
    code = ("import sys, ciphertwin.agents.share_mode, ciphertwin.agents.geo as g; "
            "g.GeoFrame(48.2, 16.3).project(48.3, 16.4); print('numpy' in sys.modules)")
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
    r = {"roster": roster.digest, "params": pack_params({"frac_bits": 16})}
    good = decode(build_result("j1", "sum", 1, "n1", ["t1"], b"x" * 40, ids[1].signing, **r),
                  "job_result")
    verify_result(good, roster)
    for forged in (build_result("j1", "sum", 1, "n1", ["t1"], b"x" * 40, ids[0].signing, **r),
                   build_result("j1", "sum", 0, "n1", ["t1"], b"x" * 40, ids[1].signing, **r),
                   build_result("j1", "sum", 1, "n1", ["t1"], b"x" * 40, ids[1].signing,
                                roster=bytes(32), params=r["params"])):  # another roster
        with pytest.raises(ValidationError):
            verify_result(decode(forged, "job_result"), roster)
    for field, value in (("blob", b"y" * 40), ("params", pack_params({"frac_bits": 0}))):
        tampered = dict(good.body, **{field: value})  # a re-scaled decoding is a forgery too
        with pytest.raises(ValidationError):
            verify_result(decode(encode("job_result", tampered), "job_result"), roster)
    st = decode(build_status("j1", "failed", "n2", reason="x", signer=ids[2].signing), "job_status")
    verify_status(st, ids[2].signing.verify_key)
    with pytest.raises(ValidationError):
        verify_status(st, ids[0].signing.verify_key)
    with pytest.raises(ValidationError):
        build_status("j1", "exploded", "n2")


def test_the_shipped_share_mode_example_loads() -> None:
    from pathlib import Path

    mode = load_share_mode(Path(__file__).parents[1] / "config" / "share-mode.example.toml")
    assert mode.geo.unit == mode.encodings["x"].unit == "m@aeqd:48.2082,16.3738"


async def test_device_agent_in_share_mode_seals_three_items_and_refuses_out_of_range(
        tmp_path) -> None:
    """What ``ciphertwin device run --shares`` wires up: the agent's expand hook is the share
    mode from the TOML file; a refused reading leaves nothing in the outbox."""
    import time

    from ciphertwin.agents.bundle import BrokerConnection, enroll_from_bundle, load_enrolled_device
    from ciphertwin.agents.device import DeviceAgent
    from ciphertwin.agents.identity import Identity
    from ciphertwin.agents.outbox import Outbox
    from ciphertwin.agents.owner import OwnerAgent
    from ciphertwin.agents.sources import Reading
    from ciphertwin.protocol.items import decode_item

    owner = OwnerAgent(Identity.generate("alice", "owner"), None)  # type: ignore[arg-type]
    bundle = owner.enroll_device("t1", "d1", BrokerConnection("127.0.0.1", 1883, "d1", "x"))
    enroll_from_bundle(bundle, tmp_path / "d1")
    (tmp_path / "d1" / SHARE_MODE_FILE).write_text(
        (Path(__file__).parents[1] / "config" / "share-mode.example.toml").read_text())
    mode = load_share_mode(tmp_path / "d1" / SHARE_MODE_FILE)
    async with Outbox(tmp_path / "d1" / "outbox.db") as outbox:
        agent = DeviceAgent(load_enrolled_device(tmp_path / "d1"), None, outbox,  # type: ignore[arg-type]
                            expand=mode)
        seqs = await agent.record(Reading("location", {"lat": 48.21, "lon": 16.37}, time.time()))
        assert seqs == [1, 2, 3]
        items = [decode_item(p) for _, p in await outbox.pending(10)]
        assert [sorted(a for a in i["attrs"] if a.startswith("share:")) for i in items] == \
            [["share:0"], ["share:1"], ["share:2"]]
        with pytest.raises(ValidationError, match="outside its declared range"):  # Graz
            await agent.record(Reading("location", {"lat": 47.07, "lon": 15.44}, time.time()))
        assert await outbox.count() == 3
