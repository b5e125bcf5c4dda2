"""Fault lab: a real deployment of separate processes that can be killed and counted.

Used by the fault tests (``tests/faults/``) and the soak benchmark (``benchmarks/soak.py``,
which imports this file through ``sys.path``). It builds a deployment in a folder exactly as
a user does, with the CLI (``python -m ciphertwin.cli …`` (the `ciphertwin` command): clients add, operator init, owner
init/register, owner enroll-device, device enroll; ``broker --emit-mosquitto`` for
Mosquitto), and runs each service as its own process in its own session
(``start_new_session=True``): a broker on a free port (the embedded one or ``mosquitto``),
the cloud, and device agents whose source is :mod:`sensor` (a counter at a steady rate).

Why counting is exact: every reading carries a per-device counter ``n`` (the sensor logs
each counter it produces) and every item a per-device outbox ``seq`` (gapless, persisted).
At the end, :meth:`Lab.counts` compares what the sensors produced, what the devices
committed to their outboxes, what the cloud's store holds (sqlite3 on its file) and what the
owner reads back through the history query (``owner history --json``, decrypted and
verified).

    lab = Lab(tmp_path, broker="embedded")
    lab.build()                       # broker, cloud, 3 devices streaming
    lab.broker.kill(); lab.broker.start()
    lab.finish()                      # stop the sensors, wait until everything is stored
    counts = lab.counts()             # lost / duplicated / ...
    assert lab.stop_all() == []       # graceful stop; returns orphan processes
    lab.close()                       # SIGKILL whatever is left (always, in a finally)

Nothing here is secret: passphrases are fixed test values; the cloud password is random.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ports import port_open  # tests/ (pytest puts it on sys.path; soak.py does too)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SENSOR = HERE / "sensor.py"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
TWIN = "plant"
OWNER = "alice"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


# --------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, str]:
    """Fields of /proc/<pid>/status ({} if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def live_processes() -> list[int]:
    """Pids of live (not zombie) processes."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def session_members(sid: int) -> list[int]:
    return [pid for pid in live_processes() if (st := _stat(pid)) and st[2] == sid]


def kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


@dataclass
class Service:
    """One service started again and again as a separate process, in a session of its own.

    Output (stdout and stderr) of every start goes to ``log`` (appended, with a marker line).
    ``sessions`` remembers every session it ever had: all of their processes must be gone
    once the service is stopped or killed (see :meth:`Lab.orphans`).
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    sessions: list[int] = field(default_factory=list)
    started_at: float = 0.0
    ready: Callable[[Service], bool] | None = None
    peak_rss_kb: dict[str, int] = field(default_factory=dict)
    _log_offset: int = 0

    def start(self, wait: float = 30.0) -> None:
        assert not self.alive, f"{self.name} is already running"
        with self.log.open("ab") as out:
            out.write(f"=== start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self._log_offset = out.tell()
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.starts += 1
        self.sessions.append(self.proc.pid)
        self.started_at = time.time()
        if self.ready is not None and wait:
            wait_for(lambda: self.ready(self) or self._died(), wait, f"{self.name} ready")
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output()[-3000:]}")

    def _died(self) -> bool:
        return not self.alive

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive else None  # type: ignore[union-attr]

    def output(self, this_start_only: bool = True) -> str:
        data = self.log.read_bytes()
        return data[self._log_offset if this_start_only else 0:].decode(errors="replace")

    def kill(self, sig: int = signal.SIGKILL, group: bool = False) -> None:
        """Signal the service's main process (a crash: its children are on their own) or,
        with ``group``, its whole process group; reap it."""
        if not self.alive:
            return
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        self.kills += sig == signal.SIGKILL
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; returns the exit status (None if it did not exit in time)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self.proc.returncode

    def members(self) -> list[int]:
        """Live processes of every session this service ever had."""
        return [pid for pid in live_processes() if (st := _stat(pid)) and st[2] in self.sessions]

    def sample_rss(self) -> None:
        """Record the peak resident memory of each live process of the service."""
        for pid in self.members():
            st = proc_status(pid)
            if not st:
                continue
            role = "main" if pid in self.sessions else _role(pid)
            peak = max(kb(st.get("VmHWM")), kb(st.get("VmRSS")))
            self.peak_rss_kb[role] = max(self.peak_rss_kb.get(role, 0), peak)

    def cleanup(self) -> None:
        """SIGKILL every process of every session this service had (teardown)."""
        for sid in self.sessions:
            try:
                os.killpg(sid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.members():  # anything that left the group but kept the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _role(pid: int) -> str:
    cmd = _cmdline(pid)
    if "sensor.py" in cmd:
        return "sensor"
    return "worker"  # a forked child of the service (e.g. the cloud's pool)


# --------------------------------------------------------------------------- counting


@dataclass
class DeviceCounts:
    """Exact counts of one device; see :class:`Counts`."""

    generated: int  # counters the sensor produced (offered to the device)
    committed: int  # items the device committed to its outbox (its last seq)
    pending: int  # items still in the outbox (not acknowledged)
    stored: int  # rows in the cloud's store
    readable: int  # distinct seqs the owner reads back through the history query
    lost: int  # committed seqs not readable, plus counters neither readable nor dropped
    duplicated: int  # extra rows for a (device, seq) or a (device, counter)
    dropped_at_source: int  # produced but never committed: in the pipe when the device died
    unknown: int  # readable items whose counter the sensor never produced (must be 0)


@dataclass
class Counts:
    devices: dict[str, DeviceCounts]

    def total(self, name: str) -> int:
        return sum(getattr(d, name) for d in self.devices.values())

    @property
    def lost(self) -> int:
        return self.total("lost")

    @property
    def duplicated(self) -> int:
        return self.total("duplicated")

    def as_dict(self) -> dict[str, Any]:
        names = DeviceCounts.__dataclass_fields__
        return {**{n: self.total(n) for n in names},
                "per_device": {d: vars(c) for d, c in self.devices.items()}}


def problems(counts: Counts, *, max_dropped_at_source: int = 0) -> list[str]:
    """What is wrong with a run's counts (empty: nothing lost, nothing twice)."""
    out = []
    for d, c in counts.devices.items():
        if c.lost:
            out.append(f"{d}: {c.lost} item(s) lost ({c})")
        if c.duplicated:
            out.append(f"{d}: {c.duplicated} duplicate(s) ({c})")
        if c.unknown:
            out.append(f"{d}: {c.unknown} readable item(s) no sensor produced ({c})")
        if c.pending or c.stored != c.committed or c.readable != c.committed:
            out.append(f"{d}: committed/stored/readable/pending disagree ({c})")
    if counts.total("dropped_at_source") > max_dropped_at_source:
        out.append(f"{counts.total('dropped_at_source')} reading(s) dropped between sensor and "
                   f"outbox (allowed {max_dropped_at_source})")
    return out


def sqlite_rows(path: Path, query: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    """Run a read-only query on a live SQLite file (WAL: does not disturb the writer)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(query, tuple(args)).fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------- the lab


class Lab:
    """A deployment under ``root``: one broker, one cloud, ``devices`` device agents.

    ``broker``: "embedded" (``python -m ciphertwin broker``) or "mosquitto". ``rate``:
    readings per second per device; ``pad``: filler bytes per reading.
    """

    PASSPHRASE = "fault-lab key passphrase"
    BUNDLE_PASSPHRASE = "fault-lab bundle passphrase"

    def __init__(self, root: Path, *, broker: str = "embedded", devices: int = 3,
                 rate: float = 20.0, pad: int = 0, cloud_workers: int = 0) -> None:
        if broker not in ("embedded", "mosquitto"):
            raise ValueError("broker is 'embedded' or 'mosquitto'")
        if broker == "mosquitto" and MOSQUITTO is None:
            raise FileNotFoundError("mosquitto binary not installed")
        self.root = Path(root).resolve()
        self.broker_kind = broker
        self.device_names = [f"d{i + 1}" for i in range(devices)]
        self.rate, self.pad, self.cloud_workers = rate, pad, cloud_workers
        self.port = free_port()
        self.config = self.root / "deployment.toml"
        self.home = self.root / "home"
        self.store_dir = self.root / "store"
        self.store_path = self.store_dir / "cloud.sqlite"
        self.logs = self.root / "logs"
        self.stop_file = self.root / "sensors.stop"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CIPHERTWIN_")},
            "CIPHERTWIN_CONFIG": str(self.config),
            "CIPHERTWIN_HOME": str(self.home),
            "CIPHERTWIN_PASSPHRASE": self.PASSPHRASE,
            "CIPHERTWIN_BUNDLE_PASSPHRASE": self.BUNDLE_PASSPHRASE,
            "CIPHERTWIN_CLOUD_PASSWORD": secrets.token_hex(16),
            "PYTHONUNBUFFERED": "1",
        }
        self.broker: Service
        self.cloud: Service
        self.devices: dict[str, Service] = {}
        self.events: list[tuple[float, str]] = []  # (time, what) for reports

    # -- CLI --------------------------------------------------------------------------
    def cli(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """Run ``python -m ciphertwin.cli ARGS`` to completion; its stdout (raises on failure)."""
        run = subprocess.run([sys.executable, "-m", "ciphertwin.cli", *args], env=self.env,
                             cwd=self.root, input=stdin, capture_output=True, text=True,
                             timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"ciphertwin {' '.join(args)} failed ({run.returncode}):\n"
                               f"{run.stderr[-3000:]}")
        return run.stdout

    def cli_all(self, *commands: list[str], timeout: float = 120) -> None:
        """Run several CLI commands at once (they lock the files they share); raises if one
        fails."""
        procs = [subprocess.Popen([sys.executable, "-m", "ciphertwin.cli", *args],
                                  env=self.env, cwd=self.root, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                 for args in commands]
        errors = []
        for args, proc in zip(commands, procs, strict=True):
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                errors.append(f"ciphertwin {' '.join(args)} failed ({proc.returncode}):\n"
                              f"{err.decode(errors='replace')[-2000:]}")
        if errors:
            raise RuntimeError("\n".join(errors))

    def _service(self, name: str, argv: list[str], ready: Callable[[Service], bool]) -> Service:
        return Service(name, argv, self.env, self.logs / f"{name}.log", self.root, ready=ready)

    def write_config(self) -> None:
        mode = "embedded" if self.broker_kind == "embedded" else "external"
        self.config.write_text(f"""\
[broker]
host = "127.0.0.1"
port = {self.port}
prefix = "ct/v1"
mode = "{mode}"
bind = "127.0.0.1"

[storage]
backend = "sqlite"
sqlite_path = "{self.store_path}"

[principals]
credentials_file = "{self.root / 'var' / 'clients.json'}"

[processing]
operator_key = "{self.home / 'operator' / 'public.key'}"
""")

    def prepare(self) -> None:
        """Deployment file and the principals that exist before any service runs."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.store_dir.mkdir(exist_ok=True)
        self.write_config()
        self.cli("clients", "add", "cloud", "--role", "cloud", "--password-stdin",
                 stdin=self.env["CIPHERTWIN_CLOUD_PASSWORD"] + "\n")
        self.cli_all(["operator", "init", "--name", "operator"],
                     ["owner", "init", "--name", OWNER])
        if self.broker_kind == "embedded":
            argv = [sys.executable, "-m", "ciphertwin.cli", "--log-json", "broker",
                    "--config", str(self.config)]
        else:
            self.emit_mosquitto()
            argv = [str(MOSQUITTO), "-c", str(self.root / "mosquitto" / "mosquitto.conf")]
        self.broker = self._service("broker", argv, lambda s: port_open(self.port))
        self.cloud = self._service("cloud", self.cloud_argv(),
                                   lambda s: "cloud twin running" in s.output())

    def build(self, *, start_devices: bool = True) -> None:
        """Create the deployment with the CLI and start broker, cloud and device agents."""
        self.prepare()
        self.broker.start()
        self.cloud.start()
        self.cli("owner", "register", "--name", OWNER)
        for name in self.device_names:  # one at a time: the owner's control messages are
            # sequenced (the cloud refuses a concurrent one as "stale or replayed")
            self.cli("owner", "enroll-device", "--name", OWNER, "--twin", TWIN,
                     "--device", name, "--out", str(self.root / f"{name}.bundle"),
                     "--source", json.dumps(self.sensor_source(name)))
        if self.broker_kind == "mosquitto":  # the new device logins: emit again, SIGHUP
            self.emit_mosquitto()
            assert self.broker.proc is not None
            self.broker.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        self.cli_all(*(["device", "enroll", str(self.root / f"{n}.bundle"),
                        "--home", str(self.home / n)] for n in self.device_names))
        for name in self.device_names:
            self.devices[name] = self._service(
                name, [sys.executable, "-m", "ciphertwin.cli", "--log-json", "device", "run",
                       "--name", name, "--home", str(self.home / name)],
                lambda s: "waiting in the outbox" in s.output())
        if start_devices:
            self.start_devices(self.devices.values())
        self.event("built")

    def start_devices(self, devices: Iterable[Service], wait: float = 30.0) -> None:
        """Start device agents together, then wait until each is running."""
        devices = list(devices)
        for d in devices:
            d.start(wait=0)
        for d in devices:
            wait_for(lambda d=d: d.ready(d) or not d.alive, wait, f"{d.name} ready")  # type: ignore[misc]
            if not d.alive:
                raise RuntimeError(f"{d.name} exited:\n{d.output()[-3000:]}")

    def emit_mosquitto(self) -> None:
        self.cli("broker", "--emit-mosquitto", str(self.root / "mosquitto"),
                 "--mosquitto-user", "root" if os.geteuid() == 0 else os.environ.get("USER", ""))

    def cloud_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "ciphertwin.cli", "--log-json", "cloud",
                "--config", str(self.config)]
        return argv + (["--workers", str(self.cloud_workers)] if self.cloud_workers else [])

    def sensor_source(self, device: str) -> dict[str, Any]:
        return {"kind": "command", "argv": [
            sys.executable, str(SENSOR), "--log", str(self.sensor_log(device)),
            "--rate", str(self.rate), "--stop", str(self.stop_file), "--pad", str(self.pad)]}

    def sensor_log(self, device: str) -> Path:
        return self.root / f"{device}.sensor"

    @property
    def services(self) -> list[Service]:
        return [s for s in (getattr(self, "broker", None), getattr(self, "cloud", None),
                            *self.devices.values()) if s is not None]

    def event(self, what: str) -> float:
        now = time.time()
        self.events.append((now, what))
        return now

    # -- faults -----------------------------------------------------------------------
    def outage(self, service: Service, seconds: float) -> float:
        """SIGKILL ``service``, keep it down ``seconds``, start it again; returns the time
        it was back (ready)."""
        service.kill()
        self.event(f"{service.name} killed")
        time.sleep(seconds)
        service.start()
        return self.event(f"{service.name} back")

    # -- observing --------------------------------------------------------------------
    def stored_rows(self) -> list[tuple[str, int, float]]:
        """(device, seq, stored_at) of every row in the cloud's store."""
        if not self.store_path.exists():
            return []
        return sqlite_rows(self.store_path, "SELECT device, seq, stored_at FROM envelopes")

    def stored_count(self, device: str | None = None, since: float = 0.0) -> int:
        q = "SELECT COUNT(*) FROM envelopes WHERE stored_at >= ?"
        args: list[Any] = [since]
        if device is not None:
            q += " AND device = ?"
            args.append(device)
        return int(sqlite_rows(self.store_path, q, args)[0][0])

    def first_stored_after(self, t: float) -> dict[str, float | None]:
        """Per device, how long after ``t`` its first item was stored (None: none yet)."""
        rows = sqlite_rows(self.store_path, "SELECT device, MIN(stored_at) FROM envelopes "
                           "WHERE stored_at >= ? GROUP BY device", [t])
        found = {d: m - t for d, m in rows}
        return {d: found.get(d) for d in self.device_names}

    def wait_resumed(self, t: float, timeout: float) -> dict[str, float]:
        """Wait until every device has an item stored after ``t``; their delays."""
        def check() -> dict[str, float] | None:
            delays = self.first_stored_after(t)
            return None if any(v is None for v in delays.values()) else delays  # type: ignore[return-value]
        try:
            return wait_for(check, timeout, "every device resumed", step=0.2)
        except TimeoutError:
            got = self.first_stored_after(t)
            raise TimeoutError(f"devices did not resume within {timeout:.0f} s of "
                               f"t={t:.3f}: {got}") from None

    def outbox(self, device: str) -> tuple[int, int]:
        """(last seq committed, items pending) of a device's outbox (0, 0 if none yet)."""
        path = self.home / device / "outbox.db"
        if not path.exists():
            return 0, 0
        (next_seq,), = sqlite_rows(path, "SELECT next_seq FROM outbox_meta")
        (pending,), = sqlite_rows(path, "SELECT COUNT(*) FROM outbox_items")
        return int(next_seq) - 1, int(pending)

    def generated(self, device: str) -> list[int]:
        """Counters the sensor of ``device`` delivered into its pipe (``!n``: refused)."""
        try:
            words = self.sensor_log(device).read_text().split()
        except FileNotFoundError:
            return []
        refused = {w[1:] for w in words if w.startswith("!")}
        return [int(w) for w in words if not w.startswith("!") and w not in refused]

    def finish(self, timeout: float = 60.0) -> None:
        """Stop the sensors and wait until every committed item is stored and acknowledged."""
        self.stop_file.touch()
        self.event("sensors stopped")
        time.sleep(1.0 / self.rate + 0.5)  # the sensors notice, the devices read to the end

        def drained() -> bool:
            for d in self.device_names:
                committed, pending = self.outbox(d)
                if pending or self.stored_count(d) < committed:
                    return False
            return True
        try:
            wait_for(drained, timeout, "outboxes drained", step=0.25)
        except TimeoutError:
            state = {d: self.outbox(d) + (self.stored_count(d),) for d in self.device_names}
            raise TimeoutError(f"not drained within {timeout:.0f} s; per device (committed, "
                               f"pending, stored): {state}") from None
        self.event("drained")

    def history(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every item of the twin (with a reading time >= ``since``, if given), read back by
        the owner (``owner history --json``)."""
        from datetime import datetime

        extra = ["--since", datetime.fromtimestamp(since).isoformat()] if since else []
        out = self.cli("owner", "history", "--name", OWNER, TWIN, "--json", *extra)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def counts(self) -> Counts:
        """Exact per-device accounting: sensors vs outboxes vs store vs history."""
        history = self.history()
        by_device: dict[str, list[dict[str, Any]]] = {d: [] for d in self.device_names}
        for row in history:
            by_device.setdefault(row["device"], []).append(row)
        stored = Counter(d for d, _, _ in self.stored_rows())
        store_dups = sqlite_rows(self.store_path, "SELECT device, COUNT(*) - COUNT(DISTINCT seq) "
                                 "FROM envelopes GROUP BY device")
        store_dup = {d: int(n) for d, n in store_dups}
        result = {}
        for d in self.device_names:
            rows = by_device[d]
            gen = set(self.generated(d))
            committed, pending = self.outbox(d)
            seqs = Counter(int(r["seq"]) for r in rows)
            counters = Counter(int(r["values"]["n"]) for r in rows)
            readable_seqs = {s for s in seqs if 1 <= s <= committed}
            lost_committed = committed - len(readable_seqs)
            missing_counters = gen - set(counters)
            # counters produced but never committed: at most the device's intake when it died
            dropped = max(0, len(gen) - committed)
            lost = max(lost_committed, len(missing_counters) - dropped)
            dup = (sum(n - 1 for n in seqs.values()) + sum(n - 1 for n in counters.values())
                   + store_dup.get(d, 0))
            result[d] = DeviceCounts(
                generated=len(gen), committed=committed, pending=pending,
                stored=stored.get(d, 0), readable=len(seqs), lost=lost, duplicated=dup,
                dropped_at_source=dropped, unknown=len(set(counters) - gen))
        return Counts(result)

    def stream(self, seconds: float, every: float = 0.5) -> None:
        """Let the devices stream for ``seconds``, sampling memory meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sample_rss()
            time.sleep(min(every, left))

    # -- processes --------------------------------------------------------------------
    def sample_rss(self) -> None:
        for s in self.services:
            s.sample_rss()

    def rss_kb(self, service: Service) -> int:
        """Current resident memory of a service's main process (0 if not running)."""
        return kb(proc_status(service.pid).get("VmRSS")) if service.pid else 0

    def orphans(self, exclude_running: bool = True) -> list[str]:
        """Processes that outlive their service: members of a session whose service main
        process is gone (all sessions but the running one, with ``exclude_running``), and
        any process with this lab's folder on its command line that is not a running
        service's member. Each as "pid cmdline"."""
        running: set[int] = set()
        if exclude_running:
            for s in self.services:
                if s.alive:
                    running.update(s.members())
        sids = {sid for s in self.services for sid in s.sessions}
        out = []
        me = os.getpid()
        for pid in live_processes():
            if pid == me or pid in running:
                continue
            st = _stat(pid)
            cmd = _cmdline(pid)
            if st and (st[2] in sids or f"{self.root}/" in cmd):
                out.append(f"{pid} (ppid {st[1]}, sid {st[2]}) {cmd[:200]}")
        return out

    def wait_no_orphans(self, timeout: float = 5.0) -> list[str]:
        """Orphans still there after ``timeout`` seconds (a dying process needs a moment)."""
        try:
            wait_for(lambda: not self.orphans(), timeout, "orphans gone", step=0.2)
        except TimeoutError:
            pass
        return self.orphans()

    def stop_all(self, timeout: float = 15.0) -> list[str]:
        """Stop every service gracefully (devices, cloud, broker: SIGTERM); return the
        processes that outlive them (must be none) and exit statuses that are not 0."""
        problems = []
        for s in [*self.devices.values(), getattr(self, "cloud", None),
                  getattr(self, "broker", None)]:
            if s is None or not s.alive:
                continue
            rc = s.stop(timeout)
            if rc is None:
                problems.append(f"{s.name} did not exit within {timeout:.0f} s of SIGTERM")
        self.event("stopped")
        return problems + self.wait_no_orphans()

    def close(self) -> None:
        """Kill everything this lab started (teardown; always safe to call)."""
        for s in self.services:
            s.cleanup()
        for pid in live_processes():  # anything with our folder in its command line
            if pid != os.getpid() and f"{self.root}/" in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_events(self, service: Service, event: str) -> list[dict[str, Any]]:
        """JSON log lines of ``service`` (all its starts) whose event is ``event``."""
        out = []
        for line in service.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("event") == event:
                    out.append(obj)
        return out


# --------------------------------------------------------------------------- stalled client


def _mqtt_string(s: str) -> bytes:
    data = s.encode()
    return len(data).to_bytes(2, "big") + data


def _mqtt_packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def stalled_subscriber(lab: Lab, topic_filter: str, *, keepalive: int = 10, qos: int = 0,
                       principal: str = OWNER) -> socket.socket:
    """A raw MQTT 3.1.1 client of ``principal`` (its own broker login) that subscribes to
    ``topic_filter`` and then never reads again (nor pings): what a hung or malicious
    subscriber looks like to the broker. Its receive buffer is made small so the broker,
    not the kernel, has to hold what it cannot deliver; QoS 0 (default) asks the broker to
    write without waiting for acknowledgements. Close the socket to end it."""
    login = json.loads((lab.home / principal / "broker.secret").read_text())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", lab.port))
    body = (_mqtt_string("MQTT") + bytes([4, 0xC2]) + keepalive.to_bytes(2, "big")
            + _mqtt_string(f"{principal}@stalled{secrets.token_hex(6)}")
            + _mqtt_string(login["username"]) + _mqtt_string(login["password"]))
    sock.sendall(_mqtt_packet(0x10, body))
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise RuntimeError(f"stalled subscriber: CONNECT refused ({connack.hex()})")
    sock.sendall(_mqtt_packet(0x82, (1).to_bytes(2, "big") + _mqtt_string(topic_filter)
                              + bytes([qos])))
    return sock


# --------------------------------------------------------------------------- scenarios

RESUME_TARGET_S = 5.0  # a device sends again at most this long after the broker returns


def utc_seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


def reconnect_delays(lab: Lab, after: float) -> dict[str, float | None]:
    """Per device: seconds from ``after`` to its first ``bus.reconnected`` log line."""
    out: dict[str, float | None] = {}
    for name, dev in lab.devices.items():
        times = [utc_seconds(e["timestamp"]) for e in lab.log_events(dev, "bus.reconnected")]
        later = [t - after for t in times if t >= after]
        out[name] = round(min(later), 3) if later else None
    return out


def still_sending(lab: Lab, window: float = 2.0) -> list[str]:
    """Devices with nothing stored in the last ``window`` seconds (should be none)."""
    since = time.time() - window
    return [d for d in lab.device_names if lab.stored_count(d, since=since) == 0]


def service_outage(lab: Lab, service: Service, seconds: float, *,
                   resume_timeout: float = 20.0) -> tuple[float, dict[str, float]]:
    """SIGKILL ``service``, restart it after ``seconds``, wait until every device has an
    item stored again; returns (time it was back, per-device resume delay)."""
    back = lab.outage(service, seconds)
    return back, lab.wait_resumed(back, resume_timeout)
