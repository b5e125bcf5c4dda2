"""``ciphertwin demo contact-tracing``: registered by the lead's ``demo/cli.py`` via
:func:`add_contact_tracing`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ciphertwin.demo.cli import broker_address
from ciphertwin.errors import ValidationError


def add_contact_tracing(demo_subparsers: Any) -> None:
    p = demo_subparsers.add_parser(
        "contact-tracing", help="2+, 3+ and 6+ end to end: MPC contact tracing over MQTT")
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--key-epochs", type=int, default=50,
                   help="distinct data keys per user (1 = one per day)")
    p.add_argument("--radius", type=float, default=5.0, help="metres")
    p.add_argument("--rtt-ms", type=float, default=30.0,
                   help="round-trip time imposed on node-to-node frames (bus-layer delay)")
    p.add_argument("--broker", default="embedded", help="embedded or mqtt://host:port (open)")
    p.add_argument("--paths", type=Path,
                   help="CSV user,time,lat,lon (time ISO-8601 with offset/Z or Unix seconds) or "
                        "user,epoch,x,y (epoch = Unix minute, metres); any order, gaps allowed")
    p.add_argument("--reference", type=Path,
                   help="CSV time,lat,lon or epoch,x,y of the reference path")
    p.add_argument("--origin", help="LAT,LON the phones project lat/lon around "
                                    "(default: the mean of the reference path)")
    p.add_argument("--replay", action="store_true",
                   help="move every reading by whole days so the last one is recent "
                        "(the cloud refuses items more than 366 days old)")
    p.add_argument("--epoch-s", type=int, default=60,
                   help="epoch length in seconds (epochs start at whole multiples in UTC)")
    p.add_argument("--window", type=int, default=0,
                   help="a contact may be up to this many epochs apart (default 0: same epoch)")
    p.add_argument("--repeat", action="store_true", help="run the job twice (cache effect)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run)


def _origin(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise ValidationError(f"--origin must be LAT,LON in degrees, got {text!r}") from None
    return lat, lon


async def _run(args: argparse.Namespace) -> int:
    from ciphertwin.demo.contact_tracing import format_report, load_paths, run_demo
    from ciphertwin.log import configure_logging

    if args.log_level == "INFO":
        configure_logging(json=args.log_json, level="WARNING")
    broker = broker_address(args.broker)
    if (args.paths is None) != (args.reference is None):
        raise SystemExit("--paths and --reference go together")
    if not 1 <= args.users <= 100_000 or not 1 <= args.points <= 1440:
        raise SystemExit("--users 1..100000, --points 1..1440")
    if not 1 <= args.epoch_s <= 86_400 or not 0 <= args.window <= 1440:
        raise SystemExit("--epoch-s 1..86400, --window 0..1440")
    if args.origin is not None and args.paths is None:
        raise SystemExit("--origin goes with --paths/--reference")
    origin = _origin(args.origin) if args.origin else None  # errors: one line, exit 2
    paths = load_paths(args.paths, args.reference, origin=origin) if args.paths else None
    report = await run_demo(users=args.users, points=args.points, key_epochs=args.key_epochs,
                            radius=args.radius, rtt_ms=args.rtt_ms, broker=broker,
                            paths=paths, repeat=args.repeat, replay=args.replay,
                            epoch_s=args.epoch_s, window=args.window)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.checked else 1
