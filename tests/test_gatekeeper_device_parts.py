"""Device-side parts around the gatekeeper: settings file, handlers, the interaction store and
the outgoing hook of the device agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ciphertwin.agents.device_settings import load_device_settings, parse_device_settings
from ciphertwin.agents.handlers import HandlerError, SimulatedThermostat, call_handler, load_handler
from ciphertwin.agents.interaction_store import InteractionStore
from ciphertwin.errors import ValidationError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "device-gatekeeper.example.toml"


def test_settings_defaults_example_and_errors(tmp_path: Path) -> None:
    d = load_device_settings(tmp_path / "absent.toml")
    assert d.wake.always_awake and d.handler_spec == "thermostat"
    with pytest.raises(ValidationError):
        load_device_settings(tmp_path / "absent.toml", required=True)
    s = load_device_settings(EXAMPLE)
    assert s.gatekeeper.simulator is not None and s.wake.window_s == 60
    bad = tmp_path / "bad.toml"
    for text in ("[interaction]\nsleep_s = -1", "[interaction]\nwakeable = 'yes'",
                 "[interaction]\nmax_wakes_per_hour = -2", "[interaction]\nwindow_s = 0",
                 "[other]\n", "[interaction]\nhandler = 'nope:nothing'\n", "not toml ==",
                 "[gatekeeper.access]\ndefault = 'perhaps'"):
        bad.write_text(text)
        with pytest.raises(ValidationError):
            load_device_settings(bad).handler()
    with pytest.raises(ValidationError):
        parse_device_settings({"interaction": {"handler_params": 3}})


def test_simulated_thermostat_follows_the_model() -> None:
    now = [1000.0]
    th = SimulatedThermostat(clock=lambda: now[0], room_c=20.0)
    assert th("set_target", {"target_c": 22.0})["target_c"] == 22.0
    now[0] += 3 * 3600
    state = th("get_state", {})
    assert 21.5 < state["room_c"] < 22.5
    th("desired", {"mode": "off"})
    now[0] += 3 * 3600
    assert th.state()["room_c"] < 20.0 and th.state()["heater"] is False
    for op, args in (("set_target", {}), ("set_mode", {"mode": "x"}), ("launch", {}),
                     ("desired", {"target_c": "warm"}), ("firmware_update", {"version": "2"})):
        with pytest.raises(HandlerError):
            th(op, args)
    out = th("firmware_update", {"version": "2.0", "attachment": b"img"})
    assert out["installed"] == "2.0" and th.state()["firmware"] == "2.0"


async def echo(op: str, args: dict) -> tuple[str, dict]:
    return op, args


def test_load_handler_entry_points() -> None:
    assert isinstance(load_handler("thermostat", {"outside_c": -5.0}), SimulatedThermostat)
    fn = load_handler("test_gatekeeper_device_parts:echo")
    assert asyncio.run(call_handler(fn, "x", {"a": 1})) == ("x", {"a": 1})
    with pytest.raises(ValidationError):
        load_handler("thermostat", {"no_such_param": 1})
    with pytest.raises(ValidationError):
        load_handler("math:pi")  # not callable


def test_interaction_store_survives_restart(tmp_path: Path) -> None:
    async def run() -> None:
        path = tmp_path / "interaction.db"
        async with InteractionStore(path) as st:
            assert await st.counter("desired_version") == 0
            assert await st.claim_desired(3, b"doc3") == (True, 0, 1)
            assert await st.claim_desired(3, b"again") == (False, 3, 0)
            assert await st.claim_desired(2, b"older") == (False, 3, 0)
            assert await st.get_doc("desired_doc") == b"doc3"
            assert [await st.next_counter("reported_version") for _ in range(2)] == [2, 3]
            assert await st.claim_request("bob", "r1", 9e12) == (True, None)
            assert await st.claim_request("bob", "r1", 9e12) == (False, None)
            await st.store_answer("bob", "r1", b"answer")
            assert await st.claim_request("carol", "r1", 9e12) == (True, None)
            await st.revoke(b"tok", 9e12)
        async with InteractionStore(path) as st:
            assert await st.counter("desired_version") == 3
            assert await st.next_counter("reported_version") == 4
            assert await st.claim_desired(4, b"doc4") == (True, 3, 5)
            assert await st.claim_request("bob", "r1", 9e12) == (False, b"answer")
            assert await st.revoked() == {b"tok"}
            # expired rows are forgotten
            assert await st.claim_request("bob", "old", 1.0) == (True, None)
            assert await st.claim_request("bob", "old2", 1.0) == (True, None)
            assert await st.claim_request("bob", "old", 1.0) == (True, None)
    asyncio.run(run())
