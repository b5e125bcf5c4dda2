"""Soak: devices stream while the broker and the cloud are SIGKILLed and restarted at random.

    python benchmarks/soak.py --minutes 10 [--broker embedded|mosquitto] [--json]

A real deployment of separate processes (the fault lab of ``tests/faults/harness.py``: a
broker, the cloud with its worker pool, three device agents fed by a counting sensor) runs for
``--minutes``; at random intervals the broker, the cloud or both are killed with SIGKILL and
started again after a random outage (short ones of a few seconds and long ones of 20-35 s).
At the end the sensors stop, everything is drained, and every item is counted exactly by
(device, seq) and (device, counter): in the devices' outboxes, in the cloud's store, and read
back through the owner's history query.

Printed (and in ``--json`` with the target beside each): items generated / sent / stored /
readable, lost, duplicated, the longest stall (longest gap between consecutive stored items
while the devices were producing — outages included), the longest device resume after a
broker (and after a cloud) return, peak RSS of every process (sampled from /proc VmHWM/VmRSS,
pool workers and sensor commands included), the number of kills, and processes that outlived
their service. Targets: 0 lost, 0 duplicated, resume <= 5 s, no orphans.

The schedule uses ``random`` with ``--seed`` (reproducible; nothing here is secret).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "faults"), str(ROOT / "tests")]

from harness import RESUME_TARGET_S, Lab, Service  # noqa: E402


class Sampler(threading.Thread):
    """Samples every process's memory twice a second while the soak runs."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab, self.done = lab, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                self.lab.sample_rss()
            except Exception:  # noqa: BLE001 - a process vanished mid-read: next sample
                pass


def _outage_length(rng: random.Random, what: str) -> float:
    if what == "cloud":
        return rng.uniform(0.5, 8.0)
    return rng.uniform(20.0, 35.0) if rng.random() < 0.3 else rng.uniform(0.5, 5.0)


def _fault(lab: Lab, rng: random.Random, log: list[dict[str, Any]], quiet: bool) -> None:
    """Kill the broker, the cloud or both; restart after an outage; measure the resume."""
    what = rng.choices(["broker", "cloud", "both"], weights=[5, 4, 1])[0]
    victims: list[Service] = ([lab.broker] if what == "broker" else [lab.cloud]
                              if what == "cloud" else [lab.broker, lab.cloud])
    down = _outage_length(rng, "broker" if what != "cloud" else "cloud")
    killed = time.time()
    for s in victims:
        s.kill()
        lab.event(f"{s.name} killed")
    time.sleep(down)
    for s in [lab.broker, lab.cloud]:  # broker first: the cloud connects to it
        if s in victims:
            s.start(wait=60)
    back = lab.event(f"{what} back")
    try:
        resumed: dict[str, float] | None = lab.wait_resumed(back, 60)
    except TimeoutError:
        resumed = None
    entry = {"at_s": round(killed - lab.events[0][0], 1), "killed": what,
             "outage_s": round(down, 1),
             "resume_s": ({d: round(v, 2) for d, v in resumed.items()} if resumed else None)}
    log.append(entry)
    if not quiet:
        print(f"  {entry['at_s']:7.1f} s  SIGKILL {what:6}  down {down:5.1f} s  resume "
              f"{max(resumed.values()) if resumed else 'NONE within 60 s'}", flush=True)


def _longest_gap(times: list[float], start: float, end: float) -> float:
    edges = [start, *sorted(t for t in times if start <= t <= end), end]
    return max((b - a for a, b in zip(edges, edges[1:], strict=False)), default=0.0)


def soak(minutes: float, broker: str, rate: float, devices: int, seed: int, workdir: Path,
         quiet: bool) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - a fault schedule, not a secret
    lab = Lab(workdir, broker=broker, devices=devices, rate=rate)
    sampler = Sampler(lab)
    faults: list[dict[str, Any]] = []
    try:
        lab.build()
        sampler.start()
        start = lab.event("soak started")
        end = start + minutes * 60
        if not quiet:
            print(f"soak: {broker} broker, {devices} devices x {rate:g}/s, {minutes:g} min, "
                  f"seed {seed}; lab in {workdir}", flush=True)
        while True:
            pause = rng.uniform(8.0, 25.0)
            if time.time() + pause + 10 > end:
                break
            time.sleep(pause)
            _fault(lab, rng, faults, quiet)
        time.sleep(max(0.0, end - time.time()))
        producing_until = lab.event("soak ending")
        drained = True
        try:
            lab.finish(180)
        except TimeoutError as exc:
            drained = False
            if not quiet:
                print(f"  NOT DRAINED: {exc}", flush=True)
        counts = lab.counts()
        stored_times = [t for _, _, t in lab.stored_rows()]
        sampler.done.set()
        sampler.join()
        lab.sample_rss()
        orphans = lab.stop_all()
    finally:
        sampler.done.set()
        lab.close()
    broker_resumes = [max(f["resume_s"].values()) if f["resume_s"] else None
                      for f in faults if f["killed"] != "cloud"]
    cloud_resumes = [max(f["resume_s"].values()) if f["resume_s"] else None
                     for f in faults if f["killed"] == "cloud"]

    def longest(values: list[float | None]) -> float | str | None:
        """None: no such fault happened; "never": a device did not resume within 60 s."""
        if not values:
            return None
        if any(v is None for v in values):
            return "never"
        return max(values)  # type: ignore[type-var, arg-type]

    worst_broker = longest(broker_resumes)
    c = counts.as_dict()
    return {
        "broker": broker, "minutes": minutes, "devices": devices, "rate_per_device": rate,
        "seed": seed,
        "generated": c["generated"], "sent": c["committed"], "stored": c["stored"],
        "readable": c["readable"], "dropped_at_source": c["dropped_at_source"],
        "drained": drained,
        "lost": {"value": c["lost"], "target": 0},
        "duplicated": {"value": c["duplicated"], "target": 0},
        "longest_stall_s": round(_longest_gap(stored_times, start, producing_until), 2),
        "longest_resume_after_broker_s": {"value": worst_broker, "target": RESUME_TARGET_S},
        "longest_resume_after_cloud_s": longest(cloud_resumes),
        "kills": {s.name: s.kills for s in (lab.broker, lab.cloud)},
        "peak_rss_mb": {s.name: {role: round(k / 1024, 1) for role, k in s.peak_rss_kb.items()}
                        for s in lab.services},
        "orphans": {"value": len(orphans), "target": 0, "detail": orphans},
        "faults": faults,
        "per_device": c["per_device"],
    }


def _ok(r: dict[str, Any]) -> bool:
    resume = r["longest_resume_after_broker_s"]["value"]
    resumed = resume is None or (resume != "never" and resume <= RESUME_TARGET_S)
    return (r["lost"]["value"] == 0 and r["duplicated"]["value"] == 0 and r["drained"]
            and resumed and r["orphans"]["value"] == 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    p.add_argument("--rate", type=float, default=20.0, help="readings per second per device")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random)")
    p.add_argument("--workdir", help="lab folder (default: a fresh temporary one, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="ct-soak-")
    workdir = Path(args.workdir or tmp)  # type: ignore[arg-type]
    try:
        r = soak(args.minutes, args.broker, args.rate, args.devices, seed, workdir, args.json)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        resume = r["longest_resume_after_broker_s"]["value"]
        print(f"generated {r['generated']}  sent {r['sent']}  stored {r['stored']}  "
              f"readable {r['readable']}  (dropped at source {r['dropped_at_source']})")
        print(f"lost {r['lost']['value']} (target 0)  duplicated {r['duplicated']['value']} "
              f"(target 0)  drained {r['drained']}")
        cloud = r["longest_resume_after_cloud_s"]
        print(f"longest stall {r['longest_stall_s']} s (outages included); longest resume "
              f"after a broker return {'n/a' if resume is None else resume} s "
              f"(target <= {RESUME_TARGET_S:g}); after a cloud return "
              f"{'n/a' if cloud is None else cloud} s")
        print(f"kills {r['kills']}  orphans {r['orphans']['value']} (target 0)")
        for name, roles in r["peak_rss_mb"].items():
            print(f"peak RSS {name}: " + ", ".join(f"{k} {v} MB" for k, v in roles.items()))
        print("PASS" if _ok(r) else "FAIL")
    return 0 if _ok(r) else 1


if __name__ == "__main__":
    sys.exit(main())
