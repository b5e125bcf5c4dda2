"""Service processes as a supervisor sees them: real `ciphertwin cloud` / `ciphertwin node`
processes against a real broker process, their worker processes found with psutil.

* workers never outlive their service: not after SIGKILL (then no process may keep a
  connection to the broker either), not after SIGTERM, and SIGTERM/SIGINT to the service's
  process group ends everything with exit code 0;
* a worker holds no socket and ignores no SIGTERM;
* a cloud whose store cannot be opened — or is lost while running — exits non-zero within
  10 s with a one-line error, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from ports import wait_for_port

from ciphertwin.agents.cli import BROKER_SECRET
from ciphertwin.agents.identity import Identity, save_identity, write_private_file
from ciphertwin.broker.embedded import free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.cloud_twin.reencryption import ReencryptionPool
from ciphertwin.cloud_twin.service import CloudTwin
from ciphertwin.cloud_twin.store import SqliteTwinStore, StoreUnavailable
from ciphertwin.cloud_twin.store_watch import watch_store
from ciphertwin.config import Principal
from ciphertwin.config.principals import add_client
from ciphertwin.crypto.passwords import Argon2Params
from ciphertwin.workers import worker_pool

PASSPHRASE = "test passphrase for node keys"
CLOUD_PASSWORD = "pw-cloud-0123456789abcdef"
PG = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class World:
    """A deployment (files in ``root``) and its broker process."""

    root: Path
    config: Path
    port: int
    broker: subprocess.Popen[bytes]
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "CIPHERTWIN_CONFIG": str(self.config),
                "CIPHERTWIN_CLOUD_PASSWORD": CLOUD_PASSWORD,
                "CIPHERTWIN_PASSPHRASE": PASSPHRASE, **extra}

    def start(self, *argv: str, **env: str) -> subprocess.Popen[str]:
        """A `ciphertwin` process in its own process group (as a supervisor starts one)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "ciphertwin.cli", "--log-level", "WARNING", *argv],
            env=self.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self.procs.append(proc)
        return proc

    def cloud(self, store: Path | None = None, **env: str) -> subprocess.Popen[str]:
        path = store or self.root / f"cloud-{os.urandom(4).hex()}.sqlite"
        return self.start("cloud", "--workers", "2", CIPHERTWIN_STORAGE__SQLITE_PATH=str(path),
                          **env)

    def clients_of_broker(self) -> list[tuple[int | None, str]]:
        """(pid, local address) of every TCP connection to the broker's port (client side)."""
        return [(c.pid, f"{c.laddr.ip}:{c.laddr.port}")
                for c in psutil.net_connections("tcp")
                if c.raddr and c.raddr.port == self.port
                and c.status == psutil.CONN_ESTABLISHED]



@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("procs")
    port = free_port()
    credentials = root / "clients.json"
    operator = Identity.generate("operator", "operator")
    save_identity(operator, root / "operator", None, allow_plaintext=True)
    config = root / "deployment.toml"
    config.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nmode = "embedded"\n'
        f'prefix = "ct/procs{os.urandom(2).hex()}"\n'
        f'[storage]\nbackend = "sqlite"\nsqlite_path = "{root / "cloud.sqlite"}"\n'
        f'[principals]\ncredentials_file = "{credentials}"\nhash_iterations = 1000\n'
        f'[processing]\noperator_key = "{root / "operator" / "public.key"}"\n')
    add_client(credentials, Principal.create("cloud", "cloud", CLOUD_PASSWORD, iterations=1000))
    node = Identity.generate("node0", "node")
    save_identity(node, root / "node0", PASSPHRASE, Argon2Params(memory_kib=64, iterations=1,
                                                                 lanes=1))
    node_password = "pw-node0-0123456789abcdef"
    add_client(credentials, Principal.create("node0", "node", node_password, iterations=1000))
    write_private_file(root / "node0" / BROKER_SECRET,
                       json.dumps({"username": "node0", "password": node_password}).encode())
    broker = subprocess.Popen([sys.executable, "-m", "ciphertwin.cli", "--log-level", "WARNING",
                               "broker", "--config", str(config)])
    w = World(root, config, port, broker)
    try:
        wait_for_port(port, broker)
        yield w
    finally:
        for proc in [*w.procs, broker]:
            _kill_tree(proc.pid)
            proc.wait(10)


def _kill_tree(pid: int) -> None:
    """Test clean-up: whatever the test left running (only processes it started)."""
    try:
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


def _wait_line(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
    """Wait until ``proc`` prints a line containing ``text`` (its stdout)."""
    found = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        proc.kill()
        raise AssertionError(f"no {text!r} within {timeout} s; stdout {lines!r}, "
                             f"stderr {proc.stderr.read()[-3000:]!r}")  # type: ignore[union-attr]


def _descendants(proc: subprocess.Popen[str], at_least: int) -> list[psutil.Process]:
    """The service's worker processes (every descendant); at least ``at_least`` of them."""
    deadline = time.monotonic() + 10
    before: set[int] = set()
    while True:  # until the set is stable: a process may be starting or ending right now
        found = psutil.Process(proc.pid).children(recursive=True)
        pids = {p.pid for p in found}
        if (len(found) >= at_least and pids == before) or time.monotonic() > deadline:
            break
        before = pids
        time.sleep(0.3)
    assert len(found) >= at_least, f"expected >= {at_least} worker processes, found {found}"
    return found


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _all_gone(procs: list[psutil.Process], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(procs)
    assert not left, f"still running {timeout} s later: {[(p.pid, p.ppid()) for p in left]}"


def _running_cloud(world: World) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    cloud = world.cloud()
    _wait_line(cloud, "cloud twin running")
    # two workers, plus the fork server they come from
    return cloud, _descendants(cloud, at_least=2)


def test_cloud_sigkill_leaves_no_worker_and_no_broker_connection(world: World) -> None:
    cloud, workers = _running_cloud(world)
    deadline = time.monotonic() + 5  # psutil may catch a connection between its states
    while not (clients := {pid for pid, _ in world.clients_of_broker()}) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    # a shared socket shows one pid (None: psutil could not tell whose it is)
    assert clients and clients <= {cloud.pid, *(w.pid for w in workers)}, (
        clients, cloud.pid, [w.pid for w in workers])
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):  # one that is gone holds nothing
            assert not w.net_connections("inet"), f"worker {w.pid} holds a network socket"
    cloud.kill()
    cloud.wait(5)
    _all_gone(workers)
    deadline = time.monotonic() + 5
    while world.clients_of_broker() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert world.clients_of_broker() == [], "a process still holds a connection to the broker"


def test_cloud_sigterm_exits_0_and_stops_its_workers(world: World) -> None:
    cloud, workers = _running_cloud(world)
    cloud.send_signal(signal.SIGTERM)
    assert cloud.wait(15) == 0, cloud.stderr.read()[-3000:]  # type: ignore[union-attr]
    _all_gone(workers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_cloud_process_group_ends_all_of_it(world: World, sig: int) -> None:
    """What a supervisor (or Ctrl-C in a terminal) does: signal the whole group."""
    cloud, workers = _running_cloud(world)
    os.killpg(cloud.pid, sig)
    assert cloud.wait(15) == 0
    _all_gone(workers)
    assert "Traceback" not in cloud.stderr.read()  # type: ignore[union-attr]


def test_a_worker_dies_of_sigterm(world: World) -> None:
    """Workers do not inherit the service's handlers: SIGTERM ends a worker like any process
    (a forked worker ignored it, and passed it on to the cloud through the inherited asyncio
    signal wakeup fd)."""
    cloud, workers = _running_cloud(world)
    # pool workers: children of the fork server (itself a child of the cloud), or of the
    # cloud itself when forked from it
    worker = next((w for w in workers if w.ppid() != cloud.pid), workers[0])
    worker.send_signal(signal.SIGTERM)
    _all_gone([worker], timeout=3)
    time.sleep(0.5)
    assert cloud.poll() is None, "the worker's SIGTERM reached the cloud and stopped it"
    cloud.send_signal(signal.SIGTERM)
    cloud.wait(15)
    _all_gone(workers)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_node_stops_with_its_workers(world: World, how: str) -> None:
    node = world.start("node", "--name", "node0", "--home", str(world.root / "node0"),
                       "--index", "0", "--workers", "2")
    _wait_line(node, "running")
    workers = _descendants(node, at_least=2)
    if how == "sigterm":
        node.send_signal(signal.SIGTERM)
        assert node.wait(15) == 0, node.stderr.read()[-3000:]  # type: ignore[union-attr]
    else:
        node.kill()
        node.wait(5)
    _all_gone(workers)


def test_pool_workers_start_clean_and_are_replaced_when_one_dies() -> None:
    """In-process: signals reset in the workers; a killed worker breaks nothing for good."""
    pool = worker_pool(2)
    try:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert pool.submit(signal.getsignal, signal.SIGTERM).result() == signal.SIG_DFL
        os.kill(pool.submit(os.getpid).result(), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool.restarts == 0:  # the pool notices, tasks in flight fail, new workers start
            assert time.monotonic() < deadline, "the pool never replaced its workers"
            with contextlib.suppress(BrokenProcessPool):
                pool.submit(os.getpid).result(timeout=10)
            time.sleep(0.05)
        assert psutil.pid_exists(pool.submit(os.getpid).result(timeout=10))
        assert pool.restarts == 1
    finally:
        pool.shutdown()


# -- a store that cannot be opened, or is lost -----------------------------------------------
def _assert_fails_promptly(proc: subprocess.Popen[str], message: str) -> str:
    start = time.monotonic()
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError("still running 10 s later (hangs instead of exiting)") from None
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert code != 0, err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("ciphertwin: error:")]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert time.monotonic() - start < 10
    return err


def _store_cases(root: Path) -> dict[str, Path]:
    directory = root / "a-directory.sqlite"
    directory.mkdir(exist_ok=True)
    not_a_db = root / "not-a-database.sqlite"
    not_a_db.write_bytes(os.urandom(8192))
    under_a_file = root / "plain-file"
    under_a_file.write_text("x")
    return {"path is a directory": directory, "file is not a database": not_a_db,
            "parent is a file": under_a_file / "cloud.sqlite"}


@pytest.mark.parametrize("case", ["path is a directory", "file is not a database",
                                  "parent is a file"])
def test_cloud_with_unopenable_sqlite_store_exits_nonzero(world: World, case: str) -> None:
    cloud = world.cloud(_store_cases(world.root)[case])
    _assert_fails_promptly(cloud, "cannot open the store")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung database server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["unknown role", "nothing listening", "server never answers"])
def test_cloud_with_unopenable_postgres_store_exits_nonzero(
    world: World, case: str, silent_server: int
) -> None:
    dsn = {"unknown role": "postgresql://no_such_role_ct:secret@127.0.0.1:5432/test",
           "nothing listening": f"postgresql://postgres@127.0.0.1:{free_port()}/test",
           "server never answers": f"postgresql://postgres@127.0.0.1:{silent_server}/test"}[case]
    cloud = world.cloud(CIPHERTWIN_STORAGE__BACKEND="postgres",
                        CIPHERTWIN_STORAGE__POSTGRES_DSN=dsn)
    err = _assert_fails_promptly(cloud, "cannot open the PostgreSQL store")
    assert "secret" not in err  # the DSN's password is never shown


def test_unopenable_store_fails_promptly_even_without_a_broker(world: World) -> None:
    """The store is opened before the broker is looked for: no waiting on a reconnect loop."""
    cloud = world.cloud(_store_cases(world.root)["path is a directory"],
                        CIPHERTWIN_BROKER__PORT=str(free_port()))
    _assert_fails_promptly(cloud, "cannot open the store")


async def test_cloud_that_fails_to_start_stops_what_it_started(tmp_path: Path) -> None:
    """In-process: the worker pool is shut down and no store thread is left (either would
    keep a process from exiting)."""
    bad = tmp_path / "not-a-database.sqlite"
    bad.write_bytes(os.urandom(8192))
    before = set(threading.enumerate())
    pool = ReencryptionPool(1)
    bus = BusClient("127.0.0.1", free_port(), client_id="never-connected")
    with pytest.raises(StoreUnavailable):
        async with CloudTwin(bus, SqliteTwinStore(bad), pool=pool):
            pass
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.executor.submit(os.getpid)
    await asyncio.sleep(0.2)  # the store's thread ends after its last queued call
    left = [t for t in set(threading.enumerate()) - before if not t.daemon and t.is_alive()
            and not t.name.startswith("asyncio_")]  # the loop's own executor: asyncio.run ends it
    assert not left, left


async def test_store_watch_gives_a_failing_store_a_grace_period(tmp_path: Path) -> None:
    """Failed checks are tolerated for ``grace_s`` (a database restart), then end the watch."""
    store = SqliteTwinStore(tmp_path / "c.sqlite")
    await store.open()
    watch = asyncio.create_task(watch_store(store, interval_s=0.05, grace_s=0.5))
    await asyncio.sleep(0.3)
    assert not watch.done()  # healthy
    await store.close()  # from now on every check fails
    await asyncio.sleep(0.3)
    assert not watch.done()  # failing, within the grace period
    with pytest.raises(StoreUnavailable, match="failed every check"):
        await asyncio.wait_for(watch, 2)


def test_cloud_exits_nonzero_when_its_store_file_is_deleted(world: World) -> None:
    store = world.root / "deleted-later.sqlite"
    cloud = world.cloud(store)
    _wait_line(cloud, "cloud twin running")
    workers = _descendants(cloud, at_least=2)
    store.unlink()
    _assert_fails_promptly(cloud, "was deleted or replaced")
    _all_gone(workers)
