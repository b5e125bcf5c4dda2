"""Ingest throughput: envelopes per second stored (committed and acknowledged) by ONE cloud
process, fed by many simulated devices, over the embedded amqtt broker and over Mosquitto.

The cloud runs as its own process (`ciphertwin cloud`), the embedded broker too
(`ciphertwin broker`); this process plays the devices. Items are sealed and signed in advance
(device cost is not what is measured), then every device publishes with a window of
unacknowledged items, as the real device agent does. The clock runs from the first publish
to the last acknowledgement — an ack is sent only after the SQLite commit.

    python benchmarks/ingest.py [--items 20000] [--devices 10] [--window 80] [--json]
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
from ciphertwin.crypto.epochs import DataKeyManager
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.log import configure_logging
from ciphertwin.protocol.items import DeviceCredentials, build_item

TARGETS = {"amqtt": (1000, 5000), "mosquitto": (2000, 5000)}  # (must, aim) envelopes/s


def _deployment(root: Path, port: int, prefix: str) -> Path:
    path = root / "deployment.toml"
    path.write_text(f'[broker]\nport = {port}\nprefix = "{prefix}"\nopen = true\n'
                    f'[storage]\nsqlite_path = "cloud.sqlite"\n'
                    f'[principals]\ncredentials_file = "clients.json"\n')
    return path


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    prof = ["-m", "cProfile", "-o", f"/tmp/prof-{args[0]}.out"] if os.environ.get("CT_PROFILE") else []
    return subprocess.Popen([sys.executable, *prof, "-m", "ciphertwin.cli", "--log-level", "WARNING",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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


async def run(broker: str, items: int, devices: int, window: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ct-ingest-") as tmp:
        root = Path(tmp)
        prefix = f"bench-{secrets.token_hex(4)}/v1"
        port = 1883 if broker == "mosquitto" else free_port()
        config = _deployment(root, port, prefix)
        procs = []
        if broker == "amqtt":
            procs.append(_spawn("broker", "--config", str(config)))
        try:
            await _wait_port(port)
            procs.append(_spawn("cloud", "--config", str(config), "--workers", "1"))
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
            ends = await asyncio.gather(*(
                _device("127.0.0.1", port, prefix, twin, name, payloads, window, first)
                for twin, name, payloads in work))
            total = sum(len(p) for _, _, p in work)
            seconds = max(ends) - first[0]
            return {"envelopes_per_s": round(total / seconds, 1), "envelopes": total,
                    "seconds": round(seconds, 3), "cloud_cpu_s": _cpu_seconds(procs[-1].pid)}
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
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configure_logging(level="WARNING")  # logs to stderr: stdout carries only the result
    results = {b: asyncio.run(run(b, args.items, args.devices, args.window))
               for b in args.brokers.split(",")}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"ingest: {args.items} envelopes from {args.devices} devices, one cloud process")
    print(f"{'broker':<10} {'envelopes/s':>12} {'must':>7} {'aim':>7}")
    for b, r in results.items():
        must, aim = TARGETS[b]
        print(f"{b:<10} {r['envelopes_per_s']:>12,.0f} {must:>7,} {aim:>7,}")


if __name__ == "__main__":
    main()
