"""The gatekeeper on plaintext: access rules, time windows, approvals, image signatures,
clamping, coarsening, the thermostat model and the simulator's refusals."""

from __future__ import annotations

import math
import tomllib
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.agents.gatekeeper import Change, Decision, Gatekeeper
from ciphertwin.agents.gatekeeper.access import AccessPolicy, TimeWindow, sign_image_hex
from ciphertwin.agents.gatekeeper.manipulator import (
    EARTH_RADIUS_M, Manipulator, coarsen_point,
)
from ciphertwin.agents.gatekeeper.models import Thermostat
from ciphertwin.agents.gatekeeper.simulator import Simulator
from ciphertwin.agents.sources import Reading
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.twin_requests import sign_approval

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "device-gatekeeper.example.toml"
VIENNA = ZoneInfo("Europe/Vienna")
ALICE, CAROL, DAVE, SIGNER = (SigningKey.generate() for _ in range(4))


def at(text: str, tz: ZoneInfo = VIENNA) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def change(op: str = "set_target", principal: str = "bob", args: dict | None = None, *,
           owner: bool = False, request_id: str | None = "r1", approvals=(),
           attachment: bytes | None = None) -> Change:
    return Change("t1", principal, op, {"target_c": 21.0} if args is None else args,
                  is_owner=owner, ref=request_id or "desired:1", request_id=request_id,
                  approvals=approvals, attachment=attachment)


def config() -> dict:
    return {
        "access": {"default": "deny", "rule": [
            {"name": "owner", "principals": ["owner"], "operations": ["*"]},
            {"name": "office-hours", "principals": ["bob"], "operations": ["set_target",
                                                                           "desired"],
             "days": ["mon", "tue", "wed", "thu", "fri"], "hours": "09:00-17:00",
             "tz": "Europe/Vienna"},
            {"name": "night", "effect": "deny", "principals": ["*"], "operations": ["boost"],
             "hours": "22:00-06:00", "tz": "Europe/Vienna", "silent": True},
            {"name": "boost", "principals": ["*"], "operations": ["boost"]},
            {"name": "firmware", "principals": ["*"], "operations": ["firmware_update"],
             "approvals": {"m": 2, "approvers": {"alice": ALICE.verify_key.raw.hex(),
                                                 "carol": CAROL.verify_key.raw.hex(),
                                                 "dave": DAVE.verify_key.raw.hex()}},
             "image_signer": SIGNER.verify_key.raw.hex()},
            {"name": "mallory", "principals": ["mallory"], "operations": ["*"],
             "effect": "deny", "silent": True},
        ]},
        "manipulator": {"clamp": {"target_c": [15.0, 25.0], "hvac.fan": [0, 3]},
                        "redact": ["owner_name"], "coarsen": {"location": 100}},
        "simulator": {"horizon_s": 3600, "envelope": {"room_c": [16.0, 26.0]},
                      "operations": ["desired", "set_target", "boost"]},
    }


GK = Gatekeeper.from_config(config())
TUESDAY_NOON = at("2026-12-01T12:00:00")
STATE = {"room_c": 20.0, "target_c": 21.0, "mode": "auto", "heater": False}


# --- access ------------------------------------------------------------------------------

def test_owner_allowed_any_time_and_principal_name_does_not_matter() -> None:
    d = GK.check(change(principal="alice-the-owner", owner=True), state=STATE,
                 now=at("2026-12-06T03:00:00"))
    assert d.allowed and d.rule == "owner" and d.action == "allow"
    # a requester who merely calls itself "owner" is not the owner
    d = GK.check(change(principal="owner"), state=STATE, now=TUESDAY_NOON)
    assert not d.allowed and d.code == "no_rule"


def test_office_hours_window_and_weekdays() -> None:
    assert GK.check(change(), state=STATE, now=TUESDAY_NOON).allowed
    late = GK.check(change(), state=STATE, now=at("2026-12-01T17:00:00"))
    assert not late.allowed and late.code == "window" and late.rule == "office-hours"
    assert "09:00-17:00 (Europe/Vienna)" in late.reason and not late.silent
    assert not GK.check(change(), state=STATE, now=at("2026-12-05T12:00:00")).allowed  # Sat
    # operations not named by the rule fall to the default
    d = GK.check(change(op="reboot"), state=STATE, now=TUESDAY_NOON)
    assert not d.allowed and d.code == "no_rule" and d.rule == "default"


def test_deny_rule_silent_and_window() -> None:
    night = GK.check(change(op="boost", args={"mode": "boost"}), state=STATE,
                     now=at("2026-12-01T23:30:00"))
    assert not night.allowed and night.silent and night.rule == "night"
    day = GK.check(change(op="boost", args={"mode": "boost", "room_c": 17.0}), state=STATE,
                   now=at("2026-12-01T10:00:00"))
    assert day.rule == "boost"  # outside the deny window the allow rule applies
    d = GK.check(change(principal="mallory", op="get_state", args={}), now=TUESDAY_NOON)
    assert not d.allowed and d.silent and d.code == "denied"


def test_time_window_across_midnight_days_name_the_start_day() -> None:
    w = TimeWindow.from_config(["fri"], "22:00-06:00", "Europe/Vienna", "t")
    assert w.contains(at("2026-12-04T22:00:00"))  # Friday evening
    assert w.contains(at("2026-12-05T05:59:59"))  # Saturday morning: Friday's window
    assert not w.contains(at("2026-12-05T06:00:00"))
    assert not w.contains(at("2026-12-05T22:30:00"))  # Saturday's own evening
    assert not w.contains(at("2026-12-04T05:00:00"))  # Friday morning = Thursday's window


def test_time_window_follows_daylight_saving() -> None:
    w = TimeWindow.from_config(None, "09:00-17:00", "Europe/Vienna", "t")
    # 09:30 local is 07:30 UTC in summer (CEST) and 08:30 UTC in winter (CET)
    assert w.contains(at("2026-07-01T07:30:00", ZoneInfo("UTC")))
    assert not w.contains(at("2026-01-15T07:30:00", ZoneInfo("UTC")))
    assert w.contains(at("2026-01-15T08:30:00", ZoneInfo("UTC")))
    # the spring-forward night (02:00 -> 03:00 on 2026-03-29): a 01:00-04:00 window is 2 h
    night = TimeWindow.from_config(None, "01:00-04:00", "Europe/Vienna", "t")
    start = at("2026-03-29T00:00:00", ZoneInfo("UTC"))  # 01:00 CET
    inside = [s for s in range(0, 4 * 3600, 60) if night.contains(start + s)]
    assert len(inside) == 120


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 23), st.integers(0, 59), st.integers(0, 23), st.integers(0, 59),
       st.integers(1_600_000_000, 1_900_000_000))
def test_time_window_matches_wall_clock(h1: int, m1: int, h2: int, m2: int, when: int) -> None:
    if (h1, m1) == (h2, m2):
        return
    w = TimeWindow.from_config(None, f"{h1:02}:{m1:02}-{h2:02}:{m2:02}", "Europe/Vienna", "t")
    local = datetime.fromtimestamp(when, VIENNA)
    clock, start, end = local.hour * 60 + local.minute, h1 * 60 + m1, h2 * 60 + m2
    expected = start <= clock < end if start < end else clock >= start or clock < end
    assert w.contains(when) == expected


@pytest.mark.parametrize("bad", [
    {"default": "maybe"},
    {"rule": [{"name": "x", "hours": "9-17"}]},
    {"rule": [{"name": "x", "hours": "10:00-10:00"}]},
    {"rule": [{"name": "x", "tz": "Mars/Olympus"}]},
    {"rule": [{"name": "x", "days": ["someday"]}]},
    {"rule": [{"name": "x", "approvals": {"m": 3, "approvers": {"a": "00" * 32}}}]},
    {"rule": [{"name": "x", "approvals": {"m": 1, "approvers": {"a": "zz"}}}]},
    {"rule": [{"name": "x", "image_signer": "abc"}]},
    {"rule": [{"name": "x", "principals": "bob"}]},
    {"rule": [{"name": "x"}, {"name": "x"}]},
    {"rule": [{"name": "x", "wat": 1}]},
    {"rule": [{"name": "x", "effect": "deny", "image_signer": "00" * 32}]},
])
def test_bad_access_config_refused_with_reason(bad: dict) -> None:
    with pytest.raises(ValidationError):
        AccessPolicy.from_config(bad)


# --- approvals and images ------------------------------------------------------------------

def firmware(approvers: list[tuple[str, SigningKey]], image: bytes = b"\x7fELF firmware v2",
             signer: SigningKey = SIGNER, **kw) -> Change:
    args = {"version": "2.0", "image_sig": sign_image_hex(signer, image)}
    approvals = [sign_approval(k, name, "t1", "r9", "firmware_update", args, image)
                 for name, k in approvers]
    return change(op="firmware_update", args=args, request_id="r9", approvals=approvals,
                  attachment=image, **kw)


def test_m_of_n_approvals() -> None:
    ok = GK.check(firmware([("alice", ALICE), ("carol", CAROL)]), now=TUESDAY_NOON)
    assert ok.allowed and ok.rule == "firmware"
    one = GK.check(firmware([("alice", ALICE)]), now=TUESDAY_NOON)
    assert not one.allowed and one.code == "approvals"
    assert "needs 2 of 3 approvals, has 1" in one.reason
    twice = GK.check(firmware([("alice", ALICE), ("alice", ALICE)]), now=TUESDAY_NOON)
    assert not twice.allowed  # one approver twice is still one


def test_forged_or_misbound_approvals_do_not_count() -> None:
    forged = GK.check(firmware([("alice", ALICE), ("carol", DAVE)]), now=TUESDAY_NOON)
    assert not forged.allowed and "carol (signature invalid)" in forged.reason
    stranger = GK.check(firmware([("alice", ALICE), ("eve", DAVE)]), now=TUESDAY_NOON)
    assert not stranger.allowed and "eve (not an approver)" in stranger.reason
    # approvals for another request id or other arguments do not carry over
    c = firmware([("alice", ALICE), ("carol", CAROL)])
    moved = Change(c.twin, c.principal, c.op, c.args, ref="r10", request_id="r10",
                   approvals=c.approvals, attachment=c.attachment)
    assert not GK.check(moved, now=TUESDAY_NOON).allowed
    other_image = Change(c.twin, c.principal, c.op, c.args, ref="r9", request_id="r9",
                         approvals=c.approvals, attachment=b"another image")
    assert not GK.check(other_image, now=TUESDAY_NOON).allowed
    garbage = Change(c.twin, c.principal, c.op, c.args, ref="r9", request_id="r9",
                     approvals=[{"approver": 5, "sig": "x"}, "nope", {"approver": "alice"}],
                     attachment=c.attachment)
    assert GK.check(garbage, now=TUESDAY_NOON).code == "approvals"


def test_image_signature_required() -> None:
    bad = GK.check(firmware([("alice", ALICE), ("carol", CAROL)], signer=DAVE),
                   now=TUESDAY_NOON)
    assert not bad.allowed and bad.code == "image" and "does not verify" in bad.reason
    c = firmware([("alice", ALICE), ("carol", CAROL)])
    no_image = Change(c.twin, c.principal, c.op, c.args, ref="r9", request_id="r9",
                      approvals=c.approvals, attachment=None)
    assert GK.check(no_image, now=TUESDAY_NOON).code in ("approvals", "image")


# --- manipulator -----------------------------------------------------------------------------

def test_clamp_and_nested_paths_and_bad_values() -> None:
    m = GK.manipulator
    out = m.clamp_args({"target_c": 30, "hvac": {"fan": -2}, "other": 99})
    assert out.args == {"target_c": 25.0, "hvac": {"fan": 0}, "other": 99}
    assert set(out.changed) == {"target_c", "hvac.fan"}
    assert m.clamp_args({"target_c": None}).args == {"target_c": None}
    for bad in ("hot", True, float("nan"), [1]):
        assert m.clamp_args({"target_c": bad}).problems
    d = GK.check(change(args={"target_c": "hot"}), state=STATE, now=TUESDAY_NOON)
    assert not d.allowed and d.code == "invalid"


def test_clamped_change_is_recorded_as_clamp() -> None:
    d = GK.check(change(args={"target_c": 40.0}), state=STATE, now=TUESDAY_NOON)
    assert d.allowed and d.action == "clamp" and d.args["target_c"] == 25.0
    assert d.clamped == ("target_c",)
    reading = d.as_reading()
    assert reading.type == "decision" and reading.values["action"] == "clamp"


@settings(max_examples=300, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(-1e3, 1e3), st.floats(0, 1e3))
def test_clamp_idempotent_and_within_range(value: float, low: float, width: float) -> None:
    m = Manipulator.from_config({"clamp": {"x": [low, low + width]}})
    once = m.clamp_args({"x": value})
    assert low <= once.args["x"] <= low + width
    assert m.clamp_args(once.args).args == once.args and not m.clamp_args(once.args).changed
    if low <= value <= low + width:
        assert once.args["x"] == value and not once.changed


def haversine(a: tuple[float, float], b: tuple[float, float]) -> float:
    (p1, l1), (p2, l2) = (tuple(map(math.radians, p)) for p in (a, b))
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin((l2 - l1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


@settings(max_examples=500, deadline=None)
@given(st.floats(-90, 90), st.floats(-180, 180), st.sampled_from([10.0, 100.0, 1000.0, 5000.0]))
def test_coarsened_point_within_half_diagonal(lat: float, lon: float, grid: float) -> None:
    c = coarsen_point(lat, lon, grid)
    assert -90 <= c[0] <= 90 and -180 < c[1] <= 180
    assert haversine((lat, lon), c) <= grid * math.sqrt(2) / 2 * (1 + 1e-6) + 1e-6
    assert coarsen_point(*c, grid) == pytest.approx(c, abs=1e-9) or abs(abs(c[0]) - 90) < 1e-6


def test_coarsening_is_a_grid_not_decimal_places() -> None:
    vienna = coarsen_point(48.20821, 16.37383, 100)
    assert vienna == coarsen_point(48.20825, 16.37390, 100)  # same 100 m cell
    assert haversine(vienna, (48.20821, 16.37383)) <= 71
    # at high latitude a cell is still ~100 m wide: neighbouring cells' centres ~100 m apart
    a = coarsen_point(69.65, 18.95, 100)
    b = coarsen_point(69.65, a[1] + 0.0027, 100)
    assert 90 <= haversine(a, b) <= 110


def test_outgoing_redacts_and_coarsens_only_configured_types() -> None:
    m = GK.manipulator
    r = m.outgoing(Reading("location", {"lat": 48.20821, "lon": 16.37383, "owner_name": "Ann",
                                        "speed": 3.0}, 1_700_000_000.0))
    assert "owner_name" not in r.values and r.values["speed"] == 3.0
    assert (r.values["lat"], r.values["lon"]) == coarsen_point(48.20821, 16.37383, 100)
    t = Reading("temperature", {"lat": 48.20821, "lon": 16.37383, "c": 21.5}, 1.0)
    assert m.outgoing(t) is t  # nothing to change: the very same reading


# --- model and simulator -----------------------------------------------------------------------

def test_thermostat_physics() -> None:
    th = Thermostat()
    # heater off: exponential decay towards outside with time constant tau
    p = th.predict({"room_c": 20.0, "mode": "off"}, {}, th.tau_s)
    assert p.series["room_c"][-1] == pytest.approx(5.0 + 15.0 * math.exp(-1), rel=1e-9)
    # boost: towards T_out + P*tau/C
    assert th.settle_c(True) == pytest.approx(5.0 + 3000 * 10800 / 1e6)
    # auto: holds the target within the hysteresis band once reached
    p = th.predict({"room_c": 18.0}, {"target_c": 22.0}, 6 * 3600)
    tail = p.series["room_c"][len(p.times) // 2:]
    assert all(21.5 < v < 22.5 for v in tail)
    with pytest.raises(ValidationError):
        th.predict({}, {"mode": "turbo"}, 60)
    with pytest.raises(ValidationError):
        Thermostat(tau_s=0)


def test_simulator_refuses_with_prediction() -> None:
    d = GK.check(change(args={"target_c": 15.0}), state=STATE, now=TUESDAY_NOON)
    assert not d.allowed and d.rule == "simulator" and d.code == "unsafe"
    assert "room_c leaves the safe envelope [16, 26]" in d.reason and "min 15." in d.reason
    boost = GK.check(change(op="boost", args={"mode": "boost"}),
                     state={**STATE, "room_c": 24.0}, now=TUESDAY_NOON)
    assert not boost.allowed and "max 2" in boost.reason
    # not judged: an operation the simulator is not configured for
    assert GK.check(change(owner=True, op="get_state", args={}), state=STATE,
                    now=TUESDAY_NOON).allowed


def test_simulator_refuses_when_the_model_fails() -> None:
    class Broken:
        def predict(self, state, change, horizon_s):  # noqa: ANN001, ANN201
            raise ZeroDivisionError

    sim = Simulator(Broken(), 60.0, {"room_c": (0.0, 1.0)})
    res = sim.check({}, {})
    assert not res.ok and "ZeroDivisionError" in res.reason
    with pytest.raises(ValidationError):
        Simulator.from_config({"model": "os:nope", "envelope": {"x": [0, 1]}})
    with pytest.raises(ValidationError):
        Simulator.from_config({"model": "not an entry point", "envelope": {"x": [0, 1]}})
    with pytest.raises(ValidationError):
        Simulator.from_config({"envelope": {"room_c": [2, 1]}})


def test_permissive_gatekeeper_and_example_config() -> None:
    d = Gatekeeper.permissive().check(change(args={"target_c": 99}))
    assert d.allowed and d.args == {"target_c": 99}
    raw = tomllib.loads(EXAMPLE.read_text())
    gk = Gatekeeper.from_config(raw["gatekeeper"])
    assert [r.name for r in gk.access.rules][:2] == ["owner-any-time", "office-hours"]
    assert gk.simulator is not None and gk.manipulator.clamp
    assert isinstance(gk.check(change(owner=True, args={"target_c": 30}), state=STATE),
                      Decision)


@settings(max_examples=60, deadline=None)
@given(st.floats(-20, 40), st.floats(5, 30), st.sampled_from(["auto", "off", "boost"]),
       st.floats(-15, 15), st.floats(60, 24 * 3600))
def test_thermostat_stays_between_its_physical_bounds(room: float, target: float, mode: str,
                                                     outside: float, horizon: float) -> None:
    """The room never leaves [min(T0, T_out), max(T0, T_out + P·τ/C)] (first-order system,
    exact steps), and in auto mode ends near the target when the heater can reach it."""
    th = Thermostat(outside_c=outside)
    p = th.predict({"room_c": room}, {"target_c": target, "mode": mode}, horizon)
    low, high = min(room, outside), max(room, th.settle_c(True))
    assert all(low - 1e-9 <= v <= high + 1e-9 for v in p.series["room_c"])
    assert len(p.times) == len(p.series["room_c"]) and p.times[-1] == pytest.approx(horizon)
    if mode == "auto" and horizon >= 12 * 3600 and outside < target < th.settle_c(True) - 1:
        assert abs(p.series["room_c"][-1] - target) < 1.0
