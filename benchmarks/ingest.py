"""Ingest throughput: envelopes per second stored (committed and acknowledged) by ONE cloud
process, fed by many simulated devices, over the embedded amqtt broker and over Mosquitto.

The cloud runs as its own process (`ciphertwin cloud`), the embedded broker too
(`ciphertwin broker`); this process plays the devices. Items are sealed and signed in advance
(device cost is not what is measured), then every device publishes with a window of
unacknowledged items, as the real device agent does. The clock runs from the first publish
to the last acknowledgement — an ack is sent only after the SQLite commit.

All processes share the machine's cores, so the devices must be cheap: by default each one is
a minimal MQTT 3.1.1 connection writing pre-built PUBLISH packets (``--devices-via raw``);
``--devices-via bus`` uses the full ``BusClient`` instead (several times the CPU per item).
The result lists the CPU seconds of every process involved, so it shows who was busy.

    python benchmarks/ingest.py [--items 20000] [--devices 10] [--window 80]
                                [--devices-via raw|bus] [--pool-workers 0] [--json]

Set CT_PROFILE=1 to write cProfile output of the cloud and broker to /tmp/prof-*.out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ciphertwin.agents.identity import Identity
from ciphertwin.agents.owner import OwnerAgent
from ciphertwin.broker.embedded import free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.bus.topics import Topics
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.log import configure_logging
from ciphertwin.protocol.items import DeviceCredentials, build_item

TARGETS = {"amqtt": (1000, 5000), "mosquitto": (2000, 5000)}  # (must, aim) envelopes/s


def _deployment(root: Path, port: int, prefix: str) -> Path:
    """Deployment file; the operator key (mandatory for the cloud) is a fresh public key."""
    operator = Identity.generate("operator", "operator")
    (root / "operator.key").write_bytes(operator.public.to_bytes())
    path = root / "deployment.toml"
    path.write_text(f'[broker]\nport = {port}\nprefix = "{prefix}"\nopen = true\n'
                    f'[storage]\nsqlite_path = "cloud.sqlite"\n'
                    f'[principals]\ncredentials_file = "clients.json"\n'
                    f'[processing]\noperator_key = "operator.key"\n')
    return path


def _spawn(log_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start a ``ciphertwin`` service; its warnings go to a file (an unread pipe could fill
    up and stall it)."""
    prof = ["-m", "cProfile", "-o", f"/tmp/prof-{args[0]}.out"] if os.environ.get("CT_PROFILE") else []
    with (log_dir / f"{args[0]}.log").open("wb") as log:
        return subprocess.Popen([sys.executable, *prof, "-m", "ciphertwin.cli", "--log-level",
                                 "WARNING", *args], stdout=subprocess.DEVNULL, stderr=log)


async def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            await asyncio.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), to show who was busy."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, IndexError, ValueError):
        return float("nan")


def _prepare(owner: Identity, devices: int, per_device: int) -> list[tuple[str, str, list[bytes]]]:
    now = time.time()
    work = []
    for d in range(devices):
        twin, name, sk = f"twin{d}", f"dev{d}", SigningKey.generate()
        token = issue_write_token(owner.signing, twin, sk.verify_key, [f"twin:{twin}", "type:*"],
                                  device=name, valid_for_s=3600)
        creds = DeviceCredentials(twin, name, sk, token.to_bytes())
        keys = DataKeyManager(owner.pre.public)
        items = [build_item(creds, keys, seq, {"type": "temperature", "values": {"c": seq},
                                              "time": now}, (f"twin:{twin}", "type:temperature"))
                 for seq in range(1, per_device + 1)]
        work.append((twin, name, items))
    return work


async def _device(host: str, port: int, prefix: str, twin: str, name: str,
                  items: list[bytes], window: int, first: list[float]) -> float:
    acked: set[int] = set()
    room = asyncio.Semaphore(window)
    done = asyncio.Event()

    async def on_ack(topic: str, payload: bytes, retain: bool) -> None:
        for seq in decode(payload, "ack")["seqs"]:
            if seq not in acked:
                acked.add(seq)
                room.release()
        if len(acked) == len(items):
            done.set()

    async with BusClient(host, port, client_id=f"{name}-{secrets.token_hex(3)}",
                         prefix=prefix) as bus:
        await bus.subscribe(bus.topics.ack(twin, name), on_ack)
        topic = bus.topics.twin_data(twin)
        if not first:
            first.append(time.perf_counter())
        sends = []
        for payload in items:  # publishes overlap; the window bounds what is unacknowledged
            await room.acquire()
            sends.append(asyncio.create_task(bus.publish(topic, payload)))
        await asyncio.gather(*sends)
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter()


def _varint(n: int) -> bytes:
    """MQTT "remaining length" encoding."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _publish_packets(topic: str, payloads: list[bytes]) -> list[bytes]:
    """QoS 1 PUBLISH packets, packet id i + 1 for the i-th payload (ids are never reused)."""
    if len(payloads) > 65_000:
        raise ValueError("at most 65 000 items per device (MQTT packet ids)")
    head = _mqtt_str(topic)
    return [_packet(0x32, head + (i + 1).to_bytes(2, "big") + p) for i, p in enumerate(payloads)]


RESEND_AFTER = 5.0
"""Seconds without any new ack after which a device sends its unacknowledged items again
(as the device agent does): a broker may drop QoS 1 messages to a subscriber whose queue is
full — Mosquitto's default ``max_queued_messages`` is 1 000, less than 10 devices × 256."""


class RawDevice(asyncio.Protocol):
    """One device as a bare MQTT 3.1.1 connection: pre-built publishes, a window of items the
    cloud has not acknowledged yet, PUBACKs for the cloud's QoS 1 acks. No task per item."""

    def __init__(self, client_id: str, ack_topic: str, packets: list[bytes], window: int,
                 first: list[float]) -> None:
        self.client_id, self.ack_topic = client_id, ack_topic
        self.packets, self.window, self.first = packets, window, first
        self.sent = 0
        self.acked: set[int] = set()
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.resent = 0
        self._acked_before = -1
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        connect = b"\x00\x04MQTT\x04\x02" + (600).to_bytes(2, "big") + _mqtt_str(self.client_id)
        subscribe = (1).to_bytes(2, "big") + _mqtt_str(self.ack_topic) + b"\x01"
        transport.write(_packet(0x10, connect) + _packet(0x82, subscribe))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.subscribed, self.done):
            if not fut.done():
                fut.set_exception(ConnectionError(f"{self.client_id}: connection lost ({exc})"))

    def start(self) -> None:
        if not self.first:
            self.first.append(time.perf_counter())
        self._send_up_to(self.window)
        self._watch()

    def _watch(self) -> None:
        """Every RESEND_AFTER seconds: no progress since the last look → resend (DUP)."""
        if self.done.done() or self.transport is None:
            return
        if len(self.acked) == self._acked_before:
            missing = [i for i in range(self.sent) if i + 1 not in self.acked]
            self.transport.write(b"".join(b"\x3a" + self.packets[i][1:] for i in missing))
            self.resent += len(missing)
        self._acked_before = len(self.acked)
        self._timer = asyncio.get_running_loop().call_later(RESEND_AFTER, self._watch)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def _send_up_to(self, limit: int) -> None:
        end = min(limit, len(self.packets))
        if end > self.sent and self.transport is not None:
            self.transport.write(b"".join(self.packets[self.sent : end]))
            self.sent = end

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            packet = self._next_packet()
            if packet is None:
                return
            self._handle(*packet)

    def _next_packet(self) -> tuple[int, bytes] | None:
        buf, length, mult, i = self._buf, 0, 1, 1
        while True:
            if i >= len(buf):
                return None
            length += (buf[i] & 0x7F) * mult
            mult <<= 7
            i += 1
            if not buf[i - 1] & 0x80:
                break
        if len(buf) < i + length:
            return None
        first, body = buf[0], bytes(buf[i : i + length])
        del buf[: i + length]
        return first, body

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 9 and not self.subscribed.done():  # SUBACK
            self.subscribed.set_result(None)
        elif kind == 3:  # PUBLISH from the cloud: an ack
            n = int.from_bytes(body[:2], "big")
            rest = body[2 + n :]
            if (first >> 1) & 3:
                assert self.transport is not None
                self.transport.write(b"\x40\x02" + rest[:2])  # PUBACK
                rest = rest[2:]
            self._on_ack(rest)

    def _on_ack(self, payload: bytes) -> None:
        before = len(self.acked)
        self.acked.update(decode(payload, "ack")["seqs"])
        if len(self.acked) > before:
            self._send_up_to(len(self.acked) + self.window)
        if len(self.acked) == len(self.packets) and not self.done.done():
            self.done.set_result(time.perf_counter())


async def _raw_devices(port: int, prefix: str, work: list[tuple[str, str, list[bytes]]],
                       window: int, first: list[float]) -> list[float]:
    loop = asyncio.get_running_loop()
    topics = Topics(prefix)
    devices: list[RawDevice] = []
    for twin, name, items in work:
        packets = _publish_packets(topics.twin_data(twin), items)
        _, dev = await loop.create_connection(
            lambda: RawDevice(f"{name}-{secrets.token_hex(3)}", topics.ack(twin, name),
                              packets, window, first),  # noqa: B023 - awaited at once
            "127.0.0.1", port)
        devices.append(dev)
    await asyncio.wait_for(asyncio.gather(*(d.subscribed for d in devices)), 30)
    for d in devices:
        d.start()
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(d.done for d in devices)), 300))
    finally:
        for d in devices:
            d.stop()
        if any(d.resent for d in devices):
            print(f"note: {sum(d.resent for d in devices)} items sent again after "
                  f"{RESEND_AFTER:.0f} s without progress (the broker dropped them)",
                  file=sys.stderr)


async def _bus_devices(port: int, prefix: str, work: list[tuple[str, str, list[bytes]]],
                       window: int, first: list[float]) -> list[float]:
    return list(await asyncio.gather(*(
        _device("127.0.0.1", port, prefix, twin, name, payloads, window, first)
        for twin, name, payloads in work)))


def _descendant_pids(pid: int) -> list[int]:
    """Every process under ``pid``: the cloud's pool workers (children of its fork server)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parent_of.items() if p in frontier]
        out += children
        frontier = children
    return out


def _show_logs(root: Path, lines: int = 20) -> None:
    """The services' last warnings, when a run fails (their files go with the temp dir)."""
    for log in sorted(root.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log.name} (last {len(tail)} lines)", *tail, sep="\n", file=sys.stderr)


def _pids_named(name: str) -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                pids.append(int(comm.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def _cpu_snapshot(broker: str, procs: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds so far of every process taking part (this one = the devices)."""
    cloud = procs[-1].pid
    brokers = [procs[0].pid] if broker == "amqtt" else _pids_named("mosquitto")
    return {"cloud": _cpu_seconds(cloud),
            "cloud_pool": sum(_cpu_seconds(p) for p in _descendant_pids(cloud)),
            "broker": sum(_cpu_seconds(p) for p in brokers),
            "devices": round(time.process_time(), 2)}


async def run(broker: str, items: int, devices: int, window: int, via: str = "raw",
              pool_workers: int = 0) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ct-ingest-") as tmp:
        root = Path(tmp)
        prefix = f"bench-{secrets.token_hex(4)}/v1"
        port = 1883 if broker == "mosquitto" else free_port()
        config = _deployment(root, port, prefix)
        procs = []
        if broker == "amqtt":
            procs.append(_spawn(root, "broker", "--config", str(config)))
        try:
            await _wait_port(port)
            procs.append(_spawn(root, "cloud", "--config", str(config), "--workers", str(pool_workers)))
            owner = Identity.generate("owner", "owner")
            work = _prepare(owner, devices, items // devices)
            async with BusClient("127.0.0.1", port, client_id=f"owner-{secrets.token_hex(3)}",
                                 prefix=prefix, connect_timeout=30) as bus:
                for _ in range(100):  # the cloud needs a moment to subscribe
                    try:
                        await OwnerAgent(owner, bus).register()
                        break
                    except Exception:  # noqa: BLE001 - retry until the cloud answers
                        await asyncio.sleep(0.2)
            first: list[float] = []
            before = _cpu_snapshot(broker, procs)
            drive = _raw_devices if via == "raw" else _bus_devices
            ends = await drive(port, prefix, work, window, first)
            after = _cpu_snapshot(broker, procs)
            total = sum(len(p) for _, _, p in work)
            seconds = max(ends) - first[0]
            cpu = {k: round(after[k] - before[k], 2) for k in after}
            return {"envelopes_per_s": round(total / seconds, 1), "envelopes": total,
                    "seconds": round(seconds, 3), "cloud_cpu_s": cpu["cloud"],
                    "cpu_s_during_run": cpu,
                    "cpu_us_per_envelope": {k: round(v / total * 1e6) for k, v in cpu.items()}}
        except BaseException:
            _show_logs(root)
            raise
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--window", type=int, default=80, help="unacknowledged items per device")
    ap.add_argument("--brokers", default="amqtt,mosquitto")
    ap.add_argument("--pool-workers", type=int, default=0,
                    help="the cloud's process pool (signature checks); "
                         "0 = one per core, as `ciphertwin cloud` runs by default")
    ap.add_argument("--devices-via", choices=("raw", "bus"), default="raw",
                    help="raw: bare MQTT connections (cheap); bus: one BusClient per device")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configure_logging(level="WARNING")  # logs to stderr: stdout carries only the result
    results = {b: asyncio.run(run(b, args.items, args.devices, args.window, args.devices_via,
                                  args.pool_workers))
               for b in args.brokers.split(",")}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"ingest: {args.items} envelopes from {args.devices} devices, one cloud process")
    print(f"{'broker':<10} {'envelopes/s':>12} {'must':>7} {'aim':>7}   CPU µs per envelope")
    for b, r in results.items():
        must, aim = TARGETS[b]
        cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_us_per_envelope"].items())  # type: ignore[attr-defined]
        print(f"{b:<10} {r['envelopes_per_s']:>12,.0f} {must:>7,} {aim:>7,}   {cpu}")


if __name__ == "__main__":
    main()
