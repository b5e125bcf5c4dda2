"""`ciphertwin demo …`: one-command demonstrations on the embedded broker."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import urlparse


def broker_address(text: str) -> tuple[str, int] | None:
    """``--broker`` of a demo: None for ``embedded``, else (host, port) of ``mqtt://host:port``."""
    if text == "embedded":
        return None
    url = urlparse(text)
    if url.scheme != "mqtt" or not url.hostname:
        raise SystemExit("--broker must be 'embedded' or mqtt://host:port")
    return (url.hostname, url.port or 1883)


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser("demo", help="run a self-checking demonstration")
    kinds = demo.add_subparsers(dest="demo", metavar="DEMO", required=True)
    twin = kinds.add_parser("twin", help="sync, share a subset, revoke — on the embedded broker")
    twin.add_argument("--readings", type=int, default=20, help="readings per device")
    twin.add_argument("--json", action="store_true", help="print a JSON report")
    twin.add_argument("--broker", default="embedded",
                      help="embedded (default) or mqtt://host:port of an open broker")
    twin.set_defaults(func=_twin)
    interact = kinds.add_parser("interact", help="desired/reported state, requests, gatekeeper "
                                                 "(access, approvals, clamp, simulator)")
    interact.add_argument("--json", action="store_true", help="print a JSON report")
    interact.add_argument("--broker", default="embedded",
                          help="embedded (default) or mqtt://host:port of an open broker")
    interact.add_argument("--window", type=float, default=3.0,
                          help="the device's awake window (s)")
    interact.add_argument("--sleep", type=float, default=3.0,
                          help="the device's sleep between windows (s)")
    interact.set_defaults(func=_interact)
    try:
        from ciphertwin.demo.ct_cli import add_contact_tracing
    except ModuleNotFoundError:  # the processing demo is optional until it lands
        return
    add_contact_tracing(kinds)


def _quiet(args: argparse.Namespace) -> None:
    """A demo prints a report; service chatter only on request (--log-level)."""
    from ciphertwin.log import configure_logging

    if args.log_level == "INFO":
        configure_logging(json=args.log_json, level="WARNING")


def _print(report: Any, as_json: bool, title: str | None = None) -> int:
    from ciphertwin.demo.twin import print_report

    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print_report(report, *([title] if title else []))
    return 0 if report.ok else 1


async def _interact(args: argparse.Namespace) -> int:
    from ciphertwin.demo.interact import TITLE, run_demo

    _quiet(args)
    if not (0.5 <= args.window <= 600 and 0.5 <= args.sleep <= 600):
        raise SystemExit("--window and --sleep must be within 0.5..600 s")
    report = await run_demo(broker_address(args.broker), window_s=args.window,
                            sleep_s=args.sleep)
    return _print(report, args.json, TITLE)


async def _twin(args: argparse.Namespace) -> int:
    from ciphertwin.demo.twin import run_demo

    _quiet(args)
    if not 1 <= args.readings <= 10_000:
        raise SystemExit("--readings must be within 1..10000")
    external = broker_address(args.broker)
    report = await run_demo(args.readings, external)
    return _print(report, args.json)
