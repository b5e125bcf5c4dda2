"""A counting sensor for fault tests: `{"kind": "command"}` source of `ciphertwin device run`.

Prints one JSON reading per line at a steady rate; each carries a per-device counter ``n``
that continues across restarts (every counter is appended to ``--log`` *before* its line is
written, so a counter is never used twice even if the sensor is killed in between; a line the
pipe refused — the agent had died — is marked ``!n``), so every reading the sensor ever
produced is identifiable in the twin's history. Stops (exit 0, so the
device sees end of input) when ``--stop`` exists.

    python sensor.py --log DIR/d1.sensor --rate 20 --stop DIR/stop [--pad 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _last_counter(path: str) -> int:
    try:
        with open(path, "rb") as f:
            lines = f.read().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1].lstrip(b"!")) if lines else 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True, help="file of counters produced (one per line)")
    p.add_argument("--rate", type=float, default=20.0, help="readings per second")
    p.add_argument("--stop", required=True, help="stop (exit 0) once this file exists")
    p.add_argument("--pad", type=int, default=0, help="bytes of filler per reading (<= 3000)")
    args = p.parse_args()
    n = _last_counter(args.log)
    # filler split into <= 256-character string values (a reading's limit per string)
    pad = {f"p{i}": "x" * min(256, args.pad - 256 * i) for i in range((args.pad + 255) // 256)}
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    period, start, k = 1.0 / args.rate, time.monotonic(), 0
    while not os.path.exists(args.stop):
        n += 1
        line = json.dumps({"type": "counter", "values": {"n": n, **pad}})
        log.write(f"{n}\n")
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the device agent died: this line was never delivered
            log.write(f"!{n}\n")
            return 1
        k += 1
        delay = start + k * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:  # fell behind (CPU starved): keep the rate, do not burst to catch up
            start, k = time.monotonic(), 0
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
