"""Reading sources for the device agent: where plaintext readings come from.

A source is anything that can be iterated asynchronously and yields `Reading`s. Built in are a
simulated sensor (demos, tests), a command whose stdout lines are JSON readings (wrap any
existing sensor script) and stdin (pipe readings in). Third parties plug in a factory by
`package.module:factory` or by an entry point in the `ciphertwin.sources` group.

Readings are validated strictly *here*, at the edge, so everything downstream (attribute rules,
sealing, the outbox) can trust their shape and size. A bad line never stops a source: it is
logged — by reason and line number only, never its content, which is plaintext — and skipped.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import math
import os
import random
import re
import selectors
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, runtime_checkable

import structlog

from ciphertwin.errors import ValidationError

log = structlog.get_logger(__name__)

Value = float | int | str | bool

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_VALUES = 32
MAX_STRING_CHARS = 256
MAX_READING_BYTES = 4096
# A raw input line may carry whitespace around a reading; anything longer is refused unread.
MAX_LINE_BYTES = 4 * MAX_READING_BYTES
# Integers must survive msgpack/SQLite untouched: signed 64-bit.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# Times are formatted as 4-digit years by the attribute rules: 1970 … 9999-12-31T23:59:59Z.
TIME_MAX = 253402300799.0
ENTRY_POINT_GROUP = "ciphertwin.sources"


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationError(f"{what} must match [a-z][a-z0-9_]{{0,31}}")
    return name


def _check_value(key: str, value: object) -> Value:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ValidationError(f"value {key!r} is outside the signed 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"value {key!r} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise ValidationError(f"value {key!r} is longer than {MAX_STRING_CHARS} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
            raise ValidationError(f"value {key!r} is not valid Unicode text") from None
        return value
    raise ValidationError(f"value {key!r} must be a number, string or boolean")


def _check_time(t: object) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValidationError("time must be a number of seconds since the epoch")
    if not (0 <= t <= TIME_MAX):  # NaN fails every comparison; huge ints compare exactly
        raise ValidationError("time must be between 1970 and 9999 (epoch seconds, UTC)")
    return float(t)


@dataclass(frozen=True)
class Reading:
    """One plaintext reading; validated on construction so an invalid one cannot exist.

    `values` is copied on construction; treat it as read-only.
    """

    type: str
    values: dict[str, Value]
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        _check_name("reading type", self.type)
        if not isinstance(self.values, Mapping):
            raise ValidationError("reading values must be an object")
        if len(self.values) > MAX_VALUES:
            raise ValidationError(f"a reading has at most {MAX_VALUES} values")
        values = {_check_name("value key", k): _check_value(k, v) for k, v in self.values.items()}
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "time", _check_time(self.time))
        if len(self.encoded()) > MAX_READING_BYTES:
            raise ValidationError(f"reading is larger than {MAX_READING_BYTES} bytes encoded")

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form, e.g. for msgpack inside the sealed item."""
        return {"type": self.type, "values": dict(self.values), "time": self.time}

    def encoded(self) -> bytes:
        """Canonical compact JSON; its length is what the size limit measures."""
        return json.dumps(
            self.as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()


def _reject_constant(name: str) -> None:
    raise ValidationError(f"{name} is not a valid number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValidationError("duplicate key in JSON object")
    return obj


def parse_reading(obj: object, *, now: Callable[[], float] = time.time) -> Reading:
    """Validate a decoded JSON object `{"type", "values", "time"?}` into a Reading."""
    if not isinstance(obj, dict):
        raise ValidationError("a reading must be a JSON object")
    unknown = set(obj) - {"type", "values", "time"}
    if unknown:
        raise ValidationError(f"unknown reading field(s): {', '.join(sorted(map(str, unknown)))}")
    if "type" not in obj or "values" not in obj:
        raise ValidationError("a reading needs 'type' and 'values'")
    if not isinstance(obj["values"], dict):
        raise ValidationError("reading values must be an object")
    return Reading(type=obj["type"], values=obj["values"], time=obj.get("time", now()))


def parse_reading_line(line: bytes, *, now: Callable[[], float] = time.time) -> Reading:
    """Parse one JSON line (bytes, UTF-8) into a Reading; ValidationError if it is bad."""
    if len(line) > MAX_LINE_BYTES:
        raise ValidationError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        text = line.decode("utf-8")
        obj = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )
    except UnicodeDecodeError:
        raise ValidationError("line is not valid UTF-8") from None
    except RecursionError:
        raise ValidationError("line nests too deeply") from None
    except json.JSONDecodeError as exc:
        # exc.msg describes the syntax problem without echoing the content.
        raise ValidationError(f"line is not JSON: {exc.msg}") from None
    return parse_reading(obj, now=now)


@runtime_checkable
class Source(Protocol):
    """Anything the agent can `async for` over to get Readings."""

    def __aiter__(self) -> AsyncIterator[Reading]: ...


# --------------------------------------------------------------------------- simulated sensor


@dataclass(frozen=True)
class _Walk:
    """Random-walk parameters of one simulated quantity."""

    start: float
    step: float
    low: float
    high: float


_SIMULATED: dict[str, dict[str, _Walk]] = {
    "temperature": {"celsius": _Walk(21.0, 0.3, -40.0, 85.0)},
    "humidity": {"percent": _Walk(45.0, 1.0, 0.0, 100.0)},
    # Around Graz; a step of ~1e-4 degrees is roughly ten metres.
    "location": {
        "lat": _Walk(47.0707, 1e-4, -90.0, 90.0),
        "lon": _Walk(15.4395, 1e-4, -180.0, 180.0),
    },
}


class SimulatedSensor:
    """A sensor that random-walks a plausible quantity: demos and tests without hardware."""

    KINDS = tuple(_SIMULATED)

    def __init__(
        self,
        kind: str = "temperature",
        interval_s: float = 1.0,
        count: int | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if kind not in _SIMULATED:
            raise ValidationError(f"simulated sensor must be one of {', '.join(self.KINDS)}")
        if isinstance(interval_s, bool) or not isinstance(interval_s, int | float):
            raise ValidationError("interval_s must be a number")
        if not (math.isfinite(interval_s) and 0 <= interval_s <= 86400):
            raise ValidationError("interval_s must be between 0 and 86400 seconds")
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 0
        ):
            raise ValidationError("count must be a non-negative integer or None")
        self.kind = kind
        self.interval_s = float(interval_s)
        self.count = count
        self._clock = clock
        # Simulation data only, never secret: a seedable non-cryptographic PRNG is right here.
        self._rng = random.Random(seed)  # noqa: S311

    async def __aiter__(self) -> AsyncIterator[Reading]:
        walks = _SIMULATED[self.kind]
        state = {key: w.start for key, w in walks.items()}
        emitted = 0
        while self.count is None or emitted < self.count:
            if emitted:
                await asyncio.sleep(self.interval_s)
            for key, w in walks.items():
                state[key] = min(w.high, max(w.low, state[key] + self._rng.gauss(0.0, w.step)))
            values = {k: round(v, 6) for k, v in state.items()}
            yield Reading(type=self.kind, values=values, time=self._clock())
            emitted += 1


# --------------------------------------------------------------------------- line-based sources

ReadChunk = Callable[[], Awaitable[bytes]]
_CHUNK = 65536


async def _lines(read_chunk: ReadChunk) -> AsyncIterator[bytes | None]:
    """Split a byte stream into lines; yields None for a line over MAX_LINE_BYTES (discarded
    without ever being held whole in memory)."""
    buf = bytearray()
    oversized = False
    while True:
        chunk = await read_chunk()
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE_BYTES:
                    oversized = True
                    buf.clear()
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if oversized or len(line) > MAX_LINE_BYTES:
                oversized = False
                yield None
            else:
                yield line
    if oversized:
        yield None
    elif buf.strip():
        yield bytes(buf)


async def _readings_from_lines(
    read_chunk: ReadChunk, source: str, now: Callable[[], float]
) -> AsyncIterator[Reading]:
    """Parse lines into Readings; log and skip bad ones (reason only, never the content)."""
    lineno = 0
    async for line in _lines(read_chunk):
        lineno += 1
        if line is None:
            log.warning("reading_skipped", source=source, line=lineno, reason="line too long")
            continue
        if not line.strip():
            continue
        try:
            yield parse_reading_line(line, now=now)
        except ValidationError as exc:
            log.warning("reading_skipped", source=source, line=lineno, reason=str(exc))


class CommandSource:
    """Runs a command and reads one JSON reading per stdout line.

    The command's stderr passes through to ours (its diagnostics are its own business). When
    the command exits the iteration ends and the exit status is logged and kept in
    `returncode`; if the consumer stops early, the command is terminated.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (
            not isinstance(argv, list | tuple)
            or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv)
        ):
            raise ValidationError("command argv must be a non-empty list of strings")
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.returncode: int | None = None
        self._clock = clock

    async def __aiter__(self) -> AsyncIterator[Reading]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                env=self.env,
            )
        except OSError as exc:
            log.error("command_failed_to_start", command=self.argv[0], error=exc.strerror)
            self.returncode = None
            return
        assert proc.stdout is not None
        stdout = proc.stdout
        log.info("command_started", command=self.argv[0], pid=proc.pid)
        try:
            async for reading in _readings_from_lines(
                lambda: stdout.read(_CHUNK), f"command:{self.argv[0]}", self._clock
            ):
                yield reading
            self.returncode = await proc.wait()
            level = log.info if self.returncode == 0 else log.warning
            level("command_exited", command=self.argv[0], returncode=self.returncode)
        finally:
            if proc.returncode is None:
                await _stop(proc)
                self.returncode = proc.returncode


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Terminate, then kill if the command does not exit within a few seconds."""
    try:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=3.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    except ProcessLookupError:
        pass


class StdinSource:
    """Reads one JSON reading per line from stdin (or another binary stream).

    Pipes and terminals are read without a thread through the event loop; regular files
    (which an event loop cannot watch) are read in small blocking chunks in a worker thread,
    which never blocks for long on a file.
    """

    def __init__(
        self, stream: BinaryIO | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._stream = stream
        self._clock = clock

    async def __aiter__(self) -> AsyncIterator[Reading]:
        stream = self._stream if self._stream is not None else sys.stdin.buffer
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        transport = None
        read_chunk: ReadChunk
        if _pollable(stream):
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), stream
            )
            read_chunk = lambda: reader.read(_CHUNK)  # noqa: E731
        else:
            read_chunk = lambda: asyncio.to_thread(stream.read, _CHUNK)  # noqa: E731
        try:
            async for reading in _readings_from_lines(read_chunk, "stdin", self._clock):
                yield reading
        finally:
            if transport is not None:
                transport.close()


def _pollable(stream: BinaryIO) -> bool:
    """Can the event loop watch this stream (pipe, socket, terminal) rather than a thread?"""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):  # no file descriptor (e.g. BytesIO)
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return False
    # Some character devices (/dev/null) are refused by epoll: ask a throwaway selector.
    with selectors.DefaultSelector() as probe:
        try:
            probe.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


# --------------------------------------------------------------------------- plugins + registry


class _CheckedSource:
    """Wraps a third-party source: whatever it yields is re-validated, bad items skipped."""

    def __init__(self, inner: Source, name: str) -> None:
        self._inner = inner
        self._name = name

    async def __aiter__(self) -> AsyncIterator[Reading]:
        async for item in self._inner:
            if not isinstance(item, Reading):
                log.warning("reading_skipped", source=self._name, reason="not a Reading")
                continue
            try:
                # Values could have been mutated after construction: validate again.
                yield Reading(type=item.type, values=item.values, time=item.time)
            except ValidationError as exc:
                log.warning("reading_skipped", source=self._name, reason=str(exc))


_TARGET_RE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def _load_target(target: str) -> Callable[..., Any]:
    if not _TARGET_RE.fullmatch(target):
        raise ValidationError("plugin target must look like 'package.module:factory'")
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"plugin module {module_name!r} cannot be imported: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValidationError(f"plugin {target!r} not found") from None
    if not callable(obj):
        raise ValidationError(f"plugin {target!r} is not callable")
    return obj


def _load_entry_point(name: str) -> Callable[..., Any]:
    matches = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not matches:
        raise ValidationError(f"no {ENTRY_POINT_GROUP!r} entry point named {name!r}")
    obj = next(iter(matches)).load()
    if not callable(obj):
        raise ValidationError(f"entry point {name!r} is not callable")
    return obj


def _fields(spec: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = set(spec) - allowed - {"kind"}
    if unknown:
        raise ValidationError(
            f"source {spec['kind']!r}: unknown option(s) {', '.join(sorted(map(str, unknown)))}"
        )
    missing = required - set(spec)
    if missing:
        raise ValidationError(f"source {spec['kind']!r}: missing {', '.join(sorted(missing))}")


def make_source(spec: Mapping[str, Any]) -> Source:
    """Build a source from its config table; ValidationError on anything malformed.

    kinds: `simulated` (sensor, interval_s, count, seed), `command` (argv), `stdin`,
    `plugin` (target "package.module:factory" *or* entry_point NAME, plus `options`, a table
    passed to the factory as keyword arguments).
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("kind"), str):
        raise ValidationError("a source needs a 'kind'")
    kind = spec["kind"]
    if kind == "simulated":
        _fields(spec, {"sensor", "interval_s", "count", "seed"}, set())
        seed = spec.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValidationError("seed must be an integer")
        return SimulatedSensor(
            spec.get("sensor", "temperature"), spec.get("interval_s", 1.0), spec.get("count"),
            seed=seed,
        )
    if kind == "command":
        _fields(spec, {"argv"}, {"argv"})
        return CommandSource(spec["argv"])
    if kind == "stdin":
        _fields(spec, set(), set())
        return StdinSource()
    if kind == "plugin":
        _fields(spec, {"target", "entry_point", "options"}, set())
        if ("target" in spec) == ("entry_point" in spec):
            raise ValidationError("a plugin source needs exactly one of 'target', 'entry_point'")
        options = spec.get("options", {})
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise ValidationError("plugin options must be a table")
        if "target" in spec:
            if not isinstance(spec["target"], str):
                raise ValidationError("plugin target must be a string")
            name, factory = spec["target"], _load_target(spec["target"])
        else:
            if not isinstance(spec["entry_point"], str):
                raise ValidationError("plugin entry_point must be a string")
            name, factory = spec["entry_point"], _load_entry_point(spec["entry_point"])
        try:
            inner = factory(**options)
        except ValidationError:
            raise
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"plugin {name!r} rejected its options: {exc}") from None
        if not isinstance(inner, Source):
            raise ValidationError(f"plugin {name!r} did not return an async iterable")
        return _CheckedSource(inner, f"plugin:{name}")
    raise ValidationError(f"unknown source kind {kind!r} (simulated, command, stdin, plugin)")
