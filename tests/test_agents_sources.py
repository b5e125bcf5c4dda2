"""Reading sources: strict reading validation, built-in sources, registry and plugins."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from ciphertwin.agents.sources import (
    MAX_LINE_BYTES,
    CommandSource,
    Reading,
    SimulatedSensor,
    StdinSource,
    make_source,
    parse_reading_line,
)
from ciphertwin.errors import ValidationError

SECRET = "SECRET-PLAINTEXT-4711"


async def collect(source: object, limit: int = 1000) -> list[Reading]:
    out = []
    async for r in source:  # type: ignore[attr-defined]
        out.append(r)
        if len(out) >= limit:
            break
    return out


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


# --------------------------------------------------------------------------- Reading


def test_valid_reading_keeps_values_and_copies_them() -> None:
    values = {"celsius": 21.5, "ok": True, "count": 3, "room": "kitchen"}
    r = Reading("temperature", values, 1_800_000_000)
    values["celsius"] = 99.0
    assert r.values == {"celsius": 21.5, "ok": True, "count": 3, "room": "kitchen"}
    assert r.time == 1_800_000_000.0 and isinstance(r.time, float)
    assert r.as_dict() == {"type": "temperature", "values": r.values, "time": r.time}


@pytest.mark.parametrize(
    ("rtype", "values", "t"),
    [
        ("Temperature", {"a": 1}, 1.0),  # upper case type
        ("t" * 33, {"a": 1}, 1.0),  # type too long
        ("1abc", {"a": 1}, 1.0),
        ("temp", {"A": 1}, 1.0),  # bad key
        ("temp", {"a-b": 1}, 1.0),
        ("temp", {f"k{i}": i for i in range(33)}, 1.0),  # too many values
        ("temp", {"a": "x" * 257}, 1.0),  # string too long
        ("temp", {"a": float("nan")}, 1.0),
        ("temp", {"a": float("inf")}, 1.0),
        ("temp", {"a": 2**63}, 1.0),  # outside int64
        ("temp", {"a": None}, 1.0),
        ("temp", {"a": [1, 2]}, 1.0),
        ("temp", {"a": {"b": 1}}, 1.0),
        ("temp", {"a": "\ud800"}, 1.0),  # lone surrogate cannot be encoded
        ("temp", {"a": 1}, -1.0),
        ("temp", {"a": 1}, float("nan")),
        ("temp", {"a": 1}, 10**400),
        ("temp", {"a": 1}, True),
        ("temp", {"a": 1}, "2026-01-01"),
        ("temp", [("a", 1)], 1.0),
    ],
)
def test_invalid_readings_are_refused(rtype: str, values: object, t: object) -> None:
    with pytest.raises(ValidationError):
        Reading(rtype, values, t)  # type: ignore[arg-type]


def test_reading_size_limit_is_enforced_on_the_encoding() -> None:
    # 32 values of 256 chars each are individually fine but exceed 4 KiB together.
    with pytest.raises(ValidationError, match="4096"):
        Reading("blob", {f"k{i}": "x" * 256 for i in range(32)}, 1.0)
    Reading("blob", {f"k{i}": "x" * 100 for i in range(32)}, 1.0)  # ~3.6 KiB: fine


def test_parse_line_fills_missing_time_from_clock() -> None:
    raw = line({"type": "temperature", "values": {"celsius": 3}})
    r = parse_reading_line(raw, now=lambda: 42.0)
    assert r == Reading("temperature", {"celsius": 3}, 42.0)
    r = parse_reading_line(line({"type": "t", "values": {}, "time": 7}), now=lambda: 42.0)
    assert r.time == 7.0


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "t"}',
        b'{"values": {}}',
        b'{"type": "t", "values": {}, "extra": 1}',
        b'{"type": "t", "values": [], "time": 1}',
        b'{"type": "t", "type": "u", "values": {}}',  # duplicate key
        b'{"type": "t", "values": {"a": NaN}}',
        b'{"type": "t", "values": {"a": -Infinity}}',
        b'{"type": "t", "values": {"a": 1e999}}',  # overflows to inf
        b'{"type": "t", "values": {"a": 1}}\xff',
        b"[" * 5000 + b"]" * 5000,
        b" " * (MAX_LINE_BYTES + 1),
    ],
)
def test_bad_lines_raise_validation_error(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_reading_line(raw)


# --------------------------------------------------------------------------- simulated


@pytest.mark.parametrize(("kind", "keys"), [("temperature", {"celsius"}),
                                            ("humidity", {"percent"}),
                                            ("location", {"lat", "lon"})])
async def test_simulated_sensor_random_walk(kind: str, keys: set[str]) -> None:
    readings = await collect(SimulatedSensor(kind, 0, count=50, seed=3, clock=lambda: 5.0))
    assert len(readings) == 50
    assert all(r.type == kind and set(r.values) == keys and r.time == 5.0 for r in readings)
    # It walks: not constant, and reproducible from the seed.
    assert len({tuple(r.values.values()) for r in readings}) > 40
    again = await collect(SimulatedSensor(kind, 0, count=50, seed=3, clock=lambda: 5.0))
    assert again == readings
    if kind == "humidity":
        assert all(0 <= r.values["percent"] <= 100 for r in readings)


async def test_simulated_sensor_paces_by_interval() -> None:
    t0 = time.monotonic()
    readings = await collect(SimulatedSensor("temperature", 0.05, count=3))
    assert len(readings) == 3
    assert time.monotonic() - t0 >= 0.1  # two sleeps between three readings


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "pressure"}, {"interval_s": -1}, {"interval_s": float("nan")},
     {"interval_s": "1"}, {"count": -1}, {"count": 1.5}, {"count": True}],
)
def test_simulated_sensor_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        SimulatedSensor(**kwargs)


# --------------------------------------------------------------------------- command


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


async def test_command_source_parses_lines_skips_bad_ones_without_logging_content() -> None:
    good1 = {"type": "temperature", "values": {"celsius": 31.5}, "time": 100}
    good2 = {"type": "location", "values": {"lat": 1.0, "lon": 2.0, "note": SECRET}}
    bad = {"type": "temperature", "values": {"celsius": SECRET}, "extra": SECRET}
    body = (
        "import sys\n"
        f"print({json.dumps(json.dumps(good1))})\n"
        f"print('garbage {SECRET}')\n"
        f"print({json.dumps(json.dumps(bad))})\n"
        "print()\n"
        f"print('x' * {MAX_LINE_BYTES * 3})\n"
        f"print({json.dumps(json.dumps(good2))}, end='')\n"
        "sys.exit(3)\n"
    )
    src = CommandSource(_script(body), clock=lambda: 9.0)
    with capture_logs() as logs:
        readings = await collect(src)
    assert readings == [Reading("temperature", {"celsius": 31.5}, 100.0),
                        Reading("location", {"lat": 1.0, "lon": 2.0, "note": SECRET}, 9.0)]
    assert src.returncode == 3
    skipped = [e for e in logs if e["event"] == "reading_skipped"]
    assert [e["line"] for e in skipped] == [2, 3, 5]
    assert any(e["event"] == "command_exited" and e["returncode"] == 3 for e in logs)
    assert SECRET not in repr(logs)


async def test_command_source_reports_a_missing_command() -> None:
    src = CommandSource(["/nonexistent/ciphertwin-sensor"])
    with capture_logs() as logs:
        assert await collect(src) == []
    assert [e["event"] for e in logs] == ["command_failed_to_start"]


async def test_stopping_early_terminates_the_command() -> None:
    reading = json.dumps(json.dumps({"type": "t", "values": {"a": 1}}))
    body = f"import time\nwhile True:\n    print({reading}, flush=True)\n    time.sleep(0.01)\n"
    src = CommandSource(_script(body))
    it = aiter(src)
    assert (await anext(it)).type == "t"
    await it.aclose()
    assert src.returncode is not None and src.returncode != 0  # killed by our SIGTERM


def test_command_source_rejects_bad_argv() -> None:
    for argv in ([], "ls", [1], ["a\0b"]):
        with pytest.raises(ValidationError):
            CommandSource(argv)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- stdin

GOOD = {"type": "humidity", "values": {"percent": 40}, "time": 1}


async def test_stdin_source_reads_a_pipe() -> None:
    r_fd, w_fd = os.pipe()

    def writer() -> None:
        with os.fdopen(w_fd, "wb") as w:
            for _ in range(3):
                w.write(line(GOOD) + b"\n")
                w.flush()
                time.sleep(0.01)
            w.write(b"{broken\n" + line(GOOD))

    t = threading.Thread(target=writer)
    t.start()
    with os.fdopen(r_fd, "rb", buffering=0) as r:
        readings = await collect(StdinSource(r))
    t.join()
    assert readings == [Reading("humidity", {"percent": 40}, 1.0)] * 4


async def test_stdin_source_reads_a_regular_file_and_a_buffer(tmp_path) -> None:
    path = tmp_path / "readings.jsonl"
    path.write_bytes(b"\n".join([line(GOOD), b"nope", line(GOOD)]) + b"\n")
    with open(path, "rb") as f:
        assert len(await collect(StdinSource(f))) == 2
    assert len(await collect(StdinSource(io.BytesIO(line(GOOD) + b"\n")))) == 1


# --------------------------------------------------------------------------- registry + plugins


class _PluginSource:
    def __init__(self, n: int, bad: bool = False) -> None:
        self.n, self.bad = n, bad

    async def __aiter__(self) -> AsyncIterator[object]:
        for i in range(self.n):
            if self.bad:
                yield {"type": "t", "values": {}}  # not a Reading
                r = Reading("t", {"a": 1}, 1.0)
                r.values["a"] = float("nan")  # mutated after construction
                yield r
            yield Reading("plugged", {"i": i}, 1.0)


def plugin_factory(n: int = 2, bad: bool = False) -> _PluginSource:
    return _PluginSource(n, bad)


def not_a_source() -> int:
    return 5


async def test_make_source_builds_each_builtin_kind() -> None:
    sim = make_source({"kind": "simulated", "sensor": "humidity", "interval_s": 0, "count": 2,
                       "seed": 1})
    assert isinstance(sim, SimulatedSensor)
    assert [r.type for r in await collect(sim)] == ["humidity", "humidity"]
    argv = _script(f"print({json.dumps(json.dumps(GOOD))})")
    cmd = make_source({"kind": "command", "argv": argv})
    assert await collect(cmd) == [Reading("humidity", {"percent": 40}, 1.0)]
    assert isinstance(make_source({"kind": "stdin"}), StdinSource)


async def test_plugin_source_is_loaded_and_its_output_revalidated() -> None:
    src = make_source({"kind": "plugin", "target": f"{__name__}:plugin_factory",
                       "options": {"n": 3, "bad": True}})
    with capture_logs() as logs:
        readings = await collect(src)
    assert [r.values["i"] for r in readings] == [0, 1, 2]
    assert sum(e["event"] == "reading_skipped" for e in logs) == 6


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"kind": 3},
        {"kind": "magic"},
        {"kind": "simulated", "sensor": "pressure"},
        {"kind": "simulated", "intervall_s": 1},
        {"kind": "simulated", "seed": "x"},
        {"kind": "command"},
        {"kind": "command", "argv": "ls -l"},
        {"kind": "stdin", "path": "/dev/stdin"},
        {"kind": "plugin"},
        {"kind": "plugin", "target": "os:system", "entry_point": "x"},
        {"kind": "plugin", "target": "os.system"},
        {"kind": "plugin", "target": "no_such_module_xyz:f"},
        {"kind": "plugin", "target": f"{__name__}:missing"},
        {"kind": "plugin", "target": f"{__name__}:not_a_source"},
        {"kind": "plugin", "target": f"{__name__}:plugin_factory", "options": {"nope": 1}},
        {"kind": "plugin", "target": f"{__name__}:plugin_factory", "options": [1]},
        {"kind": "plugin", "entry_point": "no-such-ciphertwin-source"},
    ],
)
def test_make_source_rejects_bad_specs(spec: dict) -> None:
    with pytest.raises(ValidationError):
        make_source(spec)


async def test_sources_run_concurrently_without_blocking_the_loop() -> None:
    """A slow command must not stall other tasks (the agent also serves MQTT)."""
    body = "import time\ntime.sleep(0.3)\n"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await collect(CommandSource(_script(body)))
    task.cancel()
    assert ticks >= 10


async def test_stdin_source_on_dev_null_ends_instead_of_hanging() -> None:
    """epoll refuses /dev/null; the source must notice and read it as a file."""
    with open(os.devnull, "rb") as f:
        assert await asyncio.wait_for(collect(StdinSource(f)), timeout=5) == []
